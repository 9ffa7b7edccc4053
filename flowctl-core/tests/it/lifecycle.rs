#[allow(unused_imports)]
use flowctl_core::prelude::*;
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
    assert_eq!(
        ledger.live("req"),
        0,
        "the caller has it: no longer counted"
    );
    attempt.release().await;
    assert_eq!(released.load(Ordering::SeqCst), 0);
}

/// The value arrives and is sent to the caller's `Inflight`, and then the
/// caller is dropped without polling it again: the value never reaches the
/// caller, so it must be released, and counted until it is.
#[tokio::test]
async fn a_value_sent_to_an_inflight_dropped_before_its_next_poll_is_released() {
    let ledger = Ledger::new();
    let server = Server::default();
    let (reply_tx, reply_rx) = oneshot::channel::<u32>();
    let attempt = Attempt::new("connect", &ledger);
    let s = server.clone();
    let (released_tx, released_rx) = oneshot::channel::<()>();
    let mut inflight = Box::pin(attempt.inflight(
        "sub.request",
        async move { reply_rx.await.map_err(|_| FlowError::Closed) },
        move |id| async move {
            s.unsubscribe(id);
            let _ = released_tx.send(());
        },
    ));
    // Polled once (waiting for the reply), then no more.
    assert!(futures::poll!(inflight.as_mut()).is_pending());
    server.subscribe(7);
    reply_tx.send(7).unwrap();
    // The request's task ends once it has sent the value to `inflight`.
    tokio::time::timeout(LIMIT, attempt.release())
        .await
        .unwrap();
    assert_eq!(server.live(), vec![7], "sent, not yet taken or released");
    assert_eq!(
        ledger.live("sub.request"),
        1,
        "a value on its way to the caller is still counted"
    );
    drop(inflight);
    tokio::time::timeout(LIMIT, released_rx)
        .await
        .expect("the value dropped with its Inflight was never released")
        .unwrap();
    assert!(server.live().is_empty(), "{:?}", server.live());
    tokio::time::timeout(LIMIT, ledger.until_zero(Some("sub.request")))
        .await
        .unwrap();
}

/// As above, but the caller is dropped first, on a thread outside the
/// runtime, and only then is the attempt released (what `retry` does after a
/// timeout): `release` must wait for the value's release, or the next
/// attempt would start beside a live subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_waits_for_a_sent_value_whose_inflight_was_dropped_off_the_runtime() {
    let ledger = Ledger::new();
    let server = Server::default();
    let (reply_tx, reply_rx) = oneshot::channel::<u32>();
    let attempt = Attempt::new("connect", &ledger);
    let s = server.clone();
    let mut inflight = Box::pin(attempt.inflight(
        "sub.request",
        async move { reply_rx.await.map_err(|_| FlowError::Closed) },
        move |id| async move {
            // Gives the caller's `release` a chance to return too early.
            tokio::task::yield_now().await;
            s.unsubscribe(id);
        },
    ));
    assert!(futures::poll!(inflight.as_mut()).is_pending());
    server.subscribe(7);
    reply_tx.send(7).unwrap();
    // The request's task has ended once it has sent the value.
    tokio::time::timeout(LIMIT, async {
        while attempt.live() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    std::thread::scope(|t| {
        t.spawn(move || drop(inflight));
    });
    tokio::time::timeout(LIMIT, attempt.release())
        .await
        .unwrap();
    assert!(
        server.live().is_empty(),
        "release returned before the dropped value was released: {:?}",
        server.live()
    );
    assert_eq!(ledger.live("sub.request"), 0);
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

/// A release action that reports `name` when it starts and finishes only once
/// `gate` opens (or its sender is dropped).
fn gated(
    name: &'static str,
    entered: &tokio::sync::mpsc::UnboundedSender<&'static str>,
    gate: oneshot::Receiver<()>,
) -> impl FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + 'static {
    let entered = entered.clone();
    move || {
        Box::pin(async move {
            let _ = entered.send(name);
            let _ = gate.await;
        })
    }
}

/// Waits for the next release action to start. A hang detector only: under
/// paused time it fires as soon as nothing else can run.
async fn next_entered(
    entered: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>,
) -> Option<&'static str> {
    tokio::time::timeout(Duration::from_secs(3600), entered.recv())
        .await
        .expect("no release action started, and none can")
}

