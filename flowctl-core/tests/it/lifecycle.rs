use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use flowctl_core::FlowError;
use flowctl_core::lifecycle::{Attempt, Ledger, RetryPolicy, retry};
use tokio::sync::oneshot;

/// A fake server's table of live subscriptions: the server-side accounting the
/// tests check (the transports check the real servers' tables the same way).
#[derive(Clone, Default)]
struct Server {
    subs: Arc<std::sync::Mutex<Vec<u32>>>,
}

impl Server {
    fn subscribe(&self, id: u32) {
        self.subs.lock().unwrap().push(id);
    }
    fn unsubscribe(&self, id: u32) {
        self.subs.lock().unwrap().retain(|s| *s != id);
    }
    fn live(&self) -> Vec<u32> {
        self.subs.lock().unwrap().clone()
    }
}

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn dropping_an_attempt_releases_what_it_owned() {
    let ledger = Ledger::new();
    let server = Server::default();
    {
        let attempt = Attempt::new("connect", &ledger);
        for id in 0..3 {
            let s = server.clone();
            attempt
                .own("sub", move || async move { s.unsubscribe(id) })
                .unwrap();
            server.subscribe(id);
        }
        assert_eq!(ledger.live("sub"), 3);
    } // dropped: no commit, no release
    tokio::time::timeout(LIMIT, ledger.until_zero(None))
        .await
        .expect("released");
    assert!(server.live().is_empty());
}

#[tokio::test]
async fn a_committed_attempt_releases_nothing() {
    let ledger = Ledger::new();
    let server = Server::default();
    let attempt = Attempt::new("connect", &ledger);
    let s = server.clone();
    attempt
        .own("sub", move || async move { s.unsubscribe(1) })
        .unwrap();
    server.subscribe(1);
    attempt.commit();
    drop(attempt);
    assert_eq!(server.live(), vec![1]);
    assert_eq!(ledger.total(), 0, "ownership moved to the returned value");
    // Claiming on a finished attempt releases at once and says so.
    let late = Attempt::new("late", &ledger);
    late.commit();
    let s = server.clone();
    assert!(matches!(
        late.own("sub", move || async move { s.unsubscribe(1) }),
        Err(FlowError::Closed)
    ));
    tokio::time::timeout(LIMIT, ledger.until_zero(None))
        .await
        .unwrap();
    assert!(server.live().is_empty());
}

/// The Aeron bug: the subscription request is in flight when the connect times
/// out. Its reply arrives later and must be released, not leaked.
#[tokio::test]
async fn a_reply_arriving_after_the_attempt_gave_up_is_released() {
    let ledger = Ledger::new();
    let server = Server::default();
    let (reply_tx, reply_rx) = oneshot::channel::<u32>();
    let attempt = Attempt::new("connect", &ledger);
    let s = server.clone();
    let inflight = attempt.inflight(
        "sub.request",
        async move { reply_rx.await.map_err(|_| FlowError::Closed) },
        move |id| async move { s.unsubscribe(id) },
    );
    // The acquisition times out while waiting for the reply.
    let timed_out = tokio::time::timeout(Duration::from_millis(1), inflight).await;
    assert!(timed_out.is_err());
    assert_eq!(ledger.live("sub.request"), 1, "the request is still owned");
    // The server creates the subscription and replies, late.
    server.subscribe(7);
    reply_tx.send(7).unwrap();
    // release() waits for the in-flight request and releases its late value.
    tokio::time::timeout(LIMIT, attempt.release())
        .await
        .unwrap();
    assert!(
        server.live().is_empty(),
        "late subscription released: {:?}",
        server.live()
    );
    assert_eq!(ledger.total(), 0);
}

