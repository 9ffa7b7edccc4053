//! Building and running the transport harnesses (release examples of the
//! sibling crates) and reading their `BENCH {json}` lines.
//!
//! A harness prints its human output as before and, with
//! `FLOWCTL_BENCH_JSON=1`, one line per measurement:
//!
//! ```text
//! BENCH {"name":"ssh.aes128-gcm","side":"flowctl","round":0,"value":212.5,"unit":"MB/s"}
//! ```
//!
//! `side` is `flowctl`, `anchor`, or `baseline` (context only); `round`
//! pairs a flowctl figure with the anchor figure measured next to it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::rows::Sample;

/// The prefix of a machine-readable line.
pub(crate) const BENCH_PREFIX: &str = "BENCH ";

/// Builds one example of a package in release mode and returns its path.
pub(crate) fn build_example(
    cargo: &Path,
    root: &Path,
    package: &str,
    example: &str,
) -> Result<PathBuf, String> {
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args([
        "build",
        "--release",
        "--message-format=json-render-diagnostics",
        "-p",
        package,
        "--example",
        example,
    ]);
    println!("$ cargo build --release -p {package} --example {example}");
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building example {example} of {package} failed ({})",
            out.status
        ));
    }
    executable_from_messages(&String::from_utf8_lossy(&out.stdout), example).ok_or_else(|| {
        format!("cargo built example {example} of {package} but named no executable")
    })
}

/// The executable of the example `name` in cargo's JSON messages.
pub(crate) fn executable_from_messages(stdout: &str, name: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "example"))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// Parses one `BENCH {json}` line (without checking the row name).
pub(crate) fn parse_bench_line(line: &str) -> Option<Result<Sample, String>> {
    let json = line.strip_prefix(BENCH_PREFIX)?;
    Some(parse_bench_json(json).map_err(|e| format!("malformed line `{line}`: {e}")))
}

fn parse_bench_json(json: &str) -> Result<Sample, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let text = |key: &str| {
        v[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no string `{key}`"))
    };
    Ok(Sample {
        name: text("name")?,
        side: text("side")?,
        round: v["round"].as_u64().unwrap_or(0) as usize,
        value: v["value"].as_f64().ok_or("no number `value`")?,
        unit: text("unit")?,
        bytes: v["bytes"].as_u64(),
    })
}

/// How to run one harness.
#[derive(Debug)]
pub(crate) struct Invocation<'a> {
    pub(crate) label: &'a str,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(&'static str, String)>,
    /// Killed (with everything it started) and reported as failed after this.
    pub(crate) timeout: Duration,
    /// Temporary directories `<tmp>/<prefix><pid>-*` the harness leaves
    /// behind when it is killed (removed afterwards).
    pub(crate) temp_prefix: Option<&'static str>,
}

/// Runs a harness to its end (killed after `timeout`) and returns
/// its samples; its human output is echoed, indented.
pub(crate) fn run(inv: &Invocation<'_>) -> Result<Vec<Sample>, String> {
    println!("$ {} {}", inv.program.display(), inv.args.join(" "));
    let mut cmd = Command::new(&inv.program);
    cmd.args(&inv.args)
        .env("FLOWCTL_BENCH_JSON", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in &inv.env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", inv.program.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + inv.timeout;
    let mut samples = Vec::new();
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(sample) = parse_bench_line(&line) {
                    match sample {
                        Ok(s) => samples.push(s),
                        Err(e) => break Err(e),
                    }
                } else {
                    println!("    {line}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill_tree(&mut child);
                break Err(format!("{} timed out after {:?}", inv.label, inv.timeout));
            }
        }
    };
    if result.is_err() {
        kill_tree(&mut child);
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {}: {e}", inv.label));
    let _ = reader.join();
    if let Some(prefix) = inv.temp_prefix {
        remove_temp_dirs(prefix, child.id());
    }
    result?;
    let status = status?;
    if !status.success() {
        return Err(format!("{} exited with {status}", inv.label));
    }
    Ok(samples)
}

/// Kills `child` and every process it started (found through
/// `/proc/<pid>/task/<tid>/children`), each by its pid.
fn kill_tree(child: &mut Child) {
    let descendants = descendants(child.id());
    let _ = child.kill();
    if !descendants.is_empty() {
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(descendants.iter().map(u32::to_string))
            .stderr(Stdio::null())
            .status();
    }
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if !out.contains(&c) {
                    out.push(c);
                    todo.push(c);
                }
            }
        }
    }
    out
}

fn remove_temp_dirs(prefix: &str, pid: u32) {
    let tmp = std::env::temp_dir();
    let mine = format!("{prefix}{pid}-");
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&mine) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bench_lines() {
        let s = parse_bench_line(
            r#"BENCH {"name":"ssh.aes128-gcm","side":"flowctl","round":1,"value":212.5,"unit":"MB/s","bytes":1024}"#,
        )
        .expect("a bench line")
        .expect("well formed");
        assert_eq!(
            (
                s.name.as_str(),
                s.side.as_str(),
                s.round,
                s.value,
                s.unit.as_str(),
                s.bytes
            ),
            ("ssh.aes128-gcm", "flowctl", 1, 212.5, "MB/s", Some(1024))
        );
        assert!(parse_bench_line("best of 3 rounds").is_none());
        assert!(
            parse_bench_line("BENCH {\"name\":1}")
                .expect("a bench line")
                .is_err()
        );
    }

    #[test]
    fn finds_the_example_executable() {
        let msgs = r#"{"reason":"compiler-artifact","target":{"name":"dep","kind":["lib"]},"executable":null}
{"reason":"compiler-artifact","target":{"name":"bench_zmq","kind":["example"]},"executable":"/t/release/examples/bench_zmq"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_messages(msgs, "bench_zmq"),
            Some(PathBuf::from("/t/release/examples/bench_zmq"))
        );
        assert_eq!(executable_from_messages(msgs, "other"), None);
    }
}
