//! Leak-free lifecycles: attempts that own what they request, retries that
//! wait for the release, and a ledger that counts what is live.
//!
//! The failure this module prevents: an async connect times out, its cleanup
//! forgets the subscription it had already requested (the request was still in
//! flight, so there was no handle to close yet), and every retry leaves one
//! more subscription behind (Aeron's `AeronCluster.AsyncConnect.close()`).
//!
//! The rules:
//!
//! - An [`Attempt`] owns every sub-resource an acquisition has asked for. Claim
//!   a resource with [`Attempt::own`] **before** the request leaves (name the
//!   consumer, pick the subscription id, then send), or run the request through
//!   [`Attempt::inflight`] so that a reply arriving after a cancel is released
//!   when it lands.
//! - Dropping the attempt (timeout, cancel, error) releases everything it
//!   owns; [`Attempt::commit`] hands it all over to the value the acquisition
//!   returned instead.
//! - [`retry`] bounds each attempt by a timeout and starts the next one only
//!   after the previous attempt is fully released, including its in-flight
//!   requests.
//! - A [`Ledger`] counts live resources and tasks by kind, so tests and the
//!   soak can assert a return to zero.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{AbortHandle, Abortable, BoxFuture};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

use crate::FlowError;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Live resources by kind ("ssh.session", "nats.subscription", "task", ...).
///
/// Cheap to clone; clones share the counts. Every [`Lease`] counts one live
/// resource until it is dropped.
#[derive(Clone, Default)]
pub struct Ledger {
    inner: Arc<LedgerInner>,
}

#[derive(Default)]
struct LedgerInner {
    counts: Mutex<BTreeMap<&'static str, usize>>,
    changed: Notify,
    /// Report every count as the `flowctl_live_resources{kind}` gauge.
    export: bool,
}

impl LedgerInner {
    /// Sets the `flowctl_live_resources{kind}` gauge (under the counts' lock,
    /// so the gauge never goes backwards past a newer count).
    fn report(&self, kind: &'static str, live: usize) {
        #[cfg(feature = "metrics")]
        if self.export {
            metrics::gauge!("flowctl_live_resources", "kind" => kind).set(live as f64);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (kind, live, self.export);
    }
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Ledger").field(&self.snapshot()).finish()
    }
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Ledger::default()
    }

    /// The process-wide ledger that flowctl's transports count into unless
    /// given another. With the `metrics` feature it reports its counts as the
    /// gauge `flowctl_live_resources{kind}` (other ledgers do not: tests make
    /// their own).
    pub fn global() -> &'static Ledger {
        static GLOBAL: OnceLock<Ledger> = OnceLock::new();
        GLOBAL.get_or_init(|| Ledger {
            inner: Arc::new(LedgerInner {
                export: true,
                ..LedgerInner::default()
            }),
        })
    }

    /// Counts one live resource of `kind` until the lease is dropped.
    pub fn acquire(&self, kind: &'static str) -> Lease {
        {
            let mut counts = lock(&self.inner.counts);
            let n = counts.entry(kind).or_insert(0);
            *n += 1;
            self.inner.report(kind, *n);
        }
        tracing::trace!(kind, "ledger: acquired");
        Lease {
            ledger: self.clone(),
            kind,
        }
    }

    /// Spawns `fut` on the current tokio runtime, counted as a live `kind` until it ends.
    ///
    /// # Panics
    /// Outside a tokio runtime, as `tokio::spawn` does.
    pub fn spawn<F>(&self, kind: &'static str, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let lease = self.acquire(kind);
        tokio::spawn(async move {
            let out = fut.await;
            drop(lease);
            out
        })
    }

    /// Live resources of `kind`.
    pub fn live(&self, kind: &str) -> usize {
        lock(&self.inner.counts).get(kind).copied().unwrap_or(0)
    }

    /// Live resources of every kind together.
    pub fn total(&self) -> usize {
        lock(&self.inner.counts).values().sum()
    }

    /// Every kind with a non-zero count.
    pub fn snapshot(&self) -> BTreeMap<&'static str, usize> {
        lock(&self.inner.counts)
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| (*k, *n))
            .collect()
    }

    /// Waits until nothing of `kind` is live (every kind with `None`). Combine
    /// with a timeout in tests: a leak makes it wait forever.
    pub async fn until_zero(&self, kind: Option<&str>) {
        loop {
            let notified = self.inner.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let live = match kind {
                Some(k) => self.live(k),
                None => self.total(),
            };
            if live == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One live resource counted in a [`Ledger`]; dropping it un-counts it.
pub struct Lease {
    ledger: Ledger,
    kind: &'static str,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease").field("kind", &self.kind).finish()
    }
}

impl Lease {
    /// The kind this lease counts as.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut counts = lock(&self.ledger.inner.counts);
            if let Some(n) = counts.get_mut(self.kind) {
                *n = n.saturating_sub(1);
                self.ledger.inner.report(self.kind, *n);
            }
        }
        tracing::trace!(kind = self.kind, "ledger: released");
        self.ledger.inner.changed.notify_waiters();
    }
}

