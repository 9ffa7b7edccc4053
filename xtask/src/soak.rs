//! `cargo xtask soak`: the project's main job. Installs what the scenarios
//! need (`setup`), then runs the `flowctl-soak` binary in release mode with the
//! options given here, passed through unchanged:
//!
//! - `--duration D`: total run time, split between scenarios (`90s`, `10m`, `1h`; default 60s).
//! - `--seed N`: seed of the fault schedule, printed at start so a run can be repeated.
//! - `--scenario NAME[,NAME]`: `all` (default) or a list.
//! - `--json FILE`, `--plot DIR`: the report as JSON, charts as SVG.
//! - `--metrics 127.0.0.1:PORT`: serve every stage's metrics in the Prometheus
//!   text format at `/metrics` while the soak runs (`--linger`: until stdin closes).
//!
//! The local NATS cluster of the `cluster` and `pipeline` scenarios runs the
//! newest nats-server of the matrix (`setup::NATS_SERVERS`). `--nats
//! all|newest|debian|VERSION,...` selects servers instead: the soak runs
//! once per server, with `--scenario cluster,pipeline` unless a scenario is
//! given, and `--json`/`--plot` get the version in their name. A `--nats`
//! value that is not a selection (a URL list: an external cluster) is passed
//! through to `flowctl-soak`.
//!
//! The scenarios, invariants and report live in `flowctl-soak/`; this module
//! only prepares the machine and starts it. Release mode matters: the soak's
//! per-message checksums are CPU work on the runtime's thread, and a debug
//! build is slow enough to show up in the timer-lateness invariant.

use crate::setup::{self, NatsServer};
use crate::util::{Args, cargo, run as run_cmd};

/// Runs setup, then `cargo run --release -p flowctl-soak -- <args>` once,
/// or once per selected server.
pub(crate) fn run(mut args: Args) -> Result<(), String> {
    let nats = args.value("--nats")?;
    let (selection, external) = match nats {
        Some(n) if setup::is_selection(&n) => (Some(n), None),
        other => (None, other),
    };
    let mut passthrough = args.into_rest();
    if let Some(urls) = external {
        passthrough.extend(["--nats".to_owned(), urls]);
    }
    let facts = setup::run()?;
    let Some(selection) = selection else {
        return soak_once(&facts, None, &passthrough);
    };
    let servers = setup::select(&facts.nats_servers, &selection)?;
    if !passthrough.iter().any(|a| a.starts_with("--scenario")) {
        passthrough.extend(["--scenario".to_owned(), "cluster,pipeline".to_owned()]);
    }
    let mut failed = Vec::new();
    for server in &servers {
        println!("==> soak with nats-server {}", server.version);
        match soak_once(
            &facts,
            Some(server),
            &per_server(&passthrough, server, servers.len()),
        ) {
            Ok(()) => println!("==> soak with nats-server {}: ok", server.version),
            Err(e) => {
                println!("==> soak with nats-server {}: FAILED ({e})", server.version);
                failed.push(server.version.clone());
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the soak failed with nats-server {}",
            failed.join(", ")
        ))
    }
}

fn soak_once(
    facts: &setup::Facts,
    server: Option<&NatsServer>,
    args: &[String],
) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "flowctl-soak",
        "--",
    ]);
    cmd.args(args);
    match server {
        Some(s) => facts.with_nats(s).apply(&mut cmd),
        None => facts.apply(&mut cmd),
    }
    run_cmd(&mut cmd)
}

/// `args` with the server's version in the `--json` file and `--plot`
/// directory names when several servers run (`soak.json` becomes
/// `soak-2.15.1.json`, `plots` becomes `plots-2.15.1`).
fn per_server(args: &[String], server: &NatsServer, runs: usize) -> Vec<String> {
    if runs < 2 {
        return args.to_vec();
    }
    let tag = |path: &str| match path.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && !ext.contains('/') => {
            format!("{stem}-{}.{ext}", server.version)
        }
        _ => format!("{path}-{}", server.version),
    };
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" | "--plot" => {
                out.push(arg.clone());
                if let Some(path) = it.next() {
                    out.push(tag(path));
                }
            }
            _ => match arg.split_once('=') {
                Some((flag @ ("--json" | "--plot"), path)) => {
                    out.push(format!("{flag}={}", tag(path)))
                }
                _ => out.push(arg.clone()),
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn several_runs_get_their_own_report_files() {
        let server = NatsServer {
            version: "2.15.1".into(),
            bin: PathBuf::from("/x"),
            debian: false,
        };
        let args: Vec<String> = ["--json", "out/soak.json", "--plot=plots", "--seed", "7"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            per_server(&args, &server, 2),
            [
                "--json",
                "out/soak-2.15.1.json",
                "--plot=plots-2.15.1",
                "--seed",
                "7"
            ]
        );
        assert_eq!(per_server(&args, &server, 1), args);
    }
}
