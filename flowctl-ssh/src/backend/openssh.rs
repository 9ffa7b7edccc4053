//! The openssh backend ([`Backend::OpenSsh`](crate::Backend::OpenSsh)): the
//! system `ssh` binary as a ControlMaster, driven by the `openssh` crate in
//! its process-mux mode. See the crate docs ("Choosing a backend").

use std::ops::Deref;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use flowctl_core::PipeSink;
use flowctl_core::lifecycle::Lease;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::config::{Auth, ExecOptions, HostKeyPolicy, SshConfig, split_host_port};
use crate::error::SshError;
use crate::ledger::{LEDGER_SESSION, LEDGER_TASK};
use crate::process::{
    ExitStatus, ExitTx, Flags, Outcome, Plumbing, RemoteProcess, StdinWriter, StreamFlags, deliver,
    plumbing, room, write_stdin,
};

/// A running ControlMaster (`ssh -M -f -N`), closed with `ssh -O exit` when
/// the last session or process holding it is dropped.
pub(crate) struct Master {
    /// `Some` until drop or [`Master::close`].
    session: Option<openssh::Session>,
    /// The next command's number: the channel id of its stage names (the
    /// mux client does not tell us the master's channel number).
    next_channel: std::sync::atomic::AtomicU64,
    _lease: Lease,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master")
            .field("session", &self.session)
            .finish()
    }
}

/// What `openssh::Child` holds to keep the master up: a shared [`Master`]
/// that dereferences to the `openssh::Session`.
#[derive(Debug, Clone)]
struct MasterRef(Arc<Master>);

impl Deref for MasterRef {
    type Target = openssh::Session;

    fn deref(&self) -> &openssh::Session {
        // Invariant: `session` is taken only in `close(self)` and in `Drop`,
        // when no `MasterRef` can exist any more.
        self.0
            .session
            .as_ref()
            .expect("the openssh session lives as long as its Master")
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        // openssh's own Drop runs `ssh -O exit` synchronously (a few ms of
        // blocking). We do not move it into a task: a task may never run
        // (runtime shutting down, process exiting), and a ControlMaster
        // started with `-f` outlives this process, keeping its connection
        // to the server open until ControlPersist runs out. Call
        // `Session::close().await` to close without blocking.
        if let Some(session) = self.session.take() {
            drop(session);
            tracing::info!("ssh control master closed (on drop)");
        }
    }
}

async fn close_session(session: openssh::Session) {
    match session.close().await {
        Ok(()) => tracing::info!("ssh control master closed"),
        Err(e) => tracing::debug!(error = %e, "ssh control master ended with an error"),
    }
}

/// The OpenSSH options derived from an [`SshConfig`].
struct Plan {
    host: String,
    port: u16,
    key_file: Option<PathBuf>,
    agent_socket: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
    strict: bool,
    connect_secs: u64,
}

