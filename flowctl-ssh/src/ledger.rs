//! The ledger kinds this crate counts its resources under (see
//! [`flowctl_core::lifecycle::Ledger`]), shared by both backends.

/// Ledger kind of a live SSH connection.
pub const LEDGER_SESSION: &str = "ssh.session";
/// Ledger kind of a live task spawned by this crate.
pub const LEDGER_TASK: &str = "ssh.task";
/// Ledger kind of an exec in progress: the task that opens a channel and
/// starts a command, and closes both if the caller of `exec` is gone
/// (russh backend).
pub const LEDGER_OPEN: &str = "ssh.open";