/// The ledger counts `sub` twice while "b" runs and "a" waits, once while "a"
/// runs, and zero only after both have finished.
async fn both_releases_run_and_stay_counted(
    ledger: &Ledger,
    entered: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>,
    open_a: oneshot::Sender<()>,
    open_b: oneshot::Sender<()>,
) {
    assert_eq!(
        ledger.live("sub"),
        2,
        "the ledger must count both resources while their releases are pending"
    );
    open_b.send(()).unwrap();
    assert_eq!(
        next_entered(entered).await,
        Some("a"),
        "the second release never ran"
    );
    assert_eq!(ledger.live("sub"), 1, "\"b\" finished, \"a\" is running");
    open_a.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3600), ledger.until_zero(Some("sub")))
        .await
        .expect("both releases finished: nothing is live");
}

/// Issue 15 item 2: `release_within` gives up on a slow release action; the
/// actions not finished by then still run, and each resource stays counted
/// until its action has finished.
#[tokio::test(start_paused = true)]
async fn release_within_timeout_still_runs_and_counts_every_release() {
    let ledger = Ledger::new();
    let attempt = Attempt::new("connect", &ledger);
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let (open_a, a_gate) = oneshot::channel();
    let (open_b, b_gate) = oneshot::channel();
    // Released last owned first: "b" (slow) before "a".
    attempt.own("sub", gated("a", &entered_tx, a_gate)).unwrap();
    attempt.own("sub", gated("b", &entered_tx, b_gate)).unwrap();
    drop(entered_tx);
    // "b" cannot finish before its gate opens: the limit always passes first.
    attempt.release_within(Duration::from_secs(1)).await;
    assert_eq!(next_entered(&mut entered).await, Some("b"));
    both_releases_run_and_stay_counted(&ledger, &mut entered, open_a, open_b).await;
    // Releasing again finds nothing left to release.
    attempt.release().await;
    assert_eq!(ledger.total(), 0);
}

/// Issue 15 item 2: a `retry` dropped while it releases a failed attempt: the
/// release actions still run, each counted until it has finished.
#[tokio::test(start_paused = true)]
async fn a_retry_dropped_mid_release_still_runs_and_counts_every_release() {
    let ledger = Ledger::new();
    let policy = RetryPolicy {
        ledger: ledger.clone(),
        release_timeout: Duration::from_secs(60),
        ..RetryPolicy::default()
    };
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let (open_a, a_gate) = oneshot::channel();
    let (open_b, b_gate) = oneshot::channel();
    let mut gates = Some((a_gate, b_gate));
    let retrying = retry(&policy, |attempt| {
        let gates = gates.take();
        let entered_tx = entered_tx.clone();
        async move {
            let (a_gate, b_gate) = gates.expect("one attempt only: it is dropped mid-release");
            attempt.own("sub", gated("a", &entered_tx, a_gate))?;
            attempt.own("sub", gated("b", &entered_tx, b_gate))?;
            Err::<(), _>(FlowError::Timeout(Duration::from_millis(1)))
        }
    });
    tokio::select! {
        r = retrying => panic!("retry ended while a release action was blocked: {r:?}"),
        first = entered.recv() => assert_eq!(first, Some("b")),
    }
    // The retry future is gone, mid-release.
    drop(entered_tx);
    both_releases_run_and_stay_counted(&ledger, &mut entered, open_a, open_b).await;
}

/// An in-flight request aborted by `release_within` drops its lease; a value
/// it already produced is released to the end even though the limit passed.
#[tokio::test(start_paused = true)]
async fn release_within_aborts_a_waiting_request_but_not_a_late_release() {
    let ledger = Ledger::new();
    let attempt = Attempt::new("connect", &ledger);
    // A request that never answers.
    let never = attempt.inflight(
        "sub",
        std::future::pending::<Result<u32, FlowError>>(),
        |_| async {},
    );
    // A request that answers at once; its value's release blocks until opened.
    let (open, gate) = oneshot::channel::<()>();
    let (released_tx, released_rx) = oneshot::channel();
    let answered = attempt.inflight("sub", async { Ok(7u32) }, move |v| async move {
        let _ = gate.await;
        let _ = released_tx.send(v);
    });
    // Dropped before its request has run: its value will come late.
    drop(answered);
    attempt.release_within(Duration::from_secs(1)).await;
    // The waiting request was aborted (its lease goes before its reply
    // channel); the late value is still being released.
    assert!(matches!(never.await, Err(FlowError::Closed)));
    assert_eq!(ledger.live("sub"), 1);
    open.send(()).unwrap();
    assert_eq!(released_rx.await.unwrap(), 7);
    tokio::time::timeout(Duration::from_secs(3600), ledger.until_zero(Some("sub")))
        .await
        .expect("the late release finished: nothing is live");
}

