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
//!
//! Tests locate the real peers through environment variables, which
//! `cargo xtask test` sets from [`Facts`]: `FLOWCTL_PYTHON`, `FLOWCTL_SSHD`
//! and `FLOWCTL_NATS_SERVER`.

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
];

/// The python modules the foreign peers need (PyPI names, import names).
const PY_PACKAGES: &[&str] = &["pyzmq", "asyncssh"];
const PY_IMPORT_CHECK: &str = "import zmq, asyncssh";

/// Where the tests find the real peers; see [`Facts::apply`].
#[derive(Debug, Clone)]
pub(crate) struct Facts {
    /// The venv's python, with pyzmq and asyncssh importable.
    pub(crate) python: PathBuf,
    /// OpenSSH's server binary.
    pub(crate) sshd: PathBuf,
    /// The `nats-server` binary.
    pub(crate) nats_server: PathBuf,
}

impl Facts {
    /// The environment variables tests read, in a stable order.
    pub(crate) fn vars(&self) -> [(&'static str, &Path); 3] {
        [
            ("FLOWCTL_PYTHON", &self.python),
            ("FLOWCTL_SSHD", &self.sshd),
            ("FLOWCTL_NATS_SERVER", &self.nats_server),
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

    let facts = Facts {
        python,
        sshd,
        nats_server,
    };
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
