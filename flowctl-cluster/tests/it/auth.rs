use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::stream;
use bytes::Bytes;
use flowctl_cluster::{Cluster, ClusterError, Credentials, PublishOptions};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::prelude::*;
use flowctl_core::{Fairness, FlowError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::connect::{config, released};
use flowctl_cluster::testing::{NatsCluster, READY_LIMIT};

const AUTH: &str = r#"
authorization {
  users: [
    { user: flow, password: s3cret, permissions: {
        publish: { deny: ["secret.>"] },
        subscribe: { deny: ["secret.>"] }
    } }
  ]
}
"#;

#[tokio::test]
async fn wrong_password_is_auth_rejected_and_not_retried() {
    let nats = NatsCluster::start_with(AUTH, READY_LIMIT)
        .await
        .expect("nats cluster");
    let ledger = Ledger::new();
    let mut cfg = config(nats.urls(), &ledger);
    cfg.credentials = Credentials::UserPassword("flow".into(), "wrong".into());
    // The fixture's client ports are plaintext (loopback): opt out knowingly.
    cfg.allow_plaintext_credentials = true;
    cfg.retry.max_attempts = 5;
    let err = Cluster::connect(cfg).await.unwrap_err();
    match err.transport_error::<ClusterError>() {
        Some(ClusterError::AuthRejected { seed, reason }) => {
            assert!(nats.urls().contains(seed), "{seed}");
            assert!(reason.contains("authorization"), "{reason}");
        }
        other => panic!("expected AuthRejected, got {other:?} ({err})"),
    }
    // Not wrapped in RetriesExhausted: the first rejection ended it.
    assert!(
        !matches!(err, flowctl_core::FlowError::RetriesExhausted { .. }),
        "{err}"
    );
    assert_eq!(ledger.total(), 0);
}

#[tokio::test]
async fn denied_subscribe_and_publish_are_permission_denied() {
    let nats = NatsCluster::start_with(AUTH, READY_LIMIT)
        .await
        .expect("nats cluster");
    let ledger = Ledger::new();
    let mut cfg = config(nats.urls(), &ledger);
    cfg.credentials = Credentials::UserPassword("flow".into(), "s3cret".into());
    // The fixture's client ports are plaintext (loopback): opt out knowingly.
    cfg.allow_plaintext_credentials = true;
    let cluster = Cluster::connect(cfg).await.unwrap();

    let mut sub = cluster
        .subscribe("secret.x", Fairness::default())
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), sub.recv())
        .await
        .expect("the violation is reported, not waited on forever")
        .unwrap_err();
    match err.transport_error::<ClusterError>() {
        Some(ClusterError::PermissionDenied(text)) => assert!(text.contains("secret.x"), "{text}"),
        other => panic!("expected PermissionDenied, got {other:?} ({err})"),
    }

    // Not `create_stream_with`: its probe publishes, which this user may not.
    crate::pull::create_stream_placed(
        &cluster,
        stream::Config {
            name: "SECRET".into(),
            subjects: vec!["secret.>".into()],
            num_replicas: 3,
            ..Default::default()
        },
        std::time::Instant::now() + Duration::from_secs(30),
    )
    .await;
    let mut sink = cluster
        .publisher("secret.x", PublishOptions::default())
        .await
        .unwrap();
    sink.send(Bytes::from_static(b"hi")).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), sink.flush())
        .await
        .expect("the violation is reported, not retried forever")
        .unwrap_err();
    match err.transport_error::<ClusterError>() {
        Some(ClusterError::PermissionDenied(text)) => assert!(text.contains("secret.x"), "{text}"),
        other => panic!("expected PermissionDenied, got {other:?} ({err})"),
    }
    drop(sink);
    drop(sub);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}

