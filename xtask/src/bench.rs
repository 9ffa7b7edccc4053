//! `cargo xtask bench`: runs the criterion benchmarks of `flowctl-bench`.
//!
//! - `--quick`: criterion's quick mode (fewer samples), for a smoke run.
//! - `--only PREFIX`: only benchmarks whose id starts with `PREFIX`.
//! - `--json FILE`: reserved for the side-by-side report against the anchor
//!   figures (OpenSSH, libzmq, NATS); rejected until that harness exists.

use crate::util::{Args, cargo, run as run_cmd};

/// Runs `cargo bench -p flowctl-bench --benches [-- ^PREFIX --quick]`.
pub(crate) fn run(mut args: Args) -> Result<(), String> {
    let quick = args.flag("--quick");
    let only = args.value("--only")?;
    let json = args.value("--json")?;
    args.finish()?;
    if let Some(json) = json {
        return Err(format!(
            "--json {json}: the comparison report is not implemented yet"
        ));
    }

    let mut harness = Vec::new();
    if let Some(prefix) = only {
        // criterion treats its filter as a regex.
        harness.push(format!("^{}", regex_escape(&prefix)));
    }
    if quick {
        harness.push("--quick".to_owned());
    }
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "flowctl-bench", "--benches"]);
    if !harness.is_empty() {
        cmd.arg("--").args(harness);
    }
    run_cmd(&mut cmd)
}

fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if r"\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_regex_metacharacters() {
        assert_eq!(regex_escape("pipe/1.5"), r"pipe/1\.5");
    }
}
