//! flowctl-zmq integration tests: one binary, real pyzmq peers.

// The pyzmq peer fixture (process started per test, killed by pid on drop).
mod peer;
// A global allocator counting each thread's allocations (to bound what one call allocates).
mod alloc;
// Every socket pattern against pyzmq in both directions, content and order checked.
mod patterns;
// Starvation: a flooded PULL next to a 1 ms timer, flowctl vs a raw AsyncFd loop;
// recv_many batches capped by the fairness slice.
mod fairness;
// Bounded memory: slow pyzmq receiver vs fast PUSH; PUB drops counted.
mod backpressure;
// send_many: the same bound, order kept, cancel-safe, a bad message reported mid-batch.
mod batch_send;
// Close without loss: 100,000 messages then close at once; closing a source.
mod close;
// Bad input: wrong frame counts, endpoint in use, unknown options and values.
mod bad_input;
// Options that reach the kernel: SNDBUF/RCVBUF read back from libzmq and the TCP socket.
mod options;
// Received frame sizes around the copy limits, kept intact while later ones arrive.
mod frames;
// A peer announcing a 2^34-byte frame is dropped at the header; nothing grows.
mod max_message_size;
// Property: any frame counts and sizes round trip over inproc, or fail with a clear error.
mod frame_props;
// Send/Sync of the public types.
mod send_sync;
// Lost wake-ups: both directions at once, halves in different tasks and threads.
mod wakeups;
// The poll contract on the halves: refused messages come back, abandoned polls lose nothing.
mod poll_contract;
// Named stages, overflow policies on the sink (pyzmq and inproc peers), writability
// edges, PUB drops at HWM in the sink's stats.
mod overflow;
// The `metrics` feature: the stages' core and transport metrics through a Prometheus recorder.
#[cfg(feature = "metrics")]
mod metrics;