/// A man in the middle on loopback: plays a NATS server that does not
/// require TLS, records every byte it receives on every connection, answers
/// a CONNECT with an authorization violation and anything else (a TLS
/// ClientHello) with an unknown-protocol error, as nats-server does.
struct PlaintextServer {
    url: String,
    received: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PlaintextServer {
    async fn start() -> PlaintextServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        let info = format!(
            "INFO {{\"server_id\":\"MITM\",\"server_name\":\"mitm\",\"version\":\"2.9.10\",\
             \"proto\":1,\"host\":\"127.0.0.1\",\"port\":{port},\"headers\":true,\
             \"max_payload\":1048576,\"auth_required\":true,\"tls_required\":false}}\r\n"
        );
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                if sock.write_all(info.as_bytes()).await.is_err() {
                    continue;
                }
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                let reply = loop {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => {
                            rec.lock().unwrap().extend_from_slice(&buf[..n]);
                            seen.extend_from_slice(&buf[..n]);
                        }
                    }
                    if seen.starts_with(b"CONNECT") {
                        if seen.windows(6).any(|w| w == b"PING\r\n") {
                            break Some(&b"-ERR 'Authorization Violation'\r\n"[..]);
                        }
                    } else {
                        break Some(&b"-ERR 'Unknown Protocol Operation'\r\n"[..]);
                    }
                };
                // Recorded before answering: the client's error comes after.
                if let Some(r) = reply {
                    let _ = sock.write_all(r).await;
                }
            }
        });
        PlaintextServer {
            url: format!("nats://127.0.0.1:{port}"),
            received,
            task,
        }
    }

    fn saw(&self, needle: &str) -> bool {
        let r = self.received.lock().unwrap();
        r.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    fn bytes(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

impl Drop for PlaintextServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Credentials on a `nats://` seed without TLS: refused before any byte
/// leaves, with an error that names the opt-out. With TLS required, a man in
/// the middle that says "TLS not required" gets a TLS handshake, never the
/// password. With the opt-out the password goes out in clear (the risk the
/// option names).
#[tokio::test]
async fn credentials_are_never_sent_without_tls_unless_allowed() {
    const PASSWORD: &str = "s3cret-never-in-clear";
    const TOKEN: &str = "t0ken-never-in-clear";
    let mitm = PlaintextServer::start().await;
    let ledger = Ledger::new();
    let base = || {
        let mut cfg = config(vec![mitm.url.clone()], &ledger);
        cfg.retry.max_attempts = 1;
        cfg
    };

    for creds in [
        Credentials::UserPassword("flow".into(), PASSWORD.into()),
        Credentials::Token(TOKEN.into()),
    ] {
        let mut cfg = base();
        cfg.credentials = creds;
        let err = Cluster::connect(cfg).await.unwrap_err();
        match &err {
            FlowError::Config(text) => {
                assert!(text.contains("allow_plaintext_credentials"), "{text}");
                assert!(text.contains("tls"), "{text}");
                assert!(text.contains(&mitm.url), "names the seed: {text}");
            }
            other => panic!("expected a Config error, got {other:?} ({err})"),
        }
    }
    assert!(
        !mitm.saw(PASSWORD) && !mitm.saw(TOKEN),
        "a secret went out in clear"
    );

    // TLS required: the client answers INFO with a TLS handshake.
    let mut cfg = base();
    cfg.credentials = Credentials::UserPassword("flow".into(), PASSWORD.into());
    cfg.tls.required = true;
    Cluster::connect(cfg).await.unwrap_err();
    assert!(mitm.bytes() > 0, "the client did connect");
    assert!(!mitm.saw(PASSWORD), "the password went out in clear");
    assert!(!mitm.saw("CONNECT"), "a CONNECT went out in clear");

    // The opt-out does what it says: CONNECT with the password, in clear.
    let mut cfg = base().allow_plaintext_credentials(true);
    cfg.credentials = Credentials::UserPassword("flow".into(), PASSWORD.into());
    let err = Cluster::connect(cfg).await.unwrap_err();
    assert!(
        matches!(
            err.transport_error::<ClusterError>(),
            Some(ClusterError::AuthRejected { .. })
        ),
        "{err}"
    );
    assert!(mitm.saw(PASSWORD), "opted out: sent in clear");
    assert_eq!(ledger.total(), 0);
}
