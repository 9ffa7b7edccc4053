//! `cargo xtask loom`: runs the loom models of flowctl-core.
//!
//! The models live in `flowctl-core/tests/loom_gate.rs` and compile only under
//! `--cfg flowctl_loom`, which swaps core's sync primitives for loom's. That
//! flag changes every crate's fingerprint, so the build goes to its own
//! target directory (`target/loom`) and leaves the normal cache alone.
//! `LOOM_MAX_PREEMPTIONS=3` bounds the explored interleavings so the run
//! finishes in minutes; loom's docs recommend 2-3 for CI.

use crate::util::{append_flags, cargo, root, run as run_cmd};

/// Runs `cargo test -p flowctl-core --release --test loom_gate` under loom.
pub(crate) fn run() -> Result<(), String> {
    let root = root();
    let test_file = root.join("flowctl-core/tests/loom_gate.rs");
    if !test_file.is_file() {
        return Err(format!(
            "{} does not exist: there are no loom models to run",
            test_file.display()
        ));
    }
    run_cmd(
        cargo()
            .env("RUSTFLAGS", append_flags("RUSTFLAGS", "--cfg flowctl_loom"))
            .env("CARGO_TARGET_DIR", root.join("target").join("loom"))
            .env("LOOM_MAX_PREEMPTIONS", "3")
            .args([
                "test",
                "-p",
                "flowctl-core",
                "--release",
                "--test",
                "loom_gate",
            ]),
    )
}
