//! What only the openssh backend does: refuse what OpenSSH cannot do here.

use flowctl_ssh::{Auth, Backend, Session, SshError};

use crate::fixture::{Fixture, Kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth_is_refused_with_a_config_error() {
    let fx = Fixture::start(Kind::Sshd)
        .await
        .with_backend(Backend::OpenSsh);
    let mut cfg = fx.config();
    cfg.auth = vec![Auth::Password("s3cret".into())];
    let err = Session::connect(cfg).await.unwrap_err();
    match err.transport_error::<SshError>() {
        Some(SshError::Config(msg)) => assert!(
            msg.contains("password authentication is not supported by the openssh backend"),
            "{msg}"
        ),
        other => panic!("expected a Config error, got {other:?}"),
    }
    // Nothing was started.
    assert_eq!(fx.ledger.total(), 0);
}

/// Issue 15 item 8: a cipher name with a newline must not add directives to
/// the generated ssh_config (`ProxyCommand` runs a local command).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_config_injection_through_a_cipher_name_is_a_config_error() {
    let fx = Fixture::start(Kind::Sshd)
        .await
        .with_backend(Backend::OpenSsh);
    let witness = fx.path("injected");
    let cfg = fx.config().ciphers([format!(
        "aes128-ctr\nProxyCommand touch {}",
        witness.display()
    )]);
    let err = Session::connect(cfg).await.unwrap_err();
    assert!(!witness.exists(), "the injected ProxyCommand ran");
    match err.transport_error::<SshError>() {
        Some(SshError::Config(msg)) => assert!(msg.contains("invalid cipher name"), "{msg}"),
        other => panic!("expected a Config error, got {other:?}"),
    }
    assert_eq!(fx.ledger.total(), 0);
}

/// A host that looks like an option never reaches ssh's command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_looks_like_an_option_is_a_config_error() {
    let fx = Fixture::start(Kind::Sshd)
        .await
        .with_backend(Backend::OpenSsh);
    let witness = fx.path("injected");
    let mut cfg = fx.config();
    cfg.addr = format!("-oProxyCommand=touch {}", witness.display());
    let err = Session::connect(cfg).await.unwrap_err();
    assert!(!witness.exists(), "the injected ProxyCommand ran");
    assert!(
        matches!(err.transport_error::<SshError>(), Some(SshError::Config(m)) if m.contains("invalid host")),
        "{err:?}"
    );
}

/// A known_hosts path with a space reaches ssh as one quoted file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_hosts_path_with_a_space_is_one_file() {
    let fx = Fixture::start(Kind::Sshd)
        .await
        .with_backend(Backend::OpenSsh);
    let kh = fx.path("known hosts");
    std::fs::copy(&fx.known_hosts, &kh).unwrap();
    let s = Session::connect(fx.config().known_hosts(&kh))
        .await
        .unwrap();
    let mut p = s.exec("echo spaced").await.unwrap();
    assert_eq!(p.stdout.read_to_end().await.unwrap(), b"spaced\n");
}
