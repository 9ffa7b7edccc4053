//! 64 MiB through a consumer that stalls, then drains: every byte arrives and
//! the buffers stay within `high + 2 * max_packet`.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_ssh::Session;

use crate::fixture::{Fixture, both_servers, pattern, until};

const TOTAL: u64 = 64 * 1024 * 1024;
/// 17 bytes per line of `yes 0123456789abcdef`.
const LINE: &[u8] = b"0123456789abcdef\n";

both_servers! {
    stdout_64mib_stalled_consumer_is_bounded => stdout_64mib_stalled_consumer_is_bounded;
    stdin_64mib_stalled_remote_is_bounded => stdin_64mib_stalled_remote_is_bounded;
}

async fn stdout_64mib_stalled_consumer_is_bounded(fx: Fixture) {
    let config = fx.config();
    let high = config.watermarks.high();
    let max_packet = config.max_packet as usize;
    let session = Session::connect(config).await.unwrap();
    let mut p = session
        .exec(&format!("yes 0123456789abcdef | head -c {TOTAL}"))
        .await
        .unwrap();
    // Stall: read nothing until the source reports it is paused (its buffer
    // went above high), i.e. the producer side is now held back.
    until(Duration::from_secs(60), "stdout to pause", || {
        p.stdout.stats().paused
    })
    .await;
    let at_stall = p.stdout.stats();
    assert!(at_stall.buffered > high && at_stall.buffered <= high + 2 * max_packet);
    // Drain, checking every byte.
    let mut n = 0u64;
    while let Some(chunk) = p.stdout.recv().await.unwrap() {
        for &b in chunk.iter() {
            assert_eq!(b, LINE[(n % LINE.len() as u64) as usize], "byte {n}");
            n += 1;
        }
    }
    assert_eq!(n, TOTAL);
    let stats = p.stdout.stats();
    assert_eq!(stats.bytes, TOTAL);
    assert!(stats.pauses >= 1);
    assert!(
        stats.max_buffered <= high + 2 * max_packet,
        "max_buffered {} above high {} + 2 packets",
        stats.max_buffered,
        high
    );
    assert!(p.wait().await.unwrap().success());
}

async fn stdin_64mib_stalled_remote_is_bounded(fx: Fixture) {
    let config = fx.config();
    let high = config.watermarks.high();
    let session = Session::connect(config).await.unwrap();
    let go = fx.path("go");
    let file = fx.path("received");
    // The remote consumer stalls until the test creates `go`.
    let mut p = session
        .exec(&format!(
            "while [ ! -e {go} ]; do sleep 0.01; done; cat > {file}",
            go = go.display(),
            file = file.display()
        ))
        .await
        .unwrap();
    const CHUNK: usize = 32 * 1024;
    let mut stdin = p.stdin;
    let stats_probe = std::sync::Arc::new(std::sync::Mutex::new(stdin.stats()));
    let probe = stats_probe.clone();
    let producer = tokio::spawn(async move {
        let mut off = 0u64;
        while off < TOTAL {
            let chunk: Vec<u8> = (off..off + CHUNK as u64).map(pattern).collect();
            stdin.send(Bytes::from(chunk)).await.unwrap();
            off += CHUNK as u64;
            *probe.lock().unwrap() = stdin.stats();
        }
        stdin.close().await.unwrap();
        stdin.stats()
    });
    until(Duration::from_secs(60), "stdin to pause", || {
        stats_probe.lock().unwrap().paused
    })
    .await;
    std::fs::write(&go, b"").unwrap();
    let stats = producer.await.unwrap();
    assert_eq!(stats.bytes, TOTAL);
    assert!(stats.pauses >= 1);
    assert!(
        stats.max_buffered <= high + CHUNK,
        "stdin max_buffered {} above high {high} + one chunk",
        stats.max_buffered
    );
    assert!(p.exit.wait().await.unwrap().success());
    // Compare the file with what was sent, byte for byte.
    let mut f = std::fs::File::open(&file).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        for &b in &buf[..k] {
            assert_eq!(b, pattern(n), "byte {n} of the remote file");
            n += 1;
        }
    }
    assert_eq!(n, TOTAL);
}
