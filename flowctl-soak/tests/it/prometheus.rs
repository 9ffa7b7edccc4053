//! The soak's `--metrics` exporter scraped by a real `prometheus` server on
//! loopback (Debian's package, installed by `cargo xtask setup`; or
//! `FLOWCTL_PROMETHEUS` / `FLOWCTL_PROMTOOL`), queried through its HTTP API,
//! and its exposition checked by `promtool check metrics`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The stalled Block stage of the telemetry scenario, and its DropOldest one.
const BLOCK_STAGE: &str = "soak.telemetry.block";
const DROP_STAGE: &str = "soak.telemetry.drop_oldest";
/// The charge of the telemetry scenario's largest message: the "one item"
/// a single producer may add above high.
const LARGEST_ITEM: f64 = 2048.0;
/// Scrapes of the Block stage Prometheus must hold before it is queried.
const SCRAPES: f64 = 5.0;
/// Polls of Prometheus' API (each after [`POLL_EVERY`]) before giving up.
const POLLS: usize = 400;
const POLL_EVERY: Duration = Duration::from_millis(250);

/// A binary from `var`, else `default`; missing is a loud failure naming the fix.
fn tool(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.is_file(),
        "{} not found: run `cargo xtask setup` (Debian package prometheus) or set {var}",
        path.display()
    );
    path
}

/// A child process killed and reaped when dropped (also on a panic).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Starts `prometheus` with `config`, its storage and log in `dir`, on a
/// free loopback port, and waits until it is ready: the running server, its
/// address and its log. The port is free when chosen, not when Prometheus
/// binds it: a parallel test may take it in between, and then Prometheus is
/// started again on another (up to five times).
fn start_prometheus(
    bin: &std::path::Path,
    dir: &std::path::Path,
    config: &std::path::Path,
) -> (Killed, SocketAddr, PathBuf) {
    for attempt in 0..5 {
        let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join(format!("prometheus.{attempt}.log"));
        let stderr = std::fs::File::create(&log).expect("prometheus' log file");
        let mut child = Killed(
            Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("data.{attempt}")).display()
                ))
                .arg(format!("--web.listen-address={web}"))
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("prometheus starts"),
        );
        let mut polls = 0;
        loop {
            if let Ok(Some(status)) = child.0.try_wait() {
                let text = read_log(&log);
                if text.contains("address already in use") {
                    break;
                }
                panic!("prometheus exited ({status}) before it was ready:\n{text}");
            }
            if matches!(get(web, "/-/ready"), Ok((200, _))) {
                return (child, web, log);
            }
            polls += 1;
            assert!(
                polls < POLLS,
                "prometheus at {web} not ready in {POLLS} polls:\n{}",
                read_log(&log)
            );
            std::thread::sleep(POLL_EVERY); // a polling interval, not a synchronisation
        }
    }
    panic!("prometheus found its port taken five times in a row");
}

/// Prometheus' log so far (it logs to stderr).
fn read_log(log: &std::path::Path) -> String {
    std::fs::read_to_string(log).unwrap_or_else(|e| format!("(no log: {e})"))
}

/// `GET path` over HTTP/1.0: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query whose result is one sample (None when the
/// result is empty).
fn query(prometheus: SocketAddr, promql: &str) -> Option<f64> {
    let (status, body) = get(
        prometheus,
        &format!("/api/v1/query?query={}", encode(promql)),
    )
    .expect("prometheus answers");
    assert_eq!(status, 200, "{promql}: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON from prometheus");
    assert_eq!(json["status"], "success", "{promql}: {json}");
    let result = json["data"]["result"].as_array().expect("a vector result");
    assert!(result.len() <= 1, "{promql}: one series expected: {json}");
    result.first().map(|r| {
        r["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{promql}: not a number: {r}"))
    })
}

