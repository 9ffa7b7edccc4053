//! A link checker for the built book: every relative `href="..."` and
//! `src="..."` in every HTML file must name a file that exists, and a
//! `#fragment` must name an `id` in the page it points to.
//!
//! External links (with a scheme, or starting with `//`) are not followed: the
//! check must pass offline. `404.html` is skipped: mdBook writes it with
//! root-relative links meant for a web server's error page.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::docs::collect_files;

/// What was checked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) files: usize,
    pub(crate) links: usize,
    pub(crate) fragments: usize,
}

/// Checks every HTML file under `book`; fails listing every broken link.
pub(crate) fn check(book: &Path) -> Result<Report, String> {
    let mut files = Vec::new();
    collect_files(book, "html", &mut files)?;
    files.retain(|f| f.file_name().is_none_or(|n| n != "404.html"));
    files.sort();
    let mut ids: HashMap<PathBuf, HashSet<String>> = HashMap::new();
    let mut report = Report {
        files: files.len(),
        ..Report::default()
    };
    let mut broken = Vec::new();
    for file in &files {
        let html = read(file)?;
        let dir = file.parent().unwrap_or(book);
        for link in attribute_values(&html, &["href", "src"]) {
            let link = link.replace("&amp;", "&");
            if is_external(&link) {
                continue;
            }
            report.links += 1;
            let (path, fragment) = match link.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (link.as_str(), None),
            };
            let path = path.split('?').next().unwrap_or_default();
            let target = if path.is_empty() {
                file.clone()
            } else {
                let t = normalize(&dir.join(path));
                if t.is_dir() { t.join("index.html") } else { t }
            };
            if !target.starts_with(book) || !target.is_file() {
                broken.push(format!("{}: `{link}`: no such file", rel(book, file)));
                continue;
            }
            let Some(fragment) = fragment.filter(|f| !f.is_empty()) else {
                continue;
            };
            if target.extension().is_none_or(|e| e != "html") {
                continue;
            }
            report.fragments += 1;
            if !ids.contains_key(&target) {
                let set = attribute_values(&read(&target)?, &["id", "name"])
                    .into_iter()
                    .collect();
                ids.insert(target.clone(), set);
            }
            if !ids[&target].contains(fragment) {
                broken.push(format!(
                    "{}: `{link}`: {} has no id `{fragment}`",
                    rel(book, file),
                    rel(book, &target)
                ));
            }
        }
    }
    if broken.is_empty() {
        Ok(report)
    } else {
        Err(format!(
            "{} broken internal link(s):\n  {}",
            broken.len(),
            broken.join("\n  ")
        ))
    }
}

fn read(file: &Path) -> Result<String, String> {
    fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))
}

fn rel(book: &Path, file: &Path) -> String {
    file.strip_prefix(book)
        .unwrap_or(file)
        .display()
        .to_string()
}

/// True for links this checker does not follow.
fn is_external(link: &str) -> bool {
    if link.is_empty() || link.starts_with("//") {
        return true;
    }
    // A scheme (`https:`, `mailto:`, `data:`, `javascript:`) comes before any `/`, `?` or `#`.
    match link.find([':', '/', '?', '#']) {
        Some(i) => link[i..].starts_with(':'),
        None => false,
    }
}

/// The values of `name="..."` attributes (double quotes, as mdBook writes them).
fn attribute_values(html: &str, names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for name in names {
        let needle = format!(" {name}=\"");
        let mut rest = html;
        while let Some(i) = rest.find(&needle) {
            rest = &rest[i + needle.len()..];
            let Some(end) = rest.find('"') else { break };
            out.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    out
}

/// Resolves `.` and `..` without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_external_from_internal() {
        assert!(is_external("https://docs.rs/tokio"));
        assert!(is_external("mailto:a@b"));
        assert!(is_external("//cdn.example/x.js"));
        assert!(!is_external("recipes/child-stdout.html#spawn"));
        assert!(!is_external("../index.html"));
        assert!(!is_external("#top"));
    }

    #[test]
    fn finds_attributes_and_normalizes() {
        let html = r#"<a class="x" href="a.html#b">x</a><img src="i.svg"><h2 id="b">"#;
        assert_eq!(
            attribute_values(html, &["href", "src"]),
            ["a.html#b", "i.svg"]
        );
        assert_eq!(attribute_values(html, &["id"]), ["b"]);
        assert_eq!(
            normalize(Path::new("/b/x/../y/./z")),
            PathBuf::from("/b/y/z")
        );
    }

    #[test]
    fn reports_broken_links_and_fragments() {
        let dir = std::env::temp_dir().join(format!("xtask-linkcheck-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("index.html"), r#"<a href="sub/p.html#here">"#).unwrap();
        fs::write(
            dir.join("sub/p.html"),
            r##"<h1 id="here"></h1><a href="../index.html"><a href="#gone"><a href="nope.html">"##,
        )
        .unwrap();
        let err = check(&dir).unwrap_err();
        fs::remove_dir_all(&dir).unwrap();
        assert!(err.starts_with("2 broken"), "{err}");
        assert!(err.contains("no id `gone`"), "{err}");
        assert!(err.contains("`nope.html`: no such file"), "{err}");
    }
}
