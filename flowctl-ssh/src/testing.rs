//! A real OpenSSH `sshd` for tests and the soak (feature `testing`).
//!
//! [`Sshd::start`] runs the system `sshd` in the foreground on a free
//! 127.0.0.1 port with a throwaway host key, accepting one client key, in a
//! process group of its own with a parent-death signal (Linux: SIGKILL when
//! the thread that started it ends), and stops it and every process below
//! it (connections and their commands) when dropped. It needs `sshd` (`FLOWCTL_SSHD`, default
//! `/usr/sbin/sshd`) and `ssh-keygen` (`FLOWCTL_SSH_KEYGEN`, default from
//! `PATH`); a missing one is an error that names the package to install
//! (`cargo xtask setup` installs both).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Creates an unencrypted ed25519 key pair at `path` and `path.pub`.
///
/// # Errors
/// `ssh-keygen` missing (the message says how to install it) or failing.
pub fn ssh_keygen(path: &Path) -> Result<(), String> {
    let tool = std::env::var("FLOWCTL_SSH_KEYGEN").unwrap_or_else(|_| "ssh-keygen".into());
    let st = Command::new(&tool)
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| {
            format!("cannot run {tool} ({e}): run `cargo xtask setup` (installs openssh-client)")
        })?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{tool} failed for {}: {st}", path.display()))
    }
}

/// The `sshd` binary: `FLOWCTL_SSHD` or `/usr/sbin/sshd`.
///
/// # Errors
/// It does not exist; the message says how to install it.
pub fn sshd_binary() -> Result<PathBuf, String> {
    let path = std::env::var_os("FLOWCTL_SSHD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/sshd"));
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "sshd not found at {}: run `cargo xtask setup` (installs openssh-server) or set FLOWCTL_SSHD",
            path.display()
        ))
    }
}

/// The name of the user this process runs as (`id -un`): the login sshd
/// accepts for the client key.
///
/// # Errors
/// `id` cannot run.
pub fn current_user() -> Result<String, String> {
    let out = Command::new("id")
        .arg("-un")
        .output()
        .map_err(|e| format!("cannot run `id -un`: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot read a local address: {e}"))
}

