//! The `core.*` rows: one round is one `cargo bench -p flowctl-bench --bench
//! core` run filtered to the benchmarks the selected rows compare; the
//! figures come from criterion's `<target>/criterion/**/new/estimates.json`
//! (the median time per iteration) and `benchmark.json` (the throughput per
//! iteration), and only from files written by that run.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::SystemTime;

use serde_json::Value;

/// One benchmark's figure: per second, in items or MiB.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Figure {
    pub(crate) per_second: f64,
    pub(crate) unit: &'static str,
}

/// Runs criterion once over `ids` (full ids such as
/// `pipe_vs_mpsc/flowctl_per_item/mt2`) and returns each one's figure.
pub(crate) fn run_round(
    cargo: &Path,
    root: &Path,
    target_dir: &Path,
    ids: &[&str],
    quick: bool,
) -> Result<BTreeMap<String, Figure>, String> {
    let started = SystemTime::now();
    let filter = id_regex(ids);
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args([
        "bench",
        "-p",
        "flowctl-bench",
        "--bench",
        "core",
        "--",
        "--noplot",
    ]);
    if quick {
        cmd.arg("--quick");
    }
    cmd.arg(&filter);
    println!(
        "$ cargo bench -p flowctl-bench --bench core -- --noplot{} '{filter}'",
        if quick { " --quick" } else { "" }
    );
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot start cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo bench failed ({status})"));
    }
    let found = read_estimates(&target_dir.join("criterion"), started)?;
    let mut out = BTreeMap::new();
    for id in ids {
        let fig = found.get(*id).copied().ok_or_else(|| {
            format!(
                "criterion wrote no estimate for {id} under {}",
                target_dir.join("criterion").display()
            )
        })?;
        out.insert((*id).to_owned(), fig);
    }
    Ok(out)
}

/// An anchored regex matching exactly these ids (criterion filters by regex).
pub(crate) fn id_regex(ids: &[&str]) -> String {
    let alternatives: Vec<String> = ids.iter().map(|id| regex_escape(id)).collect();
    format!("^(?:{})$", alternatives.join("|"))
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

/// Every `new/benchmark.json` under `dir` whose estimates were written at or
/// after `since`, by full id.
fn read_estimates(dir: &Path, since: SystemTime) -> Result<BTreeMap<String, Figure>, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| format!("reading {}: {e}", d.display()))?;
        for e in entries.flatten() {
            let path = e.path();
            if !path.is_dir() {
                continue;
            }
            if path.file_name().is_some_and(|n| n == "new") {
                let estimates = path.join("estimates.json");
                let fresh = std::fs::metadata(&estimates)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t >= since);
                if !fresh {
                    continue;
                }
                let read = |p: &Path| -> Result<Value, String> {
                    let text = std::fs::read_to_string(p)
                        .map_err(|e| format!("reading {}: {e}", p.display()))?;
                    serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", p.display()))
                };
                let bench = read(&path.join("benchmark.json"))?;
                let est = read(&estimates)?;
                if let Some((id, fig)) = figure(&bench, &est) {
                    out.insert(id, fig);
                }
            } else {
                todo.push(path);
            }
        }
    }
    Ok(out)
}

/// (full id, figure) from criterion's `benchmark.json` and `estimates.json`.
pub(crate) fn figure(bench: &Value, estimates: &Value) -> Option<(String, Figure)> {
    let id = bench["full_id"].as_str()?.to_owned();
    let ns = estimates["median"]["point_estimate"].as_f64()?;
    if ns <= 0.0 {
        return None;
    }
    let per_iter_s = ns * 1e-9;
    let t = &bench["throughput"];
    let fig = if let Some(n) = t["Elements"].as_f64() {
        Figure {
            per_second: n / per_iter_s,
            unit: "items/s",
        }
    } else if let Some(b) = t["Bytes"].as_f64().or_else(|| t["BytesDecimal"].as_f64()) {
        Figure {
            per_second: b / per_iter_s / (1024.0 * 1024.0),
            unit: "MiB/s",
        }
    } else {
        return None;
    };
    Some((id, fig))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_is_anchored_and_escaped() {
        assert_eq!(id_regex(&["a/b_c", "x.y"]), r"^(?:a/b_c|x\.y)$");
    }

    #[test]
    fn figure_from_criterion_files() {
        let bench = serde_json::json!({"full_id": "pipe_vs_duplex/flowctl", "throughput": {"Bytes": 67108864}});
        let est = serde_json::json!({"median": {"point_estimate": 1e9}});
        let (id, fig) = figure(&bench, &est).expect("a figure");
        assert_eq!(id, "pipe_vs_duplex/flowctl");
        assert_eq!(
            fig,
            Figure {
                per_second: 64.0,
                unit: "MiB/s"
            }
        );
        let bench = serde_json::json!({"full_id": "g/f", "throughput": {"Elements": 100000}});
        let est = serde_json::json!({"median": {"point_estimate": 1e7}});
        assert_eq!(figure(&bench, &est).expect("a figure").1.per_second, 1e7);
    }
}