impl Plan {
    fn new(config: &SshConfig) -> Result<Plan, SshError> {
        let (host, port) = split_host_port(&config.addr);
        check_host(&host)?;
        check_user(&config.user)?;
        for c in &config.ciphers {
            check_cipher(c)?;
        }
        let mut key_file = None;
        let mut agent_socket = None;
        for auth in &config.auth {
            match auth {
                Auth::Password(_) => {
                    return Err(SshError::Config(
                        "password authentication is not supported by the openssh backend \
                         (it runs ssh with BatchMode=yes): use a key file or an agent, or Backend::Russh"
                            .into(),
                    ));
                }
                Auth::KeyFile {
                    passphrase: Some(_),
                    path,
                } => {
                    return Err(SshError::Config(format!(
                        "the openssh backend cannot use the passphrase of {} (BatchMode=yes): \
                         add the key to an ssh-agent instead",
                        path.display()
                    )));
                }
                Auth::KeyFile {
                    path,
                    passphrase: None,
                } => {
                    if key_file.is_some() {
                        return Err(SshError::Config(
                            "the openssh backend takes at most one key file (IdentityFile with IdentitiesOnly=yes)"
                                .into(),
                        ));
                    }
                    check_path("key file", path)?;
                    key_file = Some(path.clone());
                }
                Auth::Agent => {}
                Auth::AgentSocket(p) => {
                    check_path("agent socket", p)?;
                    agent_socket = Some(p.clone());
                }
            }
        }
        let (known_hosts, strict) = match &config.host_key {
            HostKeyPolicy::KnownHosts(p) => (p.clone(), true),
            HostKeyPolicy::Default => (None, true),
            HostKeyPolicy::InsecureAcceptAny => (Some(PathBuf::from("/dev/null")), false),
        };
        if let Some(kh) = &known_hosts {
            // It reaches ssh as `-o UserKnownHostsFile=...`, a config line.
            quote_config_path("known_hosts file", kh)?;
        }
        // ssh's ConnectTimeout is in whole seconds: round up, at least 1.
        let t = config.connect_timeout;
        let connect_secs = (t.as_secs() + u64::from(t.subsec_nanos() > 0)).max(1);
        Ok(Plan {
            host,
            port,
            key_file,
            agent_socket,
            known_hosts,
            strict,
            connect_secs,
        })
    }

    /// The known_hosts file ssh consults, for error messages.
    fn known_hosts_name(&self) -> String {
        match &self.known_hosts {
            Some(p) => p.display().to_string(),
            None => "~/.ssh/known_hosts".to_owned(),
        }
    }

    /// `host` or `[host]:port`, as ssh writes it in known_hosts.
    fn host_entry(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }
}

impl Master {
    /// Starts the ControlMaster: TCP connect, host key check, authentication.
    ///
    /// # Cancel safety
    /// `openssh::SessionBuilder::connect` waits for `ssh -M -f` with
    /// tokio's `Command::status`, which does not kill ssh when the wait is
    /// dropped, and removes the control directory on drop: a cancelled
    /// connect left an ssh running on its own (uncounted until the server
    /// gave up), or a master nobody could reach (until `ControlPersist` ran
    /// out). So ssh is spawned here, by a task counted as [`LEDGER_TASK`]
    /// until it has a result: when the caller is gone (dropped, or timed out
    /// by `connect_timeout`) it kills ssh and closes any master ssh had
    /// forked already (`ssh -O exit`). A master handed to a caller dropped
    /// before it took it is closed by [`Master`]'s `Drop`.
    pub(crate) async fn connect(config: &SshConfig) -> Result<Master, SshError> {
        let plan = Plan::new(config)?;
        let (mut tx, rx) = tokio::sync::oneshot::channel();
        let owned = config.clone();
        let lease = config.ledger.acquire(LEDGER_TASK);
        tokio::spawn(async move {
            let started = Master::launch(&owned, plan, &mut tx).await;
            // A master counts itself (`ssh.session`) from here on: the task
            // stops counting before the caller can see the result, so the
            // caller's counts are exact.
            drop(lease);
            if let Err(Ok(master)) = tx.send(started) {
                tracing::info!(addr = %owned.addr,
                    "ssh connect cancelled after ssh started a control master; closing it");
                master.close().await;
            }
        });
        rx.await.unwrap_or_else(|_| {
            Err(SshError::OpenSsh(Box::new(std::io::Error::other(
                "the task running `ssh -M` ended without an answer: \
                 it panicked, or the runtime is shutting down",
            ))))
        })
    }

