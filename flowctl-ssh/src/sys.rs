//! The few system calls flowctl-ssh makes itself (Unix): process groups and
//! the parent-death signal of the processes it starts. Every `unsafe` block
//! of the crate is here, each with its `SAFETY` comment.
#![allow(unsafe_code)]

/// Runs in the child between `fork` and `exec` (only async-signal-safe
/// calls): asks Linux to SIGKILL the child when the thread that spawned it
/// ends (`PR_SET_PDEATHSIG`), so a test process killed by a timeout leaves
/// no server behind. Fails if the parent is already gone.
///
/// The signal follows the spawning *thread*: start long-lived peers from a
/// thread that lives as long as they should.
#[cfg(target_os = "linux")]
fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid are async-signal-safe,
    // take no pointers and touch only this (forked, single-threaded) process.
    let ok = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } == 0;
    if !ok {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::getppid() } != parent {
        return Err(std::io::Error::other(
            "the parent exited before the child was started",
        ));
    }
    Ok(())
}

/// Puts a command to start in a process group of its own (its pid is the
/// group id, so [`kill_group`] reaches everything it forks that stays in the
/// group) and, on Linux, gives it a parent-death signal.
pub(crate) fn isolate_std(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid is always safe to call.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the closure only calls async-signal-safe functions
        // (prctl, getppid) and allocates nothing on its success path.
        unsafe {
            cmd.pre_exec(move || die_with_parent(parent));
        }
    }
}

/// [`isolate_std`] for a tokio command.
#[cfg(feature = "server")]
pub(crate) fn isolate_tokio(cmd: &mut tokio::process::Command) {
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid is always safe to call.
        let parent = unsafe { libc::getpid() };
        // SAFETY: as in `isolate_std`: only async-signal-safe calls.
        unsafe {
            cmd.pre_exec(move || die_with_parent(parent));
        }
    }
}

/// Sends SIGKILL to every process of the group `pgid` (a group leader's
/// pid, from [`isolate_std`] / [`isolate_tokio`]). A group already gone is
/// not an error.
pub(crate) fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return; // never signal "every process" (-1) or our own group (0)
    }
    // SAFETY: kill takes no pointers; a negative pid names the group.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Sends `signal` to one process (`SIGSTOP`, `SIGKILL`, ...).
#[cfg(feature = "testing")]
pub(crate) fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill takes no pointers; a positive pid names one process.
    unsafe {
        libc::kill(pid, signal);
    }
}
