//! `cargo xtask test`: everything CI checks, in the order that fails fastest
//! on the cheapest mistakes while reusing the build cache.
//!
//! Steps: setup, nextest (the whole workspace, with the newest nats-server of
//! the matrix), the flowctl-cluster suite again with Debian's nats-server
//! (the oldest supported release), doctests, loom, clippy (also flowctl-ssh
//! with each backend alone), fmt, docs. Each
//! prints a `==> step` header and its duration; the first failure stops the
//! run and is named in the error. A summary of durations ends every run.
//!
//! `--nats all|newest|debian|VERSION,...` (or `FLOWCTL_NATS_SERVERS=...`)
//! runs only the flowctl-cluster suite, once per selected server (see
//! `setup::NATS_SERVERS`), and reports each; it goes on after a failing
//! server so the summary shows the whole matrix.
//!
//! nextest does not run doctests, hence the separate `cargo test --doc` step.
//! With `CI=true` nextest uses the `ci` profile of `.config/nextest.toml`
//! (no fail-fast, no retries, slow tests killed); otherwise the `default` one.
//! The test steps get the `FLOWCTL_*` variables from [`setup::Facts`].

use std::env;
use std::time::{Duration, Instant};

use crate::setup::{self, Facts, NatsServer};
use crate::util::{Args, cargo, run as run_cmd};
use crate::{docs, loom};

/// Runs every step, or the cluster matrix; see the module docs.
pub(crate) fn run(mut args: Args) -> Result<(), String> {
    let nats = match args.value("--nats")? {
        Some(selection) => Some(selection),
        None => env::var("FLOWCTL_NATS_SERVERS")
            .ok()
            .filter(|s| !s.trim().is_empty()),
    };
    args.finish()?;
    let mut steps = Steps::default();
    let result = match nats {
        None => all(&mut steps),
        Some(selection) => matrix(&mut steps, &selection),
    };
    steps.summary();
    result
}

fn all(steps: &mut Steps) -> Result<(), String> {
    let facts = steps.step("setup".into(), setup::run)?;
    let newest = facts.newest().ok_or("setup found no nats-server")?.clone();
    steps.step(format!("nextest (nats {})", newest.version), || {
        let mut cmd = cargo();
        cmd.args(["nextest", "run", "--workspace", "--all-features"]);
        if in_ci() {
            cmd.args(["--profile", "ci"]);
        }
        facts.with_nats(&newest).apply(&mut cmd);
        run_cmd(&mut cmd)
    })?;
    for server in facts.nats_servers.iter().filter(|s| s.debian) {
        steps.step(cluster_step(server), || cluster_suite(&facts, server))?;
    }
    steps.step("doctests".into(), || {
        let mut cmd = cargo();
        cmd.args(["test", "--workspace", "--doc", "--all-features"]);
        facts.apply(&mut cmd);
        run_cmd(&mut cmd)
    })?;
    steps.step("loom".into(), loom::run)?;
    steps.step("clippy".into(), || {
        run_cmd(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]))?;
        // flowctl-ssh's backends build alone too (test builds always enable
        // both, through the crate's dev-dependency on itself).
        for backend in ["russh", "openssh"] {
            run_cmd(cargo().args([
                "clippy",
                "-p",
                "flowctl-ssh",
                "--no-default-features",
                "--features",
                backend,
                "--",
                "-D",
                "warnings",
            ]))?;
        }
        Ok(())
    })?;
    steps.step("fmt".into(), || {
        run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    steps.step("docs".into(), docs::run)?;
    Ok(())
}

/// The flowctl-cluster suite once per selected server; every server runs,
/// and the error names the ones that failed.
fn matrix(steps: &mut Steps, selection: &str) -> Result<(), String> {
    let facts = steps.step("setup".into(), setup::run)?;
    let servers = setup::select(&facts.nats_servers, selection)?;
    let mut failed = Vec::new();
    for server in &servers {
        if steps
            .step(cluster_step(server), || cluster_suite(&facts, server))
            .is_err()
        {
            failed.push(server.version.clone());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the flowctl-cluster suite failed with nats-server {}",
            failed.join(", ")
        ))
    }
}

fn cluster_step(server: &NatsServer) -> String {
    let what = if server.debian { ", debian" } else { "" };
    format!("cluster (nats {}{what})", server.version)
}

/// `cargo nextest run -p flowctl-cluster --all-features` with `server` as
/// `FLOWCTL_NATS_SERVER`.
fn cluster_suite(facts: &Facts, server: &NatsServer) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args(["nextest", "run", "-p", "flowctl-cluster", "--all-features"]);
    if in_ci() {
        cmd.args(["--profile", "ci"]);
    }
    facts.with_nats(server).apply(&mut cmd);
    run_cmd(&mut cmd)
}

/// True when the `CI` environment variable says so (`true` or `1`).
fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The steps run so far, with their durations and outcomes.
#[derive(Debug, Default)]
struct Steps {
    done: Vec<(String, Duration, bool)>,
}

impl Steps {
    fn step<T>(
        &mut self,
        name: String,
        body: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        println!("==> {name}");
        let start = Instant::now();
        let result = body();
        let elapsed = start.elapsed();
        self.done.push((name.clone(), elapsed, result.is_ok()));
        match result {
            Ok(value) => {
                println!("==> {name}: ok in {}", secs(elapsed));
                Ok(value)
            }
            Err(e) => Err(format!("step `{name}` failed after {}: {e}", secs(elapsed))),
        }
    }

    fn summary(&self) {
        println!("==> summary");
        let mut total = Duration::ZERO;
        for (name, elapsed, ok) in &self.done {
            total += *elapsed;
            let outcome = if *ok { "ok" } else { "FAILED" };
            println!("    {name:<30} {:>8}  {outcome}", secs(*elapsed));
        }
        println!("    {:<30} {:>8}", "total", secs(total));
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
