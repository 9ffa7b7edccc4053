//! `bench-report`: runs every comparison of flowctl against its anchor and
//! writes one table (`cargo xtask bench` runs this after `cargo xtask setup`).
//!
//! ```text
//! cargo run --release -p flowctl-bench --bin bench-report -- \
//!     [--quick] [--only PREFIX] [--json FILE] [--docs FILE] [--command TEXT]
//! ```
//!
//! - the `core.*` rows come from criterion (`benches/core.rs`), run once per
//!   round and read back from `<target>/criterion`;
//! - the `ssh.`, `zmq.`, `cluster.`, `fair.` and `mem.` rows from the
//!   harness examples of the transport crates, built in release mode and run
//!   with `FLOWCTL_BENCH_JSON=1`, which makes them print one `BENCH {json}`
//!   line per measurement (see `harness.rs`). Each harness alternates flowctl
//!   and its anchor round by round.
//!
//! `--only PREFIX` keeps the rows whose name starts with it and skips the
//! harnesses none of them needs; the docs page is then left alone (a partial
//! table would replace the full one) unless `--docs` names a file.
//!
//! Exit status: 0 once the report is written, whatever the verdicts (it is a
//! report); 1 if a harness failed to run (the report is still written, the
//! row says why); 2 for bad arguments.

mod criterion;
mod harness;
mod report;
mod rows;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use harness::Invocation;
use report::Report;
use rows::{Harness, Outcome, RowSpec, Sample};

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Default)]
struct Opts {
    quick: bool,
    only: Option<String>,
    json: Option<PathBuf>,
    docs: Option<PathBuf>,
    command: Option<String>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Opts, String> {
    let mut opts = Opts::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("`{name}` needs a value"))
        };
        match name.as_str() {
            "--quick" => opts.quick = true,
            "--only" => opts.only = Some(value()?),
            "--json" => opts.json = Some(PathBuf::from(value()?)),
            "--docs" => opts.docs = Some(PathBuf::from(value()?)),
            "--command" => opts.command = Some(value()?),
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    Ok(opts)
}

/// Sizes and rounds of one mode.
#[derive(Debug, Clone, Copy)]
struct Plan {
    core_rounds: usize,
    ssh_bytes: u64,
    ssh_rounds: usize,
    mem_bytes: u64,
    zmq_small: usize,
    zmq_big: usize,
    zmq_stall: usize,
    zmq_rounds: usize,
    cluster_msgs: u64,
    timeout: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                core_rounds: 2,
                ssh_bytes: 256 * MIB,
                ssh_rounds: 3,
                mem_bytes: 256 * MIB,
                zmq_small: 200_000,
                zmq_big: 5_000,
                zmq_stall: 200_000,
                zmq_rounds: 3,
                cluster_msgs: 20_000,
                timeout: Duration::from_secs(6 * 60),
            }
        } else {
            Plan {
                core_rounds: 3,
                ssh_bytes: 1024 * MIB,
                ssh_rounds: 3,
                mem_bytes: 1024 * MIB,
                zmq_small: 1_000_000,
                zmq_big: 20_000,
                zmq_stall: 1_000_000,
                zmq_rounds: 5,
                cluster_msgs: 100_000,
                timeout: Duration::from_secs(30 * 60),
            }
        }
    }

    /// What was measured, for the table's header; only the harnesses run.
    fn describe(&self, quick: bool, harnesses: &[Harness]) -> String {
        let mib = |b: u64| b / MIB;
        let parts: Vec<String> = harnesses
            .iter()
            .map(|h| match h {
                Harness::Core => format!(
                    "core: {} criterion runs{}",
                    self.core_rounds,
                    if quick { " with --quick" } else { "" }
                ),
                Harness::Ssh => format!(
                    "ssh: {} MiB per transfer, {} rounds per side and cipher",
                    mib(self.ssh_bytes),
                    self.ssh_rounds
                ),
                Harness::SshMem => format!("mem.ssh: {} MiB", mib(self.mem_bytes)),
                Harness::Zmq => format!(
                    "zmq: {} x 100 B and {} x 64 KiB, timer stall {} x 100 B, {} rounds",
                    self.zmq_small, self.zmq_big, self.zmq_stall, self.zmq_rounds
                ),
                Harness::ZmqMem => {
                    format!("mem.zmq: {} MiB of 64 KiB messages", mib(self.mem_bytes))
                }
                Harness::Cluster => format!(
                    "cluster: {} x 128 B, 2 pull and 5 core subscription rounds",
                    self.cluster_msgs
                ),
            })
            .collect();
        parts.join("; ")
    }
}

/// Where things are: the workspace, cargo, the target directory.
#[derive(Debug)]
struct Env {
    root: PathBuf,
    cargo: PathBuf,
    target_dir: PathBuf,
    built: BTreeMap<(&'static str, &'static str), PathBuf>,
}

