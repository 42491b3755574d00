//! Child processes and the temporary directory of `kiln demo`, cleaned up however it ends.
//!
//! [`Processes`] SIGKILLs and reaps every process it started when it is dropped (an error, a
//! panic, or the normal end), and each child also gets `PR_SET_PDEATHSIG` so that it dies with
//! the demo even when the demo itself is killed and no destructor runs. [`TempDir`] removes
//! its directory on drop unless asked to keep it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

/// Every process the demo started. Dropping it kills them all.
#[derive(Default)]
pub struct Processes {
    /// (name, child, log file) of each process, in start order.
    children: Vec<(String, Child, PathBuf)>,
}

impl Processes {
    /// Start `cmd` as `name`, with stdout and stderr appended to `log`. The child is killed by
    /// the kernel if this process dies first.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<u32> {
        let out = File::create(log)
            .with_context(|| format!("failed to create log file {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("failed to open log file {} twice", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start {name} ({:?})", cmd.get_program()))?;
        let pid = child.id();
        tracing::debug!(name, pid, "child started");
        self.children
            .push((name.to_string(), child, log.to_path_buf()));
        Ok(pid)
    }

    /// The first child that has exited: its name, how it ended, and the end of its log.
    pub fn exited(&mut self) -> Option<String> {
        for (name, child, log) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(format!(
                    "{name} exited ({status}); the end of its log:\n{}",
                    log_tail(log, 20)
                ));
            }
        }
        None
    }

    /// Kill (SIGKILL) and reap every child.
    pub fn kill_all(&mut self) {
        for (name, mut child, _) in self.children.drain(..).rev() {
            // Errors mean the child is already gone, which is what we want.
            let _ = child.kill();
            let _ = child.wait();
            tracing::debug!(name, "child killed");
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].iter().map(|l| format!("  | {l}\n")).collect()
        }
        Err(e) => format!("  (cannot read {}: {e})\n", path.display()),
    }
}

/// Ask the kernel to SIGKILL the child when its parent dies.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, _exit); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            #[cfg(target_os = "linux")]
            {
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
            }
            // The parent may have died before prctl took effect: then nobody would kill us.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// A fresh directory under the system's temporary directory, removed on drop unless kept.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<TempDir> {
        let base = std::env::temp_dir();
        for _ in 0..16 {
            let path = base.join(format!(
                "{prefix}-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "failed to create a temporary directory in {}",
                            base.display()
                        )
                    })
                }
            }
        }
        anyhow::bail!(
            "failed to create a fresh temporary directory in {}: every name tried exists",
            base.display()
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keep the directory after the demo (for `--keep`, and after an error so logs survive).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    pub fn is_kept(&self) -> bool {
        self.keep
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if std::fs::remove_dir_all(&self.path).is_ok() {
            return;
        }
        // Store directories are made read-only; open them up and try again.
        make_writable(&self.path);
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove the demo directory");
        }
    }
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        // Best effort: whatever cannot be opened up is reported by the final removal.
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755));
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins down that dropping the guard kills and reaps what it started.
    #[test]
    fn dropping_processes_kills_children() {
        let dir = TempDir::new("kiln-procs-test").unwrap();
        let mut procs = Processes::default();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo started; exec sleep 600"]);
        let pid = procs
            .spawn("sleeper", cmd, &dir.path().join("log"))
            .unwrap();
        assert!(procs.exited().is_none());
        drop(procs);
        // After the drop the pid is reaped: signalling it fails.
        let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
        assert!(!alive, "child {pid} survived the guard");
    }

    #[test]
    fn temp_dir_is_removed_even_when_read_only_inside() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = TempDir::new("kiln-procs-test").unwrap();
        let path = dir.path().to_path_buf();
        let sub = path.join("store/x");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("f"), "x").unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o555)).unwrap();
        drop(dir);
        assert!(!path.exists());
    }
}
