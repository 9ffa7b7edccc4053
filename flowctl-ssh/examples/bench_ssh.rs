//! Throughput of flowctl-ssh against the OpenSSH client, side by side on the
//! same throwaway sshd (127.0.0.1, started and stopped here).
//!
//! ```text
//! cargo run --release -p flowctl-ssh --example bench_ssh -- [BYTES] [ROUNDS]
//! ```
//!
//! For each cipher (aes128-gcm, chacha20-poly1305) it runs
//! `head -c BYTES /dev/zero` (default 1 GiB) ROUNDS times (default 2) through
//! flowctl-ssh (drained into nothing) and through
//! `ssh -c CIPHER ... > /dev/null`, and prints MB/s (best and mean).
//! sshd is `$FLOWCTL_SSHD` or `/usr/sbin/sshd`.
//!
//! Then the stalled-consumer row, once per backend (russh, and openssh when
//! built with `--features openssh`): BYTES (aes128-gcm) from sshd into a
//! local child `sh -c 'sleep 5; exec cat >/dev/null'` through
//! `redirect::output_to_child`, in a fresh process of this example (so that
//! its peak RSS, VmHWM, is this backend's alone); MB/s counts the time after
//! the stall. For openssh the ControlMaster's own VmHWM is printed too (it
//! holds the channel's window while the consumer stalls).
//!
//! ```text
//! cargo run --release -p flowctl-ssh --features openssh --example bench_ssh -- 1073741824 2
//! ```
//!
//! With `--json` (after the positional arguments) or `FLOWCTL_BENCH_JSON=1`
//! it also prints one `BENCH {json}` line per round and side, which
//! `cargo xtask bench` reads (`flowctl-bench/src/bin/bench-report`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowctl_core::Watermarks;
use flowctl_core::prelude::*;
use flowctl_ssh::redirect::output_to_child;
use flowctl_ssh::{Auth, Backend, Session, SshConfig};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Sshd(Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn keygen(path: &Path) -> BoxResult<()> {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()?;
    if !st.success() {
        return Err("ssh-keygen failed".into());
    }
    Ok(())
}

fn start_sshd(dir: &Path) -> BoxResult<(Sshd, u16)> {
    let bin = std::env::var_os("FLOWCTL_SSHD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/sshd"));
    if !bin.exists() {
        return Err("sshd not found: run `cargo xtask setup` (installs openssh-server)".into());
    }
    let _ = std::fs::create_dir_all("/run/sshd");
    keygen(&dir.join("host_key"))?;
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress 127.0.0.1:{port}\nHostKey {}\nAuthorizedKeysFile {}\nUsePAM no\n\
             StrictModes no\nPidFile none\nPasswordAuthentication no\nPermitRootLogin yes\n\
             LogLevel INFO\nUseDNS no\nCiphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com\n",
            dir.join("host_key").display(),
            dir.join("authorized_keys").display()
        ),
    )?;
    let mut child = Command::new(bin)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("Server listening") {
                let _ = tx.send(());
            }
        }
    });
    let sshd = Sshd(child);
    rx.recv_timeout(Duration::from_secs(20))
        .map_err(|_| "sshd did not start")?;
    Ok((sshd, port))
}

fn user() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "root".into())
}

async fn flowctl_round(dir: &Path, port: u16, cipher: &str, bytes: u64) -> BoxResult<f64> {
    let cfg = SshConfig::new(user(), format!("127.0.0.1:{port}"))
        .auth(Auth::key_file(dir.join("id")))
        .known_hosts(dir.join("known_hosts"))
        .ciphers([cipher]);
    let session = Session::connect(cfg).await?;
    let started = Instant::now();
    let mut p = session.exec(&format!("head -c {bytes} /dev/zero")).await?;
    let mut got = 0u64;
    while let Some(chunk) = p.stdout.recv().await? {
        got += chunk.len() as u64;
    }
    p.wait().await?;
    let secs = started.elapsed().as_secs_f64();
    if got != bytes {
        return Err(format!("flowctl-ssh got {got} of {bytes} bytes").into());
    }
    Ok(bytes as f64 / secs / 1e6)
}

fn openssh_round(dir: &Path, port: u16, cipher: &str, bytes: u64) -> BoxResult<f64> {
    let started = Instant::now();
    let st = Command::new("ssh")
        .args(["-c", cipher, "-p", &port.to_string(), "-i"])
        .arg(dir.join("id"))
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            dir.join("known_hosts").display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "Compression=no",
            "-T",
        ])
        .arg(format!("{}@127.0.0.1", user()))
        .arg(format!("head -c {bytes} /dev/zero"))
        .stdout(Stdio::null())
        .status()?;
    let secs = started.elapsed().as_secs_f64();
    if !st.success() {
        return Err(format!("ssh exited with {st}").into());
    }
    Ok(bytes as f64 / secs / 1e6)
}

/// One machine-readable measurement for `cargo xtask bench`: `side` is
/// `flowctl` or `anchor` (the OpenSSH client).
fn bench_line(cipher: &str, side: &str, round: usize, mb_s: f64, bytes: u64) {
    let cipher = cipher.trim_end_matches("@openssh.com");
    println!(
        "BENCH {{\"name\":\"ssh.{cipher}\",\"side\":\"{side}\",\"round\":{round},\"value\":{mb_s},\"unit\":\"MB/s\",\"bytes\":{bytes}}}"
    );
}

