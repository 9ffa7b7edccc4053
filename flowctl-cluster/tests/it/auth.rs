use std::time::Duration;

use async_nats::jetstream::stream;
use bytes::Bytes;
use flowctl_cluster::{Cluster, ClusterError, Credentials, PublishOptions};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::{Fairness, Sink, Source};

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
    cfg.retry.max_attempts = 5;
    let err = Cluster::connect(cfg).await.unwrap_err();
    match ClusterError::from_flow(&err) {
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
    let cluster = Cluster::connect(cfg).await.unwrap();

    let mut sub = cluster
        .subscribe("secret.x", Fairness::default())
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), sub.recv())
        .await
        .expect("the violation is reported, not waited on forever")
        .unwrap_err();
    match ClusterError::from_flow(&err) {
        Some(ClusterError::PermissionDenied(text)) => assert!(text.contains("secret.x"), "{text}"),
        other => panic!("expected PermissionDenied, got {other:?} ({err})"),
    }

    cluster
        .jetstream()
        .create_stream(stream::Config {
            name: "SECRET".into(),
            subjects: vec!["secret.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut sink = cluster
        .publisher("secret.x", PublishOptions::default())
        .await
        .unwrap();
    sink.send(Bytes::from_static(b"hi")).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), sink.flush())
        .await
        .expect("the violation is reported, not retried forever")
        .unwrap_err();
    match ClusterError::from_flow(&err) {
        Some(ClusterError::PermissionDenied(text)) => assert!(text.contains("secret.x"), "{text}"),
        other => panic!("expected PermissionDenied, got {other:?} ({err})"),
    }
    drop(sink);
    drop(sub);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}
