//! Each agent's private view of the store dir.
//!
//! Store paths are absolute, so two agents on one host must not share a writable store dir by
//! accident. As root on Linux the agent enters its own mount namespace and bind-mounts
//! `<state-dir>/store` over `--store-dir`: every agent sees its own store, and what an agent
//! built is visible from outside at `<state-dir>/store/<hash>-<name>` (an interface: tests and
//! operators read outputs there). Not as root, it does the same inside an unprivileged user
//! namespace that maps its own uid and gid to themselves (files it creates belong to the user
//! outside too). Where neither works (not Linux, or user namespaces disabled), the agent takes
//! an exclusive `flock` on `<store-dir>/.kiln-agent.lock` and refuses to start when another
//! agent holds it.
//!
//! [`establish`] must run before the tokio runtime (or anything else that spawns threads)
//! starts: `unshare(CLONE_NEWUSER)` fails with `EINVAL` once a process has several threads,
//! and `unshare(CLONE_NEWNS)` moves only the calling thread (threads it starts afterwards
//! follow it). Under an emulator such as qemu-user the process has the emulator's own threads
//! from the start: as root the namespace still works (they never touch the store), not as root
//! it cannot be had, and the agent falls back to the lock with a warning that says why.

use std::fs::{self, File};
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// How this agent keeps its store to itself. The lock file must live as long as the agent.
#[derive(Debug)]
pub enum StoreView {
    /// A private mount namespace with `<state-dir>/store` bind-mounted over the store dir.
    Namespace { backing: PathBuf },
    /// An exclusive lock on the shared store dir.
    Locked(File),
}

/// Sets up the private view; must run while the process is single-threaded.
pub fn establish(store_dir: &Path, state_dir: &Path) -> anyhow::Result<StoreView> {
    fs::create_dir_all(store_dir)
        .with_context(|| format!("failed to create the store dir {}", store_dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if cfg!(target_os = "linux") {
        match namespace(store_dir, state_dir, !root) {
            Ok(backing) => {
                tracing::info!(store_dir = %store_dir.display(), backing = %backing.display(), "private store view: mount namespace");
                return Ok(StoreView::Namespace { backing });
            }
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "failed to set up a mount namespace, falling back to a lock"
            ),
        }
    }
    let lock = lock_exclusive(&store_dir.join(".kiln-agent.lock")).with_context(|| {
        format!(
            "another kiln-agent uses the store dir {}: give each agent its own --store-dir, or run it on Linux with user namespaces enabled for a private view",
            store_dir.display()
        )
    })?;
    tracing::info!(store_dir = %store_dir.display(), "private store view: lock file");
    Ok(StoreView::Locked(lock))
}

#[cfg(target_os = "linux")]
fn namespace(store_dir: &Path, state_dir: &Path, unprivileged: bool) -> anyhow::Result<PathBuf> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt as _;
    let backing = state_dir.join("store");
    fs::create_dir_all(&backing)
        .with_context(|| format!("failed to create {}", backing.display()))?;
    let backing = backing
        .canonicalize()
        .context("failed to resolve the backing store dir")?;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).context("path contains a NUL byte");
    let (src, dst, slash) = (c(&backing)?, c(store_dir)?, c(Path::new("/"))?);
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let flags = if unprivileged {
        libc::CLONE_NEWUSER | libc::CLONE_NEWNS
    } else {
        libc::CLONE_NEWNS
    };
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(flags) } != 0 {
        let err = std::io::Error::last_os_error();
        let hint = unshare_hint(err.raw_os_error(), thread_count());
        return Err(err).with_context(|| format!("failed to unshare the mount namespace{hint}"));
    }
    if unprivileged {
        // Map our own ids to themselves; setgroups must be denied before gid_map is written.
        fs::write("/proc/self/setgroups", "deny").context("failed to deny setgroups")?;
        fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))
            .context("failed to write uid_map")?;
        fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))
            .context("failed to write gid_map")?;
    }
    // SAFETY: plain syscalls on NUL-terminated strings that outlive the calls.
    unsafe {
        let none = std::ptr::null();
        if libc::mount(
            none,
            slash.as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("failed to make / private");
        }
        if libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            none,
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error())
                .context("failed to bind-mount the private store");
        }
    }
    Ok(backing)
}

/// The threads of this process, from `/proc/self/task` (None where it cannot be read).
#[cfg(target_os = "linux")]
fn thread_count() -> Option<usize> {
    fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

/// What to add to a failed `unshare`'s message: `EINVAL` in a process that already has
/// several threads is what an emulator such as qemu-user causes, and the operator can do
/// something about it.
#[cfg(target_os = "linux")]
fn unshare_hint(errno: Option<i32>, threads: Option<usize>) -> String {
    match (errno, threads) {
        (Some(libc::EINVAL), Some(n)) if n > 1 => format!(
            " (this process already has {n} threads, and a user namespace needs a single-threaded one: \
             is the agent running under an emulator such as qemu-user? Run it as root for a private \
             mount namespace, or give each agent its own --store-dir)"
        ),
        _ => String::new(),
    }
}

#[cfg(not(target_os = "linux"))]
fn namespace(_: &Path, _: &Path, _: bool) -> anyhow::Result<PathBuf> {
    anyhow::bail!("mount namespaces exist only on Linux")
}

/// Takes an exclusive, non-blocking flock on `path` (created if missing).
pub fn lock_exclusive(path: &Path) -> anyhow::Result<File> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    // SAFETY: flock on a valid descriptor owned by `f`.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("failed to lock {}", path.display()));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins down the message a not-root agent under qemu-user logs when it falls back to the
    /// lock: EINVAL with the emulator's threads names the cause and the ways out.
    #[cfg(target_os = "linux")]
    #[test]
    fn einval_with_threads_names_the_emulator() {
        let hint = unshare_hint(Some(libc::EINVAL), Some(3));
        assert!(hint.contains("3 threads"), "{hint}");
        assert!(hint.contains("qemu-user"), "{hint}");
        assert!(hint.contains("--store-dir"), "{hint}");
        // Other failures, or a single thread, get no guess.
        assert_eq!(unshare_hint(Some(libc::EPERM), Some(3)), "");
        assert_eq!(unshare_hint(Some(libc::EINVAL), Some(1)), "");
        assert_eq!(unshare_hint(Some(libc::EINVAL), None), "");
    }

    #[test]
    fn a_second_lock_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("l");
        let first = lock_exclusive(&p).unwrap();
        assert!(lock_exclusive(&p).is_err());
        drop(first);
        assert!(lock_exclusive(&p).is_ok());
    }
}
