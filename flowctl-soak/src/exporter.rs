//! `--metrics ADDR`: the soak's Prometheus exporter. Installs
//! `metrics-exporter-prometheus`'s recorder as the process's global recorder
//! (before any stage exists: a stage binds its metric handles when it is
//! built), registers the help text of flowctl's metrics, and serves
//! `GET /metrics` in the Prometheus text format from a thread of its own.
//!
//! The responder is a few lines over a blocking `std::net::TcpListener`
//! (one request per connection, `Connection: close`): a scraper asks once a
//! second, and a thread of its own keeps it off the scenarios' runtimes, whose
//! tasks the soak counts exactly. The connections it serves are not the
//! scenarios' file descriptors: [`serves`] tells the leak check which to
//! leave out.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The port the exporter listens on, once started.
static PORT: OnceLock<u16> = OnceLock::new();

/// A client that sends nothing for this long is dropped (a scrape sends its
/// request at once).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head read; a scrape's is a few hundred bytes.
const MAX_REQUEST: usize = 16 * 1024;

/// Installs the recorder and starts serving `GET /metrics` on `addr`.
/// Returns the address actually bound (port 0 picks a free one).
pub(crate) fn start(addr: SocketAddr) -> Result<SocketAddr, String> {
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("--metrics {addr}: cannot listen: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("--metrics {addr}: {e}"))?;
    // ANCHOR: install
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("--metrics: cannot install the Prometheus recorder: {e}"))?;
    // Each describes the core metrics too.
    flowctl_ssh::describe_metrics();
    flowctl_zmq::describe_metrics();
    flowctl_cluster::describe_metrics();
    // ANCHOR_END: install
    let _ = PORT.set(bound.port());
    std::thread::Builder::new()
        .name("soak-metrics".into())
        .spawn(move || serve(&listener, &handle))
        .map_err(|e| format!("--metrics: cannot start the exporter thread: {e}"))?;
    Ok(bound)
}

/// The exporter's port, if `--metrics` started it: its listener and the
/// connections it serves are the exporter's, not a scenario's.
pub(crate) fn serves() -> Option<u16> {
    PORT.get().copied()
}

fn serve(listener: &TcpListener, handle: &PrometheusHandle) {
    for conn in listener.incoming() {
        match conn {
            Ok(conn) => {
                // A client that went away mid-request is its own business.
                let _ = respond(conn, handle);
            }
            Err(e) => eprintln!("metrics exporter: accept failed: {e}"),
        }
    }
}

/// Reads one request head and answers it: `GET /metrics` gets the
/// exposition, any other path 404, any other method 405.
fn respond(conn: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers (up to the blank line), within a bound.
    let mut seen = request_line.len();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line)?;
        seen += n;
        if n == 0 || line == "\r\n" || line == "\n" || seen > MAX_REQUEST {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET", "/metrics") => {
            handle.run_upkeep();
            ("200 OK", handle.render())
        }
        ("GET", _) => (
            "404 Not Found",
            "not found: the metrics are at /metrics\n".into(),
        ),
        _ => ("405 Method Not Allowed", "only GET /metrics\n".into()),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut conn = TcpStream::connect(addr).expect("connect");
        write!(conn, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("request");
        let mut text = String::new();
        conn.read_to_string(&mut text).expect("response");
        text
    }

    // One test per process for the global recorder: it can be installed once.
    #[test]
    fn serves_the_exposition_of_named_stages_at_slash_metrics() {
        let addr = start("127.0.0.1:0".parse().unwrap()).expect("exporter");
        assert_eq!(serves(), Some(addr.port()));
        let (_tx, rx) = flowctl_core::PipeBuilder::new(
            flowctl_core::Watermarks::new(10, 100).expect("watermarks"),
        )
        .name("soak.test.exporter")
        .build::<bytes::Bytes>();
        let text = get(addr, "/metrics");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("Content-Type: text/plain; version=0.0.4"),
            "{text}"
        );
        assert!(
            text.contains("flowctl_high_watermark_bytes{stage=\"soak.test.exporter\"} 100"),
            "{text}"
        );
        assert!(text.contains("# HELP flowctl_buffered_bytes"), "{text}");
        assert!(get(addr, "/").starts_with("HTTP/1.1 404"));
        drop(rx);
    }
}