impl Env {
    fn new() -> Result<Env, String> {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest.parent().unwrap_or(manifest).to_path_buf();
        let cargo = std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
        let out = Command::new(&cargo)
            .current_dir(&root)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot start cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!("cargo metadata failed ({})", out.status));
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata: {e}"))?;
        let target_dir = meta["target_directory"]
            .as_str()
            .map(PathBuf::from)
            .ok_or("cargo metadata names no target_directory")?;
        Ok(Env {
            root,
            cargo,
            target_dir,
            built: BTreeMap::new(),
        })
    }

    fn example(&mut self, package: &'static str, example: &'static str) -> Result<PathBuf, String> {
        if let Some(p) = self.built.get(&(package, example)) {
            return Ok(p.clone());
        }
        let p = harness::build_example(&self.cargo, &self.root, package, example)?;
        self.built.insert((package, example), p.clone());
        Ok(p)
    }
}

/// What a harness produced.
#[derive(Debug)]
enum HarnessResult {
    Ran(Vec<Sample>),
    NotRun(String),
    Failed(String),
}

fn run_core(env: &Env, plan: &Plan, quick: bool, rows: &[RowSpec]) -> Result<Vec<Sample>, String> {
    let mut ids: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.criterion)
        .flat_map(|(a, b)| [a, b])
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut samples = Vec::new();
    for round in 0..plan.core_rounds {
        println!(
            "== core: criterion run {} of {}",
            round + 1,
            plan.core_rounds
        );
        let figs = criterion::run_round(&env.cargo, &env.root, &env.target_dir, &ids, quick)?;
        for row in rows {
            let Some((ours, theirs)) = row.criterion else {
                continue;
            };
            for (side, id) in [("flowctl", ours), ("anchor", theirs)] {
                let fig = figs[id];
                samples.push(Sample {
                    name: row.name.to_owned(),
                    side: side.to_owned(),
                    round,
                    value: fig.per_second,
                    unit: fig.unit.to_owned(),
                    bytes: None,
                });
            }
        }
    }
    Ok(samples)
}

fn invocation<'a>(
    label: &'a str,
    program: PathBuf,
    args: Vec<String>,
    plan: &Plan,
) -> Invocation<'a> {
    Invocation {
        label,
        program,
        args,
        env: Vec::new(),
        timeout: plan.timeout,
        temp_prefix: None,
    }
}

fn run_harness(
    env: &mut Env,
    h: Harness,
    plan: &Plan,
    quick: bool,
    rows: &[RowSpec],
) -> HarnessResult {
    let result = match h {
        Harness::Core => run_core(env, plan, quick, rows),
        Harness::Ssh => env.example("flowctl-ssh", "bench_ssh").and_then(|p| {
            let args = vec![plan.ssh_bytes.to_string(), plan.ssh_rounds.to_string()];
            harness::run(&invocation("bench_ssh", p, args, plan))
        }),
        Harness::SshMem => env.example("flowctl-ssh", "remote_to_local").and_then(|p| {
            let args = vec![
                plan.mem_bytes.to_string(),
                "--stall-ms".into(),
                "2000".into(),
            ];
            let samples = harness::run(&invocation("remote_to_local", p, args, plan))?;
            check_moved(&samples, plan.mem_bytes)?;
            Ok(samples)
        }),
        Harness::Zmq => env.example("flowctl-zmq", "bench_zmq").and_then(|p| {
            let args = [plan.zmq_small, plan.zmq_big, plan.zmq_stall]
                .map(|n| n.to_string())
                .to_vec();
            let mut inv = invocation("bench_zmq", p, args, plan);
            inv.env.push(("BENCH_ROUNDS", plan.zmq_rounds.to_string()));
            harness::run(&inv)
        }),
        Harness::ZmqMem => env.example("flowctl-zmq", "bench_zmq").and_then(|p| {
            let mut inv = invocation("bench_zmq (BENCH_MEM)", p, Vec::new(), plan);
            inv.env.push(("BENCH_MEM", plan.mem_bytes.to_string()));
            harness::run(&inv)
        }),
        Harness::Cluster => {
            let source = env.root.join("flowctl-cluster/examples/bench_cluster.rs");
            if !source.is_file() {
                return HarnessResult::NotRun(
                    "flowctl-cluster has no examples/bench_cluster.rs yet; it lands with the cluster merge"
                        .to_owned(),
                );
            }
            env.example("flowctl-cluster", "bench_cluster")
                .and_then(|p| {
                    // Throughput rounds only: the failover timings are not rows.
                    let args = vec![
                        plan.cluster_msgs.to_string(),
                        "128".to_owned(),
                        "--no-failover".to_owned(),
                    ];
                    let mut inv = invocation("bench_cluster", p, args, plan);
                    inv.temp_prefix = Some("flowctl-nats-");
                    harness::run(&inv)
                })
        }
    };
    match result {
        Ok(samples) => HarnessResult::Ran(samples),
        Err(e) => HarnessResult::Failed(e),
    }
}

