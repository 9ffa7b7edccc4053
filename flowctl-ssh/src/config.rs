//! What [`Session::connect`](crate::Session::connect) needs to know.

use std::path::PathBuf;
use std::time::Duration;

use flowctl_core::Watermarks;
use flowctl_core::lifecycle::Ledger;

/// A password or a passphrase: never printed (`Debug` shows `<redacted>`),
/// and wiped from memory when dropped.
///
/// Build it from a `String` or a `&str`; [`expose`](Secret::expose) gives
/// the text to whoever must send it. Copies made by the SSH library while
/// authenticating are out of its reach.
///
/// ```
/// use flowctl_ssh::Secret;
/// let s = Secret::from("s3cret");
/// assert_eq!(format!("{s:?}"), "<redacted>");
/// assert_eq!(s.expose(), "s3cret");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(zeroize::Zeroizing<String>);

impl Secret {
    /// The secret text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(zeroize::Zeroizing::new(s))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(zeroize::Zeroizing::new(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One way to authenticate. [`SshConfig::auth`] lists them; they are tried
/// in order until the server accepts one.
#[derive(Clone)]
#[non_exhaustive]
pub enum Auth {
    /// A private key file (OpenSSH or PKCS#8 format), with its passphrase if
    /// it is encrypted.
    KeyFile {
        /// The private key file (`~/.ssh/id_ed25519`).
        path: PathBuf,
        /// The passphrase of an encrypted key.
        passphrase: Option<Secret>,
    },
    /// Every identity of the ssh-agent reached through `SSH_AUTH_SOCK`.
    Agent,
    /// Every identity of the ssh-agent listening on this Unix socket.
    AgentSocket(PathBuf),
    /// A password.
    Password(Secret),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a passphrase or a password.
        match self {
            Auth::KeyFile { path, passphrase } => f
                .debug_struct("KeyFile")
                .field("path", path)
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .finish(),
            Auth::Agent => f.write_str("Agent"),
            Auth::AgentSocket(p) => f.debug_tuple("AgentSocket").field(p).finish(),
            Auth::Password(_) => f.write_str("Password(<redacted>)"),
        }
    }
}

impl Auth {
    /// An unencrypted private key file.
    pub fn key_file(path: impl Into<PathBuf>) -> Self {
        Auth::KeyFile {
            path: path.into(),
            passphrase: None,
        }
    }

    #[cfg_attr(not(any(feature = "russh", feature = "openssh")), allow(dead_code))]
    pub(crate) fn describe(&self) -> String {
        match self {
            Auth::KeyFile { path, .. } => format!("publickey {}", path.display()),
            Auth::Agent => "agent".to_owned(),
            Auth::AgentSocket(p) => format!("agent {}", p.display()),
            Auth::Password(_) => "password".to_owned(),
        }
    }
}

/// How the server's host key is checked.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum HostKeyPolicy {
    /// Accept the key only if a known_hosts file records it for this host
    /// (`host`, or `[host]:port` when the port is not 22). An unknown or a
    /// changed key fails the connection with its fingerprint in the error.
    /// `None` means `~/.ssh/known_hosts`.
    KnownHosts(Option<PathBuf>),
    /// The default: `KnownHosts(None)`.
    #[default]
    Default,
    /// Accept ANY host key without checking. This disables the protection
    /// against man-in-the-middle attacks: use it only for throwaway test
    /// servers on loopback.
    InsecureAcceptAny,
}

/// Which SSH implementation a [`Session`](crate::Session) runs on. See the
/// crate docs ("Choosing a backend").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// russh, in this process (pure Rust). The SSH window is refilled on
    /// receipt: a stalled consumer stalls its whole connection.
    #[default]
    Russh,
    /// The system `ssh` binary as a ControlMaster, through the `openssh`
    /// crate (feature `openssh`). The window of each channel is refilled as
    /// its output is consumed: a stalled consumer stalls only its channel.
    /// Password authentication is not supported.
    OpenSsh,
}

