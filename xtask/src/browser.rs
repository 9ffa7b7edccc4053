//! The headless browser check of the built book, and a static file server.
//!
//! The book is served on a free 127.0.0.1 port by [`Server`] (std only), so
//! that every request the browser makes is seen: a page, stylesheet, script or
//! font that is missing is a failure. Debian's `chromium` (installed by
//! `cargo xtask setup`) then loads each page twice in headless mode:
//!
//! - with `--screenshot`, logging to stderr: a line with `Uncaught` or a
//!   console message at error level is a JavaScript error, and fails;
//! - with `--dump-dom`: the page rendered if the DOM after its scripts ran
//!   has the sidebar's chapter list (built by a script) and the page's `<main>`.
//!
//! Each run gets a fresh `--user-data-dir` and every background service
//! disabled, so nothing leaves the machine.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::which;

/// How long one chromium run may take before it is killed.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(120);

/// Requests the browser makes on its own that a static site need not answer.
const IGNORED_MISSING: &[&str] = &["/favicon.ico"];

/// Loads `page` (relative to `book`) in headless chromium, saves a screenshot
/// to `screenshot`, and fails on a missing resource, a JavaScript error or a
/// page that did not render.
pub(crate) fn check_page(book: &Path, page: &str, screenshot: &Path) -> Result<(), String> {
    let chromium = chromium()?;
    if !book.join(page).is_file() {
        return Err(format!("{} does not exist", book.join(page).display()));
    }
    let server = Server::start(book, "127.0.0.1:0")?;
    let url = format!("http://{}/{page}", server.addr);
    let scratch = PrivateDir::new("flowctl-chromium")?;
    let scratch = scratch.path();
    let result = (|| {
        let _ = fs::remove_file(screenshot);
        let shot_arg = format!("--screenshot={}", screenshot.display());
        let (_, log) = run_chromium(
            &chromium,
            scratch,
            &[
                &shot_arg,
                "--window-size=1280,900",
                "--enable-logging=stderr",
                "--v=0",
                &url,
            ],
        )?;
        let errors = js_errors(&log);
        if !errors.is_empty() {
            return Err(format!(
                "JavaScript errors on {url}:\n  {}",
                errors.join("\n  ")
            ));
        }
        if !screenshot.is_file() {
            return Err(format!(
                "chromium wrote no screenshot of {url}; its log:\n{log}"
            ));
        }
        let (dom, log) = run_chromium(&chromium, scratch, &["--dump-dom", &url])?;
        if !dom.contains("class=\"chapter") || !dom.contains("<main") {
            return Err(format!(
                "{url} did not render: no sidebar chapter list or no <main> in the DOM \
                 after its scripts ran; chromium's log:\n{log}"
            ));
        }
        Ok(())
    })();
    let missing = server.stop();
    result?;
    if !missing.is_empty() {
        return Err(format!(
            "loading {page} requested files the book does not have: {}",
            missing.join(", ")
        ));
    }
    println!(
        "browser ok: {page} rendered without JavaScript errors; screenshot {}",
        screenshot.display()
    );
    Ok(())
}

/// A fresh directory only this user can enter (mode 0700), made like
/// `mkdtemp(3)`: a random name under the temp dir, created with one `mkdir`
/// that fails if anything (a file, a directory, a symlink planted by another
/// user) already has that name, then tried again with another name. Removed
/// on drop. std only: xtask has no dependencies, so that it builds in
/// seconds on a fresh machine.
#[derive(Debug)]
pub(crate) struct PrivateDir(PathBuf);

impl PrivateDir {
    pub(crate) fn new(prefix: &str) -> Result<PrivateDir, String> {
        Self::new_in(&std::env::temp_dir(), prefix)
    }

    fn new_in(base: &Path, prefix: &str) -> Result<PrivateDir, String> {
        use std::hash::{BuildHasher, RandomState};
        use std::os::unix::fs::DirBuilderExt;
        let mut last = None;
        for attempt in 0u32..100 {
            // RandomState is seeded from the OS's random source per process
            // and varies per instance.
            let random = RandomState::new().hash_one((std::process::id(), attempt, Instant::now()));
            let path = base.join(format!("{prefix}-{random:016x}"));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(path),
                Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
            }
        }
        Err(format!(
            "cannot create a private directory in {}: 100 names taken (last {:?})",
            base.display(),
            last
        ))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Serves `book` on `addr` until the process is interrupted.
pub(crate) fn serve_forever(book: &Path, addr: &str) -> Result<(), String> {
    let server = Server::start(book, addr)?;
    println!(
        "serving {} on http://{}/ (Ctrl-C to stop)",
        book.display(),
        server.addr
    );
    loop {
        thread::park();
    }
}

fn chromium() -> Result<PathBuf, String> {
    which("chromium")
        .or_else(|| Some(PathBuf::from("/usr/bin/chromium")).filter(|p| p.is_file()))
        .ok_or_else(|| {
            "`chromium` not found: the docs' browser check needs Debian's chromium; \
             run `cargo xtask setup` (or `apt-get install chromium`)"
                .to_owned()
        })
}

/// Runs headless chromium with `extra` arguments; returns (stdout, stderr).
fn run_chromium(
    chromium: &Path,
    scratch: &Path,
    extra: &[&str],
) -> Result<(String, String), String> {
    let profile = scratch.join("profile");
    let _ = fs::remove_dir_all(&profile);
    fs::create_dir_all(&profile)
        .map_err(|e| format!("cannot create {}: {e}", profile.display()))?;
    let (out_path, err_path) = (scratch.join("stdout"), scratch.join("stderr"));
    let file =
        |p: &Path| fs::File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()));
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--mute-audio",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .stdin(Stdio::null())
    .stdout(file(&out_path)?)
    .stderr(file(&err_path)?);
    println!("$ chromium --headless ... {}", extra.join(" "));
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", chromium.display()))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > CHROMIUM_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "chromium did not finish within {}s",
                    CHROMIUM_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("cannot wait for chromium: {e}")),
        }
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    if !status.success() {
        return Err(format!("chromium failed ({status}); its log:\n{stderr}"));
    }
    Ok((stdout, stderr))
}

