//! TLS passed through to async-nats (rustls, `ring`): every node requires TLS
//! on its client port with a certificate signed by a throwaway CA.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use flowctl_cluster::testing::{NatsCluster, READY_LIMIT};
use flowctl_cluster::{Cluster, ConsumeOptions, Credentials, PublishOptions, Tls};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::prelude::*;

use crate::connect::{config, released};
use crate::pull::stream_and_consumer;

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): run `cargo xtask setup` (installs openssl)")
        });
    assert!(status.success(), "openssl {args:?} failed: {status}");
}

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`:
/// returns (ca.pem, server.pem, server.key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
    ca.extend(["-subj", "/CN=flowctl test CA"]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

async fn tls_cluster() -> (tempfile::TempDir, PathBuf, NatsCluster) {
    tls_cluster_with("").await
}

/// [`tls_cluster`] with `more` configuration lines on every node.
async fn tls_cluster_with(more: &str) -> (tempfile::TempDir, PathBuf, NatsCluster) {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let extra = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", timeout: 5 }}\n{more}",
        cert.display(),
        key.display()
    );
    let nats = NatsCluster::start_with(&extra, READY_LIMIT)
        .await
        .expect("nats cluster with TLS");
    (dir, ca, nats)
}

/// With the CA as a root: connect, publish into an R3 stream and consume it
/// back in order over TLS; the ledger returns to zero.
#[tokio::test]
async fn a_cluster_that_requires_tls_is_reached_with_the_ca_as_root() {
    let (_dir, ca, nats) = tls_cluster().await;
    let ledger = Ledger::new();
    let mut cfg = config(nats.urls(), &ledger);
    cfg.tls = Tls {
        required: true,
        root_certificates: vec![ca],
        client_cert: None,
    };
    let cluster = Cluster::connect(cfg).await.unwrap();
    stream_and_consumer(&cluster, "TLS", "tls.>", "c", Duration::from_secs(30)).await;
    let mut sink = cluster
        .publisher("tls.x", PublishOptions::default())
        .await
        .unwrap();
    for i in 0..100u64 {
        sink.send(Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    sink.close().await.unwrap();
    let mut src = cluster
        .consume("TLS", "c", ConsumeOptions::default())
        .await
        .unwrap();
    for i in 0..100u64 {
        let m = tokio::time::timeout(Duration::from_secs(60), src.recv())
            .await
            .expect("message within 60 s")
            .unwrap()
            .expect("stream ended early");
        assert_eq!(m.payload[..], i.to_be_bytes()[..]);
    }
    drop(src);
    drop(sink);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}

/// Without the CA the server's certificate is not trusted: every seed fails
/// with a TLS reason, and nothing is left behind.
#[tokio::test]
async fn an_untrusted_server_certificate_is_a_clear_error() {
    let (_dir, _ca, nats) = tls_cluster().await;
    let ledger = Ledger::new();
    let mut cfg = config(nats.urls(), &ledger);
    cfg.tls.required = true;
    cfg.retry.max_attempts = 1;
    let err = Cluster::connect(cfg).await.unwrap_err();
    let text = err.to_string().to_lowercase();
    for url in nats.urls() {
        assert!(
            text.contains(&url.to_lowercase()),
            "seed {url} named: {err}"
        );
    }
    assert!(
        text.contains("certificate") || text.contains("tls"),
        "the reason names the certificate: {err}"
    );
    assert_eq!(ledger.total(), 0);
}

/// A password needs no opt-out when TLS protects it: `tls://` seeds (here
/// without `Tls::required`) make flowctl require TLS on every connection,
/// and the user publishes and flushes over it.
#[tokio::test]
async fn credentials_over_tls_seeds_need_no_opt_out() {
    let (_dir, ca, nats) =
        tls_cluster_with("authorization { users: [ { user: flow, password: s3cret } ] }\n").await;
    let ledger = Ledger::new();
    let seeds = nats
        .urls()
        .iter()
        .map(|u| u.replacen("nats://", "tls://", 1))
        .collect();
    let mut cfg = config(seeds, &ledger);
    cfg.tls.root_certificates = vec![ca];
    cfg.credentials = Credentials::UserPassword("flow".into(), "s3cret".into());
    assert!(!cfg.allow_plaintext_credentials && !cfg.tls.required);
    let cluster = Cluster::connect(cfg).await.unwrap();
    stream_and_consumer(
        &cluster,
        "TLSAUTH",
        "tlsauth.>",
        "c",
        Duration::from_secs(30),
    )
    .await;
    let mut sink = cluster
        .publisher("tlsauth.x", PublishOptions::default())
        .await
        .unwrap();
    sink.send(Bytes::from_static(b"over tls")).await.unwrap();
    sink.close().await.unwrap();
    assert_eq!(sink.acked(), 1);
    drop(sink);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}