/// Runs the soak's telemetry scenario with `--metrics` under a real
/// Prometheus scraping it every second, then checks from Prometheus' side
/// that the stalled Block stage never held more than its high watermark +
/// one item and that the DropOldest stage's drops were exported, and that
/// `promtool` accepts the exposition without a lint complaint.
#[test]
fn a_real_prometheus_sees_the_stalled_stage_within_its_bound_and_the_drops() {
    let prometheus_bin = tool("FLOWCTL_PROMETHEUS", "/usr/bin/prometheus");
    let promtool = tool("FLOWCTL_PROMTOOL", "/usr/bin/promtool");
    let dir = tempfile::tempdir().expect("a temp dir");

    let mut soak = Killed(
        Command::new(env!("CARGO_BIN_EXE_flowctl-soak"))
            .args([
                "--scenario",
                "telemetry",
                "--duration",
                "10s",
                "--seed",
                "17",
                "--timer-bound-ms",
                "600000",
                "--metrics",
                "127.0.0.1:0",
                "--linger",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the soak binary runs"),
    );
    let stdin: ChildStdin = soak.0.stdin.take().expect("piped stdin");
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stdout = soak.0.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut output = Vec::new();
    let next_line = |output: &mut Vec<String>| {
        let line = lines
            .recv()
            .unwrap_or_else(|_| panic!("the soak ended early:\n{}", output.join("\n")));
        output.push(line.clone());
        line
    };
    let exporter: SocketAddr = loop {
        let line = next_line(&mut output);
        if let Some(rest) = line.strip_prefix("metrics served at http://") {
            break rest
                .trim_end_matches("/metrics")
                .parse()
                .expect("the exporter's address");
        }
    };

    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: flowctl-soak\n    static_configs:\n      \
             - targets: ['{exporter}']\n"
        ),
    )
    .expect("the config");
    let (mut prometheus, web, log) = start_prometheus(&prometheus_bin, dir.path(), &config);

    // The run ends (its report is printed; the exporter lingers).
    loop {
        let line = next_line(&mut output);
        if line.starts_with("--linger") {
            break;
        }
    }
    let text = output.join("\n");
    assert!(text.contains("soak PASSED"), "{text}");

    // Until Prometheus holds enough scrapes of the stalled stage.
    let scraped = format!("count_over_time(flowctl_buffered_bytes{{stage=\"{BLOCK_STAGE}\"}}[5m])");
    let mut polls = 0;
    loop {
        if let Ok(Some(status)) = prometheus.0.try_wait() {
            panic!("prometheus exited ({status}):\n{}", read_log(&log));
        }
        if query(web, &scraped).is_some_and(|n| n >= SCRAPES) {
            break;
        }
        polls += 1;
        assert!(
            polls < POLLS,
            "prometheus at {web} did not scrape {exporter} {SCRAPES} times in {POLLS} polls"
        );
        std::thread::sleep(POLL_EVERY); // a polling interval, not a synchronisation
    }

    let high = query(
        web,
        &format!("flowctl_high_watermark_bytes{{stage=\"{BLOCK_STAGE}\"}}"),
    )
    .expect("the high watermark is exported");
    let max_seen = query(
        web,
        &format!("max_over_time(flowctl_buffered_bytes{{stage=\"{BLOCK_STAGE}\"}}[5m])"),
    )
    .expect("buffered bytes were scraped");
    assert!(
        max_seen <= high + LARGEST_ITEM,
        "{BLOCK_STAGE} held {max_seen} bytes at a scrape, above high {high} + one item"
    );
    let max_buffered = query(
        web,
        &format!("max_over_time(flowctl_max_buffered_bytes{{stage=\"{BLOCK_STAGE}\"}}[5m])"),
    )
    .expect("max buffered bytes were scraped");
    assert!(
        max_buffered <= high + LARGEST_ITEM,
        "{BLOCK_STAGE} reached {max_buffered} bytes, above high {high} + one item"
    );
    assert!(
        max_buffered >= high,
        "{BLOCK_STAGE} never filled up to high ({max_buffered} < {high}): its stalls tested nothing"
    );
    let dropped = query(
        web,
        &format!("sum(flowctl_dropped_total{{stage=\"{DROP_STAGE}\",reason=\"drop_oldest\"}})"),
    )
    .expect("drops are exported");
    assert!(dropped > 0.0, "{DROP_STAGE} exported no drop");
    let paused = query(
        web,
        &format!("max_over_time(flowctl_paused{{stage=\"{BLOCK_STAGE}\"}}[5m])"),
    );
    assert!(paused.is_some(), "{BLOCK_STAGE}'s paused gauge is exported");

    // promtool reads a scrape on stdin: exit 0, no lint complaint.
    let (status, exposition) = get(exporter, "/metrics").expect("a scrape");
    assert_eq!(status, 200);
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    check
        .stdin
        .take()
        .expect("piped")
        .write_all(exposition.as_bytes())
        .expect("promtool reads the exposition");
    let out = check.wait_with_output().expect("promtool ends");
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool check metrics: {:?}\n{complaints}",
        out.status
    );

    // Closing stdin ends the lingering soak, which passed.
    drop(stdin);
    let status = soak.0.wait().expect("the soak ends");
    assert!(status.success(), "{status:?}");
}
