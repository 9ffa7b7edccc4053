//! Integration tests of flowctl-cluster against a real 3-node nats-server cluster.

// The 3-node cluster fixture is `flowctl_cluster::testing` (feature `testing`).
// Cluster::connect: seeds, retries, per-seed errors.
mod connect;
// JetStream pull Source: watermark-driven demand, slow consumer, order.
mod pull;
// Publish Sink: bounded un-acked bytes, order, dedupe, max_payload; missing stream/consumer errors.
mod publish;
// The Aeron scenario: cancelled connect + consume cycles, checked with /subsz and /connz.
mod leak;
// SIGKILL of the consumer's node and of the stream leader while producing and consuming.
mod failover;
// Core subscriptions: slow consumer drops surfaced as errors.
mod core_sub;
// Auth rejected and permission denied, against a cluster with users and permissions.
mod auth;
// Named stages and metrics in a Prometheus exposition (the metric tests need `--features metrics`).
mod metrics;
// TLS: a cluster that requires it, reached with the test CA as root; refused without it.
mod tls;
