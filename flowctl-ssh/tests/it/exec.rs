//! The same exec tests against the embedded server and sshd.

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_ssh::{ExitStatus, Session};

use crate::fixture::{Fixture, both_servers};

both_servers! {
    stdout_stderr_and_exit_code => stdout_stderr_and_exit_code;
    stdin_reaches_remote_and_eof_ends_it => stdin_reaches_remote_and_eof_ends_it;
    eof_from_remote_ends_stdout_while_stdin_open => eof_from_remote_ends_stdout_while_stdin_open;
    two_processes_on_one_session => two_processes_on_one_session;
    dropped_stdout_is_discarded_not_buffered => dropped_stdout_is_discarded_not_buffered;
}

async fn dropped_stdout_is_discarded_not_buffered(fx: Fixture) {
    let session = Session::connect(fx.config()).await.unwrap();
    // 16 MiB of stdout nobody reads, then a line on stderr: the process must
    // finish (a dropped stream is discarded, it does not stop the channel).
    let p = session
        .exec("head -c 16777216 /dev/zero; echo end >&2")
        .await
        .unwrap();
    let (stdin, stdout, mut stderr, mut exit) = p.split();
    drop(stdout);
    drop(stdin);
    assert_eq!(stderr.read_to_end().await.unwrap(), b"end\n");
    assert!(exit.wait().await.unwrap().success());
}

async fn stdout_stderr_and_exit_code(fx: Fixture) {
    let session = Session::connect(fx.config()).await.unwrap();
    let mut p = session
        .exec("printf 'hello out'; printf 'hello err' >&2; exit 3")
        .await
        .unwrap();
    let out = p.stdout.read_to_end().await.unwrap();
    let err = p.stderr.read_to_end().await.unwrap();
    assert_eq!(out, b"hello out");
    assert_eq!(err, b"hello err");
    assert_eq!(p.wait().await.unwrap(), ExitStatus::Code(3));
    assert_eq!(
        p.stdout.recv().await.unwrap(),
        None,
        "end of stream repeats"
    );
}

async fn stdin_reaches_remote_and_eof_ends_it(fx: Fixture) {
    let session = Session::connect(fx.config()).await.unwrap();
    // `wc -c` answers only after EOF on its stdin.
    let mut p = session.exec("wc -c").await.unwrap();
    for _ in 0..100 {
        p.stdin
            .send(Bytes::from_static(&[7u8; 1000]))
            .await
            .unwrap();
    }
    p.stdin.close().await.unwrap();
    let out = p.stdout.read_to_end().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out).trim(), "100000");
    assert!(p.wait().await.unwrap().success());
}

async fn eof_from_remote_ends_stdout_while_stdin_open(fx: Fixture) {
    let session = Session::connect(fx.config()).await.unwrap();
    // The command ignores stdin; our stdin stays open, yet stdout ends.
    let mut p = session.exec("echo done").await.unwrap();
    let out = p.stdout.read_to_end().await.unwrap();
    assert_eq!(out, b"done\n");
    assert_eq!(p.wait().await.unwrap(), ExitStatus::Code(0));
}

async fn two_processes_on_one_session(fx: Fixture) {
    let session = Session::connect(fx.config()).await.unwrap();
    let mut a = session.exec("echo a").await.unwrap();
    let mut b = session.exec("echo b").await.unwrap();
    assert_eq!(b.stdout.read_to_end().await.unwrap(), b"b\n");
    assert_eq!(a.stdout.read_to_end().await.unwrap(), b"a\n");
    assert!(a.wait().await.unwrap().success());
    assert!(b.wait().await.unwrap().success());
}