    /// [`Master::connect`]'s work, owned by its task.
    async fn launch<T>(
        config: &SshConfig,
        plan: Plan,
        caller: &mut tokio::sync::oneshot::Sender<T>,
    ) -> Result<Master, SshError> {
        // What `openssh::SessionBuilder::connect` runs, spawned here so that
        // it can be stopped: `ssh -M -f -N` with its socket and log in a
        // temporary directory, the master forking away once authenticated.
        let dir = tempfile::Builder::new()
            .prefix(".ssh-connection")
            .tempdir_in(std::env::temp_dir())
            .map_err(|e| SshError::Config(format!("cannot create ssh's control directory: {e}")))?;
        let log = dir.path().join("log");
        let mut ssh = tokio::process::Command::new("ssh");
        ssh.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .arg("-E")
            .arg(&log)
            .arg("-S")
            .arg(dir.path().join("master"))
            .args(["-M", "-f", "-N", "-o"])
            // Bounded (not `yes`): a master whose owner crashed exits by
            // itself once idle that long.
            .arg(format!(
                "ControlPersist={}s",
                config.control_persist.as_secs().max(1)
            ))
            .args(["-o", "BatchMode=yes", "-o"])
            .arg(if plan.strict {
                "StrictHostKeyChecking=yes"
            } else {
                "StrictHostKeyChecking=no"
            })
            .arg("-o")
            .arg(format!("ConnectTimeout={}", plan.connect_secs));
        if let Some(i) = config.keepalive_interval {
            ssh.arg("-o")
                .arg(format!("ServerAliveInterval={}", i.as_secs()));
        }
        ssh.arg("-p").arg(plan.port.to_string());
        ssh.arg("-l").arg(&config.user);
        if let Some(k) = &plan.key_file {
            ssh.args(["-o", "IdentitiesOnly=yes", "-i"]).arg(k);
        }
        // Ciphers have no option of their own here: a config file that sets
        // them and then includes the user's and the system's configuration
        // (the first value ssh obtains for an option wins).
        let _cfg_file;
        if !config.ciphers.is_empty() {
            let file = write_ssh_config(&config.ciphers)?;
            ssh.arg("-F").arg(file.path());
            _cfg_file = file;
        }
        if let Some(s) = &plan.agent_socket {
            ssh.env("SSH_AUTH_SOCK", s);
        }
        if let Some(kh) = &plan.known_hosts {
            // ssh parses `-o` as a config line: quoted, a path with spaces
            // stays one file.
            let mut option = std::ffi::OsString::from("UserKnownHostsFile=");
            option.push(quote_config_path("known_hosts file", kh)?);
            ssh.arg("-o").arg(option);
        }
        ssh.arg(&plan.host);
        let mut child = ssh
            .spawn()
            .map_err(|e| SshError::Config(format!("cannot run ssh: {e}")))?;
        let status = tokio::select! {
            status = child.wait() => status.map_err(|e| SshError::OpenSsh(Box::new(e)))?,
            () = caller.closed() => {
                // Nobody waits for this master any more: stop ssh before it
                // forks one, or close the one it has forked already.
                let _ = child.start_kill();
                let _ = child.wait().await;
                if dir.path().join("master").exists() {
                    close_session(openssh::Session::new_process_mux(dir)).await;
                }
                tracing::info!(addr = %config.addr, "ssh connect cancelled; ssh stopped");
                return Err(SshError::Config("the connect was cancelled".into()));
            }
        };
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(classify(&text, &plan, config).await);
        }
        tracing::info!(user = %config.user, addr = %config.addr, "ssh control master established");
        Ok(Master {
            session: Some(openssh::Session::new_process_mux(dir)),
            next_channel: std::sync::atomic::AtomicU64::new(0),
            _lease: config.ledger.acquire(LEDGER_SESSION),
        })
    }

    /// Asks the master to exit (`ssh -O exit`) and waits for the answer.
    pub(crate) async fn close(mut self) {
        if let Some(session) = self.session.take() {
            close_session(session).await;
        }
    }
}

fn write_ssh_config(ciphers: &[String]) -> Result<tempfile::NamedTempFile, SshError> {
    use std::io::Write;
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let text = ssh_config_text(ciphers, home.as_deref())?;
    let mut f = tempfile::NamedTempFile::new()
        .map_err(|e| SshError::Config(format!("cannot write an ssh_config file: {e}")))?;
    f.write_all(text.as_bytes())
        .map_err(|e| SshError::Config(format!("cannot write an ssh_config file: {e}")))?;
    Ok(f)
}

