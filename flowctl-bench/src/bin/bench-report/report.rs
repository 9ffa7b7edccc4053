//! The report: the machine, the terminal table, `docs/src/benchmarks.md` and
//! the JSON other tools read.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::rows::{Goal, Outcome, RowSpec};

/// Everything the report shows.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) machine: String,
    pub(crate) date: String,
    pub(crate) command: String,
    pub(crate) quick: bool,
    pub(crate) only: Option<String>,
    pub(crate) sizes: String,
    pub(crate) load_start: String,
    pub(crate) load_end: String,
    pub(crate) rows: Vec<(RowSpec, Outcome)>,
}

/// `model name` from `/proc/cpuinfo`, the number of CPUs and `MemTotal`.
pub(crate) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or_else(
            || "unknown".to_owned(),
            |kib| format!("{:.1}", kib / (1024.0 * 1024.0)),
        );
    format!("{model}, {cpus} CPUs, {ram_gib} GiB RAM")
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Now, as `YYYY-MM-DD HH:MM UTC`.
pub(crate) fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc(secs)
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM UTC` (Howard Hinnant's
/// `civil_from_days`).
pub(crate) fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

/// A figure with a readable magnitude.
pub(crate) fn figure(value: f64, unit: &str) -> String {
    match unit {
        "items/s" | "msg/s" if value >= 1e6 => format!("{:.2} M {unit}", value / 1e6),
        "items/s" | "msg/s" if value >= 1e3 => format!("{:.1} k {unit}", value / 1e3),
        "MiB/s" if value >= 10.0 * 1024.0 => format!("{:.1} GiB/s", value / 1024.0),
        "ms" if value < 100.0 => format!("{value:.2} ms"),
        _ if value >= 100.0 => format!("{value:.0} {unit}"),
        _ => format!("{value:.1} {unit}"),
    }
}

fn ratio(r: f64) -> String {
    if r < 0.1 {
        format!("{r:.3}x")
    } else {
        format!("{r:.2}x")
    }
}

/// The verdict of one row: `pass`, `FAIL (<figure>)`, `info`, or `n/a (...)`.
fn verdict(spec: &RowSpec, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Measured {
            pass: Some(true), ..
        } => "pass".to_owned(),
        Outcome::Measured {
            pass: Some(false),
            flowctl,
            ratio: r,
            ..
        } => match spec.goal {
            Goal::AtMost(_) => format!("FAIL ({})", figure(*flowctl, spec.unit)),
            _ => format!("FAIL ({})", ratio(*r)),
        },
        Outcome::Measured { pass: None, .. } => "info".to_owned(),
        Outcome::NotRun(why) => format!("n/a (not run: {why})"),
        Outcome::Failed(why) => format!("n/a (harness failed: {why})"),
    }
}

/// The six cells of a row: name, flowctl, anchor, ratio, goal, verdict.
fn cells(spec: &RowSpec, outcome: &Outcome) -> [String; 6] {
    let goal = spec.goal.text(spec.unit).unwrap_or_else(|| "-".to_owned());
    let (ours, theirs, r) = match outcome {
        Outcome::Measured {
            flowctl,
            anchor,
            ratio: r,
            ..
        } => (
            figure(*flowctl, spec.unit),
            figure(*anchor, spec.unit),
            ratio(*r),
        ),
        _ => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
    };
    [
        spec.name.to_owned(),
        ours,
        theirs,
        r,
        goal,
        verdict(spec, outcome),
    ]
}

const HEADER: [&str; 6] = ["row", "flowctl", "anchor", "ratio", "goal", "verdict"];

impl Report {
    /// (pass, fail, info, not run, harness failed)
    pub(crate) fn counts(&self) -> (usize, usize, usize, usize, usize) {
        let mut c = (0, 0, 0, 0, 0);
        for (_, o) in &self.rows {
            match o {
                Outcome::Measured {
                    pass: Some(true), ..
                } => c.0 += 1,
                Outcome::Measured {
                    pass: Some(false), ..
                } => c.1 += 1,
                Outcome::Measured { pass: None, .. } => c.2 += 1,
                Outcome::NotRun(_) => c.3 += 1,
                Outcome::Failed(_) => c.4 += 1,
            }
        }
        c
    }

    fn summary(&self) -> String {
        let (pass, fail, info, not_run, failed) = self.counts();
        let mut s = format!("{pass} pass, {fail} FAIL, {info} info, {not_run} not run");
        if failed > 0 {
            let _ = write!(s, ", {failed} harness failed");
        }
        s
    }

    /// The table for the terminal, with a header naming the sizes.
    pub(crate) fn terminal(&self) -> String {
        let rows: Vec<[String; 6]> = self.rows.iter().map(|(s, o)| cells(s, o)).collect();
        let mut width = HEADER.map(str::len);
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let mut out = String::new();
        let _ = writeln!(out, "flowctl vs anchors, {}", self.date);
        let _ = writeln!(out, "machine: {}", self.machine);
        let _ = writeln!(
            out,
            "load average: start {}, end {}",
            self.load_start, self.load_end
        );
        let _ = writeln!(out, "sizes: {}", self.sizes);
        let line = |out: &mut String, r: &[String]| {
            let last = r.len() - 1;
            for (i, c) in r.iter().enumerate() {
                if i == last {
                    let _ = writeln!(out, "{c}");
                } else if i == 0 {
                    let _ = write!(out, "{c:<w$}  ", w = width[i]);
                } else {
                    let _ = write!(out, "{c:>w$}  ", w = width[i]);
                }
            }
        };
        line(&mut out, &HEADER.map(str::to_owned));
        let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
        line(&mut out, &rule);
        for r in &rows {
            line(&mut out, r);
        }
        let _ = writeln!(out, "{}", self.summary());
        out
    }

    /// `docs/src/benchmarks.md`.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::from("# Benchmarks\n\n");
        out.push_str(
            "This page is written by `cargo xtask bench` (the `bench-report` binary of\n\
             `flowctl-bench`); rerun it rather than editing by hand. Every flowctl figure\n\
             was measured in the same run as its anchor: the two alternate round by\n\
             round, the figures are the medians over the rounds and the ratio is the\n\
             median of the per-round ratios flowctl / anchor, so it need not equal the\n\
             quotient of the two medians. Higher is better except for the `fair.` (ms)\n\
             and `mem.` (MiB) rows, whose goal is a ceiling on the flowctl figure.\n\
             A row that misses its goal says FAIL with its figure; it is reported, not\n\
             hidden or loosened.\n\n\
             The machine is shared: quote ratios, not absolute figures, and read them\n\
             next to the load average below.\n\n",
        );
        let _ = writeln!(out, "- **Machine**: {}", self.machine);
        let _ = writeln!(out, "- **Date**: {}", self.date);
        let _ = writeln!(
            out,
            "- **Load average** (1, 5, 15 min): {} at the start, {} at the end",
            self.load_start, self.load_end
        );
        let _ = writeln!(out, "- **Command**: `{}`", self.command);
        let _ = writeln!(
            out,
            "- **Mode**: {}",
            if self.quick {
                "quick (smaller sizes, criterion's `--quick`): a smoke run, not the figures to quote"
            } else {
                "full"
            }
        );
        let _ = writeln!(out, "- **Sizes**: {}", self.sizes);
        let _ = writeln!(out, "- **Verdicts**: {}\n", self.summary());
        let _ = writeln!(out, "| {} |", HEADER.join(" | "));
        let _ = writeln!(out, "|---|---:|---:|---:|---|---|");
        for (spec, outcome) in &self.rows {
            let mut c = cells(spec, outcome);
            c[0] = format!("`{}`", c[0]);
            if c[5].starts_with("FAIL") {
                c[5] = format!("**{}**", c[5]);
            }
            let _ = writeln!(out, "| {} |", c.join(" | ").replace('\n', " "));
        }
        let missed: Vec<String> = self
            .rows
            .iter()
            .filter(|(_, o)| {
                matches!(
                    o,
                    Outcome::Measured {
                        pass: Some(false),
                        ..
                    }
                )
            })
            .map(|(s, o)| {
                let verdict = verdict(s, o);
                let got = verdict.trim_start_matches("FAIL (").trim_end_matches(')');
                let goal = s.goal.text(s.unit).unwrap_or_default();
                format!("`{}` ({got}, goal {goal})", s.name)
            })
            .collect();
        if !missed.is_empty() {
            let _ = writeln!(out, "\nMissed goals: {}.", missed.join(", "));
        }
        let notes: Vec<String> = self
            .rows
            .iter()
            .filter_map(|(s, o)| match o {
                Outcome::Measured {
                    baseline: Some(b), ..
                } => Some(format!(
                    "- `{}`: a task that only yields stalled the same timer {} (median): \
                     the scheduler's own floor at this load.",
                    s.name,
                    figure(*b, s.unit)
                )),
                _ => None,
            })
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(out, "\n{}", notes.join("\n"));
        }
        out.push_str("\n## What each row compares\n\n| row | flowctl | anchor |\n|---|---|---|\n");
        for (spec, _) in &self.rows {
            let _ = writeln!(
                out,
                "| `{}` | {} | {} |",
                spec.name, spec.flowctl, spec.anchor
            );
        }
        out.push_str(
            "\nThe `core.` rows are criterion benchmarks (`flowctl-bench/benches/core.rs`,\n\
             described in `flowctl-bench/README.md`); the others are the harness examples\n\
             of the transport crates (`bench_ssh`, `remote_to_local`, `bench_zmq`,\n\
             `bench_cluster`), each starting its own servers on 127.0.0.1.\n\n\
             Run them yourself:\n\n\
             ```sh\n\
             cargo xtask bench                          # every row; rewrites this page\n\
             cargo xtask bench --quick                  # smaller sizes, under 10 minutes\n\
             cargo xtask bench --only zmq. --json z.json  # some rows; this page is left alone\n\
             ```\n",
        );
        out
    }

    /// The JSON other tools read.
    pub(crate) fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|(s, o)| {
                let goal = s.goal.text(s.unit);
                match o {
                    Outcome::Measured {
                        flowctl,
                        anchor,
                        ratio,
                        rounds,
                        pass,
                        baseline,
                    } => {
                        let mut v = json!({
                            "name": s.name, "unit": s.unit,
                            "flowctl": flowctl, "anchor": anchor, "ratio": ratio,
                            "goal": goal, "pass": pass, "rounds": rounds,
                            "status": match pass { Some(true) => "pass", Some(false) => "fail", None => "info" },
                        });
                        if let Some(b) = baseline {
                            v["baseline"] = json!(b);
                        }
                        v
                    }
                    Outcome::NotRun(why) | Outcome::Failed(why) => json!({
                        "name": s.name, "unit": s.unit,
                        "flowctl": null, "anchor": null, "ratio": null,
                        "goal": goal, "pass": null,
                        "status": if matches!(o, Outcome::NotRun(_)) { "not_run" } else { "harness_failed" },
                        "note": why,
                    }),
                }
            })
            .collect();
        json!({
            "machine": self.machine,
            "date": self.date,
            "command": self.command,
            "quick": self.quick,
            "only": self.only,
            "sizes": self.sizes,
            "load_average": { "start": self.load_start, "end": self.load_end },
            "rows": rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::select;

    fn report() -> Report {
        let pipe = select(Some("core.pipe_vs_mpsc.per_item"))[0];
        let stall = select(Some("fair.zmq.timer_stall"))[0];
        let core_sub = select(Some("cluster.core_sub"))[0];
        Report {
            machine: "cpu, 2 CPUs, 1.0 GiB RAM".into(),
            date: "2026-11-22 16:00 UTC".into(),
            command: "cargo xtask bench --quick".into(),
            quick: true,
            only: None,
            sizes: "small".into(),
            load_start: "1 2 3".into(),
            load_end: "4 5 6".into(),
            rows: vec![
                (
                    pipe,
                    Outcome::Measured {
                        flowctl: 7.7e6,
                        anchor: 5.7e6,
                        ratio: 1.35,
                        rounds: 2,
                        pass: Some(true),
                        baseline: None,
                    },
                ),
                (
                    stall,
                    Outcome::Measured {
                        flowctl: 6.0,
                        anchor: 300.0,
                        ratio: 0.02,
                        rounds: 2,
                        pass: Some(false),
                        baseline: Some(1.5),
                    },
                ),
                (core_sub, Outcome::NotRun("merge pending".into())),
            ],
        }
    }

    #[test]
    fn json_has_the_agreed_shape() {
        let v = report().json();
        assert_eq!(v["machine"], "cpu, 2 CPUs, 1.0 GiB RAM");
        let r = &v["rows"][0];
        assert_eq!(r["name"], "core.pipe_vs_mpsc.per_item");
        assert_eq!(r["unit"], "items/s");
        assert_eq!(r["goal"], ">= 0.8");
        assert_eq!(r["pass"], true);
        assert_eq!(r["ratio"], 1.35);
        assert_eq!(v["rows"][1]["pass"], false);
        assert_eq!(v["rows"][2]["pass"], Value::Null);
        assert_eq!(v["rows"][2]["status"], "not_run");
    }

    #[test]
    fn tables_show_fails_and_rows_not_run() {
        let r = report();
        let text = r.terminal();
        assert!(text.contains("FAIL (6.00 ms)"), "{text}");
        assert!(text.contains("n/a (not run: merge pending)"), "{text}");
        assert!(text.contains("1 pass, 1 FAIL, 0 info, 1 not run"), "{text}");
        let md = r.markdown();
        assert!(md.starts_with("# Benchmarks\n"));
        assert!(md.contains("| `fair.zmq.timer_stall` | 6.00 ms | 300 ms | 0.020x | <= 5 ms | **FAIL (6.00 ms)** |"), "{md}");
        assert!(md.contains("Missed goals: `fair.zmq.timer_stall` (6.00 ms, goal <= 5 ms)."));
    }

    #[test]
    fn dates_and_figures() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(
            utc(1_795_305_600 + 16 * 3600 + 5 * 60),
            "2026-11-22 16:05 UTC"
        );
        assert_eq!(figure(7.7e6, "items/s"), "7.70 M items/s");
        assert_eq!(figure(9728.0 * 2.0, "MiB/s"), "19.0 GiB/s");
        assert_eq!(figure(12.34, "MiB"), "12.3 MiB");
    }
}
