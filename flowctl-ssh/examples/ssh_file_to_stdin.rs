//! Recipe: a local file streamed into a remote command's stdin, with the file
//! read only as fast as the remote command takes it.
//!
//! ```text
//! cargo run -p flowctl-ssh --features server --example ssh_file_to_stdin
//! ```
//!
//! The remote side is the in-process server of the `server` feature, which
//! runs commands with `sh -c` on this machine. The file is 8 MiB of a
//! repeating pattern in a temporary directory; the remote command
//! `sleep 0.3; wc -c` reads nothing for 300 ms, then counts its input (an
//! upload into `tar x` or a database restore has the same shape).

use std::path::Path;

use flowctl_core::Watermarks;
use flowctl_core::prelude::*;
use flowctl_ssh::redirect::reader_to_stdin;
use flowctl_ssh::russh::keys::ssh_key::LineEnding;
use flowctl_ssh::server::{EmbeddedServer, ServerConfig, generate_key};
use flowctl_ssh::{Auth, Session, SshConfig};

const BYTES: usize = 8 * 1024 * 1024;

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
    let file = dir.path().join("upload.bin");
    let pattern: Vec<u8> = (0..=255u8).cycle().take(BYTES).collect();
    std::fs::write(&file, &pattern)?;

    let watermarks = Watermarks::new(64 * 1024, 256 * 1024)?;
    let config = SshConfig::new("flowctl", server.addr().to_string())
        .auth(Auth::key_file(dir.path().join("id")))
        .known_hosts(dir.path().join("known_hosts"))
        .watermarks(watermarks);
    let session = Session::connect(config).await?;

    // ANCHOR: upload
    let mut remote = session.exec("sleep 0.3; wc -c").await?;
    let reader = tokio::fs::File::open(&file).await?;

    // file -> ReaderSource (32 KiB reads) -> pump -> bounded stdin pipe ->
    // SSH channel; closes stdin at the end, so the remote command sees EOF.
    let sent = reader_to_stdin(reader, &mut remote.stdin).await?;

    // `wc` prints only after EOF: a small output, read whole.
    let counted = remote.stdout.read_to_end().await?;
    let status = remote.wait().await?;
    // ANCHOR_END: upload

    // ANCHOR: evidence
    let stdin = remote.stdin.stats();
    let counted = String::from_utf8_lossy(&counted);
    println!(
        "sent {} bytes; remote wc counted {}; remote {status}; \
         stdin buffer peaked at {} bytes (high {} + one 32768-byte read), {} pauses",
        sent.bytes,
        counted.trim(),
        stdin.max_buffered,
        watermarks.high(),
        stdin.pauses,
    );
    assert_eq!(sent.bytes, BYTES as u64);
    assert_eq!(counted.trim(), BYTES.to_string());
    assert!(status.success());
    assert!(stdin.max_buffered <= watermarks.high() + 32 * 1024);
    // ANCHOR_END: evidence

    drop(remote);
    session.close().await;
    drop(server);
    Ok(())
}
