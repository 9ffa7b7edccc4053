//! Redirection helpers: remote stdout into a local child, a local reader
//! into remote stdin, bounded end to end.

use std::process::Stdio;

use flowctl_core::Watermarks;
use flowctl_core::prelude::*;
use flowctl_ssh::Session;
use flowctl_ssh::redirect::{output_to_child, reader_to_stdin};
use tokio::io::AsyncReadExt;

use crate::fixture::{Fixture, Kind, pattern};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_stdout_into_local_child() {
    let fx = Fixture::start(Kind::Embedded).await;
    let s = Session::connect(fx.config()).await.unwrap();
    const N: u64 = 8 * 1024 * 1024;
    let mut remote = s.exec(&format!("head -c {N} /dev/zero")).await.unwrap();
    let mut local = tokio::process::Command::new("wc")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let wm = Watermarks::new(16 * 1024, 64 * 1024).unwrap();
    let moved = output_to_child(&mut remote.stdout, local.stdin.take().unwrap(), wm)
        .await
        .unwrap();
    assert_eq!(moved.bytes, N);
    let mut out = String::new();
    local
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert_eq!(out.trim(), N.to_string());
    assert!(local.wait().await.unwrap().success());
    assert!(remote.wait().await.unwrap().success());
    let high = fx.config().watermarks.high();
    assert!(remote.stdout.stats().max_buffered <= high + 2 * 32768);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_reader_into_remote_stdin() {
    let fx = Fixture::start(Kind::Sshd).await;
    let s = Session::connect(fx.config()).await.unwrap();
    let src = fx.path("src");
    let data: Vec<u8> = (0..3_000_000u64).map(pattern).collect();
    std::fs::write(&src, &data).unwrap();
    let dst = fx.path("dst");
    let mut remote = s.exec(&format!("cat > {}", dst.display())).await.unwrap();
    let file = tokio::fs::File::open(&src).await.unwrap();
    let moved = reader_to_stdin(file, &mut remote.stdin).await.unwrap();
    assert_eq!(moved.bytes, data.len() as u64);
    assert!(remote.wait().await.unwrap().success());
    assert_eq!(std::fs::read(&dst).unwrap(), data);
}