/// The generated ssh_config: the ciphers, then `Include`s of the user's and
/// the system's files (quoted: a HOME with spaces). Every value is checked:
/// a newline in a cipher name would add a directive (`ProxyCommand` runs a
/// local command).
fn ssh_config_text(ciphers: &[String], home: Option<&std::path::Path>) -> Result<String, SshError> {
    for c in ciphers {
        check_cipher(c)?;
    }
    let mut text = format!("Ciphers {}\n", ciphers.join(","));
    let user = home.map(|h| h.join(".ssh").join("config"));
    for inc in user
        .into_iter()
        .chain(std::iter::once(PathBuf::from("/etc/ssh/ssh_config")))
    {
        if inc.exists() {
            text.push_str(&format!(
                "Include {}\n",
                quote_config_path("Include path", &inc)?
            ));
        }
    }
    Ok(text)
}

/// A cipher name as SSH writes them (`aes128-gcm@openssh.com`): letters,
/// digits and `@._+-`, nothing that ssh_config or a shell would read as
/// syntax.
fn check_cipher(name: &str) -> Result<(), SshError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@._+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SshError::Config(format!(
            "invalid cipher name {name:?}: only letters, digits and @._+- are allowed, at most 64 bytes"
        )))
    }
}

/// A host name or address for ssh's command line: it must not look like an
/// option (`-oProxyCommand=...`) and holds no space, quote or control byte.
fn check_host(host: &str) -> Result<(), SshError> {
    let ok = !host.is_empty()
        && !host.starts_with('-')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:%".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SshError::Config(format!(
            "invalid host {host:?} for the openssh backend: only letters, digits and .-_:% are allowed, and it must not start with '-'"
        )))
    }
}

/// A user name for `ssh -l`: no leading `-`, no whitespace, quote or control byte.
fn check_user(user: &str) -> Result<(), SshError> {
    let ok = !user.is_empty()
        && !user.starts_with('-')
        && !user
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"'\\".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SshError::Config(format!(
            "invalid user {user:?} for the openssh backend: it must not start with '-' or hold whitespace, quotes or control characters"
        )))
    }
}

/// A path given to ssh as its own argument: valid UTF-8 without control
/// characters (a newline would end a config line).
fn check_path(what: &str, path: &std::path::Path) -> Result<(), SshError> {
    match path.to_str() {
        Some(p) if !p.is_empty() && !p.starts_with('-') && !p.chars().any(char::is_control) => {
            Ok(())
        }
        _ => Err(SshError::Config(format!(
            "invalid {what} {}: it must be UTF-8 without control characters and must not start with '-'",
            path.display()
        ))),
    }
}

/// A path as one double-quoted ssh_config word (`"/home/a b/.ssh/config"`).
/// A path with a double quote or a backslash is refused: ssh_config has no
/// portable escape for them.
fn quote_config_path(what: &str, path: &std::path::Path) -> Result<String, SshError> {
    check_path(what, path)?;
    let p = path.to_str().unwrap_or_default();
    if p.contains(['"', '\\']) {
        return Err(SshError::Config(format!(
            "invalid {what} {p:?}: ssh_config cannot quote a path holding '\"' or '\\'"
        )));
    }
    Ok(format!("\"{p}\""))
}

