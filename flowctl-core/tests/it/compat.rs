use bytes::Bytes;
use flowctl_core::compat::{FuturesSink, StreamSource};
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, Sink, Source, SourceExt, Watermarks, pipe};
use futures::{SinkExt as _, StreamExt as _};

#[tokio::test]
async fn a_source_is_a_futures_stream() {
    let (mut tx, rx) = pipe::<Bytes>(Watermarks::default());
    tx.send(Bytes::from_static(b"a")).await.unwrap();
    tx.send(Bytes::from_static(b"b")).await.unwrap();
    drop(tx);
    let items: Vec<Bytes> = rx.into_stream().map(Result::unwrap).collect().await;
    assert_eq!(
        items,
        vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
    );
}

#[tokio::test]
async fn a_futures_sink_and_stream_are_ours() {
    let (tx, rx) = futures::channel::mpsc::channel::<Bytes>(4);
    let mut sink = FuturesSink::new(tx);
    let mut src = StreamSource::new(rx);
    sink.send(Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(src.recv().await.unwrap().unwrap(), "x");
    sink.close().await.unwrap();
    sink.close().await.unwrap();
    assert!(matches!(
        sink.send(Bytes::from_static(b"y")).await,
        Err(FlowError::Closed)
    ));
    assert_eq!(src.recv().await.unwrap(), None);
    assert_eq!(
        (Sink::stats(&sink).items, Source::stats(&src).items),
        (1, 1)
    );
}

#[tokio::test]
async fn a_futures_sink_error_is_a_transport_error() {
    let (tx, rx) = futures::channel::mpsc::channel::<Bytes>(1);
    drop(rx);
    let mut sink = FuturesSink::new(tx);
    let err = sink.send(Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(err, FlowError::Transport(_)), "{err}");
    // And the futures Sink still works as before through into_inner.
    let mut inner = sink.into_inner();
    assert!(inner.send(Bytes::new()).await.is_err());
}
