//! `cargo xtask docs`: the API docs and the mdBook site, checked.
//!
//! Steps, each fatal:
//!
//! 1. `cargo doc --workspace --no-deps --all-features` with rustdoc warnings
//!    (broken intra-doc links, bad code blocks) denied.
//! 2. Every `{{#include FILE:ANCHOR}}` in `docs/src` names a file that exists
//!    and an anchor it defines (mdBook would render an empty snippet instead).
//! 3. `mdbook build docs` into `target/book` under the workspace root, whatever
//!    `CARGO_TARGET_DIR` says; a warning or error from mdbook fails the step.
//!    mdbook is installed with `cargo install` when `mdbook --version` fails
//!    ([`MDBOOK_INSTALL`]: only the `search` feature, the cheapest build that
//!    renders the whole site).
//! 4. Internal links of the built HTML ([`crate::linkcheck`]).
//! 5. Headless chromium loads the index page and a recipe page
//!    ([`crate::browser`]) and saves screenshots next to them.
//!
//! `--serve` builds the book, then serves it on `127.0.0.1:3000`: with
//! `mdbook serve` (live reload) when the installed mdbook has its `serve`
//! feature, otherwise with xtask's own static file server.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{Args, append_flags, cargo, output, root, run as run_cmd};
use crate::{browser, linkcheck};

/// How mdbook is installed when missing: `--locked` for a reproducible build,
/// no default features because `serve` and `watch` pull in an HTTP stack and a
/// file watcher that `cargo xtask docs` does not need. Measured for mdbook
/// 0.5.4 with `search` only: 123 crates, 176 s of CPU time (about 2 minutes on
/// 2 idle cores).
const MDBOOK_INSTALL: &[&str] = &[
    "install",
    "mdbook",
    "--locked",
    "--version",
    "^0.5.4",
    "--no-default-features",
    "--features",
    "search",
];

/// The pages the browser check loads, relative to the book's root.
const BROWSER_PAGES: &[(&str, &str)] = &[
    ("index.html", "screenshot-index.png"),
    ("recipes/child-stdout.html", "screenshot-recipe.png"),
];

/// Where `--serve` listens.
const SERVE_ADDR: &str = "127.0.0.1:3000";

/// The command line: `cargo xtask docs [--serve]`.
pub(crate) fn cli(mut args: Args) -> Result<(), String> {
    let serve = args.flag("--serve");
    args.finish()?;
    if serve { serve_book() } else { run() }
}

/// Every step of the module docs; what `cargo xtask test` runs.
pub(crate) fn run() -> Result<(), String> {
    api_docs()?;
    let mdbook = ensure_mdbook()?;
    let book = build_book(&mdbook)?;
    let report = linkcheck::check(&book)?;
    println!(
        "links ok: {} internal links (with {} #fragments) in {} HTML files",
        report.links, report.fragments, report.files
    );
    for (page, shot) in BROWSER_PAGES {
        browser::check_page(&book, page, &book.join(shot))?;
    }
    println!("book: {}", book.display());
    println!("      open {}", book.join("index.html").display());
    Ok(())
}

fn api_docs() -> Result<(), String> {
    run_cmd(
        cargo()
            .env("RUSTDOCFLAGS", append_flags("RUSTDOCFLAGS", "-D warnings"))
            .args(["doc", "--workspace", "--no-deps", "--all-features"]),
    )
}

/// Checks the includes, then builds the book; returns its folder.
fn build_book(mdbook: &Path) -> Result<PathBuf, String> {
    let root = root();
    let src = root.join("docs").join("src");
    let includes = check_includes(&src)?;
    println!("includes ok: {includes} {{{{#include}}}} directives resolve");
    let dest = root.join("target").join("book");
    let mut cmd = Command::new(mdbook);
    cmd.current_dir(&root)
        .args(["build", "docs", "--dest-dir"])
        .arg(&dest);
    println!("$ mdbook build docs --dest-dir {}", dest.display());
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {}: {e}", mdbook.display()))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{log}");
    if !out.status.success() {
        return Err(format!("`mdbook build docs` failed ({})", out.status));
    }
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    if !complaints.is_empty() {
        return Err(format!(
            "`mdbook build docs` reported problems:\n  {}",
            complaints.join("\n  ")
        ));
    }
    if !dest.join("index.html").is_file() {
        return Err(format!(
            "{} was not written",
            dest.join("index.html").display()
        ));
    }
    Ok(dest)
}

