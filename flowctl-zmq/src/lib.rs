//! ZeroMQ sockets for flowctl (not yet implemented): libzmq (through the `zmq`
//! crate) driven by `tokio::io::unix::AsyncFd`, with fair, budgeted receive paths
//! and libzmq high-water marks as backpressure.
// `deny`, not `forbid`: a module that must use `unsafe` for the libzmq file
// descriptor may allow it locally, with a `// SAFETY:` comment on each block.
#![deny(unsafe_code)]
