//! The backends: each turns an [`SshConfig`](crate::SshConfig) into a
//! connection and a command into a [`RemoteProcess`](crate::RemoteProcess)
//! by feeding the backend-neutral plumbing of `process.rs`.
//!
//! Imports go one way: `session.rs` -> `backend::*` -> `process.rs`,
//! `ledger.rs`, `config.rs`, `error.rs`. A backend never imports
//! `session.rs` nor the other backend.

#[cfg(feature = "openssh")]
pub(crate) mod openssh;
#[cfg(feature = "russh")]
pub(crate) mod russh;