/// Turns what ssh printed when the master failed into our error.
async fn classify(log: &str, plan: &Plan, config: &SshConfig) -> SshError {
    if log.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") || log.contains("has changed and you")
    {
        return changed_key(log, plan);
    }
    if log.contains("host key is known for") && log.contains("strict checking") {
        let (algorithm, fingerprint) = probe_host_key(plan, config)
            .await
            .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
        return SshError::UnknownHostKey {
            host: plan.host_entry(),
            algorithm,
            fingerprint,
            known_hosts: plan.known_hosts_name(),
        };
    }
    if log.contains("Permission denied (") {
        let mut tried: Vec<String> = config.auth.iter().map(Auth::describe).collect();
        if tried.is_empty() {
            tried.push("ssh's defaults".into());
        }
        return SshError::AuthRejected {
            user: config.user.clone(),
            tried: format!("{} (via the openssh client)", tried.join(", ")),
        };
    }
    if log.contains("Connection refused") {
        return SshError::Connect {
            addr: config.addr.clone(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, log.trim()),
        };
    }
    if log.contains("timed out") {
        return SshError::ConnectTimeout {
            addr: config.addr.clone(),
            timeout: config.connect_timeout,
        };
    }
    SshError::OpenSsh(log.trim().into())
}

/// `HostKeyMismatch` from ssh's "REMOTE HOST IDENTIFICATION HAS CHANGED" report.
fn changed_key(log: &str, plan: &Plan) -> SshError {
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    let mut algorithm = "unknown".to_owned();
    let mut fingerprint = "unknown".to_owned();
    let mut line = 0;
    let mut known_hosts = plan.known_hosts_name();
    for (i, l) in lines.iter().enumerate() {
        // "The fingerprint for the ED25519 key sent by the remote host is"
        if let Some(rest) = l.strip_prefix("The fingerprint for the ") {
            if let Some(alg) = rest.split_whitespace().next() {
                algorithm = openssh_key_type(alg);
            }
            if let Some(fp) = lines.get(i + 1) {
                fingerprint = fp.trim_end_matches('.').to_owned();
            }
        }
        // "Offending ED25519 key in /path/known_hosts:1"
        if let Some(rest) = l.strip_prefix("Offending ")
            && let Some((_, loc)) = rest.split_once(" key in ")
            && let Some((path, n)) = loc.rsplit_once(':')
        {
            known_hosts = path.to_owned();
            line = n.parse().unwrap_or(0);
        }
    }
    SshError::HostKeyMismatch {
        host: plan.host_entry(),
        algorithm,
        fingerprint,
        line,
        known_hosts,
    }
}

/// ssh's key type label (`ED25519`) as an SSH algorithm name.
fn openssh_key_type(label: &str) -> String {
    match label {
        "ED25519" => "ssh-ed25519".into(),
        "RSA" => "ssh-rsa".into(),
        "ECDSA" => "ecdsa-sha2-nistp256".into(),
        other => other.to_lowercase(),
    }
}

/// ssh does not print the offered key when it is unknown: one more
/// handshake at `LogLevel=DEBUG1` (which fails at the same check, before
/// authentication) shows "Server host key: ALG SHA256:...".
async fn probe_host_key(plan: &Plan, config: &SshConfig) -> Option<(String, String)> {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.kill_on_drop(true)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .args(["-T", "-o", "LogLevel=DEBUG1", "-o", "BatchMode=yes"])
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "PreferredAuthentications=none",
        ])
        .arg("-o")
        .arg(format!("ConnectTimeout={}", plan.connect_secs))
        .arg("-p")
        .arg(plan.port.to_string())
        .arg("-l")
        .arg(&config.user);
    if let Some(kh) = &plan.known_hosts {
        cmd.arg("-o").arg(format!(
            "UserKnownHostsFile={}",
            quote_config_path("known_hosts file", kh).ok()?
        ));
    }
    cmd.arg(&plan.host).arg("true");
    let out = tokio::time::timeout(config.connect_timeout, cmd.output())
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines().find_map(|l| {
        let rest = l.split_once("Server host key: ")?.1;
        let mut it = rest.split_whitespace();
        Some((it.next()?.to_owned(), it.next()?.to_owned()))
    })
}