/// A stalled-consumer figure only counts if all the data went through.
fn check_moved(samples: &[Sample], bytes: u64) -> Result<(), String> {
    for s in samples.iter().filter(|s| s.side == "flowctl") {
        if s.bytes.is_some_and(|b| b != bytes) {
            return Err(format!("{} moved {:?} of {bytes} bytes", s.name, s.bytes));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-report: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "bench-report: a harness failed to run; see the rows marked `harness failed`"
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench-report: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs the selected rows and writes the report; `Ok(false)` if a harness failed.
fn run(opts: &Opts) -> Result<bool, String> {
    let selected = rows::select(opts.only.as_deref());
    if selected.is_empty() {
        let names: Vec<&str> = rows::ROWS.iter().map(|r| r.name).collect();
        return Err(format!(
            "no row starts with `{}`; rows: {}",
            opts.only.as_deref().unwrap_or_default(),
            names.join(", ")
        ));
    }
    let mut env = Env::new()?;
    let plan = Plan::new(opts.quick);
    let mut by_harness: BTreeMap<Harness, Vec<RowSpec>> = BTreeMap::new();
    for r in &selected {
        by_harness.entry(r.harness).or_default().push(*r);
    }
    let harnesses: Vec<Harness> = by_harness.keys().copied().collect();
    let date = report::utc_now();
    let load_start = report::load_average();
    println!(
        "bench-report: {} rows, {}",
        selected.len(),
        plan.describe(opts.quick, &harnesses)
    );
    println!("load average at start: {load_start}");

    let mut results = BTreeMap::new();
    for (h, rows) in &by_harness {
        println!("\n== {h:?}");
        let started = std::time::Instant::now();
        let r = run_harness(&mut env, *h, &plan, opts.quick, rows);
        let took = started.elapsed().as_secs();
        match &r {
            HarnessResult::Ran(s) => println!("== {h:?}: {} figures in {took} s", s.len()),
            HarnessResult::NotRun(why) => println!("== {h:?}: not run: {why}"),
            HarnessResult::Failed(why) => println!("== {h:?}: FAILED after {took} s: {why}"),
        }
        results.insert(*h, r);
    }

    let report = Report {
        machine: report::machine(),
        date,
        command: opts.command.clone().unwrap_or_else(|| {
            "cargo run --release -p flowctl-bench --bin bench-report".to_owned()
        }),
        quick: opts.quick,
        only: opts.only.clone(),
        sizes: plan.describe(opts.quick, &harnesses),
        load_start,
        load_end: report::load_average(),
        rows: selected
            .iter()
            .map(|spec| {
                let outcome = match &results[&spec.harness] {
                    HarnessResult::Ran(samples) => rows::evaluate(spec, samples),
                    HarnessResult::NotRun(why) => Outcome::NotRun(why.clone()),
                    HarnessResult::Failed(why) => Outcome::Failed(why.clone()),
                };
                (*spec, outcome)
            })
            .collect(),
    };
    println!("\n{}", report.terminal());

    let docs = match (&opts.docs, &opts.only) {
        (Some(p), _) => Some(p.clone()),
        (None, None) => Some(env.root.join("docs/src/benchmarks.md")),
        (None, Some(_)) => None,
    };
    match docs {
        Some(path) => {
            std::fs::write(&path, report.markdown())
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
        None => println!("--only: docs/src/benchmarks.md left as it was"),
    }
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&report.json()).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(report.counts().4 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Opts, String> {
        parse_args(list.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn parses_options() {
        let o = args(&[
            "--quick",
            "--only",
            "zmq.",
            "--json=out.json",
            "--command",
            "cargo xtask bench",
        ])
        .expect("valid");
        assert!(o.quick);
        assert_eq!(o.only.as_deref(), Some("zmq."));
        assert_eq!(o.json, Some(PathBuf::from("out.json")));
        assert_eq!(o.command.as_deref(), Some("cargo xtask bench"));
        assert!(args(&["--only"]).is_err());
        assert!(args(&["--bogus"]).is_err());
    }

    #[test]
    fn quick_plan_is_smaller_and_described() {
        let (q, f) = (Plan::new(true), Plan::new(false));
        assert!(q.ssh_bytes < f.ssh_bytes && q.zmq_small < f.zmq_small);
        let d = q.describe(true, &[Harness::Core, Harness::Ssh]);
        assert_eq!(
            d,
            "core: 2 criterion runs with --quick; ssh: 256 MiB per transfer, 3 rounds per side and cipher"
        );
    }

    #[test]
    fn moved_bytes_are_checked() {
        let s = Sample {
            name: "mem.ssh.stalled_consumer".into(),
            side: "flowctl".into(),
            round: 0,
            value: 10.0,
            unit: "MiB".into(),
            bytes: Some(5),
        };
        assert!(check_moved(std::slice::from_ref(&s), 5).is_ok());
        assert!(check_moved(&[s], 6).is_err());
    }
}
