//! [`Session`]: the backend-neutral connection type. It picks a backend from
//! [`SshConfig::backend`] and hands each call to it; the connection itself
//! (and everything specific to russh or OpenSSH) lives in `backend/`.

use std::sync::Arc;

use flowctl_core::FlowError;

use crate::config::{ExecOptions, SshConfig};
use crate::error::SshError;
use crate::process::RemoteProcess;

/// An authenticated SSH connection.
///
/// Open remote processes with [`exec`](Session::exec). The connection stays
/// up while the session or any of its processes is alive; dropping all of
/// them closes it and ends russh's session task. [`close`](Session::close)
/// disconnects at once.
pub struct Session {
    conn: Conn,
    config: Arc<SshConfig>,
}

/// The connection of one backend.
enum Conn {
    #[cfg(feature = "russh")]
    Russh(Arc<crate::backend::russh::SessionInner>),
    #[cfg(feature = "openssh")]
    OpenSsh(Arc<crate::backend::openssh::Master>),
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user", &self.config.user)
            .field("addr", &self.config.addr)
            .finish()
    }
}

impl Session {
    /// Connects, checks the host key and authenticates, all within
    /// [`SshConfig::connect_timeout`].
    ///
    /// # Errors
    /// A [`FlowError::Transport`] holding an [`SshError`] (read it with
    /// `err.transport_error::<SshError>()`):
    /// [`SshError::Connect`] if the TCP connection fails,
    /// [`SshError::UnknownHostKey`] / [`SshError::HostKeyMismatch`] (with the
    /// offered key's fingerprint) if the host key is not trusted,
    /// [`SshError::AuthRejected`] if no method was accepted,
    /// [`SshError::ConnectTimeout`] if it all took too long,
    /// [`SshError::Config`] if the configured backend's cargo feature is off.
    ///
    /// # Cancel safety
    /// Dropping the future, or its [`SshError::ConnectTimeout`], leaks
    /// nothing. With [`Backend::Russh`](crate::Backend::Russh) the socket
    /// russh's session task owns is shut and counted as
    /// [`LEDGER_SESSION`](crate::LEDGER_SESSION) until that task drops it.
    /// With [`Backend::OpenSsh`](crate::Backend::OpenSsh) the `ssh -M` it
    /// starts is owned by a task (counted as
    /// [`LEDGER_TASK`](crate::LEDGER_TASK)) that kills it and closes any
    /// ControlMaster it had forked already.
    pub async fn connect(config: SshConfig) -> Result<Session, FlowError> {
        Ok(Session::open(config).await?)
    }

    /// [`connect`](Session::connect) with the typed error.
    async fn open(config: SshConfig) -> Result<Session, SshError> {
        let conn = match config.backend {
            #[cfg(feature = "russh")]
            crate::Backend::Russh => {
                let timeout = config.connect_timeout;
                match tokio::time::timeout(timeout, crate::backend::russh::connect(&config)).await {
                    Ok(r) => Conn::Russh(r?),
                    Err(_) => {
                        return Err(SshError::ConnectTimeout {
                            addr: config.addr.clone(),
                            timeout,
                        });
                    }
                }
            }
            #[cfg(not(feature = "russh"))]
            crate::Backend::Russh => {
                return Err(SshError::Config(
                    "Backend::Russh needs the `russh` feature of flowctl-ssh".into(),
                ));
            }
            #[cfg(feature = "openssh")]
            crate::Backend::OpenSsh => {
                // ssh's own ConnectTimeout bounds the TCP connect and the
                // server's banner, not the key exchange or authentication:
                // a server that stalls after its banner held the connect
                // until it gave up (sshd: LoginGraceTime).
                let timeout = config.connect_timeout;
                match tokio::time::timeout(
                    timeout,
                    crate::backend::openssh::Master::connect(&config),
                )
                .await
                {
                    Ok(master) => Conn::OpenSsh(Arc::new(master?)),
                    Err(_) => {
                        return Err(SshError::ConnectTimeout {
                            addr: config.addr.clone(),
                            timeout,
                        });
                    }
                }
            }
            #[cfg(not(feature = "openssh"))]
            crate::Backend::OpenSsh => {
                return Err(SshError::Config(
                    "Backend::OpenSsh needs the `openssh` feature of flowctl-ssh".into(),
                ));
            }
        };
        Ok(Session {
            conn,
            config: Arc::new(config),
        })
    }

