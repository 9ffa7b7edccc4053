//! Processes left behind (issue 15): every peer a test starts, and every
//! command it runs, is gone once its owner is dropped, counted in /proc.

use std::time::Duration;

use flowctl_ssh::Session;
use flowctl_ssh::testing::process_tree;

use crate::fixture::{Fixture, Kind, until};

/// Whether `pid` still runs (a zombie counts as gone: it runs nothing).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

fn children_of_this_test() -> Vec<u32> {
    process_tree(std::process::id())
        .into_iter()
        .filter(|&p| alive(p))
        .collect()
}

/// Dropping sshd while a connection runs a command that ignores its
/// input: the listener, the connection's sshd processes and the command
/// all end (before: only the listener was killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_sshd_ends_its_connections_and_their_commands() {
    let mut fx = Fixture::sshd_with("");
    let s = Session::connect(fx.config()).await.unwrap();
    let sshd = fx.sshd.as_ref().unwrap();
    let _p = s.exec("sleep 1000").await.unwrap();
    until(Duration::from_secs(30), "sleep to run under sshd", || {
        sshd.commands().iter().any(|c| c == "sleep")
    })
    .await;
    let mut tree = process_tree(sshd.pid());
    tree.push(sshd.pid());
    assert!(tree.len() >= 3, "listener, connection, command: {tree:?}");
    drop(fx.sshd.take());
    until(Duration::from_secs(30), "every sshd process to end", || {
        tree.iter().all(|&p| !alive(p))
    })
    .await;
    let left: Vec<u32> = tree.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "still running: {left:?}");
}

/// The embedded server kills a command's whole process group: `sh`, and
/// the background job and the child it started. Counted by pid: a child
/// whose parent dies is adopted elsewhere and leaves this test's tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_server_kills_the_whole_command_group() {
    let fx = Fixture::start(Kind::Embedded).await;
    let baseline = children_of_this_test();
    let s = Session::connect(fx.config()).await.unwrap();
    let p = s.exec("sleep 1000 & sleep 1001; wait").await.unwrap();
    until(Duration::from_secs(30), "sh and its two sleeps", || {
        children_of_this_test().len() >= baseline.len() + 3
    })
    .await;
    let started: Vec<u32> = children_of_this_test()
        .into_iter()
        .filter(|p| !baseline.contains(p))
        .collect();
    assert_eq!(started.len(), 3, "sh and two sleeps: {started:?}");
    drop(p);
    drop(s);
    until(Duration::from_secs(30), "sh and both sleeps to end", || {
        started.iter().all(|&p| !alive(p))
    })
    .await;
}

/// The openssh backend's ControlMaster outlives a process that dies
/// without closing it (here: a session forgotten, never dropped); with a
/// bounded ControlPersist it exits by itself once idle.
#[cfg(feature = "openssh")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_master_of_a_crashed_owner_exits_when_idle() {
    let fx = Fixture::start(Kind::Sshd)
        .await
        .with_backend(flowctl_ssh::Backend::OpenSsh);
    let port = fx.addr.rsplit(':').next().unwrap().to_owned();
    // The master forks away (`-f`): find it by its command line.
    let masters = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
                args.first().is_some_and(|a| a.ends_with(b"ssh"))
                    && args.contains(&&b"-M"[..])
                    && args
                        .windows(2)
                        .any(|w| w[0] == b"-p" && w[1] == port.as_bytes())
                    && alive(pid)
            })
            .collect()
    };
    assert!(masters().is_empty());
    let s = Session::connect(fx.config().control_persist(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(masters().len(), 1, "one ControlMaster");
    std::mem::forget(s); // as if this process had crashed: no `ssh -O exit`
    until(
        Duration::from_secs(30),
        "the idle ControlMaster to exit",
        || masters().is_empty(),
    )
    .await;
}

/// sshd dies with the thread that started it (Linux `PR_SET_PDEATHSIG`):
/// a test killed by a timeout leaves no listener behind.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_dies_with_the_thread_that_started_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id");
    crate::fixture::ssh_keygen(&key);
    let path = dir.path().to_owned();
    let sshd = std::thread::spawn(move || {
        flowctl_ssh::testing::Sshd::start(&path, &path.join("id"), "").unwrap()
    })
    .join()
    .unwrap();
    let pid = sshd.pid();
    until(
        Duration::from_secs(30),
        "sshd to die with its starting thread",
        || !alive(pid),
    )
    .await;
    drop(sshd);
}

/// Dropping a process whose command waits on its input (`cat`) ends the
/// command on sshd, with either backend: sshd keeps a command's stdin open
/// until the client sends EOF, and a CHANNEL_CLOSE alone does not send it.
async fn dropping_a_process_ends_its_command_on_sshd(backend: flowctl_ssh::Backend) {
    let fx = Fixture::start(Kind::Sshd).await.with_backend(backend);
    let sshd = fx.sshd.as_ref().unwrap();
    let s = Session::connect(fx.config()).await.unwrap();
    let p = s.exec("cat").await.unwrap();
    until(Duration::from_secs(30), "cat to run under sshd", || {
        sshd.commands().iter().any(|c| c == "cat")
    })
    .await;
    drop(p);
    until(Duration::from_secs(30), "sshd to run no command", || {
        sshd.commands().is_empty()
    })
    .await;
    // The session still works.
    let mut q = s.exec("echo alive").await.unwrap();
    assert_eq!(q.stdout.read_to_end().await.unwrap(), b"alive\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn russh_dropping_a_process_ends_its_command_on_sshd() {
    dropping_a_process_ends_its_command_on_sshd(flowctl_ssh::Backend::Russh).await
}

#[cfg(feature = "openssh")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_dropping_a_process_ends_its_command_on_sshd() {
    dropping_a_process_ends_its_command_on_sshd(flowctl_ssh::Backend::OpenSsh).await
}
