//! The soak as a user runs it: the binary, its exit status and its JSON.

// The `--metrics` exporter scraped and queried by a real Prometheus server.
mod prometheus;

use std::path::PathBuf;
use std::process::Command;

fn soak(args: &[&str], json: &PathBuf) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flowctl-soak"))
        .args(args)
        .arg("--json")
        .arg(json)
        .output()
        .expect("the soak binary runs")
}

fn report(json: &PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(json).expect("the soak wrote its JSON"))
        .expect("valid JSON")
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("flowctl-soak-{}-{name}.json", std::process::id()))
}

/// Runs `--scenario NAME` for `duration` with the timer bound relaxed
/// (timing is the soak report's business, not a test's: the figure is still
/// reported), and checks what every passing scenario must report: a PASS,
/// every figure tools rely on, messages delivered, nothing lost, duplicated,
/// reordered or corrupted, no leak, at least `min_faults` faults injected and
/// no stage above its bound. Returns the scenario's JSON and the run's stderr.
fn passing_run(
    scenario: &str,
    duration: &str,
    seed: u64,
    min_faults: u64,
) -> (serde_json::Value, String) {
    let json = tmp(scenario);
    let seed = seed.to_string();
    let out = soak(
        &[
            "--duration",
            duration,
            "--seed",
            &seed,
            "--scenario",
            scenario,
            "--timer-bound-ms",
            "600000",
        ],
        &json,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("seed {seed}")),
        "the seed is printed so a run can be repeated: {stdout}"
    );
    let r = report(&json);
    let _ = std::fs::remove_file(json);
    assert_eq!(r["seed"].to_string(), seed);
    assert_eq!(r["passed"], true, "{r}");
    let s = r["scenarios"][0].clone();
    assert_eq!(s["name"], scenario);
    for field in [
        "messages",
        "bytes",
        "lost",
        "duplicated",
        "reordered",
        "corrupted",
        "in_flight_lost",
        "dropped_at_most_once",
        "latency_p99_us",
        "max_buffered",
        "bound",
        "rss_peak",
        "rss_bound",
        "timer_p99_us",
        "faults",
        "leaks",
    ] {
        assert!(s[field].is_u64(), "field {field} missing: {s}");
    }
    assert!(s["messages"].as_u64().unwrap() > 0, "{s}");
    for field in ["lost", "duplicated", "reordered", "corrupted", "leaks"] {
        assert_eq!(s[field], 0, "{field}: {s}");
    }
    assert!(
        s["faults"].as_u64().unwrap() >= min_faults,
        "at least {min_faults} faults were injected: {s}"
    );
    assert!(s["max_buffered"].as_u64() <= s["bound"].as_u64(), "{s}");
    assert_eq!(s["violations"].as_array().unwrap().len(), 0, "{s}");
    (s, stderr)
}

