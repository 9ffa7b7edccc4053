//! `cargo xtask`: the project's automation, written in Rust so it runs
//! wherever cargo runs (see <https://github.com/matklad/cargo-xtask>).
//!
//! The alias `xtask = "run --package xtask --"` lives in `.cargo/config.toml`.
//! Each command is one module; [`util`] holds the shared helpers (running a
//! command, finding the workspace root, parsing flags). Cargo is always
//! invoked through `$CARGO`, so the toolchain that runs xtask also runs the
//! build.

mod bench;
mod browser;
mod docs;
mod linkcheck;
mod loom;
mod setup;
mod soak;
mod test;
mod util;

use std::process::ExitCode;

use util::Args;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  setup     install what this machine lacks (apt packages, python venv with
            pyzmq + asyncssh, cargo-nextest, the nats-server matrix in
            target/nats-servers); idempotent
  test      setup, then nextest (newest nats-server), the flowctl-cluster
            suite on Debian's nats-server, doctests, loom, clippy, fmt and docs;
            stops at the first failing step (CI=true selects the nextest `ci` profile)
              [--nats all|newest|debian|VERSION,...: only the flowctl-cluster
               suite, once per server; or FLOWCTL_NATS_SERVERS=...]
  loom      run the loom models of flowctl-core (flowctl-core/tests/loom_*.rs)
  soak      long-running failure scenarios (newest nats-server)
              [--duration D] [--seed N] [--json FILE] [--scenario NAME]
              [--metrics 127.0.0.1:PORT: serve every stage's metrics for Prometheus]
              [--nats all|newest|debian|VERSION,...: once per server,
               scenarios cluster,pipeline unless --scenario is given]
  bench     every performance goal measured against its anchor: table, JSON, docs/src/benchmarks.md
              [--quick] [--only PREFIX] [--json FILE]
  docs      API docs (rustdoc warnings denied), the mdBook site in target/book,
            its internal links and a headless chromium check of two pages
              [--serve: serve the book on 127.0.0.1:3000]
  help      print this message
";

fn main() -> ExitCode {
    let mut args = Args::from_env();
    let result = match args.subcommand().as_deref() {
        None | Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some("setup") => args.finish().and_then(|()| setup::run().map(drop)),
        Some("test") => test::run(args),
        Some("loom") => args.finish().and_then(|()| loom::run()),
        Some("soak") => soak::run(args),
        Some("bench") => bench::run(args),
        Some("docs") => docs::cli(args),
        Some(other) => Err(format!("unknown command `{other}`; run `cargo xtask help`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: error: {message}");
            ExitCode::FAILURE
        }
    }
}