/// Everything needed to open an SSH connection.
///
/// ```
/// use flowctl_ssh::{Auth, SshConfig};
/// let cfg = SshConfig::new("deploy", "127.0.0.1:22")
///     .auth(Auth::key_file("/home/deploy/.ssh/id_ed25519"))
///     .known_hosts("/home/deploy/.ssh/known_hosts");
/// assert_eq!(cfg.user, "deploy");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SshConfig {
    /// The user to log in as.
    pub user: String,
    /// `host:port` (the host part is what known_hosts is searched for).
    pub addr: String,
    /// Authentication methods, tried in order.
    pub auth: Vec<Auth>,
    /// How the host key is checked (known_hosts by default).
    pub host_key: HostKeyPolicy,
    /// Limit for TCP connect, key exchange and authentication together.
    pub connect_timeout: Duration,
    /// Send a keepalive after this much silence from the server (`None`: never).
    ///
    /// A channel whose consumer stalls blocks russh's session loop: no
    /// keepalive is sent or answered during the stall, so a server that
    /// probes its clients may drop the connection (see the crate docs).
    pub keepalive_interval: Option<Duration>,
    /// Keepalives without reply before the connection is dropped.
    pub keepalive_max: usize,
    /// Watermarks of each stdout/stderr buffer and of stdin.
    pub watermarks: Watermarks,
    /// Messages russh may queue per channel before its session loop waits
    /// (`channel_buffer_size`). Each message is at most one SSH packet
    /// ([`max_packet`](SshConfig::max_packet) bytes). Default 2.
    pub channel_buffer: usize,
    /// The largest SSH packet the server may send us (bytes of channel data
    /// per message). Default 32768, russh's default.
    pub max_packet: u32,
    /// The channel window russh advertises (bytes). Default 2 MiB. russh
    /// refills it on receipt, so it bounds bytes in flight on the wire, not
    /// memory in this process.
    pub window: u32,
    /// Ciphers to offer, most preferred first, by their SSH names
    /// (`aes128-gcm@openssh.com`, `chacha20-poly1305@openssh.com`, ...).
    /// Empty: russh's default list.
    pub ciphers: Vec<String>,
    /// The ledger that counts this crate's tasks and connections
    /// (`ssh.task`, `ssh.session`). Default: [`Ledger::global()`].
    pub ledger: Ledger,
    /// The system-wide known_hosts file, read after the user's (OpenSSH's
    /// `GlobalKnownHostsFile`). Default `/etc/ssh/ssh_known_hosts`; `None`
    /// reads only the user's file. The openssh backend leaves this to ssh,
    /// whose default is the same file.
    pub global_known_hosts: Option<PathBuf>,
    /// openssh backend: how long the ControlMaster (`ssh -M -f`, a
    /// process of its own that outlives ours) stays up without any command
    /// running (`ControlPersist`, whole seconds, at least 1). Default 300 s.
    /// It bounds how long a master outlives a crash of this process (a
    /// normal drop closes it at once), and it also closes an idle session:
    /// an exec after a longer idle time fails.
    pub control_persist: Duration,
    /// Whether tracing spans of a remote process record its full command
    /// line (`command` field). Default `false`: a command line may carry
    /// secrets (`PGPASSWORD=... psql`), so spans record only its length
    /// (`command_len`).
    pub log_commands: bool,
    /// The SSH implementation. Default: [`Backend::Russh`].
    ///
    /// With [`Backend::OpenSsh`], `channel_buffer`, `max_packet` and `window`
    /// do not apply (OpenSSH chooses its own window and packet size).
    pub backend: Backend,
}

impl SshConfig {
    /// A configuration for `user@addr` with no authentication method yet,
    /// known_hosts checking, a 10 s connect timeout, no keepalive and the
    /// default [`Watermarks`].
    pub fn new(user: impl Into<String>, addr: impl Into<String>) -> Self {
        SshConfig {
            user: user.into(),
            addr: addr.into(),
            auth: Vec::new(),
            host_key: HostKeyPolicy::Default,
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: None,
            keepalive_max: 3,
            watermarks: Watermarks::default(),
            channel_buffer: 2,
            max_packet: 32768,
            window: 2 * 1024 * 1024,
            ciphers: Vec::new(),
            ledger: Ledger::global().clone(),
            global_known_hosts: Some(PathBuf::from("/etc/ssh/ssh_known_hosts")),
            control_persist: Duration::from_secs(300),
            log_commands: false,
            backend: Backend::default(),
        }
    }

    /// Adds an authentication method (tried after the ones already added).
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth.push(auth);
        self
    }

    /// Checks host keys against this known_hosts file.
    pub fn known_hosts(mut self, path: impl Into<PathBuf>) -> Self {
        self.host_key = HostKeyPolicy::KnownHosts(Some(path.into()));
        self
    }

    /// Reads this system-wide known_hosts file after the user's (`None`:
    /// none). Default `/etc/ssh/ssh_known_hosts`.
    pub fn global_known_hosts(mut self, path: Option<PathBuf>) -> Self {
        self.global_known_hosts = path;
        self
    }

    /// Sets the host key policy.
    pub fn host_key_policy(mut self, policy: HostKeyPolicy) -> Self {
        self.host_key = policy;
        self
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the keepalive interval and the count of unanswered keepalives.
    pub fn keepalive(mut self, interval: Duration, max: usize) -> Self {
        self.keepalive_interval = Some(interval);
        self.keepalive_max = max;
        self
    }

    /// Sets the watermarks of every stream buffer.
    pub fn watermarks(mut self, watermarks: Watermarks) -> Self {
        self.watermarks = watermarks;
        self
    }

    /// Counts tasks and connections in this ledger instead of the global one.
    pub fn ledger(mut self, ledger: Ledger) -> Self {
        self.ledger = ledger;
        self
    }

    /// Offers only these ciphers, in this order of preference.
    pub fn ciphers<I, S>(mut self, ciphers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.ciphers = ciphers.into_iter().map(Into::into).collect();
        self
    }

    /// Records full command lines in tracing spans (off by default: they
    /// may carry secrets).
    pub fn log_commands(mut self, on: bool) -> Self {
        self.log_commands = on;
        self
    }

    /// Sets how long an idle openssh ControlMaster stays up
    /// ([`control_persist`](SshConfig::control_persist)).
    pub fn control_persist(mut self, idle: Duration) -> Self {
        self.control_persist = idle;
        self
    }

    /// Chooses the SSH implementation.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Sets russh's per-channel queue length (at least 1).
    pub fn channel_buffer(mut self, messages: usize) -> Self {
        self.channel_buffer = messages;
        self
    }
}