/// An OpenSSH sshd on a free loopback port, killed by pid on drop.
#[derive(Debug)]
pub struct Sshd {
    child: Child,
    port: u16,
    known_hosts_line: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Sshd {
    /// Starts sshd with its files in `dir` (host key, `authorized_keys` with
    /// `client_key`'s public half `client_key.pub`, `sshd_config` plus the
    /// `extra` lines) and waits until it listens. A port taken between
    /// choosing and binding is retried, up to five times.
    ///
    /// # Errors
    /// A missing tool (with the package to install), a file that cannot be
    /// written, or an sshd that does not start within 20 s (with its log).
    pub fn start(dir: &Path, client_key: &Path, extra: &str) -> Result<Sshd, String> {
        let bin = sshd_binary()?;
        // sshd insists on its privilege-separation directory when run as root.
        let _ = std::fs::create_dir_all("/run/sshd");
        let host_key = dir.join("host_key");
        ssh_keygen(&host_key)?;
        let host_pub = std::fs::read_to_string(dir.join("host_key.pub"))
            .map_err(|e| format!("cannot read the host key: {e}"))?;
        let mut pub_path = client_key.as_os_str().to_owned();
        pub_path.push(".pub");
        let authorized = dir.join("authorized_keys");
        std::fs::copy(&pub_path, &authorized)
            .map_err(|e| format!("cannot write {}: {e}", authorized.display()))?;
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let config = dir.join("sshd_config");
            std::fs::write(
                &config,
                // `extra` first: sshd keeps the first value it reads for a keyword.
                // HOME is the fixture's directory: the remote shell (bash, started by
                // sshd) reads $HOME/.bashrc, and the user's own may run slow or
                // lock-taking tools (pyenv's rehash takes a lock that a session killed
                // mid-start leaves behind, and every later shell then hangs on it).
                format!(
                    "{extra}\nListenAddress 127.0.0.1:{port}\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                     UsePAM no\nStrictModes no\nPidFile none\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin yes\n\
                     MaxStartups 100\nMaxSessions 100\nLogLevel INFO\nPrintMotd no\nUseDNS no\n\
                     SetEnv HOME={home}\n",
                    hk = host_key.display(),
                    ak = authorized.display(),
                    home = dir.display(),
                ),
            )
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            let mut cmd = Command::new(&bin);
            cmd.arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            // Its own process group, and SIGKILL when the thread that
            // started it ends (a test killed by a timeout leaves no sshd).
            crate::sys::isolate_std(&mut cmd);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            let Some(stderr) = child.stderr.take() else {
                let _ = child.kill();
                let _ = child.wait();
                return Err("sshd started without a stderr pipe".into());
            };
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
                    Ok(Ok(())) => {
                        return Ok(Sshd {
                            child,
                            port,
                            known_hosts_line: format!("[127.0.0.1]:{port} {}", host_pub.trim()),
                            log,
                        });
                    }
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
                        return Err(format!(
                            "sshd did not print \"Server listening\" within 20 s: {last_err}"
                        ));
                    }
                }
            }
        }
        Err(format!("sshd failed to start: {last_err}"))
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The `known_hosts` line that trusts exactly this server's host key.
    pub fn known_hosts_line(&self) -> &str {
        &self.known_hosts_line
    }

    /// The listener's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Cuts every live connection from the server side: SIGKILLs every
    /// process below the listener (one sshd per connection, and what it
    /// started). Returns how many processes were killed.
    pub fn drop_connections(&self) -> usize {
        let mut killed = 0;
        for pid in descendants(self.child.id()) {
            let ok = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            killed += usize::from(ok);
        }
        killed
    }

    /// The command names (`/proc/PID/comm`) of the processes that clients'
    /// commands run in, with their children: every process below a session
    /// process (the sshd whose title reads `sshd: USER@notty` or
    /// `sshd: USER@pts/N`; it is the listener's child for root, which
    /// runs without privilege separation, and its grandchild otherwise). A
    /// command still starting (forked, not yet `exec`ed: named `sshd`) and a
    /// zombie not yet reaped are included.
    pub fn commands(&self) -> Vec<String> {
        let below = descendants_with_depth(self.child.id());
        let title = |pid: u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let titled = |pid: u32| {
            let t = title(pid);
            t.starts_with("sshd: ") && (t.contains("@notty") || t.contains("@pts/"))
        };
        // The topmost titled processes: a command forked but not yet
        // `exec`ed still carries its parent's title.
        let sessions = below
            .iter()
            .map(|&(pid, _)| pid)
            .filter(|&pid| titled(pid) && !parent_of(pid).is_some_and(titled));
        let mut out = Vec::new();
        for session in sessions {
            for (pid, _) in descendants_with_depth(session) {
                if let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
                    out.push(c.trim().to_owned());
                }
            }
        }
        out
    }

    /// How many lines sshd logged that contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Every line sshd logged that contains any of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| needles.iter().any(|n| l.contains(n)))
            .collect()
    }

    /// Whether sshd logged a line containing `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Sshd {
    /// Stops the whole tree: the listener, one or two sshd per connection
    /// (each in a session of its own: `setsid`) and the commands they run
    /// (in sessions of their own too), so no group kill reaches them all.
    /// Every process is first frozen (SIGSTOP: it can fork no more), the
    /// frozen tree is listed again until it stops growing, then everything
    /// is SIGKILLed.
    fn drop(&mut self) {
        let root = self.child.id();
        crate::sys::signal(root, libc::SIGSTOP);
        let mut frozen: Vec<u32> = Vec::new();
        loop {
            let fresh: Vec<u32> = descendants(root)
                .into_iter()
                .filter(|p| !frozen.contains(p))
                .collect();
            if fresh.is_empty() || frozen.len() > 100_000 {
                break;
            }
            for &pid in &fresh {
                crate::sys::signal(pid, libc::SIGSTOP);
            }
            frozen.extend(fresh);
        }
        for &pid in &frozen {
            crate::sys::signal(pid, libc::SIGKILL);
        }
        crate::sys::kill_group(root);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every process below `root` (from `/proc`): to check that a peer left
/// nothing behind.
pub fn process_tree(root: u32) -> Vec<u32> {
    descendants(root)
}

/// Every process below `root`, from `/proc` (children before their own
/// children, so the connection's sshd goes first).
fn descendants(root: u32) -> Vec<u32> {
    descendants_with_depth(root)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// The parent of `pid`, from `/proc/PID/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces, so split after ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse::<u32>().ok())
}

/// Every process below `root` with its depth (1 for a child), from `/proc`.
fn descendants_with_depth(root: u32) -> Vec<(u32, usize)> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`: comm may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![(root, 0)];
    while let Some((p, depth)) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == p {
                out.push((pid, depth + 1));
                frontier.push((pid, depth + 1));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_finds_a_grandchild() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .expect("sh");
        // The grandchild appears once `sh` has forked it: poll until then.
        let limit = Instant::now() + Duration::from_secs(30);
        let mut found = descendants(child.id());
        while found.is_empty() && Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(5));
            found = descendants(child.id());
        }
        let _ = Command::new("kill")
            .args(["-KILL", &found.first().copied().unwrap_or(0).to_string()])
            .status();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found.len(), 1, "sh's one child (sleep): {found:?}");
    }
}
