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
    until(Duration::from_secs(20), "ssh-agent socket", || {
        sock.exists()
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
