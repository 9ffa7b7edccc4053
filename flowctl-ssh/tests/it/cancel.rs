//! Issue 15 item 3: a cancelled exec closes every channel it opened,
//! including an open still in flight, against sshd (`MaxSessions 2`, so a
//! leaked channel is felt at once) and the embedded server (which counts
//! its open channels).

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use flowctl_ssh::{LEDGER_OPEN, LEDGER_SESSION, Session, SshError};

use crate::fixture::{Fixture, Kind, Let, Relay, until};

/// Cancels three execs of `cat` at different moments: right after the first
/// poll (the channel open in flight), after a few polls, and once the
/// command runs on the server (`running` says so; the exec reply may or may
/// not have arrived). After each, waits until `settled` (the exec task has
/// closed what it opened and the server has let go of it: closing is
/// asynchronous, and a session whose command still runs counts against
/// `MaxSessions`).
async fn cancel_three_execs<F: Future<Output = ()>>(
    s: &Session,
    running: impl Fn() -> bool,
    settled: impl Fn() -> F,
) {
    for polls in [1, 8] {
        {
            let mut fut = pin!(s.exec("cat"));
            for _ in 0..polls {
                let polled = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
                if let Poll::Ready(r) = polled {
                    drop(r.expect("exec")); // finished first: dropping the process
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        settled().await;
    }
    {
        let mut fut = pin!(s.exec("cat"));
        tokio::select! {
            biased;
            r = &mut fut => drop(r.expect("exec")),
            () = async {
                while !running() {
                    tokio::time::sleep(Duration::from_millis(2)).await; // polling the server
                }
            } => {}
        }
    }
    settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_exec_closes_its_channel_on_sshd_with_max_sessions_2() {
    let fx = Fixture::sshd_with("MaxSessions 2\n");
    let sshd = fx.sshd.as_ref().expect("sshd");
    let s = Session::connect(fx.config()).await.unwrap();
    let settled = || async {
        tokio::time::timeout(
            Duration::from_secs(30),
            fx.ledger.until_zero(Some(LEDGER_OPEN)),
        )
        .await
        .expect("exec tasks still alive after the caller was cancelled");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = sshd.commands();
            if left.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sshd still runs {left:?} 30 s after the exec was cancelled"
            );
            tokio::time::sleep(Duration::from_millis(2)).await; // polling /proc
        }
    };
    cancel_three_execs(&s, || sshd.commands().iter().any(|c| c == "cat"), settled).await;
    // Two sessions at most: a leaked channel would make this open fail.
    let mut p = s.exec("echo next").await.expect("exec after 3 cancelled");
    assert_eq!(p.stdout.read_to_end().await.unwrap(), b"next\n");
    assert!(p.wait().await.unwrap().success());
    drop(p);
    let mut q = s.exec("echo again").await.expect("second exec");
    assert_eq!(q.stdout.read_to_end().await.unwrap(), b"again\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_exec_closes_its_channel_on_the_embedded_server() {
    let fx = Fixture::start(Kind::Embedded).await;
    let server = fx.embedded.as_ref().expect("embedded");
    let s = Session::connect(fx.config()).await.unwrap();
    let baseline = server.live_channels();
    assert_eq!(baseline, 0);
    let settled = || async {
        tokio::time::timeout(
            Duration::from_secs(30),
            fx.ledger.until_zero(Some(LEDGER_OPEN)),
        )
        .await
        .expect("exec tasks still alive after the caller was cancelled");
        until(
            Duration::from_secs(30),
            "the server's channels to return to baseline",
            || server.live_channels() == baseline,
        )
        .await;
    };
    cancel_three_execs(&s, || server.live_channels() > baseline, settled).await;
    let mut p = s.exec("echo next").await.unwrap();
    assert_eq!(p.stdout.read_to_end().await.unwrap(), b"next\n");
    assert!(p.wait().await.unwrap().success());
    drop(p);
    until(
        Duration::from_secs(30),
        "the finished command's channel to close",
        || server.live_channels() == baseline,
    )
    .await;
}

/// A connect dropped while the server holds back the key exchange (its
/// banner sent, the rest not) leaves no connection behind: the client's
/// socket is closed and the ledger reads zero. Run with russh against both
/// servers, through a [`Relay`] that lets the server's first line through.
async fn connect_dropped_in_the_key_exchange_leaves_no_connection(fx: Fixture) {
    let relay = Relay::start(&fx.addr, Let::FirstLine).await;
    let cfg = relay.config(&fx);
    {
        let connect = pin!(Session::connect(cfg));
        // russh's banner is one short line; its KEXINIT follows once it has
        // read the server's banner, and is hundreds of bytes long.
        let kexinit_sent = until(
            Duration::from_secs(30),
            "the client to send its KEXINIT",
            || relay.client_bytes() > 100,
        );
        tokio::select! {
            r = connect => panic!(
                "the connect ended with the key exchange held back: {:?}",
                r.map(|_| ())
            ),
            () = kexinit_sent => {}
        }
        assert_eq!(
            fx.ledger.live(LEDGER_SESSION),
            1,
            "the socket is not counted"
        );
        // Dropped here, waiting for the server's KEXINIT.
    }
    relay.nothing_left(&fx).await;

    // The same through `connect_timeout`, the way a caller meets it: long
    // enough that even a loaded machine reaches the held key exchange first.
    let relay = Relay::start(&fx.addr, Let::FirstLine).await;
    let cfg = relay.config(&fx).connect_timeout(Duration::from_secs(2));
    let err = Session::connect(cfg).await.map(|_| ()).unwrap_err();
    assert!(
        matches!(
            err.transport_error::<SshError>(),
            Some(SshError::ConnectTimeout { .. })
        ),
        "{err:?}"
    );
    relay.nothing_left(&fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_dropped_in_the_key_exchange_leaves_no_connection_on_sshd() {
    connect_dropped_in_the_key_exchange_leaves_no_connection(Fixture::start(Kind::Sshd).await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_dropped_in_the_key_exchange_leaves_no_connection_on_the_embedded_server() {
    connect_dropped_in_the_key_exchange_leaves_no_connection(Fixture::start(Kind::Embedded).await)
        .await;
}
