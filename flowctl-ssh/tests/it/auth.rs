//! Authentication through a real ssh-agent (OpenSSH's `ssh-agent`).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flowctl_ssh::{Auth, Session};

use crate::fixture::{Fixture, both_servers, until};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

both_servers! {
    agent_identity_authenticates => agent_identity_authenticates;
}

async fn agent_identity_authenticates(fx: Fixture) {
    let sock = fx.path("agent.sock");
    let agent = Agent(
        Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .spawn()
            .expect("ssh-agent: run `cargo xtask setup` (installs openssh-client)"),
    );
    // ssh-agent binds the socket (the file appears) before it listens: until
    // then a connection is refused, and `ssh-add` fails with "Error connecting
    // to agent: Connection refused" (seen once in CI). Ready means a connect
    // succeeds, not that the file exists.
    until(Duration::from_secs(20), "ssh-agent listening", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    })
    .await;
    let st = Command::new("ssh-add")
        .arg("-q")
        .arg(&fx.key)
        .env("SSH_AUTH_SOCK", &sock)
        .status()
        .unwrap();
    assert!(st.success());
    let mut cfg = fx.config();
    // The agent alone: no key file.
    cfg.auth = vec![Auth::AgentSocket(sock.clone())];
    let s = Session::connect(cfg).await.unwrap();
    let mut p = s.exec("echo via-agent").await.unwrap();
    assert_eq!(p.stdout.read_to_end().await.unwrap(), b"via-agent\n");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_authenticates_and_a_wrong_one_is_rejected() {
    use flowctl_ssh::SshError;
    use flowctl_ssh::server::{EmbeddedServer, ServerConfig};
    let fx = Fixture::start(crate::fixture::Kind::Embedded).await;
    let mut cfg = ServerConfig::new(Vec::new()).unwrap();
    cfg.password = Some((fx.user.clone(), "s3cret".into()));
    let server = EmbeddedServer::start(cfg).await.unwrap();
    let kh = fx.path("pw_known_hosts");
    std::fs::write(&kh, server.known_hosts_line()).unwrap();
    let base = flowctl_ssh::SshConfig::new(&fx.user, server.addr().to_string())
        .known_hosts(&kh)
        .ledger(fx.ledger.clone());
    let err = Session::connect(base.clone().auth(Auth::Password("wrong".into())))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.transport_error::<SshError>(),
            Some(SshError::AuthRejected { .. })
        ),
        "{err:?}"
    );
    let s = Session::connect(base.auth(Auth::Password("s3cret".into())))
        .await
        .unwrap();
    let mut p = s.exec("echo via-password").await.unwrap();
    assert_eq!(p.stdout.read_to_end().await.unwrap(), b"via-password\n");
}