/// Issue 15, also fix: a jitter that is not a fraction from 0.0 to 1.0 is a
/// configuration error naming the field and the limit, and `retry` refuses
/// it before its first attempt.
#[tokio::test]
async fn retry_policy_rejects_a_jitter_outside_zero_to_one() {
    for jitter in [
        f64::NAN,
        -0.5,
        -0.0001,
        1.5,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        let policy = RetryPolicy {
            jitter,
            ledger: Ledger::new(),
            ..RetryPolicy::default()
        };
        let err = policy.validate().unwrap_err();
        assert!(matches!(err, FlowError::Config(_)), "{jitter}: {err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("jitter") && msg.contains("0.0 to 1.0"),
            "{jitter}: {msg}"
        );
        let mut calls = 0;
        let refused = retry(&policy, |_| {
            calls += 1;
            async { Ok(()) }
        })
        .await
        .unwrap_err();
        assert_eq!(refused.to_string(), msg);
        assert_eq!(calls, 0, "no attempt runs under an invalid policy");
    }
    for jitter in [0.0, 0.5, 1.0] {
        let policy = RetryPolicy {
            jitter,
            ..RetryPolicy::default()
        };
        policy.validate().unwrap();
    }
}

/// Issue 15, also fix: `backoff` is total: a NaN, negative or infinite jitter
/// (a policy `validate` would refuse) and pauses near `Duration::MAX` give a
/// pause within `0..=max_backoff` instead of a panic.
#[test]
fn backoff_never_panics_and_stays_within_max_backoff() {
    for jitter in [
        f64::NAN,
        -1.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        0.0,
        0.5,
        1.0,
    ] {
        for (initial, max) in [
            (Duration::MAX, Duration::MAX),
            (Duration::from_secs(1), Duration::MAX),
            (Duration::MAX, Duration::from_secs(u64::MAX / 2)),
            (Duration::from_millis(100), Duration::from_secs(5)),
        ] {
            let policy = RetryPolicy {
                initial_backoff: initial,
                max_backoff: max,
                jitter,
                ..RetryPolicy::default()
            };
            for attempt in [0, 1, 2, 63, 64, 65, u32::MAX] {
                let pause = policy.backoff(attempt);
                assert!(
                    pause <= max,
                    "{jitter} {initial:?} {max:?} {attempt}: {pause:?}"
                );
            }
        }
    }
    // Without jitter the capped pause is exact, even at `Duration::MAX`.
    let policy = RetryPolicy {
        initial_backoff: Duration::MAX,
        max_backoff: Duration::MAX,
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    assert_eq!(policy.backoff(1), Duration::MAX);
    assert_eq!(policy.backoff(u32::MAX), Duration::MAX);
    // A NaN jitter counts as none.
    let policy = RetryPolicy {
        initial_backoff: Duration::from_secs(3),
        max_backoff: Duration::from_secs(3),
        jitter: f64::NAN,
        ..RetryPolicy::default()
    };
    assert_eq!(policy.backoff(1), Duration::from_secs(3));
}

/// A policy whose pauses and timeouts are `Duration::MAX` is valid, and
/// `retry` runs under it (its timers saturate instead of overflowing).
#[tokio::test]
async fn retry_runs_under_duration_max_limits() {
    let policy = RetryPolicy {
        max_attempts: 1,
        attempt_timeout: Duration::MAX,
        initial_backoff: Duration::MAX,
        max_backoff: Duration::MAX,
        release_timeout: Duration::MAX,
        ledger: Ledger::new(),
        ..RetryPolicy::default()
    };
    policy.validate().unwrap();
    let value = retry(&policy, |_| async { Ok(5) }).await.unwrap();
    assert_eq!(value, 5);
}
