//! Real peers for the tests: [`Fixture::embedded`] and [`Fixture::sshd`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flowctl_core::Watermarks;
use flowctl_core::lifecycle::Ledger;
use flowctl_ssh::server::{EmbeddedServer, ServerConfig};

use flowctl_ssh::testing::Sshd;
use flowctl_ssh::{Auth, Backend, SshConfig};

/// Which server a fixture runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Embedded,
    Sshd,
}

/// A running server plus a client key that it accepts and a known_hosts
/// file that records its host key.
pub(crate) struct Fixture {
    #[allow(dead_code)]
    pub(crate) kind: Kind,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) addr: String,
    pub(crate) key: PathBuf,
    pub(crate) known_hosts: PathBuf,
    pub(crate) user: String,
    pub(crate) ledger: Ledger,
    /// The embedded server's own ledger (its accept loop counts as 1).
    pub(crate) server_ledger: Ledger,
    pub(crate) embedded: Option<EmbeddedServer>,
    /// The client backend [`Fixture::config`] selects.
    pub(crate) backend: Backend,
    pub(crate) sshd: Option<Sshd>,
}

pub(crate) fn ssh_keygen(path: &Path) {
    flowctl_ssh::testing::ssh_keygen(path).unwrap_or_else(|e| panic!("{e}"));
}

fn user() -> String {
    flowctl_ssh::testing::current_user().unwrap_or_else(|e| panic!("{e}"))
}

impl Fixture {
    pub(crate) async fn start(kind: Kind) -> Fixture {
        match kind {
            Kind::Embedded => Fixture::embedded().await,
            Kind::Sshd => Fixture::sshd().await,
        }
    }

    pub(crate) async fn embedded() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("id");
        ssh_keygen(&key);
        let public = flowctl_ssh::russh::keys::load_public_key(dir.path().join("id.pub")).unwrap();
        let ledger = Ledger::new();
        let server_ledger = Ledger::new();
        let mut cfg = ServerConfig::new(vec![public]).unwrap();
        cfg.ledger = server_ledger.clone();
        let server = EmbeddedServer::start(cfg).await.unwrap();
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, format!("{}\n", server.known_hosts_line())).unwrap();
        Fixture {
            kind: Kind::Embedded,
            addr: server.addr().to_string(),
            key,
            known_hosts,
            user: user(),
            ledger,
            server_ledger,
            embedded: Some(server),
            backend: Backend::Russh,
            sshd: None,
            dir,
        }
    }

    pub(crate) async fn sshd() -> Fixture {
        Fixture::sshd_with("")
    }

    /// An sshd with extra `sshd_config` lines.
    pub(crate) fn sshd_with(extra: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("id");
        ssh_keygen(&key);
        let sshd = Sshd::start(dir.path(), &key, extra).unwrap_or_else(|e| panic!("{e}"));
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, format!("{}\n", sshd.known_hosts_line())).unwrap();
        Fixture {
            kind: Kind::Sshd,
            addr: sshd.addr(),
            key,
            known_hosts,
            user: user(),
            ledger: Ledger::new(),
            server_ledger: Ledger::new(),
            embedded: None,
            backend: Backend::Russh,
            sshd: Some(sshd),
            dir,
        }
    }

    /// A client configuration that trusts this server and authenticates with the key.
    pub(crate) fn config(&self) -> SshConfig {
        SshConfig::new(&self.user, &self.addr)
            .auth(Auth::key_file(&self.key))
            .known_hosts(&self.known_hosts)
            .connect_timeout(Duration::from_secs(20))
            .ledger(self.ledger.clone())
            .watermarks(Watermarks::new(64 * 1024, 256 * 1024).unwrap())
            .backend(self.backend)
    }

    /// The same fixture, with clients on `backend`.
    #[allow(dead_code)]
    pub(crate) fn with_backend(mut self, backend: Backend) -> Fixture {
        self.backend = backend;
        self
    }

    /// Cuts every live connection from the server side.
    pub(crate) fn drop_connections(&self) {
        if let Some(e) = &self.embedded {
            e.drop_connections();
        }
        if let Some(s) = &self.sshd {
            assert!(s.drop_connections() > 0, "no connection to cut");
        }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub(crate) async fn until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The test pattern: byte `i` of a stream.
pub(crate) fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// Runs a test body against both servers with russh, and against sshd with
/// the openssh backend (feature `openssh`).
macro_rules! both_servers {
    ($($name:ident => $body:ident;)*) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$body($crate::fixture::Fixture::start($crate::fixture::Kind::Embedded).await).await
                }
            )*
        }
        mod sshd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$body($crate::fixture::Fixture::start($crate::fixture::Kind::Sshd).await).await
                }
            )*
        }
        /// The openssh backend (system `ssh` as ControlMaster) against sshd.
        #[cfg(feature = "openssh")]
        mod openssh {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$body(
                        $crate::fixture::Fixture::start($crate::fixture::Kind::Sshd)
                            .await
                            .with_backend(flowctl_ssh::Backend::OpenSsh),
                    )
                    .await
                }
            )*
        }
    };
}
pub(crate) use both_servers;
