//! `cargo xtask docs`: builds the API documentation of every crate with
//! rustdoc warnings (broken intra-doc links, bad code blocks) denied.
//!
//! The mdBook site in `docs/` is not built here yet.

use crate::util::{append_flags, cargo, run as run_cmd};

/// Runs `cargo doc --workspace --no-deps --all-features` with `-D warnings`.
pub(crate) fn run() -> Result<(), String> {
    run_cmd(
        cargo()
            .env("RUSTDOCFLAGS", append_flags("RUSTDOCFLAGS", "-D warnings"))
            .args(["doc", "--workspace", "--no-deps", "--all-features"]),
    )
}
