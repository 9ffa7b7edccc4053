//! NATS cluster transport for flowctl (not yet implemented): a JetStream pull
//! `Source` whose demand is the backpressure, a publish `Sink`, core
//! subscriptions that surface slow consumers as errors, and bounded connect
//! attempts that release everything they started.
#![forbid(unsafe_code)]
