//! SSH exec channels for flowctl (not yet implemented): a stdin `Sink`, stdout and
//! stderr `Source`s and the exit status, on `russh`, with backpressure that reaches
//! the remote peer through the SSH window.
#![forbid(unsafe_code)]
