//! Recipe: a remote command's stdout into a slower local process, with
//! bounded memory (the AsyncSSH-before-2.15 failure, avoided).
//!
//! ```text
//! cargo run -p flowctl-ssh --features server --example ssh_remote_stdout
//! ```
//!
//! The remote side is the in-process server of the `server` feature, which
//! runs commands with `sh -c` on this machine: no sshd and no network beyond
//! 127.0.0.1. The remote command `head -c 16777216 /dev/zero` produces 16 MiB
//! at once; the local `sh -c 'sleep 0.3; wc -c'` reads nothing for 300 ms,
//! then counts its input.

use std::path::Path;
use std::process::Stdio;

use flowctl_core::Watermarks;
use flowctl_core::prelude::*;
use flowctl_ssh::redirect::output_to_child;
use flowctl_ssh::russh::keys::ssh_key::LineEnding;
use flowctl_ssh::server::{EmbeddedServer, ServerConfig, generate_key};
use flowctl_ssh::{Auth, Session, SshConfig};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const BYTES: u64 = 16 * 1024 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Starts the embedded server; returns it with a client key file it accepts
/// and a known_hosts file that records its host key.
async fn embedded_server(dir: &Path) -> Result<EmbeddedServer, BoxError> {
    let key = generate_key()?;
    std::fs::write(dir.join("id"), key.to_openssh(LineEnding::LF)?.as_bytes())?;
    let server = EmbeddedServer::start(ServerConfig::new(vec![key.public_key().clone()])?).await?;
    std::fs::write(dir.join("known_hosts"), server.known_hosts_line())?;
    Ok(server)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let server = embedded_server(dir.path()).await?;
    let user = "flowctl"; // the embedded server admits its keys as any user
    let addr = server.addr().to_string();

    // ANCHOR: connect
    let watermarks = Watermarks::new(256 * 1024, 1024 * 1024)?;
    let config = SshConfig::new(user, addr)
        .auth(Auth::key_file(dir.path().join("id")))
        .known_hosts(dir.path().join("known_hosts"))
        .watermarks(watermarks);
    let session = Session::connect(config).await?;
    let mut remote = session.exec(&format!("head -c {BYTES} /dev/zero")).await?;
    // ANCHOR_END: connect

    // ANCHOR: redirect
    let mut local = Command::new("sh")
        .args(["-c", "sleep 0.3; wc -c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let local_stdin = local.stdin.take().ok_or("local stdin was not piped")?;

    // remote stdout -> our bounded buffer -> pump -> WriterSink -> local stdin;
    // closes the local stdin at the end so `wc` sees end of file.
    let moved = output_to_child(&mut remote.stdout, local_stdin, watermarks).await?;
    // `head` writes nothing to stderr; a command that does needs its stderr
    // drained (or dropped) too, since both streams share one channel.
    let status = remote.wait().await?;
    // ANCHOR_END: redirect

    let mut counted = String::new();
    if let Some(mut out) = local.stdout.take() {
        out.read_to_string(&mut counted).await?;
    }
    local.wait().await?;

    // ANCHOR: evidence
    let stats = remote.stdout.stats();
    let packet = session.config().max_packet as usize;
    println!(
        "moved {} bytes; remote {status}; local wc counted {}; \
         stdout buffer peaked at {} bytes (high {} + one {packet}-byte packet), {} pauses",
        moved.bytes,
        counted.trim(),
        stats.max_buffered,
        watermarks.high(),
        stats.pauses,
    );
    assert_eq!(moved.bytes, BYTES);
    assert_eq!(counted.trim(), BYTES.to_string());
    assert!(status.success());
    assert!(stats.max_buffered <= watermarks.high() + packet);
    // ANCHOR_END: evidence

    drop(remote);
    session.close().await;
    drop(server);
    Ok(())
}
