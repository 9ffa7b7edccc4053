//! known_hosts files, read by OpenSSH's rules (sshd(8), "SSH_KNOWN_HOSTS
//! FILE FORMAT"): the parser is pure (a line in, an entry or an error
//! out), the checker reads the files and decides.
//!
//! Rules implemented, each with a test below:
//! - a line is `[marker] hostpatterns keytype base64-key [comment]`, fields
//!   separated by any run of spaces or tabs; empty lines and lines whose
//!   first non-blank byte is `#` are ignored;
//! - `hostpatterns` is a comma-separated list; `*` and `?` are wildcards,
//!   `!pattern` negates (a host matching a negated pattern is never matched
//!   by the line), names compare case-insensitively; a host on a port other
//!   than 22 is looked up as `[host]:port`;
//! - a hashed entry `|1|base64-salt|base64-hash` matches when
//!   HMAC-SHA1(salt, host) equals the hash;
//! - `@revoked`: the key on the line must never be accepted for the
//!   matching hosts, even if another line lists it;
//! - `@cert-authority`: the key is a certificate authority, not a host key:
//!   it never vouches for a plain host key (host certificates are not
//!   supported here);
//! - a host may have several keys, of the same type or not: the offered key
//!   is accepted when any line lists it; it is "changed" only when no line
//!   lists it and some line lists another key of its type;
//! - a malformed line is skipped (as ssh does) and never stops the check.

use std::path::{Path, PathBuf};

use russh::keys::PublicKey;

/// Why a known_hosts line could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LineError {
    /// A marker other than `@revoked` and `@cert-authority`.
    #[error("unknown marker {0:?} (known: @revoked, @cert-authority)")]
    UnknownMarker(String),
    /// Fewer than the host patterns, the key type and the key.
    #[error("missing {0} (a line is: [marker] hostpatterns keytype base64-key [comment])")]
    Missing(&'static str),
    /// The key does not decode.
    #[error("key of type {key_type:?} does not decode: {why}")]
    BadKey {
        /// The key type field.
        key_type: String,
        /// The decoder's reason.
        why: String,
    },
    /// The key decodes to another type than the line names.
    #[error("key type field {field:?} does not match the key's type {actual:?}")]
    TypeMismatch {
        /// The key type field.
        field: String,
        /// The decoded key's type.
        actual: String,
    },
    /// A line longer than the limit.
    #[error("line of {len} bytes exceeds the {limit} byte limit")]
    TooLong {
        /// The line's length.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

/// The longest line read (OpenSSH reads lines of any length; keys are at
/// most a few KiB, so this only stops garbage).
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// What a line says about its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Marker {
    /// A host key.
    Plain,
    /// `@revoked`: never accept this key.
    Revoked,
    /// `@cert-authority`: a CA that signs host certificates.
    CertAuthority,
}

/// One meaningful line.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) marker: Marker,
    pub(crate) hosts: String,
    pub(crate) key: PublicKey,
}

/// Parses one line (without its newline). `Ok(None)` for a blank line or a
/// comment.
pub(crate) fn parse_line(line: &str) -> Result<Option<Entry>, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong {
            len: line.len(),
            limit: MAX_LINE,
        });
    }
    let line = line.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\r');
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split([' ', '\t']).filter(|f| !f.is_empty());
    let mut first = fields.next().ok_or(LineError::Missing("host patterns"))?;
    let marker = if let Some(m) = first.strip_prefix('@') {
        let marker = match m {
            "revoked" => Marker::Revoked,
            "cert-authority" => Marker::CertAuthority,
            _ => return Err(LineError::UnknownMarker(first.to_owned())),
        };
        first = fields.next().ok_or(LineError::Missing("host patterns"))?;
        marker
    } else {
        Marker::Plain
    };
    let key_type = fields.next().ok_or(LineError::Missing("key type"))?;
    let b64 = fields.next().ok_or(LineError::Missing("key"))?;
    let key = russh::keys::parse_public_key_base64(b64).map_err(|e| LineError::BadKey {
        key_type: key_type.to_owned(),
        why: e.to_string(),
    })?;
    let actual = key.algorithm().to_string();
    if actual != key_type {
        return Err(LineError::TypeMismatch {
            field: key_type.to_owned(),
            actual,
        });
    }
    Ok(Some(Entry {
        marker,
        hosts: first.to_owned(),
        key,
    }))
}

