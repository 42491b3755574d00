//! Child processes of the harness: each in its own process group, each with
//! `PR_SET_PDEATHSIG` = SIGKILL (so it dies with the harness even when no destructor runs),
//! and each registered in one process-wide list of groups that [`kill_everything`] SIGKILLs —
//! called by the [`Child`] guards on drop, by the panic hook and by the SIGINT/SIGTERM handler
//! ([`install_guards`]).
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, not the process:
//! children must be spawned from a thread that lives as long as they should (the harness
//! spawns them from its main thread, never from a blocking pool whose threads come and go).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Process groups of every live child, by leader pid.
static GROUPS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn groups() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    GROUPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// SIGKILL every process group the harness started and has not reaped yet.
pub fn kill_everything() {
    for pgid in groups().iter() {
        // SAFETY: kill takes plain integers; a group that is gone gives ESRCH, which is fine.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// Kill every child when the harness panics or gets SIGINT/SIGTERM (then exit 130/143).
/// Must be called once, from inside a tokio runtime.
pub fn install_guards() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_everything();
        previous(info);
    }));
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::warn!(
                "failed to install the signal handlers: children die only by PR_SET_PDEATHSIG"
            );
            return;
        };
        let code = tokio::select! {
            _ = int.recv() => 130,
            _ = term.recv() => 143,
        };
        eprintln!("kiln-chaos: interrupted, killing every process it started");
        kill_everything();
        std::process::exit(code);
    });
}

/// A running child in its own process group. Dropping it SIGKILLs the group and reaps it.
pub struct Child {
    pub name: String,
    child: Option<std::process::Child>,
    pid: i32,
    pub log: PathBuf,
}

impl Child {
    /// Start `cmd` as `name`, stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
        use std::os::unix::process::CommandExt as _;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("failed to open log file {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("failed to open log file {} twice", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (setpgid, prctl, getppid, _exit); it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                #[cfg(target_os = "linux")]
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The harness may have died before prctl took effect: then nobody kills us.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut g = groups();
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start {name} ({:?})", cmd.get_program()))?;
        let pid = child.id() as i32;
        g.insert(pid);
        drop(g);
        tracing::debug!(name, pid, "child started");
        Ok(Child {
            name: name.to_string(),
            child: Some(child),
            pid,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// How it ended, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL the whole group and reap the leader.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain integers; ESRCH (already gone) is fine.
            unsafe {
                libc::kill(-self.pid, libc::SIGKILL);
            }
            let _ = c.wait();
            groups().remove(&self.pid);
            tracing::debug!(name = %self.name, pid = self.pid, "child killed");
        }
    }

    /// SIGTERM the leader; wait up to `grace` for it to exit, then SIGKILL the group. Returns
    /// how it exited (`None` if it had to be killed).
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: plain integers.
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        let status = loop {
            match c.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break None,
            }
        };
        // SAFETY: plain integers. The group may hold children the leader left behind.
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
        }
        let _ = c.wait();
        groups().remove(&self.pid);
        status
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    kiln::client::procs::log_tail(path, lines)
}

/// An empty file, for logs that several incarnations of a process append to.
pub fn touch(path: &Path) -> anyhow::Result<()> {
    File::create(path).with_context(|| format!("failed to create {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Running (a zombie waiting for its reaper counts as dead).
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    fn wait_for_file(p: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(t) = std::fs::read_to_string(p) {
                if !t.trim().is_empty() {
                    return t;
                }
            }
            assert!(Instant::now() < deadline, "{} never appeared", p.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pins down that a child's whole group dies with its guard: the shell and its own child.
    #[test]
    fn dropping_a_child_kills_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("sleep 600 & echo $! > {}; wait", pidfile.display()));
        let mut c = Child::spawn("sleeper", cmd, &dir.path().join("log")).unwrap();
        let grandchild: i32 = wait_for_file(&pidfile).trim().parse().unwrap();
        assert!(c.is_running());
        assert!(groups().contains(&c.pid()));
        let pid = c.pid();
        drop(c);
        assert!(!alive(pid), "the leader survived");
        let deadline = Instant::now() + Duration::from_secs(30);
        // The grandchild is not our child: init reaps it, which takes a moment.
        while alive(grandchild) {
            assert!(
                Instant::now() < deadline,
                "the group's other process survived"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!groups().contains(&pid));
    }

    #[test]
    fn stop_reports_a_clean_exit() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(format!(
            "trap 'exit 0' TERM; echo up > {}; while true; do sleep 0.05; done",
            ready.display()
        ));
        let mut c = Child::spawn("trapper", cmd, &dir.path().join("log")).unwrap();
        wait_for_file(&ready);
        let st = c.stop(Duration::from_secs(30)).expect("exited by itself");
        assert!(st.success(), "{st}");
    }
}