type Release = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

struct Entry {
    id: u64,
    release: Release,
    _lease: Lease,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Committed,
    Released,
}

/// A request started by [`Attempt::inflight`]: its task, and a handle that
/// aborts the request (not the release of a value it already produced).
struct Request {
    task: JoinHandle<()>,
    abort: AbortHandle,
}

struct AttemptInner {
    label: String,
    ledger: Ledger,
    state: State,
    next_id: u64,
    entries: Vec<Entry>,
    inflight: Vec<Request>,
}

/// One try at acquiring something made of several sub-resources (a connection,
/// a subscription, a consumer), owning each of them until it is committed.
///
/// Cheap to clone: the acquisition code gets a clone, the caller (usually
/// [`retry`]) keeps one to release or commit.
///
/// # Release on drop
/// When the last clone is dropped while the attempt is neither committed nor
/// released, every release action is spawned on the current tokio runtime (a
/// destructor cannot wait); each one stays counted in the ledger until it has
/// run. Outside a runtime they run on a short-lived thread of their own.
/// Prefer [`Attempt::release`], which waits.
///
/// ```
/// use flowctl_core::lifecycle::{Attempt, Ledger};
/// use flowctl_core::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flowctl_core::FlowError> {
/// let ledger = Ledger::new();
/// let attempt = Attempt::new("connect", &ledger);
/// let claim = attempt.own("subscription", || async { /* send UNSUB */ })?;
/// assert_eq!(ledger.live("subscription"), 1);
/// attempt.release().await; // runs the UNSUB
/// assert_eq!(ledger.live("subscription"), 0);
/// # let _ = claim; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Attempt {
    inner: Arc<Mutex<AttemptInner>>,
}

impl fmt::Debug for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("Attempt")
            .field("label", &inner.label)
            .field("state", &inner.state)
            .field("owned", &inner.entries.len())
            .field("inflight", &inner.inflight.len())
            .finish()
    }
}

/// A receipt for a resource owned by an [`Attempt`]; pass it to
/// [`Attempt::disown`] when the resource is handed elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim(u64);

/// A request running under an [`Attempt`]; see [`Attempt::inflight`].
#[derive(Debug)]
pub struct Inflight<T> {
    rx: oneshot::Receiver<Result<Delivered<T>, FlowError>>,
}

/// The value of an in-flight request on its way to its [`Inflight`], still
/// counted in the ledger. If the [`Inflight`] is dropped after the value was
/// sent and before it polled it, the oneshot drops the value unseen: this
/// releases it then, as it would a value arriving after the cancel, on a
/// task of the request's runtime (from any thread) that counts until it has
/// finished and that [`Attempt::release`] waits for.
struct Delivered<T> {
    value: Option<T>,
    release: Option<Box<dyn FnOnce(T) -> BoxFuture<'static, ()> + Send>>,
    lease: Option<Lease>,
    runtime: tokio::runtime::Handle,
    attempt: std::sync::Weak<Mutex<AttemptInner>>,
}

