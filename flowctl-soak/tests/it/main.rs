//! The soak as a user runs it: the binary, its exit status and its JSON.

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

// A short clean run passes, and its JSON carries every field tools rely on.
// Timing is the soak report's business, not this test's: the timer bound is
// relaxed so that a loaded machine cannot fail it (the figure is still reported).
#[test]
fn a_short_pipe_soak_passes_and_reports_every_figure() {
    let json = tmp("pass");
    let out = soak(
        &[
            "--duration",
            "3s",
            "--seed",
            "7",
            "--scenario",
            "pipe",
            "--timer-bound-ms",
            "600000",
        ],
        &json,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "soak failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("seed 7"),
        "the seed is printed so a run can be repeated"
    );
    let r = report(&json);
    assert_eq!(r["seed"], 7);
    assert_eq!(r["passed"], true);
    let s = &r["scenarios"][0];
    assert_eq!(s["name"], "pipe");
    for field in [
        "messages",
        "lost",
        "duplicated",
        "reordered",
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
    assert!(s["messages"].as_u64().unwrap() > 0);
    assert!(s["faults"].as_u64().unwrap() > 0, "faults were injected");
    assert!(s["max_buffered"].as_u64() <= s["bound"].as_u64());
    assert_eq!(s["violations"].as_array().unwrap().len(), 0);
    let _ = std::fs::remove_file(json);
}

// A stage that drops one message must make the soak fail and name the loss.
#[test]
fn a_soak_with_a_dropped_message_fails_and_names_it() {
    let json = tmp("drop");
    let out = soak(
        &[
            "--duration",
            "3s",
            "--seed",
            "7",
            "--scenario",
            "pipe",
            "--inject",
            "drop-one",
        ],
        &json,
    );
    assert_eq!(out.status.code(), Some(1), "the soak must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("soak FAILED (seed 7)"), "{stderr}");
    let r = report(&json);
    assert_eq!(r["passed"], false);
    let s = &r["scenarios"][0];
    assert_eq!(s["lost"], 1);
    let violations: Vec<&str> = s["violations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        violations.contains(&"pipe: 1 messages lost"),
        "{violations:?}"
    );
    let _ = std::fs::remove_file(json);
}

// The zmq scenario on local libzmq peers: PUSH fan-in checked exactly, PUB
// fan-out at-most-once with its drops counted apart, a peer restarted.
#[test]
fn a_short_zmq_soak_passes_and_reports_its_at_most_once_drops() {
    let json = tmp("zmq");
    // Timing is not a test's business: the timer bound is relaxed.
    let out = soak(
        &[
            "--duration",
            "4s",
            "--seed",
            "11",
            "--scenario",
            "zmq",
            "--timer-bound-ms",
            "600000",
        ],
        &json,
    );
    assert!(
        out.status.success(),
        "soak failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&json);
    assert_eq!(r["passed"], true);
    let s = &r["scenarios"][0];
    assert_eq!(s["name"], "zmq");
    for field in [
        "messages",
        "lost",
        "duplicated",
        "reordered",
        "corrupted",
        "dropped_at_most_once",
        "max_buffered",
        "bound",
        "faults",
        "leaks",
    ] {
        assert!(s[field].is_u64(), "field {field} missing: {s}");
    }
    assert!(s["messages"].as_u64().unwrap() > 0);
    for field in ["lost", "duplicated", "reordered", "corrupted", "leaks"] {
        assert_eq!(s[field], 0, "{field}: {s}");
    }
    // Stalls and at least one peer restart (the first falls in 20-50% of the run).
    assert!(
        s["faults"].as_u64().unwrap() >= 2,
        "faults were injected: {s}"
    );
    assert!(s["max_buffered"].as_u64() <= s["bound"].as_u64());
    assert_eq!(s["violations"].as_array().unwrap().len(), 0);
    let _ = std::fs::remove_file(json);
}

// The ssh scenario on the embedded server: messages make a round trip
// through remote commands under consumer and child stalls and at least one
// cut connection; what was in flight on a cut connection is reported apart
// (at-most-once), never as lost, and every stage stays within its bound.
#[test]
fn a_short_ssh_soak_passes_and_reports_its_cut_connections() {
    let json = tmp("ssh");
    // Timing is not a test's business: the timer bound is relaxed.
    let out = soak(
        &[
            "--duration",
            "4s",
            "--seed",
            "5",
            "--scenario",
            "ssh",
            "--timer-bound-ms",
            "600000",
        ],
        &json,
    );
    assert!(
        out.status.success(),
        "soak failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&json);
    assert_eq!(r["passed"], true);
    let s = &r["scenarios"][0];
    assert_eq!(s["name"], "ssh");
    for field in [
        "messages",
        "lost",
        "duplicated",
        "reordered",
        "corrupted",
        "in_flight_lost",
        "max_buffered",
        "bound",
        "faults",
        "leaks",
    ] {
        assert!(s[field].is_u64(), "field {field} missing: {s}");
    }
    assert!(s["messages"].as_u64().unwrap() > 0);
    for field in ["lost", "duplicated", "reordered", "corrupted", "leaks"] {
        assert_eq!(s[field], 0, "{field}: {s}");
    }
    // At least one connection drop, plus stalls.
    assert!(
        s["faults"].as_u64().unwrap() >= 2,
        "faults were injected: {s}"
    );
    assert!(s["max_buffered"].as_u64() <= s["bound"].as_u64());
    assert_eq!(s["violations"].as_array().unwrap().len(), 0);
    let _ = std::fs::remove_file(json);
}

// The cluster scenario on a local 3-node nats-server cluster it starts:
// JetStream publish -> R3 stream -> pull consume, checked exactly once and in
// order through consumer stalls and at least one node SIGKILLed and
// restarted; both stages within their bound, nothing of ours left in the
// servers' /subsz and /connz (a violation otherwise), every node stopped.
#[test]
fn a_short_cluster_soak_survives_a_node_kill_exactly_once_in_order() {
    let json = tmp("cluster");
    // Timing is not a test's business: the timer bound is relaxed.
    let out = soak(
        &[
            "--duration",
            "8s",
            "--seed",
            "11",
            "--scenario",
            "cluster",
            "--timer-bound-ms",
            "600000",
        ],
        &json,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "soak failed:\n{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("SIGKILLed"), "a node was killed: {stderr}");
    let r = report(&json);
    assert_eq!(r["passed"], true);
    let s = &r["scenarios"][0];
    assert_eq!(s["name"], "cluster");
    assert!(s["messages"].as_u64().unwrap() > 0, "{s}");
    for field in ["lost", "duplicated", "reordered", "corrupted", "leaks"] {
        assert_eq!(s[field], 0, "{field}: {s}");
    }
    // At least one node kill, plus stalls.
    assert!(
        s["faults"].as_u64().unwrap() >= 2,
        "faults were injected: {s}"
    );
    assert!(s["max_buffered"].as_u64() <= s["bound"].as_u64());
    assert_eq!(s["violations"].as_array().unwrap().len(), 0);
    let _ = std::fs::remove_file(json);
}

// A scenario whose transport has not landed is refused loudly, not skipped.
#[test]
fn an_unimplemented_scenario_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowctl-soak"))
        .args(["--scenario", "pipeline"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not implemented yet"));
}