/// Runs `--scenario NAME --inject drop-one`: the consumer silently drops
/// message 1000, so the soak must fail, say so, and name exactly that loss.
fn drop_one_fails(scenario: &str, duration: &str) {
    let json = tmp(&format!("{scenario}-drop"));
    let out = soak(
        &[
            "--duration",
            duration,
            "--seed",
            "7",
            "--scenario",
            scenario,
            "--inject",
            "drop-one",
            "--timer-bound-ms",
            "600000",
        ],
        &json,
    );
    assert_eq!(out.status.code(), Some(1), "the soak must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("soak FAILED (seed 7)"), "{stderr}");
    let r = report(&json);
    let _ = std::fs::remove_file(json);
    assert_eq!(r["passed"], false);
    let s = &r["scenarios"][0];
    assert_eq!(s["lost"], 1, "{s}");
    let violations: Vec<&str> = s["violations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let expected = format!("{scenario}: 1 messages lost");
    assert!(violations.contains(&expected.as_str()), "{violations:?}");
}

// A scenario that leaves a process running (here: a forgotten `sleep`)
// fails the report, which names the process; the soak kills it.
#[test]
fn a_scenario_that_leaves_a_process_behind_fails_the_report() {
    let json = tmp("pipe-leak-process");
    let out = soak(
        &[
            "--duration",
            "2s",
            "--seed",
            "7",
            "--scenario",
            "pipe",
            "--inject",
            "leak-process",
            "--timer-bound-ms",
            "600000",
        ],
        &json,
    );
    assert_eq!(out.status.code(), Some(1), "the soak must fail");
    let r = report(&json);
    let _ = std::fs::remove_file(json);
    let s = &r["scenarios"][0];
    assert_eq!(s["leaks"], 1, "{s}");
    let violations = s["violations"].to_string();
    assert!(
        violations.contains("pipe: 1 processes still running at the end (killed now)")
            && violations.contains("(sleep)"),
        "{violations}"
    );
}

// A short clean run of the core pipe passes, with stalls and cancelled sends.
#[test]
fn a_short_pipe_soak_passes_and_reports_every_figure() {
    passing_run("pipe", "3s", 7, 1);
}

// A stage that drops one message must make the soak fail and name the loss.
#[test]
fn a_soak_with_a_dropped_message_fails_and_names_it() {
    drop_one_fails("pipe", "3s");
}

// The telemetry scenario: a DropOldest stage whose consumer stalls for
// seconds accounts for every message (sent = received + dropped + left),
// keeps the order of what it delivers, never pauses its producer and stays
// within its high watermark; its blocking twin loses nothing.
#[test]
fn a_short_telemetry_soak_drops_oldest_and_counts_every_drop() {
    let (s, stderr) = passing_run("telemetry", "3s", 3, 1);
    assert!(s["dropped_at_most_once"].as_u64().unwrap() > 0, "{s}");
    assert!(
        stderr.contains("soak.telemetry.drop_oldest: sent"),
        "the counts are printed: {stderr}"
    );
}

// The consumer of the DropOldest stage loses one message it received: the
// exact account (sent = received + dropped + left) must name it.
#[test]
fn a_telemetry_soak_with_a_vanished_message_fails_and_names_it() {
    drop_one_fails("telemetry", "3s");
}

// The zmq scenario on local libzmq peers: PUSH fan-in checked exactly, PUB
// fan-out at-most-once with its drops counted apart; stalls and at least one
// peer restart (the first falls in 20-50% of the run).
#[test]
fn a_short_zmq_soak_passes_and_reports_its_at_most_once_drops() {
    passing_run("zmq", "4s", 11, 2);
}

// The ssh scenario on the embedded server: messages make a round trip
// through remote commands under consumer and child stalls and at least one
// cut connection; what was in flight on a cut connection is reported apart
// (at-most-once), never as lost, and every stage stays within its bound.
#[test]
fn a_short_ssh_soak_passes_and_reports_its_cut_connections() {
    passing_run("ssh", "4s", 5, 2);
}

// The same against OpenSSH's sshd (`--sshd` adds this scenario): connections
// are cut by SIGKILLing the connection's sshd processes.
#[test]
fn a_short_ssh_soak_against_sshd_passes_and_reports_its_cut_connections() {
    passing_run("ssh-sshd", "4s", 5, 2);
}

// The cluster scenario on a local 3-node nats-server cluster it starts:
// JetStream publish -> R3 stream -> pull consume, checked exactly once and in
// order through consumer stalls and at least one node SIGKILLed and
// restarted; both stages within their bound, nothing of ours left in the
// servers' /subsz and /connz (a violation otherwise), every node stopped.
#[test]
fn a_short_cluster_soak_survives_a_node_kill_exactly_once_in_order() {
    // One fault at least: the node kill, which the scenario itself requires
    // (a violation otherwise); consumer stalls depend on the seed and load.
    let (_, stderr) = passing_run("cluster", "8s", 11, 1);
    assert!(stderr.contains("SIGKILLed"), "a node was killed: {stderr}");
}

// The pipeline scenario: ssh -> framing -> ordered offload -> zmq PUSH/PULL
// -> JetStream publish -> pull consume, checked end to end exactly once and
// in order through consumer stalls, at least one PUSH restart (with linger)
// and at least one node SIGKILLed and restarted; all seven stages within
// their bounds, nothing of ours left on the servers.
#[test]
fn a_short_pipeline_soak_passes_end_to_end_through_every_fault() {
    let (s, stderr) = passing_run("pipeline", "8s", 13, 2);
    assert!(stderr.contains("SIGKILLed"), "a node was killed: {stderr}");
    assert!(
        stderr.contains("PUSH restarts"),
        "the hops' counts are printed: {stderr}"
    );
    assert_eq!(s["in_flight_lost"], 0, "no connection is cut here: {s}");
    assert_eq!(s["dropped_at_most_once"], 0, "no hop is at-most-once: {s}");
}

// The consumer at the end of the whole chain drops one message: the
// pipeline scenario must fail and name it, like every other.
#[test]
fn a_pipeline_soak_with_a_dropped_message_fails_and_names_it() {
    drop_one_fails("pipeline", "8s");
}

// An unknown scenario is refused loudly (exit status 2), not skipped.
#[test]
fn an_unknown_scenario_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowctl-soak"))
        .args(["--scenario", "pipelines"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown scenario"), "{stderr}");
    assert!(stderr.contains("pipeline"), "the list names it: {stderr}");
}
