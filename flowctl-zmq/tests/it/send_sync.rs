//! Send/Sync of the public types (tokio's `async_send_sync.rs` habit).

use flowctl_zmq::{
    Context, SocketBuilder, SocketType, ZmqError, ZmqSink, ZmqSocket, ZmqSource, ZmqStats,
};

fn send<T: Send>() {}
fn sync<T: Sync>() {}

#[test]
fn public_types_are_send_and_sync() {
    send::<ZmqSocket>();
    send::<ZmqSink>();
    send::<ZmqSource>();
    sync::<ZmqSink>();
    sync::<ZmqSource>();
    send::<SocketBuilder>();
    sync::<SocketBuilder>();
    send::<Context>();
    sync::<Context>();
    send::<ZmqError>();
    sync::<ZmqError>();
    send::<ZmqStats>();
    send::<SocketType>();
}

#[tokio::test]
async fn halves_can_move_to_other_tasks() {
    let (tx, rx) = ZmqSocket::builder(SocketType::Pair)
        .build()
        .unwrap()
        .split();
    let a = tokio::spawn(async move { drop(tx) });
    let b = tokio::spawn(async move { drop(rx) });
    a.await.unwrap();
    b.await.unwrap();
}