/// The mdbook binary, installed with cargo when `mdbook --version` fails.
fn ensure_mdbook() -> Result<PathBuf, String> {
    let candidates = mdbook_candidates();
    for candidate in &candidates {
        if let Some(version) = output(Command::new(candidate).arg("--version")) {
            println!("ok   {version} ({})", candidate.display());
            return Ok(candidate.clone());
        }
    }
    println!("need mdbook: `mdbook --version` failed; installing it with cargo");
    run_cmd(cargo().args(MDBOOK_INSTALL))?;
    candidates
        .into_iter()
        .find(|c| output(Command::new(c).arg("--version")).is_some())
        .ok_or_else(|| {
            "`mdbook --version` still fails after `cargo install mdbook`; \
             is cargo's bin directory in PATH?"
                .to_owned()
        })
}

/// `mdbook` from PATH, then where `cargo install` puts it.
fn mdbook_candidates() -> Vec<PathBuf> {
    let mut list = vec![PathBuf::from("mdbook")];
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        list.push(home.join("bin").join("mdbook"));
    }
    list
}

/// Verifies every `{{#include PATH[:ANCHOR]}}` under `src`; returns how many.
fn check_includes(src: &Path) -> Result<usize, String> {
    let mut pages = Vec::new();
    collect_files(src, "md", &mut pages)?;
    let mut count = 0;
    let mut problems = Vec::new();
    for page in pages {
        let text = fs::read_to_string(&page)
            .map_err(|e| format!("cannot read {}: {e}", page.display()))?;
        let dir = page.parent().unwrap_or(src);
        for directive in includes(&text) {
            count += 1;
            // `FILE`, `FILE:ANCHOR` or a line range `FILE:10:20` (not checked).
            let (file, anchor) = match directive.split_once(':') {
                Some((f, a)) if a.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') => {
                    (f, Some(a))
                }
                Some((f, _)) => (f, None),
                None => (directive.as_str(), None),
            };
            let target = dir.join(file);
            let Ok(body) = fs::read_to_string(&target) else {
                problems.push(format!(
                    "{}: includes {file}, which does not exist",
                    page.display()
                ));
                continue;
            };
            if let Some(anchor) = anchor {
                let start = body
                    .lines()
                    .any(|l| l.trim_end().ends_with(&format!("ANCHOR: {anchor}")));
                let end = body
                    .lines()
                    .any(|l| l.trim_end().ends_with(&format!("ANCHOR_END: {anchor}")));
                if !(start && end) {
                    problems.push(format!(
                        "{}: {file} has no `ANCHOR: {anchor}` ... `ANCHOR_END: {anchor}` pair",
                        page.display()
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(count)
    } else {
        Err(format!("broken includes:\n  {}", problems.join("\n  ")))
    }
}

/// The arguments of every `{{#include ...}}` in a page.
fn includes(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("{{#include ") {
        rest = &rest[i + "{{#include ".len()..];
        let Some(end) = rest.find("}}") else { break };
        found.push(rest[..end].trim().to_owned());
        rest = &rest[end..];
    }
    found
}

/// Every file under `dir` whose name ends in `.ext`, recursively.
pub(crate) fn collect_files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .path();
        if path.is_dir() {
            collect_files(&path, ext, out)?;
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    Ok(())
}

/// `--serve`: live-reloading `mdbook serve` if available, else a static server.
fn serve_book() -> Result<(), String> {
    let mdbook = ensure_mdbook()?;
    let book = build_book(&mdbook)?;
    let has_serve = crate::util::succeeds(Command::new(&mdbook).args(["serve", "--help"]));
    if has_serve {
        return run_cmd(Command::new(&mdbook).current_dir(root()).args([
            "serve",
            "docs",
            "-n",
            "127.0.0.1",
            "-p",
            "3000",
        ]));
    }
    println!(
        "this mdbook was built without its `serve` feature; serving {} without live reload \
         (rerun `cargo xtask docs --serve` after an edit, or \
         `cargo install mdbook --locked` for `mdbook serve`)",
        book.display()
    );
    browser::serve_forever(&book, SERVE_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_include_directives() {
        let page = "a {{#include ../x.rs:spawn}} b\n{{#include ../../ARCHITECTURE.md}}";
        assert_eq!(includes(page), ["../x.rs:spawn", "../../ARCHITECTURE.md"]);
    }
}
