//! What only the openssh backend does: refuse what OpenSSH cannot do here.

use flowctl_ssh::{Auth, Backend, Session, SshError};

use std::time::Duration;

use crate::fixture::{Fixture, Kind, Let, Relay, until};

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

/// The pids and parent pids of the live `ssh` processes whose command line
/// has `-p port` (a zombie has an empty command line and is left out).
fn ssh_processes(port: u16) -> Vec<(u32, u32)> {
    let port = port.to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_ssh = args.first().is_some_and(|a| a.ends_with(b"ssh"));
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"-p" && w[1] == port.as_bytes());
        if !is_ssh || !ours {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        found.push((pid, ppid));
    }
    found
}

/// A fixture whose openssh clients connect through a [`Relay`] that holds
/// every byte of the server's.
async fn through_relay() -> (Fixture, Relay, flowctl_ssh::SshConfig) {
    let fx = Fixture::start(Kind::Sshd)
        .await
        .with_backend(Backend::OpenSsh);
    let relay = Relay::start(&fx.addr, Let::Nothing).await;
    let cfg = relay.config(&fx);
    (fx, relay, cfg)
}

/// A connect dropped while ssh waits for the server stops that ssh at once,
/// with the server still mute. openssh waits for `ssh -M -f` with a wait
/// that does not kill it on drop: the ssh went on alone, uncounted, until
/// its own ConnectTimeout or the server gave up. Here that is 120 s, past
/// every limit below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_dropped_while_ssh_waits_for_the_server_stops_that_ssh() {
    let (fx, relay, cfg) = through_relay().await;
    let cfg = cfg.connect_timeout(Duration::from_secs(120));
    let mut accepted = relay.accepted.clone();
    {
        let connect = std::pin::pin!(Session::connect(cfg));
        tokio::select! {
            r = connect => panic!("the connect ended with the server mute: {:?}", r.map(|_| ())),
            r = accepted.wait_for(|n| *n == 1) => { r.unwrap(); }
        }
        assert!(
            fx.ledger.total() > 0,
            "the ledger reads zero while the connect's ssh runs"
        );
        // Dropped here: ssh has connected and waits for the server's banner.
    }
    relay.nothing_left(&fx).await;
    until(Duration::from_secs(30), "the connect's ssh to exit", || {
        ssh_processes(relay.port).is_empty()
    })
    .await;
}

/// A connect dropped after ssh forked its ControlMaster, before the connect
/// saw it, closes that master. Before, dropping the connect removed the
/// master's control directory, so nothing could reach the master, and it
/// held its connection until `ControlPersist` (300 s) ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_dropped_after_ssh_forked_its_master_closes_the_master() {
    let (fx, relay, cfg) = through_relay().await;
    let mut accepted = relay.accepted.clone();
    let me = std::process::id();
    {
        let mut connect = std::pin::pin!(Session::connect(cfg));
        tokio::select! {
            r = &mut connect => panic!("the connect ended with the server mute: {:?}", r.map(|_| ())),
            r = accepted.wait_for(|n| *n == 1) => { r.unwrap(); }
        }
        // The connect is not polled again. The server answers; ssh
        // authenticates, forks the master and its first process exits.
        relay.let_through(Let::All);
        until(
            Duration::from_secs(30),
            "ssh to fork its ControlMaster and its first process to exit",
            || {
                let procs = ssh_processes(relay.port);
                procs.iter().any(|&(_, ppid)| ppid != me)
                    && procs.iter().all(|&(_, ppid)| ppid != me)
            },
        )
        .await;
        // Dropped here, the master up and not yet seen by the connect.
    }
    relay.nothing_left(&fx).await;
    until(Duration::from_secs(30), "the master to exit", || {
        ssh_processes(relay.port).is_empty()
    })
    .await;
}

/// `connect_timeout` holds when the server stalls after its banner (ssh's
/// own `ConnectTimeout` stops at the banner; the connect waited for as long
/// as the server did), and the ssh it started is stopped with it (sshd
/// would have held it for its `LoginGraceTime`, 120 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_holds_when_the_server_stalls_after_its_banner() {
    let fx = Fixture::start(Kind::Sshd)
        .await
        .with_backend(Backend::OpenSsh);
    let relay = Relay::start(&fx.addr, Let::FirstLine).await;
    // Long enough that ssh has started and reached the held key exchange
    // (the relay counts one connection) before it runs out, on a loaded
    // machine too; well short of the outer minute and of sshd's grace time.
    let cfg = relay.config(&fx).connect_timeout(Duration::from_secs(5));
    let err = tokio::time::timeout(Duration::from_secs(60), Session::connect(cfg))
        .await
        .expect("the connect outlived its connect_timeout by a minute")
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(
            err.transport_error::<SshError>(),
            Some(SshError::ConnectTimeout { .. })
        ),
        "{err:?}"
    );
    // The server never answers: the ssh is stopped, not left to wait for it.
    relay.nothing_left(&fx).await;
    until(Duration::from_secs(30), "the connect's ssh to exit", || {
        ssh_processes(relay.port).is_empty()
    })
    .await;
}
