//! Recipe: a connect that times out twice and leaks nothing, with `lifecycle::retry`.
//!
//! A simulated server counts live subscriptions (its own accounting, the evidence a real
//! test reads from the server). Each attempt subscribes, then waits for a handshake; the
//! first two handshakes are too slow and time out. Every subscription they made, and the
//! handshake replies that arrive after the timeout, are released before the next attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flowctl_core::FlowError;
use flowctl_core::lifecycle::{Ledger, RetryPolicy, retry};
#[allow(unused_imports)]
use flowctl_core::prelude::*;

/// A stand-in for a remote server that counts what clients left behind.
#[derive(Debug, Clone, Default)]
struct Server {
    subscriptions: Arc<AtomicUsize>,
    sessions: Arc<AtomicUsize>,
}

impl Server {
    async fn subscribe(&self) {
        self.subscriptions.fetch_add(1, Ordering::SeqCst);
    }
    async fn unsubscribe(&self) {
        self.subscriptions.fetch_sub(1, Ordering::SeqCst);
    }
    /// Opens a session after `delay`: the reply of a slow handshake.
    async fn handshake(&self, delay: Duration) -> Result<Session, FlowError> {
        tokio::time::sleep(delay).await;
        self.sessions.fetch_add(1, Ordering::SeqCst);
        Ok(Session(self.clone()))
    }
}

/// A session the server has opened; closing it is the client's job.
#[derive(Debug)]
struct Session(Server);

impl Session {
    async fn close(self) {
        self.0.sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), FlowError> {
    let server = Server::default();
    let ledger = Ledger::new();
    // ANCHOR: retry
    let policy = RetryPolicy {
        attempt_timeout: Duration::from_millis(50),
        initial_backoff: Duration::from_millis(10),
        ledger: ledger.clone(),
        ..RetryPolicy::default()
    };
    let mut tries = 0u32;
    let session = retry(&policy, |attempt| {
        tries += 1;
        // The first two handshakes take longer than the attempt timeout.
        let delay = Duration::from_millis(if tries < 3 { 200 } else { 1 });
        let server = server.clone();
        async move {
            // Own the subscription *before* the request leaves.
            let unsub = server.clone();
            attempt.own(
                "subscription",
                move || async move { unsub.unsubscribe().await },
            )?;
            server.subscribe().await;
            // A reply that lands after a timeout is closed, not leaked.
            let hs = server.clone();
            let session = attempt
                .inflight(
                    "handshake",
                    async move { hs.handshake(delay).await },
                    Session::close,
                )
                .await?;
            Ok(session)
        }
    })
    .await?;
    // ANCHOR_END: retry

    // ANCHOR: evidence
    // Two failed attempts were fully released before the third began; the third
    // was committed, so its subscription and session now belong to `session`.
    assert_eq!(tries, 3);
    assert_eq!(server.subscriptions.load(Ordering::SeqCst), 1);
    assert_eq!(server.sessions.load(Ordering::SeqCst), 1);
    assert_eq!(ledger.total(), 0);
    // ANCHOR_END: evidence
    println!(
        "connected after {tries} attempts; server holds {} subscription(s) and {} session(s)",
        server.subscriptions.load(Ordering::SeqCst),
        server.sessions.load(Ordering::SeqCst)
    );
    session.close().await;
    server.unsubscribe().await; // the committed subscription is ours to release
    assert_eq!(server.sessions.load(Ordering::SeqCst), 0);
    assert_eq!(server.subscriptions.load(Ordering::SeqCst), 0);
    Ok(())
}