/// Runs `command` through the master: a `ssh -S ctl` mux client whose stdin,
/// stdout and stderr pipes the master reads and writes directly.
pub(crate) async fn exec(
    master: &Arc<Master>,
    command: &str,
    config: &SshConfig,
    options: &ExecOptions,
) -> Result<RemoteProcess, SshError> {
    let mref = MasterRef(master.clone());
    let mut child = openssh::Session::to_raw_command(mref.clone(), command)
        .stdin(openssh::Stdio::piped())
        .stdout(openssh::Stdio::piped())
        .stderr(openssh::Stdio::piped())
        .spawn()
        .await
        .map_err(|e| SshError::OpenSsh(Box::new(e)))?;
    let stdin = child.stdin().take();
    let stdout = child.stdout().take();
    let stderr = child.stderr().take();
    let channel = master
        .next_channel
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (p, proc) = plumbing(config, options, channel, master.clone());
    let span = crate::process::exec_span(command, config, "openssh", &p.name);
    let Plumbing {
        out,
        err,
        stdin: in_rx,
        flags,
        exit,
        done,
        done_rx,
        progress,
        cancel,
        name: _,
    } = p;
    let chunk = config.max_packet.max(1024) as usize;
    config.ledger.spawn(
        LEDGER_TASK,
        tracing::Instrument::instrument(
            read_outputs(ReadTask {
                child,
                stdout,
                stderr,
                out,
                err,
                flags,
                exit,
                done,
                cancel: cancel.clone(),
                chunk,
            }),
            span.clone(),
        ),
    );
    config.ledger.spawn(
        LEDGER_TASK,
        tracing::Instrument::instrument(write_stdin(stdin, in_rx, progress, done_rx, cancel), span),
    );
    Ok(proc)
}

struct ReadTask {
    child: openssh::Child<MasterRef>,
    stdout: Option<openssh::ChildStdout>,
    stderr: Option<openssh::ChildStderr>,
    out: PipeSink<Bytes>,
    err: PipeSink<Bytes>,
    flags: Arc<Flags>,
    exit: ExitTx,
    done: watch::Sender<bool>,
    cancel: watch::Receiver<()>,
    chunk: usize,
}

/// Copies one pipe into its buffer, reading only when the buffer is at or
/// below its low watermark. Not reading is the backpressure: the pipe fills,
/// the master stops writing to it, its channel buffer fills, and it stops
/// returning window for this channel alone.
async fn drain<R: AsyncRead + Unpin>(
    reader: Option<R>,
    mut pipe: PipeSink<Bytes>,
    chunk: usize,
    flags: &StreamFlags,
) -> (PipeSink<Bytes>, u64) {
    let mut total = 0u64;
    let Some(mut reader) = reader else {
        return (pipe, total);
    };
    let mut open = true;
    loop {
        room(&mut pipe, &mut open).await;
        let mut buf = BytesMut::with_capacity(chunk);
        match reader.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                deliver(&mut pipe, &mut open, buf.freeze(), flags);
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading the ssh client's output failed");
                break;
            }
        }
    }
    (pipe, total)
}

