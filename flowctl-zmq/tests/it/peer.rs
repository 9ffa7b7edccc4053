//! The pyzmq peer fixture: a separate Python process running
//! `tests/peers/peer.py`, synchronised on the lines it prints, killed by pid on drop.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How long any peer step may take before the test fails (a deadline, not a
/// timing assertion: a healthy run is far below it).
pub(crate) const DEADLINE: Duration = Duration::from_secs(60);

pub(crate) fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOWCTL_PYTHON") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target/flowctl-venv/bin/python");
    assert!(
        p.exists(),
        "no python with pyzmq at {} and FLOWCTL_PYTHON is unset: run `cargo xtask setup` (installs python3-venv and pyzmq)",
        p.display()
    );
    p
}

/// The frames every checker expects for message `i`: [b"<i>", payload(i, size)].
pub(crate) fn payload(i: usize, size: usize) -> Bytes {
    let seed = format!("{i:08}");
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        v.extend_from_slice(seed.as_bytes());
    }
    v.truncate(size);
    Bytes::from(v)
}

pub(crate) fn message(i: usize, size: usize) -> Vec<Bytes> {
    vec![Bytes::from(i.to_string()), payload(i, size)]
}

pub(crate) struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub(crate) endpoint: String,
    log: Vec<String>,
}

impl Peer {
    /// A pyzmq PULL bound to a free tcp port that expects `n` checked
    /// messages of `size` bytes and reads them slowly: RCVHWM 4, a kernel
    /// receive buffer fixed at 128 KiB (no autotuning up to `tcp_rmem`'s
    /// max), 1 ms between messages.
    pub(crate) fn slow_pull(n: usize, size: usize) -> Peer {
        Peer::slow_pull_with(n, size, &[])
    }

    /// [`Peer::slow_pull`] that reads nothing until told `GO`
    /// ([`Peer::tell`]).
    pub(crate) fn slow_pull_gated(n: usize, size: usize) -> Peer {
        Peer::slow_pull_with(n, size, &["--gate"])
    }

    fn slow_pull_with(n: usize, size: usize, more: &[&str]) -> Peer {
        let (n, size) = (n.to_string(), size.to_string());
        let mut args = vec![
            "pull",
            "--bind",
            "tcp://127.0.0.1:*",
            "--count",
            &n,
            "--size",
            &size,
            "--hwm",
            "4",
            "--rcvbuf",
            "131072",
            "--delay-ms",
            "1",
        ];
        args.extend_from_slice(more);
        Peer::start(&args)
    }

    /// Starts `peer.py <args>` and waits for its READY line.
    pub(crate) fn start(args: &[&str]) -> Peer {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/peer.py");
        let mut child = Command::new(python())
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start the pyzmq peer: {e}: run `cargo xtask setup` (installs python3-venv and pyzmq)")
            });
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut peer = Peer {
            child,
            stdin,
            lines: rx,
            endpoint: String::new(),
            log: Vec::new(),
        };
        let ready = peer.wait_line("READY");
        peer.endpoint = ready
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        peer
    }

    /// Waits for a line starting with `prefix`; panics on "ERR", on exit, or after DEADLINE.
    pub(crate) fn wait_line(&mut self, prefix: &str) -> String {
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                    assert!(!line.starts_with("ERR"), "pyzmq peer failed: {line}");
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "pyzmq peer printed no {prefix:?} within {DEADLINE:?}; log: {:?}",
                        self.log
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "pyzmq peer exited before printing {prefix:?}; log: {:?}",
                        self.log
                    )
                }
            }
        }
    }

    /// Writes `line` to the peer's stdin (the gated modes wait for it).
    pub(crate) fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the peer's stdin is piped");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to the pyzmq peer's stdin");
    }

    /// Non-blocking: has the peer printed a line starting with `prefix`?
    pub(crate) fn saw_line(&mut self, prefix: &str) -> bool {
        while let Ok(line) = self.lines.try_recv() {
            assert!(!line.starts_with("ERR"), "pyzmq peer failed: {line}");
            self.log.push(line);
        }
        self.log.iter().any(|l| l.starts_with(prefix))
    }

    /// Waits for "OK <n>" and for the process to exit successfully.
    pub(crate) fn expect_ok(mut self, n: usize) {
        let line = self.wait_line("OK");
        assert_eq!(line, format!("OK {n}"), "peer log: {:?}", self.log);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the peer") {
                assert!(status.success(), "pyzmq peer exited with {status}");
                return;
            }
            assert!(start.elapsed() < DEADLINE, "pyzmq peer did not exit");
            std::thread::sleep(Duration::from_millis(5)); // polling with a deadline
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Kills by pid (no-op if it has exited already), also on panic.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