impl<T> Delivered<T> {
    /// The value for the caller: nothing is released, and the ledger stops
    /// counting it (the caller [`own`](Attempt::own)s it if it needs to).
    fn take(mut self) -> Option<T> {
        self.release = None;
        self.lease = None;
        self.value.take()
    }

    /// The release of the value, to run now (`None` if already taken).
    fn release_now(mut self) -> Option<BoxFuture<'static, ()>> {
        let (value, release) = (self.value.take()?, self.release.take()?);
        let (work, lease) = (release(value), self.lease.take());
        Some(Box::pin(async move {
            work.await;
            drop(lease);
        }))
    }
}

impl<T> Drop for Delivered<T> {
    fn drop(&mut self) {
        let (Some(value), Some(release)) = (self.value.take(), self.release.take()) else {
            return;
        };
        let lease = self.lease.take();
        tracing::debug!("in-flight value dropped before its caller took it: releasing");
        let work = release(value);
        let task = self.runtime.spawn(async move {
            work.await;
            drop(lease);
        });
        // The attempt's `release` waits for it like for a request (there is
        // no request left to abort).
        if let Some(inner) = self.attempt.upgrade() {
            lock(&inner).inflight.push(Request {
                task,
                abort: AbortHandle::new_pair().0,
            });
        }
    }
}

impl<T> fmt::Debug for Delivered<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivered")
            .field("taken", &self.value.is_none())
            .finish()
    }
}

impl<T> Future for Inflight<T> {
    type Output = Result<T, FlowError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.rx.poll_unpin(cx).map(|r| match r {
            Ok(Ok(delivered)) => delivered.take().ok_or(FlowError::Closed),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(FlowError::Closed),
        })
    }
}

impl Attempt {
    /// A new, open attempt counting its resources in `ledger`.
    pub fn new(label: impl Into<String>, ledger: &Ledger) -> Self {
        Attempt {
            inner: Arc::new(Mutex::new(AttemptInner {
                label: label.into(),
                ledger: ledger.clone(),
                state: State::Open,
                next_id: 0,
                entries: Vec::new(),
                inflight: Vec::new(),
            })),
        }
    }

