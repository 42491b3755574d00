//! Running one builder process: its own process group, death with the agent, timeouts, and
//! killing the whole group.
//!
//! Hidden contracts:
//! - `PR_SET_PDEATHSIG` fires when the *thread* that forked the builder exits, not the process.
//!   The agent runs a current-thread tokio runtime, so builders are forked from the main thread
//!   and die exactly when the agent dies.
//! - A builder's background children stay in its process group; after the builder exits (for
//!   any reason) the whole group gets SIGKILL, like Nix kills everything of a build user.
//! - Orphans of the group are reparented to the agent (it is a child subreaper, see
//!   [`become_subreaper`]) and reaped here, so no zombie keeps the group alive.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Why a build was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The coordinator canceled it: report `Failed{reason:"canceled"}`.
    Cancel,
    /// The build belongs to someone else now: report nothing.
    Abandon,
    /// The agent is shutting down.
    Shutdown,
}

/// How a builder ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Success,
    /// Non-zero exit, killed by a signal, or a timeout: the failure reason to report.
    Failed(String),
    Stopped(StopReason),
}

/// Limits on a builder's run time; zero means none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub timeout: Duration,
    pub max_silent: Duration,
    /// Between SIGTERM and SIGKILL when the group is killed.
    pub kill_grace: Duration,
}

/// Makes this process the reaper of its orphaned descendants (Linux), so the processes a
/// builder forked can be reaped after the builder is gone.
pub fn become_subreaper() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Spawns `cmd` in its own process group with stdin from /dev/null, stdout and stderr appended
/// to `log`, dying with the agent.
pub fn spawn(mut cmd: std::process::Command, log: &File) -> io::Result<tokio::process::Child> {
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .process_group(0);
    // SAFETY: getpid is async-signal-safe, called before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
    // functions (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            #[cfg(target_os = "linux")]
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The agent may have died between fork and prctl: then nothing would kill us.
            if libc::getppid() != parent {
                return Err(io::Error::other(
                    "the agent died while starting the builder",
                ));
            }
            Ok(())
        });
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    cmd.spawn()
}

/// Waits for the builder, enforcing `limits`, and stops it when `stop` says so. The whole
/// process group is killed in every case before this returns.
pub async fn supervise(
    mut child: tokio::process::Child,
    log_path: &std::path::Path,
    limits: Limits,
    stop: &mut watch::Receiver<Option<StopReason>>,
) -> io::Result<Exit> {
    let pgid = child.id().map(|p| p as i32);
    let started = Instant::now();
    let mut last_len = 0u64;
    let mut last_output = started;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let exit = loop {
        tokio::select! {
            status = child.wait() => break status_reason(status?),
            changed = stop.changed() => {
                let reason = match changed {
                    Ok(()) => match *stop.borrow() { Some(r) => r, None => continue },
                    // The sender is gone: the agent is shutting down.
                    Err(_) => StopReason::Shutdown,
                };
                terminate(&mut child, pgid, limits.kill_grace).await;
                break Exit::Stopped(reason);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let len = std::fs::metadata(log_path).map(|m| m.len()).unwrap_or(last_len);
                if len != last_len {
                    last_len = len;
                    last_output = now;
                }
                let reason = if !limits.timeout.is_zero() && now - started > limits.timeout {
                    format!("timed out after {} seconds", limits.timeout.as_secs())
                } else if !limits.max_silent.is_zero() && now - last_output > limits.max_silent {
                    format!("no output for {} seconds", limits.max_silent.as_secs())
                } else {
                    continue;
                };
                terminate(&mut child, pgid, limits.kill_grace).await;
                break Exit::Failed(reason);
            }
        }
    };
    if let Some(pgid) = pgid {
        kill_group(pgid, libc::SIGKILL);
        reap_group(pgid, Duration::from_secs(2)).await;
    }
    Ok(exit)
}

fn status_reason(status: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(0), _) => Exit::Success,
        (Some(code), _) => Exit::Failed(format!("builder exited with status {code}")),
        (None, Some(sig)) => Exit::Failed(format!("builder killed by signal {sig}")),
        (None, None) => Exit::Failed("builder ended with an unknown status".into()),
    }
}

/// SIGTERM to the group, then SIGKILL after `grace` if the builder is still there.
async fn terminate(child: &mut tokio::process::Child, pgid: Option<i32>, grace: Duration) {
    let Some(pgid) = pgid else { return };
    kill_group(pgid, libc::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        kill_group(pgid, libc::SIGKILL);
    }
    if let Err(e) = child.wait().await {
        tracing::warn!(pgid, error = %e, "failed to wait for the builder");
    }
}

fn kill_group(pgid: i32, sig: i32) {
    // SAFETY: kill takes plain integers; a negative pid names the process group.
    let rc = unsafe { libc::kill(-pgid, sig) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal = sig, error = %err, "failed to signal the builder's process group");
        }
    }
}

/// Reaps the group's members that were reparented to the agent, until none is left or the
/// deadline passes. Only called after the group leader itself was waited for, so it never
/// steals the exit status tokio is waiting for.
async fn reap_group(pgid: i32, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`, which lives for the call.
        let rc = unsafe { libc::waitpid(-pgid, &mut status, libc::WNOHANG) };
        if rc > 0 {
            continue;
        }
        // rc == -1 (ECHILD): none of the group is our child any more. rc == 0: some remain,
        // not yet dead (or owned by another reaper), so check whether the group still exists.
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(-pgid, 0) } == 0;
        if !alive || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
