//! The limits that hold new work back (docs/agent.md, "Limits"): the load average
//! (`/proc/loadavg`, `--max-load`), the free space of the store dir and the state dir
//! (`statvfs`, `--min-free-disk-mb`) and the finished builds waiting for an upload slot
//! (`--max-waiting-uploads`). While one holds, the agent asks for no work; builds it already
//! holds go on. The build-slot limits (`--max-parallel-builds`, `--max-allocated-builds`) are
//! semaphores in the session loop.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::metrics;

/// Why the agent asks for no work right now.
#[derive(Debug, Clone, PartialEq)]
pub enum HoldBack {
    /// The 1-minute load average is above `--max-load`.
    Load { load: f64, max: f64 },
    /// A dir has less free space than `--min-free-disk-mb`.
    Disk { dir: PathBuf, free: u64, min: u64 },
    /// More finished builds wait for an upload slot than `--max-waiting-uploads`.
    Uploads { waiting: usize, max: usize },
    /// The coordinator said `pause` (and not yet `resume`).
    Paused,
}

impl HoldBack {
    /// The `reason` label of `kiln_agent_work_held_back`.
    pub fn reason(&self) -> &'static str {
        match self {
            HoldBack::Load { .. } => "load",
            HoldBack::Disk { .. } => "disk",
            HoldBack::Uploads { .. } => "uploads",
            HoldBack::Paused => "paused",
        }
    }
}

impl fmt::Display for HoldBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HoldBack::Load { load, max } => {
                write!(f, "load average {load:.2} is above --max-load {max:.2}")
            }
            HoldBack::Disk { dir, free, min } => write!(
                f,
                "{} has {} MiB free, below --min-free-disk-mb {}",
                dir.display(),
                free / (1 << 20),
                min / (1 << 20)
            ),
            HoldBack::Uploads { waiting, max } => write!(
                f,
                "{waiting} finished builds wait for an upload slot, more than --max-waiting-uploads {max}"
            ),
            HoldBack::Paused => write!(f, "the coordinator paused this agent"),
        }
    }
}

/// The limits checked before every work request.
#[derive(Debug, Clone)]
pub struct WorkLimits {
    /// `None`: no load limit.
    pub max_load: Option<f64>,
    /// Bytes; 0: no disk limit.
    pub min_free_disk: u64,
    /// The dirs whose free space counts (the store dir and the state dir).
    pub dirs: Vec<PathBuf>,
    /// Most finished builds waiting for an upload slot before new work is held back.
    pub max_waiting_uploads: usize,
}

impl WorkLimits {
    /// Reads the load average and the free space (only for the limits that are set), records
    /// them in the metrics, and says which limit holds work back, if any. A reading that fails
    /// holds nothing back (it is logged): a missing `/proc` must not stop the agent.
    pub fn check(&self, waiting_uploads: usize) -> Option<HoldBack> {
        metrics::UPLOADS_WAITING.set(waiting_uploads as u64);
        let load = self.max_load.and_then(|_| match load_average() {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "failed to read the load average; not limiting on it");
                None
            }
        });
        if let Some(l) = load {
            metrics::LOAD_AVERAGE_MILLI.set((l * 1000.0) as u64);
        }
        let mut free = Vec::new();
        if self.min_free_disk > 0 {
            for (i, dir) in self.dirs.iter().enumerate() {
                match free_bytes(dir) {
                    Ok(f) => {
                        if let Some(m) = metrics::FREE_DISK.get(i) {
                            m.set(f);
                        }
                        free.push((dir.clone(), f));
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "failed to read the free disk space; not limiting on it")
                    }
                }
            }
        }
        let held = decide(self, load, &free, waiting_uploads);
        for reason in ["load", "disk", "uploads"] {
            let on = held.as_ref().is_some_and(|h| h.reason() == reason);
            metrics::held_back(reason).set(u64::from(on));
        }
        held
    }
}

