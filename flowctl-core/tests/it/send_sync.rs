//! Public types are Send (and Sync where shared), as tokio's async_send_sync.rs checks.

use bytes::Bytes;
use flowctl_core::compat::{FuturesSink, StreamSource};
use flowctl_core::frame::Framed;
use flowctl_core::gate::{Gate, GateHandle, GateState};
use flowctl_core::io::{ReaderSource, WriterSink};
use flowctl_core::lifecycle::{Attempt, Claim, Lease, Ledger, RetryPolicy};
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::*;

fn send<T: Send>() {}
fn sync<T: Sync>() {}

#[test]
fn public_types_are_send_and_sync() {
    send::<PipeSink<Bytes>>();
    sync::<PipeSink<Bytes>>();
    send::<PipeSource<Bytes>>();
    sync::<PipeSource<Bytes>>();
    send::<WriterSink<tokio::net::TcpStream>>();
    send::<ReaderSource<tokio::net::TcpStream>>();
    send::<Framed<PipeSource<Bytes>, tokio_util::codec::BytesCodec>>();
    send::<StreamSource<futures::stream::Empty<Bytes>>>();
    send::<FuturesSink<futures::channel::mpsc::Sender<Bytes>, Bytes>>();
    send::<Gate>();
    sync::<Gate>();
    send::<GateHandle>();
    send::<GateState>();
    sync::<GateState>();
    send::<Ledger>();
    sync::<Ledger>();
    send::<Lease>();
    send::<Attempt>();
    sync::<Attempt>();
    send::<Claim>();
    send::<RetryPolicy>();
    send::<FlowError>();
    sync::<FlowError>();
    send::<Stage>();
    sync::<Stage>();
    send::<Writability>();
    sync::<Writability>();
    send::<PipeBuilder>();
    sync::<PipeBuilder>();
    send::<stage::StageCounter>();
    sync::<stage::StageCounter>();
    send::<stage::StageGauge>();
    sync::<stage::StageGauge>();
    send::<FlowStats>();
    send::<Watermarks>();
    send::<Fairness>();
    // Trait objects are usable across tasks.
    send::<Box<dyn Source<Item = Bytes>>>();
    send::<Box<dyn Sink<Item = Bytes>>>();
}

#[test]
fn trait_futures_are_send() {
    fn assert_send<F: Send>(_: &F) {}
    let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::default());
    let f = SinkExt::send(&mut tx, Bytes::new());
    assert_send(&f);
    drop(f);
    let f = SourceExt::recv(&mut rx);
    assert_send(&f);
}
