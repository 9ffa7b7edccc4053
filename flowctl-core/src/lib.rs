//! Bounded, fair, leak-free flow control for async transports.
//!
//! `flowctl-core` holds the traits and state machines the transport crates
//! (`flowctl-ssh`, `flowctl-zmq`, `flowctl-cluster`) are built on. It does no
//! network I/O. Four promises run through it:
//!
//! - **Bounded memory.** Every buffer is charged in bytes against
//!   [`Watermarks`]: a producer waits while a stage holds more than `high`
//!   bytes and resumes at `low`, so a slow consumer costs at most `high` plus one
//!   item per producer, never the whole stream ([`pipe()`], [`gate`], [`io`]).
//! - **Fair scheduling.** Every ready path spends tokio's coop budget and a
//!   [`Fairness`] budget of items and bytes, then yields, so an always-ready
//!   source cannot starve timers ([`fair`]).
//! - **No copying per frame, no CPU work on the reactor.** [`frame::Framed`]
//!   decodes without re-copying its buffer; [`offload::ordered`] runs heavy work
//!   on other threads and keeps input order, charging in-flight bytes.
//! - **Leak-free lifecycles.** An [`lifecycle::Attempt`] owns every
//!   sub-resource an acquisition requested, in flight or not; dropping it
//!   releases them, and [`lifecycle::retry`] starts a new attempt only after the
//!   old one is released. [`lifecycle::Ledger`] counts what is live.
//!
//! # Example
//!
//! A fast producer, a slow consumer, and memory that stays at the watermark:
//!
//! ```
//! use bytes::Bytes;
//! use flowctl_core::prelude::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), flowctl_core::FlowError> {
//! let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::new(16 * 1024, 64 * 1024)?);
//! let producer = tokio::spawn(async move {
//!     for _ in 0..1000 {
//!         tx.send(Bytes::from(vec![0u8; 4096])).await?; // waits above 64 KiB
//!     }
//!     tx.close().await
//! });
//! let mut received = 0;
//! while let Some(chunk) = rx.recv().await? {
//!     received += chunk.len();
//!     tokio::task::yield_now().await; // a slow consumer
//! }
//! producer.await.unwrap()?;
//! assert_eq!(received, 1000 * 4096);
//! assert!(rx.stats().max_buffered <= 64 * 1024 + 4096);
//! # Ok(())
//! # }
//! ```
//!
//! # Feature flags
//!
//! - `metrics`: every named [`Stage`] reports its buffered bytes, pauses,
//!   items, drops and forced yields through the [`metrics`](https://docs.rs/metrics)
//!   facade (see [`stage`]). Off by default; without it the calls compile to
//!   nothing, and core depends only on tokio, bytes, futures and tracing.
//!
//! Heavy backends are features of the transport crates.
//! The `flowctl_loom` cfg (`RUSTFLAGS="--cfg flowctl_loom"`, run by
//! `cargo xtask loom`) swaps the gate's and the pipe's locks for loom's.

#![forbid(unsafe_code)]

mod error;
mod pipe;
mod pump;
mod stats;
mod sync;
mod traits;
mod watermarks;
pub mod weighted;

pub mod compat;
pub mod fair;
pub mod frame;
pub mod gate;
pub mod io;
pub mod lifecycle;
pub mod offload;
pub mod stage;

pub use error::{BoxError, FlowError};
pub use fair::Fairness;
pub use pipe::{PipeBuilder, PipeSink, PipeSource, pipe, pipe_with};
pub use pump::pump;
pub use stage::{Overflow, Stage, Writability};
pub use stats::{FlowStats, PumpStats};
pub use traits::{
    CloseFuture, FlushFuture, ReadyFuture, RecvFuture, RecvManyFuture, SendError, SendFuture, Sink,
    SinkExt, Source, SourceExt, TrySendError,
};
pub use watermarks::Watermarks;
pub use weighted::Weighted;

/// `use flowctl_core::prelude::*;` brings the traits, their async
/// conveniences and the everyday types.
pub mod prelude {
    pub use crate::{
        Fairness, FlowError, FlowStats, Overflow, PipeBuilder, SendError, Sink, SinkExt, Source,
        SourceExt, TrySendError, Watermarks, Weighted, pipe, pipe_with, pump,
    };
}

/// The README's example is compiled and run as a doctest, so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
