//! `remote: head -c N /dev/zero` -> `local: slow consumer`, then prints the
//! peak RSS of this process (VmHWM).
//!
//! ```text
//! cargo run --release -p flowctl-ssh --example remote_to_local -- [BYTES] [--stall-ms MS]
//! ```
//!
//! BYTES defaults to 1 GiB. `--channel-buffer N` sets russh's
//! `channel_buffer_size` (default 2): with 100000 the stall piles packets up
//! in russh's queue, which is what this crate's small default prevents. The slow consumer is a child process (this
//! example run with `--consume`) that sleeps 1 ms per 64 KiB it reads, so it
//! takes the data at a few tens of MB/s; `--stall-ms` makes it stop reading
//! for that long first. The remote side is the in-process server of the
//! `server` feature (its memory counts in the figure), unless
//! `FLOWCTL_SSH_ADDR`, `FLOWCTL_SSH_USER`, `FLOWCTL_SSH_KEY` and
//! `FLOWCTL_SSH_KNOWN_HOSTS` name a real server.
//!
//! With `--json` or `FLOWCTL_BENCH_JSON=1` it also prints `BENCH {json}`
//! lines (peak RSS and data size in MiB) for `cargo xtask bench`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use flowctl_core::Watermarks;
use flowctl_core::prelude::*;
use flowctl_ssh::redirect::output_to_child;
use flowctl_ssh::server::{EmbeddedServer, ServerConfig, generate_key};
use flowctl_ssh::{Auth, HostKeyPolicy, Session, SshConfig};
use tokio::io::AsyncReadExt;

fn vm_hwm() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// VmHWM of this process in KiB, for the `BENCH` line.
fn vm_hwm_kib() -> Option<u64> {
    vm_hwm().strip_suffix(" kB")?.trim().parse().ok()
}

/// The slow consumer: reads stdin 64 KiB at a time, 1 ms pause per read.
async fn consume(stall: Duration) -> std::io::Result<()> {
    tokio::time::sleep(stall).await;
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = stdin.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!("consumer: read {total} bytes");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let stall_ms: u64 = args
        .iter()
        .position(|a| a == "--stall-ms")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if args.iter().any(|a| a == "--consume") {
        consume(Duration::from_millis(stall_ms)).await?;
        return Ok(());
    }
    let bytes: u64 = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(1 << 30);

    let dir = tempfile::tempdir()?;
    let mut _server = None;
    let config = match std::env::var("FLOWCTL_SSH_ADDR") {
        Ok(addr) => SshConfig::new(std::env::var("FLOWCTL_SSH_USER")?, addr)
            .auth(Auth::key_file(std::env::var("FLOWCTL_SSH_KEY")?))
            .known_hosts(std::env::var("FLOWCTL_SSH_KNOWN_HOSTS")?),
        Err(_) => {
            let key = generate_key()?;
            let key_path = dir.path().join("id");
            std::fs::write(
                &key_path,
                key.to_openssh(flowctl_ssh::russh::keys::ssh_key::LineEnding::LF)?
                    .as_bytes(),
            )?;
            let server =
                EmbeddedServer::start(ServerConfig::new(vec![key.public_key().clone()])?).await?;
            let kh = dir.path().join("known_hosts");
            std::fs::write(&kh, server.known_hosts_line())?;
            let cfg = SshConfig::new("flowctl", server.addr().to_string())
                .auth(Auth::key_file(&key_path))
                .host_key_policy(HostKeyPolicy::KnownHosts(Some(kh)));
            _server = Some(server);
            cfg
        }
    };
    // `--channel-buffer N` sets russh's per-channel queue (default 2): a
    // large one shows what russh alone does while the consumer stalls.
    let channel_buffer: usize = args
        .iter()
        .position(|a| a == "--channel-buffer")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let wm = Watermarks::new(256 * 1024, 1024 * 1024)?;
    let session = Session::connect(config.watermarks(wm).channel_buffer(channel_buffer)).await?;
    let mut remote = session.exec(&format!("head -c {bytes} /dev/zero")).await?;
    let mut local = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--consume")
        .arg("--stall-ms")
        .arg(stall_ms.to_string())
        .stdin(Stdio::piped())
        .spawn()?;
    let child_stdin = local.stdin.take().ok_or("no child stdin")?;
    let started = Instant::now();
    let moved = output_to_child(&mut remote.stdout, child_stdin, wm).await?;
    let status = remote.wait().await?;
    local.wait().await?;
    let secs = started.elapsed().as_secs_f64();
    let stats = remote.stdout.stats();
    println!(
        "moved {} bytes in {secs:.1} s ({:.1} MB/s), remote {status}",
        moved.bytes,
        moved.bytes as f64 / secs / 1e6
    );
    println!(
        "stdout source: max_buffered {} bytes (high {}), {} pauses",
        stats.max_buffered,
        wm.high(),
        stats.pauses
    );
    println!("peak RSS (VmHWM): {}", vm_hwm());
    if args.iter().any(|a| a == "--json") || std::env::var_os("FLOWCTL_BENCH_JSON").is_some() {
        let mib = |v: f64| v / (1024.0 * 1024.0);
        let rss = mib(vm_hwm_kib().ok_or("VmHWM not found in /proc/self/status")? as f64 * 1024.0);
        let name = "mem.ssh.stalled_consumer";
        println!(
            "BENCH {{\"name\":\"{name}\",\"side\":\"flowctl\",\"round\":0,\"value\":{rss},\"unit\":\"MiB\",\"bytes\":{}}}",
            moved.bytes
        );
        println!(
            "BENCH {{\"name\":\"{name}\",\"side\":\"anchor\",\"round\":0,\"value\":{},\"unit\":\"MiB\",\"bytes\":{bytes}}}",
            mib(bytes as f64)
        );
    }
    Ok(())
}
