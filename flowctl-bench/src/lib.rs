//! Benchmarks for flowctl (not yet written): criterion benches of the core
//! primitives and a side-by-side comparison against the anchor figures of
//! OpenSSH, libzmq and NATS, run with `cargo xtask bench`.
#![forbid(unsafe_code)]
