//! `cargo xtask test`: everything CI checks, in the order that fails fastest
//! on the cheapest mistakes while reusing the build cache.
//!
//! Steps: setup, nextest, doctests, loom, clippy, fmt, docs. Each prints a
//! `==> step` header and its duration; the first failure stops the run and is
//! named in the error. A summary of durations ends every run.
//!
//! nextest does not run doctests, hence the separate `cargo test --doc` step.
//! With `CI=true` nextest uses the `ci` profile of `.config/nextest.toml`
//! (no fail-fast, no retries, slow tests killed); otherwise the `default` one.
//! The test steps get the `FLOWCTL_*` variables from [`setup::Facts`].

use std::env;
use std::time::{Duration, Instant};

use crate::util::{cargo, run as run_cmd};
use crate::{docs, loom, setup};

/// Runs every step; see the module docs.
pub(crate) fn run() -> Result<(), String> {
    let mut steps = Steps::default();
    let result = all(&mut steps);
    steps.summary();
    result
}

fn all(steps: &mut Steps) -> Result<(), String> {
    let facts = steps.step("setup", setup::run)?;
    steps.step("nextest", || {
        let mut cmd = cargo();
        cmd.args(["nextest", "run", "--workspace", "--all-features"]);
        if in_ci() {
            cmd.args(["--profile", "ci"]);
        }
        facts.apply(&mut cmd);
        run_cmd(&mut cmd)
    })?;
    steps.step("doctests", || {
        let mut cmd = cargo();
        cmd.args(["test", "--workspace", "--doc", "--all-features"]);
        facts.apply(&mut cmd);
        run_cmd(&mut cmd)
    })?;
    steps.step("loom", loom::run)?;
    steps.step("clippy", || {
        run_cmd(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    steps.step("fmt", || {
        run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    steps.step("docs", docs::run)?;
    Ok(())
}

/// True when the `CI` environment variable says so (`true` or `1`).
fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The steps run so far, with their durations and outcomes.
#[derive(Debug, Default)]
struct Steps {
    done: Vec<(&'static str, Duration, bool)>,
}

impl Steps {
    fn step<T>(
        &mut self,
        name: &'static str,
        body: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        println!("==> {name}");
        let start = Instant::now();
        let result = body();
        let elapsed = start.elapsed();
        self.done.push((name, elapsed, result.is_ok()));
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
            println!("    {name:<10} {:>8}  {outcome}", secs(*elapsed));
        }
        println!("    {:<10} {:>8}", "total", secs(total));
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
