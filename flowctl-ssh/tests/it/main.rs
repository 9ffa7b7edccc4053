//! Integration tests of flowctl-ssh against real peers: the in-process russh
//! server and OpenSSH `sshd`, both on 127.0.0.1.

// Test fixtures: the embedded server and a throwaway sshd, with keys in a temp dir.
mod fixture;
// exec, stdin/stdout/stderr, exit status and EOF, against both servers.
mod exec;
// 64 MiB through stalled consumers in both directions: bounded buffers, every byte.
mod bounded;
// Connection refused, auth rejected, host keys, not found, dropped connection, signals.
mod errors;
// Cancelled execs close their channels, even an open still in flight (issue 15 item 3).
mod cancel;
// known_hosts by OpenSSH's rules: @revoked, blanks, several keys, the global file.
mod known_hosts;
// Processes left behind: sshd's whole tree, the embedded server's command groups, idle masters.
mod processes;
// Dropping processes and sessions: tasks and connections return to zero.
mod lifecycle;
// Authentication through a real ssh-agent.
mod auth;
// Secrets stay out of tracing spans unless the command line is opted in.
mod secrets;
// Redirection helpers between remote and local processes.
mod redirect;
// Stdin and Output through the poll-based contract: refusals, abandoned flushes, batches, AsyncRead.
mod contract;
// A stalled reader outlasting sshd's ClientAliveInterval: openssh survives, russh is dropped.
mod stall;
// Named stages, overflow policies on stdout/stderr, stdin writability, metrics.
mod stages;
// The openssh backend's own rules: no password auth.
#[cfg(feature = "openssh")]
mod openssh;