/// `host`, or `[host]:port` when the port is not 22, as known_hosts names it.
pub(crate) fn host_entry(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Whether `patterns` (one line's host field) names `host` (already in its
/// `[host]:port` form): a hashed entry, or a positive pattern with no
/// negated one matching.
pub(crate) fn hosts_match(patterns: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let mut positive = false;
    for p in patterns.split(',') {
        if p.starts_with("|1|") {
            positive |= hashed_match(p, &host);
        } else if let Some(neg) = p.strip_prefix('!') {
            if glob(&neg.to_ascii_lowercase(), &host) {
                return false;
            }
        } else if glob(&p.to_ascii_lowercase(), &host) {
            positive = true;
        }
    }
    positive
}

/// `|1|salt|hash`: HMAC-SHA1 keyed by the salt, over the host name.
fn hashed_match(entry: &str, host: &str) -> bool {
    use hmac::{KeyInit, Mac};
    let mut parts = entry.split('|').skip(2);
    let (Some(salt), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let decode = |s: &str| data_encoding::BASE64.decode(s.as_bytes()).ok();
    let (Some(salt), Some(hash)) = (decode(salt), decode(hash)) else {
        return false;
    };
    let Ok(mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.chain_update(host.as_bytes())
        .verify_slice(&hash)
        .is_ok()
}

/// `*` (any run) and `?` (any one character) wildcards, iteratively (no
/// recursion: a hostile pattern cannot blow the stack).
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Where a key was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) file: PathBuf,
    pub(crate) line: usize,
}

/// The decision for an offered key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A plain line lists the key for the host.
    Known,
    /// A `@revoked` line lists the key.
    Revoked(Place),
    /// No line lists the key; this line lists another key of its type.
    Changed(Place),
    /// No line lists the key or another of its type.
    Unknown,
}

/// Checks `key` for `host` (in `[host]:port` form when needed) against the
/// lines of `files` in order (a missing file is empty).
pub(crate) fn check(
    host: &str,
    key: &PublicKey,
    files: &[PathBuf],
) -> Result<Verdict, std::io::Error> {
    let mut lines = Vec::new();
    for file in files {
        let text = match std::fs::read(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        lines.push((file.as_path(), text));
    }
    let mut changed = None;
    let mut known = false;
    for (file, text) in &lines {
        for (n, raw) in text.split(|&b| b == b'\n').enumerate() {
            let place = || Place {
                file: file.to_path_buf(),
                line: n + 1,
            };
            let Ok(line) = std::str::from_utf8(raw) else {
                tracing::debug!(file = %file.display(), line = n + 1, "known_hosts: line is not UTF-8, skipped");
                continue;
            };
            let entry = match parse_line(line) {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(file = %file.display(), line = n + 1, error = %e, "known_hosts: line skipped");
                    continue;
                }
            };
            if !hosts_match(&entry.hosts, host) {
                continue;
            }
            let same = entry.key.key_data() == key.key_data();
            match entry.marker {
                Marker::Revoked if same => return Ok(Verdict::Revoked(place())),
                Marker::Revoked | Marker::CertAuthority => {}
                Marker::Plain if same => known = true,
                Marker::Plain => {
                    if changed.is_none()
                        && entry.key.key_data().algorithm() == key.key_data().algorithm()
                    {
                        changed = Some(place());
                    }
                }
            }
        }
    }
    Ok(if known {
        Verdict::Known
    } else if let Some(p) = changed {
        Verdict::Changed(p)
    } else {
        Verdict::Unknown
    })
}

/// The user's file then the global one, as ssh reads them.
pub(crate) fn files(user: Option<&Path>, global: Option<&Path>) -> Vec<PathBuf> {
    user.into_iter()
        .chain(global)
        .map(Path::to_path_buf)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::{Algorithm, PrivateKey};

    fn key() -> PublicKey {
        // `rand` comes with the `server` feature, which the tests enable.
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
            .expect("key")
            .public_key()
            .clone()
    }

    fn line(hosts: &str, k: &PublicKey) -> String {
        format!("{hosts} {}", k.to_openssh().expect("openssh"))
    }

    fn verdict(text: &str, host: &str, k: &PublicKey) -> Verdict {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("known_hosts");
        std::fs::write(&f, text).expect("write");
        check(host, k, &[f]).expect("check")
    }

    #[test]
    fn fields_are_split_on_any_run_of_blanks_and_comments_are_skipped() {
        let k = key();
        let enc = k.to_openssh().expect("openssh");
        let (t, b) = enc.split_once(' ').expect("type and key");
        let text = format!(
            "# comment\n\n   # indented comment\nexample.org \t  {t}\t\t{b}   trailing comment\n"
        );
        assert_eq!(verdict(&text, "example.org", &k), Verdict::Known);
    }

    #[test]
    fn revoked_key_is_refused_even_if_listed_on_a_plain_line() {
        let k = key();
        let text = format!("{}\n@revoked {}\n", line("example.org", &k), line("*", &k));
        match verdict(&text, "example.org", &k) {
            Verdict::Revoked(p) => assert_eq!(p.line, 2),
            other => panic!("expected Revoked, got {other:?}"),
        }
    }

    #[test]
    fn cert_authority_key_does_not_vouch_for_a_plain_host_key() {
        let k = key();
        let text = format!("@cert-authority {}\n", line("example.org", &k));
        assert_eq!(verdict(&text, "example.org", &k), Verdict::Unknown);
    }

    #[test]
    fn two_keys_of_one_type_for_a_host_accept_either() {
        let (a, b) = (key(), key());
        let text = format!("{}\n{}\n", line("example.org", &a), line("example.org", &b));
        assert_eq!(verdict(&text, "example.org", &a), Verdict::Known);
        assert_eq!(verdict(&text, "example.org", &b), Verdict::Known);
        match verdict(&text, "example.org", &key()) {
            Verdict::Changed(p) => assert_eq!(p.line, 1),
            other => panic!("expected Changed, got {other:?}"),
        }
    }

    #[test]
    fn non_default_port_is_bracketed_and_port_22_is_not() {
        let k = key();
        let text = line("[example.org]:2222", &k);
        assert_eq!(
            verdict(&text, &host_entry("example.org", 2222), &k),
            Verdict::Known
        );
        assert_eq!(
            verdict(&text, &host_entry("example.org", 22), &k),
            Verdict::Unknown
        );
    }

    #[test]
    fn hashed_host_matches_by_hmac_sha1() {
        use hmac::{KeyInit, Mac};
        let k = key();
        let salt = [7u8; 20];
        let mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt)
            .expect("hmac")
            .chain_update(b"[example.org]:2222")
            .finalize()
            .into_bytes();
        let hashed = format!(
            "|1|{}|{}",
            data_encoding::BASE64.encode(&salt),
            data_encoding::BASE64.encode(&mac)
        );
        let text = line(&hashed, &k);
        assert_eq!(verdict(&text, "[example.org]:2222", &k), Verdict::Known);
        assert_eq!(verdict(&text, "[other.org]:2222", &k), Verdict::Unknown);
    }

    #[test]
    fn negation_excludes_a_host_matched_by_a_wildcard() {
        let k = key();
        let text = line("*.example.org,!bad.example.org", &k);
        assert_eq!(verdict(&text, "good.example.org", &k), Verdict::Known);
        assert_eq!(verdict(&text, "bad.example.org", &k), Verdict::Unknown);
    }

    #[test]
    fn wildcards_and_case() {
        assert!(hosts_match("*.Example.ORG", "a.example.org"));
        assert!(hosts_match("host?", "HOST1"));
        assert!(!hosts_match("host?", "host12"));
        assert!(hosts_match("a,b,c", "b"));
        assert!(!hosts_match("!a", "a"));
        assert!(!hosts_match("!b", "a"), "a negation alone matches nothing");
        assert!(glob("*a*b*c*", "xxaxxbxxcxx"));
        assert!(!glob("*a*b*c*d", "xxaxxbxxcxx"));
    }

    #[test]
    fn malformed_lines_are_skipped_not_fatal() {
        let k = key();
        let text = format!(
            "@bogus x ssh-ed25519 AAAA\nexample.org ssh-ed25519 !!notbase64!!\nexample.org\n{}\n",
            line("example.org", &k)
        );
        assert_eq!(verdict(&text, "example.org", &k), Verdict::Known);
        assert!(matches!(
            parse_line("@bogus x y z"),
            Err(LineError::UnknownMarker(_))
        ));
        assert!(matches!(
            parse_line("host"),
            Err(LineError::Missing("key type"))
        ));
        assert!(matches!(
            parse_line("@revoked"),
            Err(LineError::Missing("host patterns"))
        ));
    }

    #[test]
    fn global_file_is_read_after_the_user_file() {
        let k = key();
        let dir = tempfile::tempdir().expect("tempdir");
        let user = dir.path().join("user");
        let global = dir.path().join("global");
        std::fs::write(&global, line("example.org", &k)).expect("write");
        let f = files(Some(&user), Some(&global));
        assert_eq!(check("example.org", &k, &f).expect("check"), Verdict::Known);
        let f = files(Some(&user), None);
        assert_eq!(
            check("example.org", &k, &f).expect("check"),
            Verdict::Unknown
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            /// Arbitrary bytes: no panic, and every error names its problem.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let text = String::from_utf8_lossy(&bytes);
                for l in text.split('\n') {
                    if let Err(e) = parse_line(l) {
                        let msg = e.to_string();
                        prop_assert!(!msg.is_empty());
                        prop_assert!(msg.chars().next().is_some_and(|c| c.is_lowercase()), "{}", msg);
                    }
                    let _ = hosts_match(l, "example.org");
                }
            }

            /// Lines shaped like known_hosts lines (marker, patterns with
            /// wildcards, negation and hashes, a type, a key of any text).
            #[test]
            fn arbitrary_shaped_lines_never_panic(
                marker in prop_oneof![
                    Just(String::new()),
                    Just("@revoked ".to_owned()),
                    Just("@cert-authority ".to_owned()),
                    "@[a-z-]{0,12} ",
                ],
                hosts in "[a-z0-9.*?!,|\\[\\]:=+/]{0,40}",
                key_type in "[a-z0-9@.-]{0,24}",
                key in "[A-Za-z0-9+/=]{0,120}",
                sep in "[ \t]{1,3}",
            ) {
                let l = format!("{marker}{hosts}{sep}{key_type}{sep}{key}");
                let _ = parse_line(&l);
                let _ = hosts_match(&hosts, "[example.org]:2222");
            }
        }
    }
}
