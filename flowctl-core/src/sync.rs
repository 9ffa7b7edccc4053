//! The synchronisation primitives of the gate and the pipe, swapped for loom's
//! under `--cfg flowctl_loom` (tokio's `src/loom` pattern). A custom cfg name is
//! used because tokio itself reacts to `--cfg loom`.

#[cfg(not(flowctl_loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(flowctl_loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

/// Locks, ignoring poisoning: every critical section in this crate leaves the
/// state consistent before it can panic (no user code runs under a lock).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