    /// Owns a resource of `kind`, released by `release` unless the attempt is
    /// committed. Call it before sending the request that creates the resource.
    ///
    /// # Errors
    /// [`FlowError::Closed`] if the attempt was already released or committed;
    /// `release` then runs at once (spawned), so nothing is left behind.
    pub fn own<F, Fut>(&self, kind: &'static str, release: F) -> Result<Claim, FlowError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let release: Release = Box::new(move || release().boxed());
        let mut inner = lock(&self.inner);
        let lease = inner.ledger.acquire(kind);
        if inner.state != State::Open {
            drop(inner);
            drop(run_detached(vec![(release, lease)]));
            return Err(FlowError::Closed);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.entries.push(Entry {
            id,
            release,
            _lease: lease,
        });
        Ok(Claim(id))
    }

    /// Stops owning a resource without releasing it: something else (a value
    /// returned to the user, a background task) owns it now.
    pub fn disown(&self, claim: Claim) {
        lock(&self.inner).entries.retain(|e| e.id != claim.0);
    }

    /// Runs `request` on its own task, owned by this attempt, and returns a
    /// future of its result.
    ///
    /// If the returned [`Inflight`] is dropped before the request completes (the
    /// acquisition was cancelled or timed out), the request still runs to its
    /// end and `release` is applied to the value it produced: a reply that
    /// arrives after the cancel is cleaned up, not leaked. [`Attempt::release`]
    /// waits for such requests. Once the caller has the value it belongs to
    /// the caller, who should [`own`](Attempt::own) it if it needs releasing.
    /// A value already sent when the [`Inflight`] is dropped, but not yet
    /// polled out of it, is released too (on a task of its own, from any
    /// thread, counted in the ledger until it has finished; `release` waits
    /// for it).
    pub fn inflight<T, Req, R, RFut>(
        &self,
        kind: &'static str,
        request: Req,
        release: R,
    ) -> Inflight<T>
    where
        T: Send + 'static,
        Req: Future<Output = Result<T, FlowError>> + Send + 'static,
        R: FnOnce(T) -> RFut + Send + 'static,
        RFut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let (abort, registration) = AbortHandle::new_pair();
        let mut inner = lock(&self.inner);
        let lease = inner.ledger.acquire(kind);
        let attempt = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            // Aborted by `release_within` while it waits: there is no value to
            // release. Once the value is there, its release runs to the end.
            let Ok(result) = Abortable::new(request, registration).await else {
                tracing::debug!(kind, "in-flight request aborted");
                drop(lease);
                return;
            };
            let result = result.map(|value| Delivered {
                value: Some(value),
                release: Some(Box::new(move |v| Box::pin(release(v)))),
                lease: Some(lease),
                runtime: tokio::runtime::Handle::current(),
                attempt,
            });
            if let Err(Ok(delivered)) = tx.send(result) {
                tracing::debug!(
                    kind,
                    "in-flight request completed after its attempt gave up: releasing"
                );
                if let Some(work) = delivered.release_now() {
                    work.await;
                }
            }
        });
        inner.inflight.push(Request { task, abort });
        Inflight { rx }
    }

    /// Resources owned now, in flight included.
    pub fn live(&self) -> usize {
        let inner = lock(&self.inner);
        inner.entries.len()
            + inner
                .inflight
                .iter()
                .filter(|r| !r.task.is_finished())
                .count()
    }

    /// The acquisition succeeded: everything owned now belongs to the value it
    /// returned, and nothing is released.
    pub fn commit(&self) {
        let mut inner = lock(&self.inner);
        inner.state = State::Committed;
        inner.entries.clear();
        inner.inflight.clear();
    }

    /// Releases everything owned, waiting for each release action and for every
    /// in-flight request (whose late value is released too). Idempotent.
    ///
    /// # Cancel safety
    /// The release actions run on a task of their own, last owned first, each
    /// resource counted in the [`Ledger`] until its action has finished. If
    /// this future is dropped (a timeout, a cancelled [`retry`]), they still
    /// run to the end; only the waiting stops.
    pub async fn release(&self) {
        let (entries, inflight, label) = {
            let mut inner = lock(&self.inner);
            if inner.state == State::Open {
                inner.state = State::Released;
            }
            (
                std::mem::take(&mut inner.entries),
                std::mem::take(&mut inner.inflight),
                inner.label.clone(),
            )
        };
        if !entries.is_empty() || !inflight.is_empty() {
            tracing::debug!(attempt = %label, owned = entries.len(), inflight = inflight.len(), "releasing attempt");
        }
        if !entries.is_empty() {
            let pending = entries
                .into_iter()
                .rev()
                .map(|e| (e.release, e._lease))
                .collect();
            // An error means the task was dropped unrun: the runtime is
            // shutting down and there is nothing left to wait for.
            let _ = run_detached(pending).await;
        }
        for request in inflight {
            // A panicking request has nothing left to release.
            let _ = request.task.await;
        }
    }

    /// [`release`](Attempt::release), giving up after `limit`: in-flight
    /// requests still waiting for their value then are aborted (a warning
    /// names the attempt).
    ///
    /// Giving up stops the waiting, not the releasing: release actions not
    /// finished by then keep running on their own task, each still counted in
    /// the [`Ledger`] until it has finished, and so does the release of a late
    /// value an in-flight request already produced.
    pub async fn release_within(&self, limit: Duration) {
        let aborts: Vec<_> = lock(&self.inner)
            .inflight
            .iter()
            .map(|r| r.abort.clone())
            .collect();
        if tokio::time::timeout(limit, self.release()).await.is_err() {
            tracing::warn!(attempt = %lock(&self.inner).label, ?limit, "release did not finish in time; aborting in-flight requests, release actions go on detached");
            for a in aborts {
                a.abort();
            }
        }
    }
}