/// Per-command options of [`Session::exec_with`](crate::Session::exec_with):
/// the stage name of the process's buffers and what stdout and stderr do
/// when their consumer falls behind.
///
/// ```
/// use flowctl_core::Overflow;
/// use flowctl_ssh::ExecOptions;
/// let opts = ExecOptions::new()
///     .name("db1.dump")               // stages db1.dump.stdout, .stderr, .stdin
///     .overflow(Overflow::DropOldest); // never stall the remote command
/// assert_eq!(opts.name.as_deref(), Some("db1.dump"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecOptions {
    /// The base of the stage names (`<name>.stdout`, `<name>.stderr`,
    /// `<name>.stdin`). `None`: `ssh.<host>.<channel id>`, with the host as
    /// given in [`SshConfig::addr`] (without the port) and the channel id as
    /// the backend knows it (russh's channel number; a per-session counter
    /// from 0 for the openssh backend).
    pub name: Option<String>,
    /// What stdout and stderr do when their buffer is full
    /// (default [`Overflow::Block`](flowctl_core::Overflow::Block)); stdin
    /// always blocks. See [`Output`](crate::Output) ("Overflow").
    pub overflow: flowctl_core::Overflow,
}

impl ExecOptions {
    /// The defaults: stages named `ssh.<host>.<channel id>.*`, and
    /// [`Overflow::Block`](flowctl_core::Overflow::Block).
    pub fn new() -> Self {
        ExecOptions::default()
    }

    /// Names the process's stages `<name>.stdout`, `<name>.stderr` and
    /// `<name>.stdin` instead of `ssh.<host>.<channel id>.*`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// What stdout and stderr do with a chunk that finds their buffer full.
    pub fn overflow(mut self, overflow: flowctl_core::Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// The base of the stage names for a channel `channel` of a session
    /// configured with `config`.
    #[cfg_attr(not(any(feature = "russh", feature = "openssh")), allow(dead_code))]
    pub(crate) fn base_name(&self, config: &SshConfig, channel: impl std::fmt::Display) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("ssh.{}.{channel}", split_host_port(&config.addr).0),
        }
    }
}

/// `host` and port (22 if none) of an `addr` such as `example.org:2222`,
/// `[::1]:2200` or `::1`, as both backends name the host (known_hosts
/// entries, ssh's command line).
#[cfg_attr(not(any(feature = "russh", feature = "openssh")), allow(dead_code))]
pub(crate) fn split_host_port(addr: &str) -> (String, u16) {
    if let Some(rest) = addr.strip_prefix('[')
        && let Some((host, port)) = rest.split_once("]:")
    {
        return (host.to_owned(), port.parse().unwrap_or(22));
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host.to_owned(), port.parse().unwrap_or(22)),
        _ => (addr.to_owned(), 22),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_a_password_or_a_passphrase() {
        let cfg = SshConfig::new("deploy", "127.0.0.1:22")
            .auth(Auth::Password("pw-TOPSECRET-1".into()))
            .auth(Auth::KeyFile {
                path: "/k".into(),
                passphrase: Some("pp-TOPSECRET-2".into()),
            });
        let printed = format!("{cfg:?}");
        assert!(!printed.contains("TOPSECRET"), "{printed}");
        assert_eq!(format!("{:?}", Secret::from("x")), "<redacted>");
    }

    #[test]
    fn stage_base_names_use_the_host_as_given_without_the_port() {
        let opts = ExecOptions::new();
        let cfg = |addr: &str| SshConfig::new("u", addr);
        assert_eq!(
            opts.base_name(&cfg("db1.example:2222"), 7),
            "ssh.db1.example.7"
        );
        assert_eq!(opts.base_name(&cfg("db1.example"), 0), "ssh.db1.example.0");
        assert_eq!(opts.base_name(&cfg("[::1]:2200"), 3), "ssh.::1.3");
        let named = ExecOptions::new().name("db1.dump");
        assert_eq!(named.base_name(&cfg("db1.example:22"), 7), "db1.dump");
        assert_eq!(
            ExecOptions::default().overflow,
            flowctl_core::Overflow::Block
        );
    }

    #[test]
    fn host_and_port_for_known_hosts() {
        assert_eq!(
            split_host_port("example.org:2222"),
            ("example.org".into(), 2222)
        );
        assert_eq!(split_host_port("example.org"), ("example.org".into(), 22));
        assert_eq!(split_host_port("[::1]:2200"), ("::1".into(), 2200));
        assert_eq!(split_host_port("::1"), ("::1".into(), 22));
    }
}
