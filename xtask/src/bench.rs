//! `cargo xtask bench`: every performance goal measured side by side with its
//! anchor in one run, as one table.
//!
//! - `--quick`: smaller sizes and criterion's quick mode (under 10 minutes on
//!   two cores); the table's header says which sizes were used.
//! - `--only PREFIX`: only the rows whose name starts with `PREFIX` (`core.`,
//!   `ssh.`, `zmq.`, `cluster.`, `fair.`, `mem.`, or longer); harnesses with no
//!   selected row are skipped, and `docs/src/benchmarks.md` is left alone.
//! - `--json FILE`: the table as JSON as well.
//!
//! Installs what the harnesses need (`setup`: sshd, nats-server, the python
//! venv), then runs `flowctl-bench`'s `bench-report` binary in release mode,
//! which holds the logic (it may have dependencies; xtask has none). It
//! prints the table and writes `docs/src/benchmarks.md`. A missed goal is a
//! FAIL row, not an error: the exit status is non-zero only when a harness
//! fails to run.

use std::path::{Path, PathBuf};

use crate::setup;
use crate::util::{Args, cargo, run as run_cmd};

/// Runs setup, then `cargo run --release -p flowctl-bench --bin bench-report -- <args>`.
pub(crate) fn run(mut args: Args) -> Result<(), String> {
    let quick = args.flag("--quick");
    let only = args.value("--only")?;
    let json = args.value("--json")?;
    args.finish()?;
    // bench-report runs in the workspace root: make a relative path the
    // caller's.
    let cwd = std::env::current_dir().map_err(|e| format!("current directory: {e}"))?;
    let json = json.map(|j| (absolute(&cwd, &j), j));
    let facts = setup::run()?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "flowctl-bench",
        "--bin",
        "bench-report",
        "--",
    ]);
    let json = json
        .as_ref()
        .map(|(path, typed)| (path.as_path(), typed.as_str()));
    cmd.args(report_args(quick, only.as_deref(), json));
    facts.apply(&mut cmd);
    run_cmd(&mut cmd)
}

fn absolute(cwd: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    }
}

/// The arguments of `bench-report`, including the command line the report
/// shows (as the user typed it). `json` is (absolute path, path as typed).
fn report_args(quick: bool, only: Option<&str>, json: Option<(&Path, &str)>) -> Vec<String> {
    let mut shown = vec!["cargo xtask bench".to_owned()];
    let mut out = Vec::new();
    if quick {
        shown.push("--quick".to_owned());
        out.push("--quick".to_owned());
    }
    if let Some(only) = only {
        shown.push(format!("--only {only}"));
        out.extend(["--only".to_owned(), only.to_owned()]);
    }
    if let Some((path, typed)) = json {
        shown.push(format!("--json {typed}"));
        out.extend(["--json".to_owned(), path.display().to_string()]);
    }
    out.extend(["--command".to_owned(), shown.join(" ")]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_options_and_the_command_line() {
        assert_eq!(
            report_args(true, Some("zmq."), Some((Path::new("/w/b.json"), "b.json"))),
            [
                "--quick",
                "--only",
                "zmq.",
                "--json",
                "/w/b.json",
                "--command",
                "cargo xtask bench --quick --only zmq. --json b.json"
            ]
        );
        assert_eq!(
            report_args(false, None, None),
            ["--command", "cargo xtask bench"]
        );
    }

    #[test]
    fn json_path_is_the_callers() {
        let cwd = Path::new("/home/u/flowctl/docs");
        assert_eq!(
            absolute(cwd, "out.json"),
            PathBuf::from("/home/u/flowctl/docs/out.json")
        );
        assert_eq!(absolute(cwd, "/tmp/b.json"), PathBuf::from("/tmp/b.json"));
    }
}
