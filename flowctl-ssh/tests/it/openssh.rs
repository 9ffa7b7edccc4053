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
    match &err {
        SshError::Config(msg) => assert!(
            msg.contains("password authentication is not supported by the openssh backend"),
            "{msg}"
        ),
        other => panic!("expected a Config error, got {other:?}"),
    }
    // Nothing was started.
    assert_eq!(fx.ledger.total(), 0);
}
