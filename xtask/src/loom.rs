//! `cargo xtask loom`: runs the loom models of flowctl-core.
//!
//! The models live in `flowctl-core/tests/loom_gate.rs` (the gate and the
//! pipe) and `flowctl-core/tests/loom_offload.rs` (the ordered offload's
//! worker hand-off) and compile only under `--cfg flowctl_loom`, which swaps
//! core's sync primitives for loom's (and runs the offload's workers on loom
//! threads). That
//! flag changes every crate's fingerprint, so the build goes to its own
//! target directory (`target/loom`) and leaves the normal cache alone.
//! `LOOM_MAX_PREEMPTIONS=3` bounds the explored interleavings so the run
//! finishes in minutes; loom's docs recommend 2-3 for CI.

use crate::util::{append_flags, cargo, root, run as run_cmd};

/// The loom model files of flowctl-core, by test target name.
const MODELS: [&str; 2] = ["loom_gate", "loom_offload"];

/// Runs `cargo test -p flowctl-core --release --test loom_gate --test
/// loom_offload` under loom.
pub(crate) fn run() -> Result<(), String> {
    let root = root();
    for model in MODELS {
        let test_file = root.join(format!("flowctl-core/tests/{model}.rs"));
        if !test_file.is_file() {
            return Err(format!(
                "{} does not exist: the loom model `{model}` cannot run",
                test_file.display()
            ));
        }
    }
    let tests = MODELS.into_iter().flat_map(|m| ["--test", m]);
    run_cmd(
        cargo()
            .env("RUSTFLAGS", append_flags("RUSTFLAGS", "--cfg flowctl_loom"))
            .env("CARGO_TARGET_DIR", root.join("target").join("loom"))
            .env("LOOM_MAX_PREEMPTIONS", "3")
            .args(["test", "-p", "flowctl-core", "--release"])
            .args(tests),
    )
}
