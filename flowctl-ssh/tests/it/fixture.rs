//! Real peers for the tests: [`Fixture::embedded`] and [`Fixture::sshd`].

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowctl_core::Watermarks;
use flowctl_core::lifecycle::Ledger;
use flowctl_ssh::server::{EmbeddedServer, ServerConfig};
use std::sync::{Arc, Mutex};

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
    let tool = std::env::var("FLOWCTL_SSH_KEYGEN").unwrap_or_else(|_| "ssh-keygen".into());
    let st = Command::new(&tool)
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {tool} ({e}): run `cargo xtask setup` (installs openssh-client)")
        });
    assert!(st.success(), "ssh-keygen failed");
}

fn user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
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
        let sshd = Sshd::start(dir.path(), &key, extra);
        let known_hosts = dir.path().join("known_hosts");
        let host_pub = std::fs::read_to_string(dir.path().join("host_key.pub")).unwrap();
        std::fs::write(
            &known_hosts,
            format!("[127.0.0.1]:{} {}\n", sshd.port, host_pub.trim()),
        )
        .unwrap();
        Fixture {
            kind: Kind::Sshd,
            addr: format!("127.0.0.1:{}", sshd.port),
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

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// An OpenSSH sshd on a free loopback port, killed by pid on drop.
pub(crate) struct Sshd {
    child: Child,
    pub(crate) port: u16,
    /// Every line sshd logged so far.
    pub(crate) log: Arc<Mutex<Vec<String>>>,
}

impl Sshd {
    /// How many lines sshd logged that contain `needle`.
    #[allow(dead_code)]
    pub(crate) fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Every line sshd logged that contains any of `needles`.
    #[allow(dead_code)]
    pub(crate) fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| needles.iter().any(|n| l.contains(n)))
            .cloned()
            .collect()
    }

    /// Whether sshd logged a line containing `needle`.
    #[allow(dead_code)]
    pub(crate) fn logged(&self, needle: &str) -> bool {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.contains(needle))
    }
}

pub(crate) fn sshd_binary() -> PathBuf {
    let path = std::env::var_os("FLOWCTL_SSHD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/sshd"));
    assert!(
        path.exists(),
        "sshd not found at {}: run `cargo xtask setup` (installs openssh-server)",
        path.display()
    );
    path
}

pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Sshd {
    fn start(dir: &Path, client_key: &Path, extra: &str) -> Sshd {
        let bin = sshd_binary();
        // sshd insists on its privilege-separation directory when run as root.
        let _ = std::fs::create_dir_all("/run/sshd");
        let host_key = dir.join("host_key");
        ssh_keygen(&host_key);
        let mut pub_path = client_key.as_os_str().to_owned();
        pub_path.push(".pub");
        std::fs::copy(&pub_path, dir.join("authorized_keys")).unwrap();
        // A port that was free a moment ago may be taken by then: retry a few.
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let config = dir.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "ListenAddress 127.0.0.1:{port}\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                     UsePAM no\nStrictModes no\nPidFile none\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin yes\n\
                     MaxStartups 100\nMaxSessions 100\nLogLevel INFO\nPrintMotd no\nUseDNS no\n{extra}",
                    hk = host_key.display(),
                    ak = dir.join("authorized_keys").display(),
                ),
            )
            .unwrap();
            let mut child = Command::new(&bin)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let stderr = child.stderr.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let log = Arc::new(Mutex::new(Vec::new()));
            let log2 = log.clone();
            // Reads sshd's log: reports the first "Server listening" (or
            // the end), then keeps draining so sshd never blocks on stderr.
            std::thread::spawn(move || {
                let mut told = false;
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log2.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(line.clone());
                    if !told && line.contains("Server listening") {
                        let _ = tx.send(Ok(()));
                        told = true;
                    } else if !told {
                        let _ = tx.send(Err(line));
                    }
                }
                if !told {
                    let _ = tx.send(Err("sshd exited".into()));
                }
            });
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(Ok(())) => return Sshd { child, port, log },
                    Ok(Err(line)) => {
                        last_err.push_str(&line);
                        last_err.push('\n');
                        if line == "sshd exited" {
                            let _ = child.wait();
                            break;
                        }
                    }
                    Err(_) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!("sshd did not print \"Server listening\" within 20 s: {last_err}");
                    }
                }
            }
        }
        panic!("sshd failed to start: {last_err}");
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` until it holds, failing after `limit` (not a timing
/// assertion: a generous bound so a broken test ends).
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