#[tokio::test]
async fn an_inflight_value_delivered_in_time_belongs_to_the_caller() {
    let ledger = Ledger::new();
    let attempt = Attempt::new("connect", &ledger);
    let released = Arc::new(AtomicU32::new(0));
    let r = released.clone();
    let value = attempt
        .inflight("req", async { Ok(5u32) }, move |_| async move {
            r.fetch_add(1, Ordering::SeqCst);
        })
        .await
        .unwrap();
    assert_eq!(value, 5);
    attempt.release().await;
    assert_eq!(released.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn retry_starts_each_attempt_only_after_the_previous_one_is_released() {
    let ledger = Ledger::new();
    let server = Server::default();
    let policy = RetryPolicy {
        max_attempts: 4,
        attempt_timeout: Duration::from_millis(20),
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ledger: ledger.clone(),
        ..RetryPolicy::default()
    };
    let attempts = AtomicU32::new(0);
    let result: Result<(), FlowError> = retry(&policy, |attempt| {
        let n = attempts.fetch_add(1, Ordering::SeqCst);
        let server = server.clone();
        let ledger = ledger.clone();
        async move {
            // The previous attempt is fully released before this one starts.
            assert!(
                server.live().is_empty(),
                "attempt {n} started with {:?} live",
                server.live()
            );
            assert_eq!(ledger.live("sub"), 0);
            let s = server.clone();
            attempt.own("sub", move || async move { s.unsubscribe(n) })?;
            server.subscribe(n);
            // ...and then hangs until the attempt timeout cancels it.
            std::future::pending::<()>().await;
            Ok(())
        }
    })
    .await;
    match result {
        Err(FlowError::RetriesExhausted { attempts: 4, last }) => {
            assert!(matches!(*last, FlowError::Timeout(_)))
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    assert!(server.live().is_empty());
    assert_eq!(ledger.total(), 0);
}

#[tokio::test]
async fn retry_returns_a_permanent_error_at_once_and_commits_a_success() {
    let ledger = Ledger::new();
    let policy = RetryPolicy {
        ledger: ledger.clone(),
        ..RetryPolicy::default()
    };
    let mut calls = 0;
    let err = retry(&policy, |_| {
        calls += 1;
        async { Err::<(), _>(FlowError::Config("bad credentials".into())) }
    })
    .await
    .unwrap_err();
    assert_eq!(calls, 1);
    assert_eq!(err.to_string(), "invalid configuration: bad credentials");

    let kept = retry(&policy, |attempt| async move {
        attempt.own("conn", || async {})?;
        Ok(1)
    })
    .await
    .unwrap();
    assert_eq!(kept, 1);
    assert_eq!(ledger.total(), 0);
}

#[test]
fn backoff_grows_is_capped_and_jittered_downwards() {
    let policy = RetryPolicy {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        jitter: 0.5,
        ..RetryPolicy::default()
    };
    for _ in 0..100 {
        let b1 = policy.backoff(1);
        assert!(
            b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100),
            "{b1:?}"
        );
        let b5 = policy.backoff(5);
        assert!(
            b5 >= Duration::from_millis(250) && b5 <= Duration::from_millis(500),
            "{b5:?}"
        );
    }
}

#[test]
fn dropping_an_attempt_outside_a_runtime_still_releases() {
    let ledger = Ledger::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let attempt = Attempt::new("no runtime", &ledger);
    attempt
        .own("sub", move || async move {
            tx.send(()).unwrap();
        })
        .unwrap();
    drop(attempt);
    rx.recv_timeout(LIMIT)
        .expect("release ran on its own thread");
}

#[tokio::test]
async fn ledger_spawn_counts_a_task_until_it_ends() {
    let ledger = Ledger::new();
    let (tx, rx) = oneshot::channel::<()>();
    let task = ledger.spawn("task", async move {
        let _ = rx.await;
    });
    assert_eq!(ledger.live("task"), 1);
    assert_eq!(ledger.snapshot().get("task"), Some(&1));
    tx.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(ledger.live("task"), 0);
    assert!(ledger.snapshot().is_empty());
}
