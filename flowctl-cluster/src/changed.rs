//! Waiting for a `tokio::sync::watch` value to change from a `poll_*` method.
//!
//! `watch::Receiver` has no poll API: its `changed()` future borrows the
//! receiver, so a stage cannot keep it across polls. [`Changed`] owns the
//! receiver inside one `ReusableBoxFuture` (as `tokio_stream::WatchStream`
//! does): boxed once when the stage is built, re-armed in the same
//! allocation after each change, so polling it allocates nothing.
//!
//! No wake-up can be lost: the future's receiver has seen at most the
//! version the caller last read (it marks a version seen only when the
//! future resolves, and the caller reads the value after that), so a change
//! made after the caller's last read resolves the future, and a pending
//! poll leaves the caller's waker registered with the channel.

use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_util::sync::ReusableBoxFuture;

type Wait<T> = (Result<(), watch::error::RecvError>, watch::Receiver<T>);

async fn wait<T: Send + Sync + 'static>(mut rx: watch::Receiver<T>) -> Wait<T> {
    let r = rx.changed().await;
    (r, rx)
}

/// Resolves each time the watched value changes, and once when its sender
/// is gone; see the module docs.
pub(crate) struct Changed<T> {
    fut: ReusableBoxFuture<'static, Wait<T>>,
    closed: bool,
}

impl<T> std::fmt::Debug for Changed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changed")
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> Changed<T> {
    /// Watches `rx` for changes after the value it holds now.
    pub(crate) fn new(mut rx: watch::Receiver<T>) -> Self {
        rx.borrow_and_update();
        Changed {
            fut: ReusableBoxFuture::new(wait(rx)),
            closed: false,
        }
    }

    /// `Ready(true)` once per change (several changes between two polls
    /// count as one); `Ready(false)` when the sender is gone, then on every
    /// later call; `Pending` with `cx`'s waker registered otherwise.
    pub(crate) fn poll_changed(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if self.closed {
            return Poll::Ready(false);
        }
        let (r, mut rx) = std::task::ready!(self.fut.poll(cx));
        if r.is_err() {
            self.closed = true;
            return Poll::Ready(false);
        }
        rx.borrow_and_update();
        // Same type, so the same layout: the allocation is reused.
        self.fut.set(wait(rx));
        Poll::Ready(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_change_wakes_once_and_the_end_is_sticky() {
        let (tx, rx) = watch::channel(0u64);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut changed = Changed::new(rx);
        // The value it was built with is not a change.
        assert_eq!(changed.poll_changed(&mut cx), Poll::Pending);
        tx.send_modify(|g| *g += 1);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the pending poll's waker was woken"
        );
        assert_eq!(changed.poll_changed(&mut cx), Poll::Ready(true));
        assert_eq!(changed.poll_changed(&mut cx), Poll::Pending);
        // Changes made between two polls count as one, and none is lost.
        tx.send_modify(|g| *g += 1);
        tx.send_modify(|g| *g += 1);
        assert_eq!(changed.poll_changed(&mut cx), Poll::Ready(true));
        assert_eq!(changed.poll_changed(&mut cx), Poll::Pending);
        // A change not yet seen comes before the end.
        tx.send_modify(|g| *g += 1);
        drop(tx);
        assert_eq!(changed.poll_changed(&mut cx), Poll::Ready(true));
        assert_eq!(changed.poll_changed(&mut cx), Poll::Ready(false));
        assert_eq!(changed.poll_changed(&mut cx), Poll::Ready(false));
    }
}