impl Drop for AttemptInner {
    fn drop(&mut self) {
        if self.state != State::Open || (self.entries.is_empty() && self.inflight.is_empty()) {
            return;
        }
        tracing::debug!(attempt = %self.label, owned = self.entries.len(), "attempt dropped: releasing what it owned");
        // In-flight tasks keep running and release their own late values.
        self.inflight.clear();
        let entries = std::mem::take(&mut self.entries)
            .into_iter()
            .rev()
            .map(|e| (e.release, e._lease))
            .collect();
        // Nobody waits for a destructor's releases.
        drop(run_detached(entries));
    }
}

/// Runs release actions in order on a task of their own; each keeps its lease
/// until its action has finished. The receiver hears when all have finished
/// (an error: the task was dropped unrun); dropping it does not stop them.
fn run_detached(entries: Vec<(Release, Lease)>) -> oneshot::Receiver<()> {
    let (done_tx, done_rx) = oneshot::channel();
    let work = async move {
        for (release, lease) in entries {
            // A release action that panics loses its own resource, not the
            // releases after it.
            let kind = lease.kind();
            if std::panic::AssertUnwindSafe(async move { release().await })
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::warn!(kind, "a release action panicked");
            }
            drop(lease);
        }
        // Nobody may be waiting any more.
        let _ = done_tx.send(());
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(work);
        }
        Err(_) => {
            // No runtime to spawn on: a private one, on a thread, so that a drop
            // outside tokio still releases.
            let spawned = std::thread::Builder::new()
                .name("flowctl-release".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt.block_on(work),
                        Err(e) => tracing::warn!(error = %e, "could not start a runtime to release resources"),
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start a thread to release resources");
            }
        }
    }
    done_rx
}

/// How [`retry`] paces and bounds its attempts.
///
/// Build it with struct update syntax from [`RetryPolicy::default`], then
/// [`validate`](RetryPolicy::validate) it where it is configured; [`retry`]
/// validates it again before its first attempt.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// Each attempt is cancelled (and released) after this long.
    pub attempt_timeout: Duration,
    /// Pause before the second attempt; doubled after each failure.
    pub initial_backoff: Duration,
    /// The pause never exceeds this.
    pub max_backoff: Duration,
    /// Fraction of each pause drawn at random (0.0 = none, 1.0 = anywhere in
    /// 0..=pause): a number from 0.0 to 1.0 (NaN and infinities are refused).
    pub jitter: f64,
    /// How long the release of a failed attempt may take before its in-flight
    /// requests are aborted.
    pub release_timeout: Duration,
    /// Which errors are worth another attempt (default: [`FlowError::is_transient`]).
    pub retry_if: fn(&FlowError) -> bool,
    /// Where attempts count their resources (default: [`Ledger::global`]).
    pub ledger: Ledger,
}

impl Default for RetryPolicy {
    /// 5 attempts of at most 5 s each, backing off from 100 ms to 5 s with 50% jitter.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            attempt_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            jitter: 0.5,
            release_timeout: Duration::from_secs(5),
            retry_if: FlowError::is_transient,
            ledger: Ledger::global().clone(),
        }
    }
}

