//! Every failure a user will meet, each one provoked for real.

use std::time::Duration;

use flowctl_core::FlowError;
use flowctl_core::prelude::*;
use flowctl_ssh::{Auth, ExitStatus, HostKeyPolicy, Session, SshError};

use crate::fixture::{Fixture, Kind, both_servers, free_port, ssh_keygen};

both_servers! {
    auth_rejected_with_unknown_key => auth_rejected_with_unknown_key;
    unknown_host_key_names_fingerprint => unknown_host_key_names_fingerprint;
    changed_host_key_is_refused => changed_host_key_is_refused;
    command_not_found_exits_127 => command_not_found_exits_127;
    killed_by_signal_reports_signal => killed_by_signal_reports_signal;
}

#[tokio::test]
async fn connection_refused() {
    let port = free_port(); // bound then released: nobody listens
    let cfg = flowctl_ssh::SshConfig::new("nobody", format!("127.0.0.1:{port}"))
        .connect_timeout(Duration::from_secs(20));
    let err = Session::connect(cfg).await.unwrap_err();
    match err.transport_error::<SshError>() {
        Some(SshError::Connect { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused)
        }
        other => panic!("expected Connect, got {other:?}"),
    }
    assert!(err.to_string().contains(&port.to_string()));
}

async fn auth_rejected_with_unknown_key(fx: Fixture) {
    let other = fx.path("other");
    ssh_keygen(&other);
    let mut cfg = fx.config();
    cfg.auth = vec![Auth::key_file(&other)];
    let err = Session::connect(cfg).await.unwrap_err();
    assert!(
        matches!(err.transport_error::<SshError>(), Some(SshError::AuthRejected { tried, .. }) if tried.contains("publickey")),
        "{err:?}"
    );
}

fn server_fingerprint(fx: &Fixture) -> String {
    let line = std::fs::read_to_string(&fx.known_hosts).unwrap();
    let b64 = line.split_whitespace().nth(2).unwrap();
    let key = flowctl_ssh::russh::keys::parse_public_key_base64(b64).unwrap();
    key.fingerprint(Default::default()).to_string()
}

