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

/// How much of the server's bytes a [`Relay`] lets through to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Let {
    /// Nothing: the client waits for the server's banner.
    Nothing,
    /// The server's first line (its `SSH-2.0-...` banner), then nothing: the
    /// client waits in the key exchange.
    FirstLine,
    /// Everything, from now on.
    All,
}

/// A loopback TCP relay in front of a server, which lets the server's bytes
/// through only as far as the test says ([`Let`]); the client's always go
/// through. Counts its live connections and the bytes clients sent.
pub(crate) struct Relay {
    pub(crate) port: u16,
    /// Connections accepted so far.
    pub(crate) accepted: tokio::sync::watch::Receiver<usize>,
    gate: tokio::sync::watch::Sender<Let>,
    live: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    pub(crate) async fn start(target: &str, initially: Let) -> Relay {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (gate, let_rx) = tokio::sync::watch::channel(initially);
        let (count, accepted) = tokio::sync::watch::channel(0usize);
        let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (target, counter, total) = (target.to_owned(), live.clone(), sent.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let server = tokio::net::TcpStream::connect(&target).await.unwrap();
                counter.fetch_add(1, SeqCst);
                count.send_modify(|n| *n += 1);
                let (mut gate, live, sent) = (let_rx.clone(), counter.clone(), total.clone());
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    // The client's end of the connection closed: the server's
                    // bytes held back have nobody to go to.
                    let client_gone = tokio::sync::Notify::new();
                    let up = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n @ 1..) = cr.read(&mut buf).await {
                            sent.fetch_add(n as u64, SeqCst);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                        client_gone.notify_one();
                    };
                    let down = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut line_done = false;
                        'read: while let Ok(n @ 1..) = sr.read(&mut buf).await {
                            let mut chunk = &buf[..n];
                            while !chunk.is_empty() {
                                let allowed = match *gate.borrow_and_update() {
                                    Let::All => chunk.len(),
                                    Let::FirstLine if !line_done => {
                                        match chunk.iter().position(|b| *b == b'\n') {
                                            Some(i) => {
                                                line_done = true;
                                                i + 1
                                            }
                                            None => chunk.len(),
                                        }
                                    }
                                    _ => 0,
                                };
                                if allowed == 0 {
                                    tokio::select! {
                                        r = gate.changed() => if r.is_err() {
                                            break 'read;
                                        },
                                        () = client_gone.notified() => break 'read,
                                    }
                                    continue;
                                }
                                if cw.write_all(&chunk[..allowed]).await.is_err() {
                                    break 'read;
                                }
                                chunk = &chunk[allowed..];
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                    live.fetch_sub(1, SeqCst);
                });
            }
        });
        Relay {
            port,
            accepted,
            gate,
            live,
            sent,
        }
    }

    /// From now on, lets `what` through.
    pub(crate) fn let_through(&self, what: Let) {
        self.gate.send_replace(what);
    }

    /// Connections through the relay that neither end has closed.
    pub(crate) fn live(&self) -> usize {
        self.live.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Bytes the clients have sent through the relay.
    pub(crate) fn client_bytes(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits for `fx`'s ledger to read zero, then for every connection
    /// through the relay to end: the proof that no client of ours is left
    /// connected. Exactly one connection was made (nothing retried).
    pub(crate) async fn nothing_left(&self, fx: &Fixture) {
        tokio::time::timeout(Duration::from_secs(60), fx.ledger.until_zero(None))
            .await
            .unwrap_or_else(|_| panic!("the ledger still counts {:?}", fx.ledger.snapshot()));
        until(
            Duration::from_secs(30),
            "the client's connection through the relay to close",
            || self.live() == 0,
        )
        .await;
        assert_eq!(
            *self.accepted.borrow(),
            1,
            "one connection, nothing retried"
        );
    }

    /// `fx`'s client configuration, through this relay: its address, and a
    /// known_hosts file that names the server's key under the relay's port.
    pub(crate) fn config(&self, fx: &Fixture) -> SshConfig {
        let known = std::fs::read_to_string(&fx.known_hosts).unwrap();
        let (_, key) = known.lines().next().unwrap().split_once(' ').unwrap();
        let kh = fx.path(&format!("known_hosts.relay{}", self.port));
        std::fs::write(&kh, format!("[127.0.0.1]:{} {key}\n", self.port)).unwrap();
        let mut cfg = fx.config().known_hosts(&kh);
        cfg.addr = format!("127.0.0.1:{}", self.port);
        cfg
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