impl RetryPolicy {
    /// Checks the policy's values: every duration is valid (the arithmetic on
    /// them saturates), `jitter` must be a number from 0.0 to 1.0.
    ///
    /// # Errors
    /// [`FlowError::Config`] naming the field, the value and the limit.
    pub fn validate(&self) -> Result<(), FlowError> {
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(FlowError::Config(format!(
                "retry policy jitter {} must be a number from 0.0 to 1.0",
                self.jitter
            )));
        }
        Ok(())
    }

    /// The pause after failed attempt number `attempt` (1-based), jitter
    /// included: `initial_backoff` doubled per failure, capped at
    /// `max_backoff`, minus up to `jitter` of it.
    ///
    /// Never panics: the doubling saturates, any duration up to
    /// `Duration::MAX` works, and a `jitter` that
    /// [`validate`](RetryPolicy::validate) refuses is clamped to 0.0..=1.0
    /// (NaN counts as 0.0).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
        let base = exp.min(self.max_backoff);
        let jitter = if self.jitter.is_nan() {
            0.0
        } else {
            self.jitter.clamp(0.0, 1.0)
        };
        scale_down(base, 1.0 - jitter * fastrand::f64())
    }
}

/// `d` times `factor` (a fraction from 0.0 to 1.0), never more than `d`.
///
/// `Duration::mul_f64` panics where the product, rounded to an `f64`, does not
/// fit a `Duration`, which happens for `Duration::MAX` even times 1.0.
fn scale_down(d: Duration, factor: f64) -> Duration {
    if factor >= 1.0 || factor.is_nan() {
        return d;
    }
    Duration::try_from_secs_f64(d.as_secs_f64() * factor.max(0.0)).map_or(d, |scaled| scaled.min(d))
}

/// Runs `op` until it succeeds, each attempt bounded by
/// `policy.attempt_timeout`, with jittered exponential backoff between them.
///
/// `op` receives the [`Attempt`] that owns what it requests. On success the
/// attempt is committed; on error or timeout it is released, **and the next
/// attempt starts only once that release is complete**.
///
/// # Errors
/// [`FlowError::Config`] before any attempt if `policy` is invalid (see
/// [`RetryPolicy::validate`]). An error that `policy.retry_if` rejects is
/// returned at once; otherwise, after `max_attempts`,
/// [`FlowError::RetriesExhausted`] with the last error.
///
/// ```
/// use std::time::Duration;
/// use flowctl_core::{FlowError, lifecycle::{retry, Ledger, RetryPolicy}};
/// use flowctl_core::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), FlowError> {
/// let ledger = Ledger::new();
/// let policy = RetryPolicy {
///     initial_backoff: Duration::from_millis(1),
///     ledger: ledger.clone(),
///     ..RetryPolicy::default()
/// };
/// let mut calls = 0;
/// let value = retry(&policy, |attempt| {
///     calls += 1;
///     let fail = calls < 3;
///     async move {
///         attempt.own("subscription", || async {})?;
///         if fail { Err(FlowError::Timeout(Duration::from_millis(1))) } else { Ok(42) }
///     }
/// })
/// .await?;
/// assert_eq!((value, calls), (42, 3));
/// assert_eq!(ledger.total(), 0); // two released, one committed
/// # Ok(()) }
/// ```
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, mut op: F) -> Result<T, FlowError>
where
    F: FnMut(Attempt) -> Fut,
    Fut: Future<Output = Result<T, FlowError>>,
{
    policy.validate()?;
    let max = policy.max_attempts.max(1);
    let mut n = 0;
    loop {
        n += 1;
        let attempt = Attempt::new(format!("attempt {n}"), &policy.ledger);
        let result = match tokio::time::timeout(policy.attempt_timeout, op(attempt.clone())).await {
            Ok(result) => result,
            Err(_) => Err(FlowError::Timeout(policy.attempt_timeout)),
        };
        let err = match result {
            Ok(value) => {
                attempt.commit();
                return Ok(value);
            }
            Err(e) => e,
        };
        attempt.release_within(policy.release_timeout).await;
        if !(policy.retry_if)(&err) {
            return Err(err);
        }
        if n >= max {
            return Err(FlowError::RetriesExhausted {
                attempts: n,
                last: Box::new(err),
            });
        }
        let pause = policy.backoff(n);
        tracing::debug!(attempt = n, error = %err, ?pause, "attempt failed; retrying");
        tokio::time::sleep(pause).await;
    }
}