/// Lines of chromium's log that report a JavaScript error.
fn js_errors(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            // Chromium logs every console message at INFO level, whatever its
            // level: exceptions say `Uncaught`, and error messages say error.
            l.contains("Uncaught")
                || (l.contains(":CONSOLE") && l.to_ascii_lowercase().contains("error"))
        })
        .map(str::to_owned)
        .collect()
}

/// A static file server on its own threads, recording requests it could not answer.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    missing: Arc<Mutex<Vec<String>>>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Server {
    fn start(root: &Path, addr: &str) -> Result<Server, String> {
        let listener =
            TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the listening address: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let missing = Arc::new(Mutex::new(Vec::new()));
        let (root, stop2, missing2) = (root.to_path_buf(), stop.clone(), missing.clone());
        let accept = thread::Builder::new()
            .name("docs-server".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (root, missing) = (root.clone(), missing2.clone());
                    let _ = thread::Builder::new().spawn(move || {
                        if let Some(path) = answer(stream, &root) {
                            missing
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(path);
                        }
                    });
                }
            })
            .map_err(|e| format!("cannot start the server thread: {e}"))?;
        Ok(Server {
            addr,
            stop,
            missing,
            accept: Some(accept),
        })
    }

    /// Stops accepting; returns the distinct paths that were not found.
    fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let list = self.missing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut seen = HashSet::new();
        list.iter()
            .filter(|p| !IGNORED_MISSING.contains(&p.as_str()) && seen.insert(p.as_str()))
            .cloned()
            .collect()
    }
}

/// Answers one request (one per connection); returns the path if it was not found.
fn answer(stream: TcpStream, root: &Path) -> Option<String> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    reader.read_line(&mut request).ok()?;
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => break,
            Ok(_) if header.trim().is_empty() => break,
            Ok(_) => {}
        }
    }
    let mut stream = reader.into_inner();
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next()?, parts.next()?);
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let file = resolve(root, path);
    let (status, body, kind) = match (method, file.as_deref().map(fs::read)) {
        ("GET" | "HEAD", Some(Ok(body))) => (
            "200 OK",
            body,
            content_type(file.as_deref().unwrap_or(root)),
        ),
        _ => ("404 Not Found", b"not found\n".to_vec(), "text/plain"),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let _ = stream.write_all(&body);
    }
    let _ = stream.flush();
    (status != "200 OK").then(|| path.to_owned())
}

/// The file a URL path names under `root`, if it is inside it.
fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let decoded = url_path.replace("%20", " ");
    let rel = Path::new(decoded.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let path = root.join(rel);
    let path = if path.is_dir() {
        path.join("index.html")
    } else {
        path
    };
    path.is_file().then_some(path)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "css" => "text/css",
        "js" => "text/javascript",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chromium scratch directory was `<tmp>/flowctl-chromium-<pid>`:
    /// another user could create it first (or a symlink by that name) and
    /// read or redirect what chromium writes. Now: a fresh random name, mode
    /// 0700, never an existing path, removed on drop.
    #[test]
    fn the_chromium_scratch_dir_is_private_and_unpredictable() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir();
        let predictable = base.join(format!("flowctl-chromium-{}", std::process::id()));
        let (a, b) = (
            PrivateDir::new("flowctl-chromium").unwrap(),
            PrivateDir::new("flowctl-chromium").unwrap(),
        );
        assert_ne!(a.path(), predictable.as_path());
        assert_ne!(a.path(), b.path());
        for dir in [&a, &b] {
            let meta = fs::symlink_metadata(dir.path()).unwrap();
            assert!(meta.is_dir(), "{:?} is a real directory", dir.path());
            assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{:?}", dir.path());
        }
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists(), "{path:?} removed on drop");
    }

    /// A name that is taken (here: every name, through a base that is a
    /// file) is never reused: creation fails instead.
    #[test]
    fn a_taken_name_is_never_used() {
        let file = PrivateDir::new("flowctl-test").unwrap();
        let blocker = file.path().join("not-a-dir");
        fs::write(&blocker, b"x").unwrap();
        assert!(PrivateDir::new_in(&blocker, "p").is_err());
    }

    #[test]
    fn recognises_javascript_errors() {
        let log = "\
[1:1:INFO:CONSOLE:3] \"hello\", source: http://127.0.0.1/x.js (3)
[1:1:INFO:CONSOLE:7] \"Uncaught ReferenceError: nope is not defined\", source: http://127.0.0.1/x.js (7)
[1:1:INFO:CONSOLE:9] \"TypeError: x is null\", source: http://127.0.0.1/x.js (9)
[1:1:ERROR:gpu_init.cc(1)] unrelated";
        assert_eq!(js_errors(log).len(), 2);
    }

    #[test]
    fn resolves_only_inside_the_root() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert_eq!(resolve(root, "/Cargo.toml"), Some(root.join("Cargo.toml")));
        assert_eq!(resolve(root, "/../Cargo.toml"), None);
        assert_eq!(resolve(root, "/nope.html"), None);
    }
}