    /// Runs `command` on the server in a new channel of this connection.
    ///
    /// All channels of a connection share russh's session loop: a process
    /// whose output is not consumed stalls the others once its buffers are
    /// full (see the crate docs). Use [`exec_isolated`](Session::exec_isolated)
    /// when that matters.
    ///
    /// # Errors
    /// A [`FlowError::Transport`] holding an [`SshError`] (read it with
    /// `err.transport_error::<SshError>()`): [`SshError::ExecRefused`] if
    /// the server refuses the command; a russh error if the connection is
    /// gone.
    ///
    /// # Cancel safety
    /// Dropping the returned future at any point leaks nothing: the channel
    /// is opened and the command started by a task (counted as
    /// [`LEDGER_OPEN`](crate::LEDGER_OPEN)) that owns every step in flight.
    /// When nobody waits for its result any more, it closes what it opened,
    /// including a channel whose open the server confirms only after the
    /// drop. A refused command, a lost connection or an error from the exec
    /// request close the channel too.
    pub async fn exec(&self, command: &str) -> Result<RemoteProcess, FlowError> {
        Ok(self.exec_typed(command, &ExecOptions::default()).await?)
    }

    /// [`exec`](Session::exec) with per-command options: the stage names of
    /// the process's buffers and the overflow policy of stdout and stderr.
    ///
    /// ```no_run
    /// use flowctl_core::Overflow;
    /// use flowctl_core::prelude::*;
    /// use flowctl_ssh::{ExecOptions, Session};
    /// # async fn f(session: Session) -> Result<(), flowctl_core::FlowError> {
    /// // A log tail that must never stall the remote command: when the
    /// // consumer falls behind, the oldest buffered chunks are dropped.
    /// let opts = ExecOptions::new().name("web1.access_log").overflow(Overflow::DropOldest);
    /// let mut tail = session.exec_with("tail -F /var/log/access.log", &opts).await?;
    /// assert_eq!(tail.stdout.stage().name(), "web1.access_log.stdout");
    /// while let Some(chunk) = tail.stdout.recv().await? {
    ///     // ...
    /// #   drop(chunk);
    /// }
    /// println!("dropped {} chunks", tail.stdout.stats().dropped);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Those of [`exec`](Session::exec).
    ///
    /// # Cancel safety
    /// As [`exec`](Session::exec).
    pub async fn exec_with(
        &self,
        command: &str,
        options: &ExecOptions,
    ) -> Result<RemoteProcess, FlowError> {
        Ok(self.exec_typed(command, options).await?)
    }

    /// [`exec`](Session::exec) with the typed error.
    async fn exec_typed(
        &self,
        command: &str,
        options: &ExecOptions,
    ) -> Result<RemoteProcess, SshError> {
        match &self.conn {
            #[cfg(feature = "russh")]
            Conn::Russh(inner) => {
                crate::backend::russh::exec(inner, command, &self.config, options, None).await
            }
            #[cfg(feature = "openssh")]
            Conn::OpenSsh(master) => {
                crate::backend::openssh::exec(master, command, &self.config, options).await
            }
        }
    }

    /// [`exec`](Session::exec) on a russh session, reporting each step of
    /// the open task to `probe` (tests cancel the caller at each step).
    #[cfg(all(test, feature = "russh"))]
    pub(crate) async fn exec_probed(
        &self,
        command: &str,
        probe: crate::backend::russh::Probe,
    ) -> Result<RemoteProcess, SshError> {
        match &self.conn {
            Conn::Russh(inner) => {
                crate::backend::russh::exec(
                    inner,
                    command,
                    &self.config,
                    &ExecOptions::default(),
                    Some(probe),
                )
                .await
            }
            #[cfg(feature = "openssh")]
            Conn::OpenSsh(_) => Err(SshError::Config(
                "exec probes need a Backend::Russh session".into(),
            )),
        }
    }

    /// Opens a new connection with the same configuration and runs `command`
    /// on it alone, so that a stalled consumer of this process cannot stall
    /// any other channel. The connection closes when the process is dropped.
    ///
    /// # Errors
    /// Those of [`connect`](Session::connect) and [`exec`](Session::exec): a
    /// [`FlowError::Transport`] holding an [`SshError`].
    pub async fn exec_isolated(&self, command: &str) -> Result<RemoteProcess, FlowError> {
        self.exec_isolated_with(command, &ExecOptions::default())
            .await
    }

    /// [`exec_isolated`](Session::exec_isolated) with per-command options
    /// (see [`exec_with`](Session::exec_with)).
    ///
    /// # Errors
    /// Those of [`exec_isolated`](Session::exec_isolated).
    pub async fn exec_isolated_with(
        &self,
        command: &str,
        options: &ExecOptions,
    ) -> Result<RemoteProcess, FlowError> {
        let session = Session::open((*self.config).clone()).await?;
        Ok(session.exec_typed(command, options).await?)
    }

    /// The configuration this session was opened with.
    pub fn config(&self) -> &SshConfig {
        &self.config
    }

    /// Disconnects now and waits for russh's session task to end, if no
    /// process of this session is still alive; otherwise the connection is
    /// closed when the last process is dropped.
    pub async fn close(self) {
        match self.conn {
            #[cfg(feature = "russh")]
            Conn::Russh(inner) => crate::backend::russh::close(inner).await,
            #[cfg(feature = "openssh")]
            Conn::OpenSsh(master) => {
                if let Ok(master) = Arc::try_unwrap(master) {
                    master.close().await;
                }
            }
        }
    }
}