/// The decision, from readings: the first limit that holds (uploads, then disk, then load).
pub fn decide(
    limits: &WorkLimits,
    load: Option<f64>,
    free: &[(PathBuf, u64)],
    waiting_uploads: usize,
) -> Option<HoldBack> {
    if waiting_uploads > limits.max_waiting_uploads {
        return Some(HoldBack::Uploads {
            waiting: waiting_uploads,
            max: limits.max_waiting_uploads,
        });
    }
    if limits.min_free_disk > 0 {
        if let Some((dir, f)) = free.iter().find(|(_, f)| *f < limits.min_free_disk) {
            return Some(HoldBack::Disk {
                dir: dir.clone(),
                free: *f,
                min: limits.min_free_disk,
            });
        }
    }
    match (limits.max_load, load) {
        (Some(max), Some(load)) if load > max => Some(HoldBack::Load { load, max }),
        _ => None,
    }
}

/// The 1-minute load average, from `/proc/loadavg`.
pub fn load_average() -> std::io::Result<f64> {
    let text = std::fs::read_to_string("/proc/loadavg")?;
    parse_loadavg(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected /proc/loadavg contents {text:?}"),
        )
    })
}

/// The first field of `/proc/loadavg` (`0.52 0.58 0.59 1/467 12345`).
pub fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace()
        .next()?
        .parse()
        .ok()
        .filter(|l: &f64| l.is_finite() && *l >= 0.0)
}

/// Bytes available to an unprivileged user on the file system of `dir` (`statvfs`).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    Ok(free)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> WorkLimits {
        WorkLimits {
            max_load: Some(4.0),
            min_free_disk: 1 << 30,
            dirs: vec![],
            max_waiting_uploads: 2,
        }
    }

    #[test]
    fn parses_proc_loadavg() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 1/467 12345\n"), Some(0.52));
        assert_eq!(parse_loadavg("12.00 1 1 1/1 1"), Some(12.0));
        assert_eq!(parse_loadavg(""), None);
        assert_eq!(parse_loadavg("x 1 1"), None);
        assert_eq!(parse_loadavg("-1 1 1"), None);
        // This machine's own file parses.
        let l = load_average().expect("/proc/loadavg is readable on Linux");
        assert!(l >= 0.0);
    }

    #[test]
    fn each_limit_holds_work_back_only_past_its_bound() {
        let l = limits();
        let roomy = vec![("/s".into(), 2u64 << 30), ("/t".into(), 1 << 30)];
        assert_eq!(decide(&l, Some(4.0), &roomy, 2), None, "at the bounds");
        assert_eq!(
            decide(&l, Some(4.5), &roomy, 0),
            Some(HoldBack::Load {
                load: 4.5,
                max: 4.0
            })
        );
        let full = vec![("/s".into(), 2u64 << 30), ("/t".into(), (1 << 30) - 1)];
        assert_eq!(
            decide(&l, Some(0.1), &full, 0),
            Some(HoldBack::Disk {
                dir: "/t".into(),
                free: (1 << 30) - 1,
                min: 1 << 30
            })
        );
        assert_eq!(
            decide(&l, Some(0.1), &roomy, 3),
            Some(HoldBack::Uploads { waiting: 3, max: 2 })
        );
        // Unset limits never hold.
        let off = WorkLimits {
            max_load: None,
            min_free_disk: 0,
            ..l.clone()
        };
        assert_eq!(decide(&off, Some(100.0), &full, 0), None);
        // Messages name the limit and the flag.
        let m = decide(&l, Some(0.1), &full, 0).unwrap().to_string();
        assert!(m.contains("/t") && m.contains("--min-free-disk-mb"), "{m}");
    }

    #[test]
    fn free_bytes_reads_a_real_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0, "a temp dir on a full disk? {free}");
        assert!(free_bytes(&dir.path().join("missing")).is_err());
        // A check against an impossible minimum holds work back on that dir.
        let l = WorkLimits {
            max_load: None,
            min_free_disk: u64::MAX,
            dirs: vec![dir.path().to_owned()],
            max_waiting_uploads: 10,
        };
        match l.check(0) {
            Some(HoldBack::Disk { dir: d, .. }) => assert_eq!(d, dir.path()),
            other => panic!("{other:?}"),
        }
    }
}
