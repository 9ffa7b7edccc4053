//! Issue 4: one session, two commands; the first one's reader stalls for
//! longer than sshd's `ClientAliveInterval 1` x `ClientAliveCountMax 2`.
//!
//! - openssh backend: the master keeps answering sshd's keepalives and only
//!   the stalled channel's window stops; the second command runs to
//!   completion during the stall, and the first then delivers every byte.
//! - russh backend: the stalled channel blocks russh's session loop, which
//!   stops answering keepalives; sshd drops the client ("Timeout, client not
//!   responding"), the second command cannot complete during the stall, and
//!   the first ends with `SshError::ConnectionLost`.

use std::time::{Duration, Instant};

use flowctl_core::prelude::*;
use flowctl_ssh::{Backend, Output, Session, SshError};

use crate::fixture::{Fixture, until};

/// Lines of `seq 1 N` in the first command: ~79 MB, far more than every
/// buffer between sshd and the consumer (window, socket buffers, pipes).
const BIG: u64 = 10_000_000;
/// Lines of `seq 1 N` in the second command.
const SMALL: u64 = 100_000;

/// The stall. This is the scenario, not synchronisation: the point is to
/// outlast sshd's keepalive timeout (1 s x 2 = about 3 s), so a fixed 5 s
/// stall is what the test needs; every other wait is on a real event.
const STALL: Duration = Duration::from_secs(5);

fn sshd_with_keepalive() -> Fixture {
    Fixture::sshd_with("ClientAliveInterval 1\nClientAliveCountMax 2\n")
}

/// FNV-1a over a byte stream, and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sum {
    hash: u64,
    len: u64,
}

impl Sum {
    fn new() -> Sum {
        Sum {
            hash: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }

    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }

    /// What `seq 1 n` prints.
    fn seq(n: u64) -> Sum {
        let mut s = Sum::new();
        for i in 1..=n {
            s.add(format!("{i}\n").as_bytes());
        }
        s
    }
}

async fn drain(out: &mut Output, sum: &mut Sum) -> Result<(), flowctl_core::FlowError> {
    while let Some(chunk) = out.recv().await? {
        sum.add(&chunk);
    }
    Ok(())
}

/// Starts the big command and stalls its reader: returns once the stdout
/// buffer is paused (above its high watermark), with what was read so far.
async fn start_stalled(session: &Session) -> (flowctl_ssh::RemoteProcess, Sum) {
    let mut p = session.exec(&format!("seq 1 {BIG}")).await.unwrap();
    let mut sum = Sum::new();
    let first = p.stdout.recv().await.unwrap().unwrap();
    sum.add(&first);
    until(Duration::from_secs(60), "the first stdout to pause", || {
        p.stdout.stats().paused
    })
    .await;
    (p, sum)
}

#[cfg(feature = "openssh")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_stalled_reader_outlasts_client_alive_and_blocks_nothing() {
    let (expect_big, expect_small) = (Sum::seq(BIG), Sum::seq(SMALL));
    let fx = sshd_with_keepalive().with_backend(Backend::OpenSsh);
    let session = Session::connect(fx.config()).await.unwrap();
    let (mut first, mut sum) = start_stalled(&session).await;
    let stall_began = Instant::now();
    let high = fx.config().watermarks.high();
    // The second command runs to completion while the first is stalled.
    let mut second = session.exec(&format!("seq 1 {SMALL}")).await.unwrap();
    let mut small = Sum::new();
    drain(&mut second.stdout, &mut small).await.unwrap();
    assert_eq!(small, expect_small);
    assert!(second.wait().await.unwrap().success());
    // ... and the first has not been read meanwhile (still paused).
    assert!(first.stdout.stats().paused);
    let buffered = first.stdout.stats().max_buffered;
    tokio::time::sleep(STALL.saturating_sub(stall_began.elapsed())).await;
    // Still bounded: nothing piled up in our process during the stall.
    assert!(
        first.stdout.stats().max_buffered <= high + 32 * 1024,
        "max_buffered {} (was {buffered} at the start of the stall)",
        first.stdout.stats().max_buffered
    );
    // After the stall: every byte, in order.
    drain(&mut first.stdout, &mut sum).await.unwrap();
    assert_eq!(sum, expect_big);
    assert!(first.wait().await.unwrap().success());
    let sshd = fx.sshd.as_ref().unwrap();
    assert!(!sshd.logged("Timeout, client not responding"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn russh_stalled_reader_is_dropped_by_client_alive() {
    let fx = sshd_with_keepalive().with_backend(Backend::Russh);
    let session = std::sync::Arc::new(Session::connect(fx.config()).await.unwrap());
    let (mut first, mut sum) = start_stalled(&session).await;
    let stall_began = Instant::now();
    // The second command, concurrently: russh's session loop is blocked on
    // the first channel's full queue, so it cannot even open its channel.
    let s2 = session.clone();
    let second = tokio::spawn(async move {
        let mut p = s2.exec(&format!("seq 1 {SMALL}")).await?;
        let mut small = Sum::new();
        drain(&mut p.stdout, &mut small).await?;
        p.wait().await?;
        Ok::<Sum, flowctl_core::FlowError>(small)
    });
    // The known failure, as sshd sees it: it gives up on the silent client.
    let sshd = fx.sshd.as_ref().unwrap();
    until(
        Duration::from_secs(60),
        "sshd to log \"Timeout, client not responding\"",
        || sshd.logged("Timeout, client not responding"),
    )
    .await;
    tokio::time::sleep(STALL.saturating_sub(stall_began.elapsed())).await;
    // The second command did not complete during the stall.
    assert!(
        !second.is_finished(),
        "second command completed during the stall"
    );
    // After the stall the first stream ends with ConnectionLost, short of
    // its length.
    let err = drain(&mut first.stdout, &mut sum).await.unwrap_err();
    match err.transport_error::<SshError>() {
        Some(SshError::ConnectionLost { stream, delivered }) => {
            assert_eq!(*stream, "stdout");
            assert_eq!(*delivered, sum.len);
        }
        _ => panic!("expected ConnectionLost, got {err:?}"),
    }
    assert!(sum.len < Sum::seq(BIG).len);
    // And the second command fails (its channel never opened, or its
    // output was cut), naming the lost connection.
    let second = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("second command still pending after the connection was lost")
        .unwrap();
    assert!(second.is_err(), "{second:?}");
}
