//! flowctl-zmq integration tests: one binary, real pyzmq peers.

// The pyzmq peer fixture (process started per test, killed by pid on drop).
mod peer;
// Every socket pattern against pyzmq in both directions, content and order checked.
mod patterns;