async fn unknown_host_key_names_fingerprint(fx: Fixture) {
    let empty = fx.path("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let cfg = fx.config().known_hosts(&empty);
    let err = Session::connect(cfg).await.unwrap_err();
    let fp = server_fingerprint(&fx);
    match err.transport_error::<SshError>() {
        Some(SshError::UnknownHostKey { fingerprint, .. }) => assert_eq!(fingerprint, &fp),
        other => panic!("expected UnknownHostKey, got {other:?}"),
    }
    assert!(err.to_string().contains(&fp), "{err}");
    // The loudly named escape hatch connects to the same server.
    let cfg = fx
        .config()
        .host_key_policy(HostKeyPolicy::InsecureAcceptAny);
    let s = Session::connect(cfg).await.unwrap();
    let mut p = s.exec("true").await.unwrap();
    assert!(p.wait().await.unwrap().success());
}

async fn changed_host_key_is_refused(fx: Fixture) {
    let impostor = fx.path("impostor");
    ssh_keygen(&impostor);
    let impostor_pub = std::fs::read_to_string(fx.path("impostor.pub")).unwrap();
    let port = fx.addr.rsplit(':').next().unwrap();
    let kh = fx.path("changed_known_hosts");
    std::fs::write(&kh, format!("[127.0.0.1]:{port} {}", impostor_pub.trim())).unwrap();
    let err = Session::connect(fx.config().known_hosts(&kh))
        .await
        .unwrap_err();
    let fp = server_fingerprint(&fx);
    match err.transport_error::<SshError>() {
        Some(SshError::HostKeyMismatch {
            fingerprint, line, ..
        }) => {
            assert_eq!(fingerprint, &fp);
            assert_eq!(*line, 1);
        }
        other => panic!("expected HostKeyMismatch, got {other:?}"),
    }
}

async fn command_not_found_exits_127(fx: Fixture) {
    let s = Session::connect(fx.config()).await.unwrap();
    let mut p = s.exec("flowctl-no-such-command-xyz").await.unwrap();
    let err = p.stderr.read_to_end().await.unwrap();
    drop(p.stdout);
    // SSH has no "not found" reply: the remote shell exits 127.
    assert_eq!(p.exit.wait().await.unwrap(), ExitStatus::Code(127));
    assert!(
        String::from_utf8_lossy(&err).contains("not found"),
        "{}",
        String::from_utf8_lossy(&err)
    );
}

async fn killed_by_signal_reports_signal(fx: Fixture) {
    let s = Session::connect(fx.config()).await.unwrap();
    let mut p = s.exec("kill -9 $$").await.unwrap();
    let status = p.wait().await.unwrap();
    if fx.backend == flowctl_ssh::Backend::OpenSsh {
        // OpenSSH's mux protocol carries no exit signal: the mux client
        // exits 255, as documented for Backend::OpenSsh.
        assert_eq!(status, ExitStatus::Code(255));
        return;
    }
    assert_eq!(status.signal(), Some("KILL"), "{status:?}");
    assert_eq!(status.code(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_dropped_mid_stream_counts_delivered_bytes() {
    dropped_mid_stream(Fixture::start(Kind::Embedded).await).await
}

/// The same against OpenSSH's sshd: the connection's sshd processes are
/// SIGKILLed (what the soak's `--sshd` does to inject a drop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_connection_dropped_mid_stream_counts_delivered_bytes() {
    dropped_mid_stream(Fixture::start(Kind::Sshd).await).await
}

/// The same with the openssh backend (the system ssh client as master)
/// against the embedded server, which can cut connections on demand.
#[cfg(feature = "openssh")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_connection_dropped_mid_stream_counts_delivered_bytes() {
    let fx = Fixture::start(Kind::Embedded)
        .await
        .with_backend(flowctl_ssh::Backend::OpenSsh);
    dropped_mid_stream(fx).await
}

async fn dropped_mid_stream(fx: Fixture) {
    let s = Session::connect(fx.config()).await.unwrap();
    let mut p = s.exec("head -c 1073741824 /dev/zero").await.unwrap();
    let mut got = 0u64;
    while got < 1024 * 1024 {
        got += p.stdout.recv().await.unwrap().unwrap().len() as u64;
    }
    fx.drop_connections();
    let err = loop {
        match p.stdout.recv().await {
            Ok(Some(chunk)) => got += chunk.len() as u64,
            Ok(None) => panic!("stream ended cleanly after a dropped connection"),
            Err(e) => break e,
        }
    };
    match err.transport_error::<SshError>() {
        Some(SshError::ConnectionLost { stream, delivered }) => {
            assert_eq!(*stream, "stdout");
            assert_eq!(*delivered, got);
        }
        _ => panic!("expected ConnectionLost, got {err:?}"),
    }
    assert!(err.to_string().contains(&format!("{got} bytes")), "{err}");
    let err = p.exit.wait().await.unwrap_err();
    assert!(
        matches!(
            err.transport_error::<SshError>(),
            Some(SshError::ConnectionLost { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn connect_timeout_when_server_never_answers() {
    // The kernel accepts the TCP connection into the backlog; nobody speaks SSH.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = flowctl_ssh::SshConfig::new("nobody", addr.to_string())
        .connect_timeout(Duration::from_millis(300));
    let err = Session::connect(cfg).await.unwrap_err();
    // Like every SshError, the timeout is inside FlowError::Transport, with
    // the address dialled; it counts as transient for retries.
    assert!(
        matches!(err.transport_error::<SshError>(), Some(SshError::ConnectTimeout { addr: a, timeout }) if *timeout == Duration::from_millis(300) && *a == addr.to_string()),
        "{err:?}"
    );
    assert!(matches!(err, FlowError::Transport(_)), "{err:?}");
    assert!(err.is_transient());
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_hosts_with_an_rsa_entry_for_the_host_still_matches() {
    // The default build has no `rsa` feature; a known_hosts that also records
    // an RSA key for the same host must not break the check.
    let fx = Fixture::start(Kind::Embedded).await;
    let rsa = fx.path("rsa");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
        .arg(&rsa)
        .status()
        .unwrap();
    assert!(st.success());
    let rsa_pub = std::fs::read_to_string(fx.path("rsa.pub")).unwrap();
    let port = fx.addr.rsplit(':').next().unwrap();
    let ours = std::fs::read_to_string(&fx.known_hosts).unwrap();
    let kh = fx.path("mixed_known_hosts");
    std::fs::write(
        &kh,
        format!("# comment\n[127.0.0.1]:{port} {}\n{ours}", rsa_pub.trim()),
    )
    .unwrap();
    let s = Session::connect(fx.config().known_hosts(&kh))
        .await
        .unwrap();
    let mut p = s.exec("true").await.unwrap();
    assert!(p.wait().await.unwrap().success());
}
