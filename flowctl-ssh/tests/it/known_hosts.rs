//! known_hosts by OpenSSH's rules, through a real connection to the
//! embedded server (the rules one by one: the unit tests of the parser).

use flowctl_ssh::Session;

use crate::fixture::{Fixture, Kind, ssh_keygen};

/// `[127.0.0.1]:PORT` and the server's key as `TYPE BASE64`.
fn entry(fx: &Fixture) -> (String, String) {
    let line = std::fs::read_to_string(&fx.known_hosts).unwrap();
    let (host, key) = line.trim().split_once(' ').unwrap();
    (host.to_owned(), key.to_owned())
}

async fn connects(fx: &Fixture, known_hosts: &str) -> Result<(), String> {
    let kh = fx.path("kh_under_test");
    std::fs::write(&kh, known_hosts).unwrap();
    let cfg = fx.config().known_hosts(&kh);
    match Session::connect(cfg).await {
        Ok(s) => {
            let mut p = s.exec("true").await.map_err(|e| e.to_string())?;
            assert!(p.wait().await.unwrap().success());
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_hosts_revoked_key_is_refused_even_if_listed_on_a_plain_line() {
    let fx = Fixture::start(Kind::Embedded).await;
    let (host, key) = entry(&fx);
    let err = connects(&fx, &format!("{host} {key}\n@revoked * {key}\n"))
        .await
        .unwrap_err();
    assert!(err.contains("revoked") && err.contains("line 2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_hosts_fields_separated_by_tabs_and_runs_of_spaces() {
    let fx = Fixture::start(Kind::Embedded).await;
    let (host, key) = entry(&fx);
    let (t, b) = key.split_once(' ').unwrap();
    connects(&fx, &format!("  {host}\t\t{t}    {b}  comment\n"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_hosts_two_keys_of_one_type_for_the_host_is_no_mismatch() {
    let fx = Fixture::start(Kind::Embedded).await;
    let (host, key) = entry(&fx);
    let other = fx.path("other_host_key");
    ssh_keygen(&other);
    let other = std::fs::read_to_string(fx.path("other_host_key.pub")).unwrap();
    let other = other
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    connects(&fx, &format!("{host} {other}\n{host} {key}\n"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_hosts_global_file_is_read_after_the_user_file() {
    let fx = Fixture::start(Kind::Embedded).await;
    let empty = fx.path("empty_user_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let global = fx.path("ssh_known_hosts");
    std::fs::copy(&fx.known_hosts, &global).unwrap();
    let cfg = fx.config().known_hosts(&empty);
    assert_eq!(
        cfg.global_known_hosts.as_deref(),
        Some(std::path::Path::new("/etc/ssh/ssh_known_hosts"))
    );
    let s = Session::connect(cfg.global_known_hosts(Some(global)))
        .await
        .unwrap();
    drop(s);
    let err = Session::connect(fx.config().known_hosts(&empty).global_known_hosts(None))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.transport_error::<flowctl_ssh::SshError>(),
            Some(flowctl_ssh::SshError::UnknownHostKey { .. })
        ),
        "{err:?}"
    );
}
