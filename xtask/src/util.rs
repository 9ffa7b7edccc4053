//! Helpers shared by every command: the workspace root, a `cargo` command
//! builder, [`run`] (prints the command line, then runs it), a `PATH` lookup
//! and a tiny hand-written flag parser ([`Args`]).

use std::collections::VecDeque;
use std::env;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The workspace root: the parent of this crate's manifest directory.
pub(crate) fn root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// A `cargo` command (through `$CARGO`, falling back to `cargo`) that runs in
/// the workspace root.
pub(crate) fn cargo() -> Command {
    let program = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(program);
    cmd.current_dir(root());
    cmd
}

/// Prints `$ <command line>` (with the environment variables set on `cmd`),
/// runs it with inherited stdio and fails unless it exits successfully.
pub(crate) fn run(cmd: &mut Command) -> Result<(), String> {
    let line = display(cmd);
    println!("$ {line}");
    let status = cmd.status().map_err(|e| spawn_error(cmd, &e))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{line}` failed ({status})"))
    }
}

/// Runs `cmd` silently and reports whether it exited successfully; a program
/// that cannot be started counts as a failure.
pub(crate) fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Runs `cmd` silently and returns its trimmed stdout if it succeeded.
pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The first executable file named `name` in `$PATH` (like `command -v`).
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Appends `extra` to the space-separated flags in the environment variable
/// `var` (such as `RUSTFLAGS`), keeping what the user already set.
pub(crate) fn append_flags(var: &str, extra: &str) -> String {
    match env::var(var) {
        Ok(existing) if !existing.trim().is_empty() => format!("{} {extra}", existing.trim()),
        _ => extra.to_owned(),
    }
}

/// A command line as a shell user would type it.
fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    let program = Path::new(cmd.get_program());
    // `$CARGO` is an absolute path; show it the way people type it.
    let program = match program.file_name() {
        Some(name) if name == "cargo" => name,
        _ => program.as_os_str(),
    };
    parts.push(quote(program));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn spawn_error(cmd: &Command, error: &std::io::Error) -> String {
    let program = cmd.get_program().to_string_lossy();
    if error.kind() == std::io::ErrorKind::NotFound {
        format!("`{program}` not found in PATH ({error}); run `cargo xtask setup`")
    } else {
        format!("cannot start `{program}`: {error}")
    }
}

/// A minimal flag parser: `--name value`, `--name=value` and `--flag`.
/// Commands take what they know, then call [`Args::finish`], which rejects
/// anything left over, so a typo is an error rather than a silent default.
#[derive(Debug)]
pub(crate) struct Args {
    rest: VecDeque<String>,
}

impl Args {
    /// The process arguments, without the program name.
    pub(crate) fn from_env() -> Self {
        Self {
            rest: env::args().skip(1).collect(),
        }
    }

    /// Removes and returns the first argument (the command name).
    pub(crate) fn subcommand(&mut self) -> Option<String> {
        self.rest.pop_front()
    }

    /// Removes every occurrence of the boolean flag `--name`; true if present.
    pub(crate) fn flag(&mut self, name: &str) -> bool {
        let before = self.rest.len();
        self.rest.retain(|arg| arg != name);
        self.rest.len() != before
    }

    /// Removes `--name value` or `--name=value` and returns the value; the
    /// last occurrence wins.
    pub(crate) fn value(&mut self, name: &str) -> Result<Option<String>, String> {
        let prefix = format!("{name}=");
        let mut found = None;
        let mut i = 0;
        while i < self.rest.len() {
            if self.rest[i] == name {
                self.rest.remove(i);
                let value = self
                    .rest
                    .remove(i)
                    .ok_or_else(|| format!("`{name}` needs a value"))?;
                found = Some(value);
            } else if let Some(value) = self.rest[i].strip_prefix(&prefix) {
                found = Some(value.to_owned());
                self.rest.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    /// Every argument not consumed yet, for commands that pass them on.
    pub(crate) fn into_rest(self) -> Vec<String> {
        self.rest.into()
    }

    /// Fails if any argument was not consumed.
    pub(crate) fn finish(self) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            let rest: Vec<_> = self.rest.into();
            Err(format!(
                "unexpected argument(s): {}; run `cargo xtask help`",
                rest.join(" ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args {
            rest: list.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn parses_values_and_flags() {
        let mut a = args(&["--seed", "7", "--quick", "--json=out.json"]);
        assert_eq!(a.value("--seed"), Ok(Some("7".to_owned())));
        assert!(a.flag("--quick"));
        assert_eq!(a.value("--json"), Ok(Some("out.json".to_owned())));
        assert_eq!(a.value("--only"), Ok(None));
        assert!(a.finish().is_ok());
    }

    #[test]
    fn rejects_missing_value_and_leftovers() {
        assert!(args(&["--seed"]).value("--seed").is_err());
        assert!(args(&["--bogus"]).finish().is_err());
    }

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(quote(OsStr::new("--cfg")), "--cfg");
        assert_eq!(quote(OsStr::new("-D warnings")), "'-D warnings'");
    }
}