async fn read_outputs(t: ReadTask) {
    let ReadTask {
        child,
        stdout,
        stderr,
        out,
        err,
        flags,
        exit,
        done,
        mut cancel,
        chunk,
    } = t;
    let master = child.session();
    let streams = flags.clone();
    let work = async move {
        let ((out, stdout_bytes), (err, _)) = tokio::join!(
            drain(stdout, out, chunk, &streams.stdout),
            drain(stderr, err, chunk, &streams.stderr)
        );
        (out, err, stdout_bytes, child.wait().await)
    };
    let (mut out, mut err, stdout_bytes, status) = tokio::select! {
        _ = cancel.changed() => {
            // Dropping `work` drops the child, which kills the local mux
            // client (kill_on_drop): the master then closes the channel.
            tracing::debug!("every part of the process dropped: closing the channel");
            exit.abandoned();
            return;
        }
        r = work => r,
    };
    let outcome = match status {
        Ok(st) => match st.code() {
            Some(c) => Outcome::Exited(ExitStatus::Code(c as u32)),
            None => Outcome::Lost, // the local ssh client was killed
        },
        // openssh maps the mux client's exit code 127 to NotFound.
        Err(openssh::Error::Remote(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Outcome::Exited(ExitStatus::Code(127))
        }
        // Exit code 255: the remote exited 255, was killed by a signal (the
        // mux protocol carries no signal), or the connection is gone.
        Err(openssh::Error::RemoteProcessTerminated) => match master.check().await {
            Ok(()) => Outcome::Exited(ExitStatus::Code(255)),
            Err(_) => Outcome::Lost,
        },
        Err(e) => {
            tracing::debug!(error = %e, "ssh mux client failed");
            Outcome::Lost
        }
    };
    if matches!(outcome, Outcome::Lost) {
        tracing::debug!(stdout_bytes, "connection lost before the end of the output");
        flags.lost();
    }
    out.close_now();
    err.close_now();
    exit.send(outcome);
    let _ = done.send(true);
}

/// The mux client's stdin pipe (which the master reads only as the server's
/// window allows); closing the pipe is EOF.
impl StdinWriter for openssh::ChildStdin {
    async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.write_all(&chunk).await
    }

    async fn eof(self) -> bool {
        close_pipe(self).await
    }
}

async fn close_pipe<W: AsyncWrite + Unpin>(mut w: W) -> bool {
    let ok = w.shutdown().await.is_ok();
    drop(w); // the last write end: the master sees EOF and sends it on
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ssh -G` (which evaluates a configuration without connecting)
    /// makes of a generated file.
    fn ssh_g(config: &std::path::Path) -> String {
        let out = std::process::Command::new("ssh")
            .arg("-G")
            .arg("-F")
            .arg(config)
            .arg("example.invalid")
            .output()
            .expect("ssh: run `cargo xtask setup` (installs openssh-client)");
        assert!(
            out.status.success(),
            "ssh -G failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn include_of_a_home_with_spaces_is_quoted_and_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("my home");
        std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
        std::fs::write(home.join(".ssh").join("config"), "Port 2345\n").expect("config");
        let text = ssh_config_text(&["aes128-ctr".to_owned()], Some(&home)).expect("config text");
        assert!(
            text.contains(&format!(
                "Include \"{}\"",
                home.join(".ssh/config").display()
            )),
            "{text}"
        );
        let file = dir.path().join("generated");
        std::fs::write(&file, &text).expect("write");
        let effective = ssh_g(&file);
        assert!(effective.lines().any(|l| l == "port 2345"), "{effective}");
        assert!(
            effective.lines().any(|l| l == "ciphers aes128-ctr"),
            "{effective}"
        );
    }

    #[test]
    fn values_that_would_be_syntax_are_config_errors() {
        for bad in [
            "aes128-ctr\nProxyCommand touch /tmp/x",
            "aes128-ctr ProxyCommand",
            "",
            "a\"b",
        ] {
            assert!(
                matches!(check_cipher(bad), Err(SshError::Config(_))),
                "cipher {bad:?}"
            );
        }
        assert!(check_cipher("aes128-gcm@openssh.com").is_ok());
        for bad in ["-oProxyCommand=x", "a b", "a\nb", ""] {
            assert!(
                matches!(check_host(bad), Err(SshError::Config(_))),
                "host {bad:?}"
            );
        }
        assert!(check_host("127.0.0.1").is_ok() && check_host("fe80::1%eth0").is_ok());
        for bad in ["-l", "a b", "a\nb", ""] {
            assert!(
                matches!(check_user(bad), Err(SshError::Config(_))),
                "user {bad:?}"
            );
        }
        for bad in ["/a\nb", "/a\"b", "/a\\b"] {
            assert!(
                matches!(
                    quote_config_path("path", std::path::Path::new(bad)),
                    Err(SshError::Config(_))
                ),
                "path {bad:?}"
            );
        }
        assert_eq!(
            quote_config_path("path", std::path::Path::new("/a b/c")).expect("quoted"),
            "\"/a b/c\""
        );
    }
}
