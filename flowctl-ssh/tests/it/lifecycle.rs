//! Dropping processes and sessions leaves nothing behind: the ledger returns
//! to zero (every task of ours ended, russh's session task awaited) and the
//! server sees the connection go.

use std::time::Duration;

use flowctl_core::prelude::*;
use flowctl_ssh::{LEDGER_SESSION, LEDGER_TASK, Session};

use crate::fixture::{Fixture, Kind, both_servers, until};

both_servers! {
    dropping_a_running_process_and_session_leaks_nothing => dropping_a_running_process_and_session_leaks_nothing;
    dropping_mid_stream_leaks_nothing => dropping_mid_stream_leaks_nothing;
}

async fn zero(fx: &Fixture) {
    tokio::time::timeout(Duration::from_secs(30), fx.ledger.until_zero(None))
        .await
        .unwrap_or_else(|_| panic!("ledger not back to zero: {:?}", fx.ledger));
    if let Some(sshd) = &fx.sshd {
        // sshd's side: every accepted connection was closed by the client
        // (for the openssh backend: the ControlMaster really exited).
        // Every accepted connection must end in sshd's log. A clean close logs
        // "Disconnected from user"; a client that vanishes while sshd is still
        // writing (dropped mid-stream) logs "...port N: Broken pipe" instead.
        let all_ended = || {
            let ends = sshd.lines_with(&[
                "Disconnected from user",
                "Broken pipe",
                "Connection reset",
                "Connection closed by",
            ]);
            let accepted = sshd.lines_with(&["Accepted publickey"]);
            accepted.iter().all(|line| {
                let port = line
                    .split(" port ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next());
                port.is_some_and(|p| {
                    let tag = format!("port {p}");
                    ends.iter().any(|e| {
                        e.match_indices(&tag).any(|(i, _)| {
                            !e[i + tag.len()..].starts_with(|c: char| c.is_ascii_digit())
                        })
                    })
                })
            })
        };
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            while !all_ended() {
                tokio::time::sleep(Duration::from_millis(2)).await; // polling sshd's log
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "sshd did not see every connection go: {:#?}",
            sshd.lines_with(&[
                "Accepted",
                "Disconnect",
                "onnection",
                "error",
                "Broken pipe"
            ])
        );
        assert!(sshd.count("Accepted publickey") >= 1);
    }
    if let Some(server) = &fx.embedded {
        // The server's side: only its accept loop is left, no connection,
        // no command task.
        until(
            Duration::from_secs(30),
            "server connections and commands to end",
            || server.live_connections() == 0 && fx.server_ledger.total() == 1,
        )
        .await;
    }
}

async fn dropping_a_running_process_and_session_leaks_nothing(fx: Fixture) {
    let s = Session::connect(fx.config()).await.unwrap();
    assert_eq!(fx.ledger.live(LEDGER_SESSION), 1);
    // `cat` never ends by itself: only closing the channel stops it.
    let p = s.exec("cat").await.unwrap();
    assert_eq!(fx.ledger.live(LEDGER_TASK), 2);
    drop(p);
    // The process's tasks end although the session lives on.
    tokio::time::timeout(
        Duration::from_secs(30),
        fx.ledger.until_zero(Some(LEDGER_TASK)),
    )
    .await
    .expect("process tasks still alive after drop");
    assert_eq!(fx.ledger.live(LEDGER_SESSION), 1);
    // The session still works.
    let mut q = s.exec("echo still").await.unwrap();
    assert_eq!(q.stdout.read_to_end().await.unwrap(), b"still\n");
    drop(q);
    drop(s);
    zero(&fx).await;
}

async fn dropping_mid_stream_leaks_nothing(fx: Fixture) {
    let s = Session::connect(fx.config()).await.unwrap();
    let mut p = s.exec("head -c 1073741824 /dev/zero").await.unwrap();
    let mut got = 0;
    while got < 4 * 1024 * 1024 {
        got += p.stdout.recv().await.unwrap().unwrap().len();
    }
    // Drop the session first, then the process in the middle of its output.
    drop(s);
    drop(p);
    zero(&fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_isolated_is_not_blocked_by_a_stalled_channel() {
    let fx = Fixture::start(Kind::Embedded).await;
    let s = Session::connect(fx.config()).await.unwrap();
    // A process nobody reads, on its own connection.
    let stalled = s
        .exec_isolated("head -c 1073741824 /dev/zero")
        .await
        .unwrap();
    until(
        Duration::from_secs(30),
        "the isolated process to pause",
        || stalled.stdout.stats().paused,
    )
    .await;
    assert_eq!(fx.ledger.live(LEDGER_SESSION), 2);
    // The main connection still runs commands to completion.
    let mut p = s.exec("echo free").await.unwrap();
    assert_eq!(p.stdout.read_to_end().await.unwrap(), b"free\n");
    assert!(p.wait().await.unwrap().success());
    drop(p);
    drop(stalled);
    drop(s);
    zero(&fx).await;
}

#[test]
fn public_types_are_send_and_sync_where_expected() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<flowctl_ssh::Session>();
    sync::<flowctl_ssh::Session>();
    send::<flowctl_ssh::RemoteProcess>();
    send::<flowctl_ssh::Stdin>();
    send::<flowctl_ssh::Output>();
    send::<flowctl_ssh::Exit>();
    send::<flowctl_ssh::SshError>();
    sync::<flowctl_ssh::SshError>();
}
