//! `cargo xtask soak`: the project's main job. Installs what the scenarios
//! need (`setup`), then runs the `flowctl-soak` binary in release mode with the
//! options given here, passed through unchanged:
//!
//! - `--duration D`: total run time, split between scenarios (`90s`, `10m`, `1h`; default 60s).
//! - `--seed N`: seed of the fault schedule, printed at start so a run can be repeated.
//! - `--scenario NAME[,NAME]`: `all` (default) or a list.
//! - `--json FILE`, `--plot DIR`: the report as JSON, charts as SVG.
//!
//! The scenarios, invariants and report live in `flowctl-soak/`; this module
//! only prepares the machine and starts it. Release mode matters: the soak's
//! per-message checksums are CPU work on the runtime's thread, and a debug
//! build is slow enough to show up in the timer-lateness invariant.

use crate::setup;
use crate::util::{Args, cargo, run as run_cmd};

/// Runs setup, then `cargo run --release -p flowctl-soak -- <args>`.
pub(crate) fn run(args: Args) -> Result<(), String> {
    let passthrough = args.into_rest();
    let facts = setup::run()?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "flowctl-soak",
        "--",
    ]);
    cmd.args(&passthrough);
    facts.apply(&mut cmd);
    run_cmd(&mut cmd)
}
