//! The backends: each turns an [`SshConfig`](crate::SshConfig) into a
//! connection and a command into a [`RemoteProcess`](crate::RemoteProcess).

#[cfg(feature = "openssh")]
pub(crate) mod openssh;
#[cfg(feature = "russh")]
pub(crate) mod russh;