fn summary(v: &[f64]) -> String {
    let best = v.iter().cloned().fold(0.0, f64::max);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    format!("best {best:7.1} MB/s, mean {mean:7.1} MB/s")
}

fn vm_hwm_kb(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    l.trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The VmHWM of the ssh ControlMaster connected to `port` (found in /proc).
fn master_hwm_kb(port: u16) -> Option<u64> {
    let needle = format!("-p\0{port}\0");
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid = e.file_name().to_string_lossy().into_owned();
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.starts_with("ssh\0") && cmd.contains("\0-M\0") && cmd.contains(&needle))
            .then(|| vm_hwm_kb(&pid))
            .flatten()
    })
}

const STALL_S: u64 = 5;

/// Child mode: one stalled-consumer run; prints `RESULT mbps hwm_kb master_kb`.
async fn stalled_child(backend: &str, dir: &Path, port: u16, bytes: u64) -> BoxResult<()> {
    let backend = match backend {
        "openssh" => Backend::OpenSsh,
        _ => Backend::Russh,
    };
    let wm = Watermarks::new(256 * 1024, 1024 * 1024)?;
    let cfg = SshConfig::new(user(), format!("127.0.0.1:{port}"))
        .auth(Auth::key_file(dir.join("id")))
        .known_hosts(dir.join("known_hosts"))
        .ciphers(["aes128-gcm@openssh.com"])
        .watermarks(wm)
        .backend(backend);
    let session = Session::connect(cfg).await?;
    let mut remote = session.exec(&format!("head -c {bytes} /dev/zero")).await?;
    let mut local = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("sleep {STALL_S}; exec cat >/dev/null"))
        .stdin(Stdio::piped())
        .spawn()?;
    let stdin = local.stdin.take().ok_or("no child stdin")?;
    let started = Instant::now();
    let moved = output_to_child(&mut remote.stdout, stdin, wm).await?;
    remote.wait().await?;
    local.wait().await?;
    let secs = started.elapsed().as_secs_f64() - STALL_S as f64;
    if moved.bytes != bytes {
        return Err(format!("moved {} of {bytes} bytes", moved.bytes).into());
    }
    let master = master_hwm_kb(port).unwrap_or(0);
    let ours = vm_hwm_kb("self").unwrap_or(0);
    println!("RESULT {:.1} {ours} {master}", bytes as f64 / secs / 1e6);
    session.close().await;
    Ok(())
}

async fn stalled_row(backend: &str, dir: &Path, port: u16, bytes: u64) -> BoxResult<()> {
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--stalled", backend])
        .arg(dir)
        .arg(port.to_string())
        .arg(bytes.to_string())
        .stderr(Stdio::inherit())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        println!("stalled consumer, {backend:8}: failed ({})", out.status);
        return Ok(());
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    let master = match (backend, f.get(2)) {
        ("openssh", Some(m)) => format!(", ssh master peak RSS {m} kB"),
        _ => String::new(),
    };
    println!(
        "stalled consumer ({STALL_S} s), {backend:8}: {} MB/s after the stall, peak RSS {} kB{master}",
        f.first().unwrap_or(&"?"),
        f.get(1).unwrap_or(&"?"),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--stalled") {
        let backend = args.get(2).ok_or("backend")?;
        let dir = PathBuf::from(args.get(3).ok_or("dir")?);
        let port: u16 = args.get(4).ok_or("port")?.parse()?;
        let bytes: u64 = args.get(5).ok_or("bytes")?.parse()?;
        return stalled_child(backend, &dir, port, bytes).await;
    }
    let bytes: u64 = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(1 << 30);
    let rounds: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(2);
    let json =
        args.iter().any(|a| a == "--json") || std::env::var_os("FLOWCTL_BENCH_JSON").is_some();
    let dir = tempfile::tempdir()?;
    keygen(&dir.path().join("id"))?;
    let (_sshd, port) = start_sshd(dir.path())?;
    let host_pub = std::fs::read_to_string(dir.path().join("host_key.pub"))?;
    std::fs::write(
        dir.path().join("known_hosts"),
        format!("[127.0.0.1]:{port} {}\n", host_pub.trim()),
    )?;
    println!("{bytes} bytes of `head -c` from sshd on 127.0.0.1:{port}, {rounds} rounds each");
    for cipher in ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"] {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        // Interleaved so that both see the same machine load.
        for round in 0..rounds {
            ours.push(flowctl_round(dir.path(), port, cipher, bytes).await?);
            theirs.push(openssh_round(dir.path(), port, cipher, bytes)?);
            if json {
                bench_line(cipher, "flowctl", round, ours[round], bytes);
                bench_line(cipher, "anchor", round, theirs[round], bytes);
            }
        }
        println!("{cipher:32} flowctl-ssh: {}", summary(&ours));
        println!("{cipher:32} OpenSSH ssh: {}", summary(&theirs));
        let ratio =
            ours.iter().cloned().fold(0.0, f64::max) / theirs.iter().cloned().fold(0.0, f64::max);
        println!("{cipher:32} ratio (best/best): {ratio:.2}x");
    }
    stalled_row("russh", dir.path(), port, bytes).await?;
    if cfg!(feature = "openssh") {
        stalled_row("openssh", dir.path(), port, bytes).await?;
    }
    Ok(())
}
