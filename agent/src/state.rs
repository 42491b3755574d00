//! The agent's state dir: what survives a SIGKILL of the agent.
//!
//! ```text
//! <state-dir>/
//!   .lock                      flock held while an agent uses this state dir
//!   store/                     the private store view (root on Linux only)
//!   builds/<id>-<attempt>/
//!     assignment.json          the assignment as received
//!     log                      the builder's stdout+stderr, raw bytes
//!     log.zst                  the compressed log, made once before its upload
//!     <output>.nar.zst         spooled outputs
//!     report.json              the decided result, written (temp + fsync + rename) before
//!                              any of it is sent
//!     build/                   the builder's build directory, removed after the builder
//! ```
//!
//! A build dir is removed once the coordinator acknowledged the result, or refused it with
//! `stale_attempt`. On start, dirs with a `report.json` are re-sent; dirs without one belonged
//! to builders that died with the agent and are discarded (the coordinator re-runs them).
//!
//! Every file operation of a build dir that can take long (removing a tree, fsync) is async and
//! runs on tokio's blocking pool ([`blocking`]): the agent's runtime has one thread, which also
//! sends the heartbeats, and a multi-GB build tree being removed there would starve them.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kiln::protocol::{Assignment, BuildId, Outcome};
use serde::{Deserialize, Serialize};

/// Version of `report.json`; bump it when the record changes shape.
const REPORT_VERSION: u32 = 1;

/// The decided result of a build, as stored in `report.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReport {
    pub version: u32,
    pub build_id: BuildId,
    pub attempt: u32,
    pub outcome: Outcome,
    /// Whether a log file exists to upload.
    pub has_log: bool,
}

impl StoredReport {
    pub fn new(build_id: BuildId, attempt: u32, outcome: Outcome, has_log: bool) -> StoredReport {
        StoredReport {
            version: REPORT_VERSION,
            build_id,
            attempt,
            outcome,
            has_log,
        }
    }
}

/// A build found in the state dir at start that still has a result to send.
#[derive(Debug)]
pub struct PendingBuild {
    pub dir: BuildDir,
    pub assignment: Assignment,
    pub report: StoredReport,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Creates the state dir and its `builds/` if missing.
    pub fn open(root: &Path) -> anyhow::Result<StateDir> {
        fs::create_dir_all(root.join("builds"))
            .with_context(|| format!("failed to create the state dir {}", root.display()))?;
        Ok(StateDir {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn build_dir(&self, build_id: BuildId, attempt: u32) -> BuildDir {
        BuildDir {
            path: self
                .root
                .join("builds")
                .join(format!("{build_id}-{attempt}")),
        }
    }

    /// Reads `builds/`: returns the builds with a decided result and removes the others.
    pub fn recover(&self) -> anyhow::Result<Vec<PendingBuild>> {
        let builds = self.root.join("builds");
        let mut pending = Vec::new();
        let entries = fs::read_dir(&builds)
            .with_context(|| format!("failed to read {}", builds.display()))?;
        for entry in entries {
            let entry = entry.context("failed to read a state dir entry")?;
            let dir = BuildDir { path: entry.path() };
            match dir.load_pending() {
                Ok(Some(p)) => pending.push(p),
                Ok(None) => {
                    tracing::info!(dir = %dir.path.display(), "discarding a build without a result");
                    dir.remove_outputs();
                    dir.remove_now();
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.path.display(), error = format!("{e:#}"), "discarding an unreadable build dir");
                    dir.remove_now();
                }
            }
        }
        pending.sort_by_key(|p| p.report.build_id);
        Ok(pending)
    }
}

/// `<state-dir>/builds/<id>-<attempt>/`.
#[derive(Debug, Clone)]
pub struct BuildDir {
    pub path: PathBuf,
}

impl BuildDir {
    /// Creates the dir, removing a left-over of an earlier run of the same attempt first.
    pub async fn create(&self) -> anyhow::Result<()> {
        let path = self.path.clone();
        blocking("create a build dir", move || {
            if path.exists() {
                remove_tree(&path)?;
            }
            fs::create_dir_all(&path)
                .with_context(|| format!("failed to create {}", path.display()))
        })
        .await
    }

    pub fn log(&self) -> PathBuf {
        self.path.join("log")
    }
    pub fn compressed_log(&self) -> PathBuf {
        self.path.join("log.zst")
    }
    pub fn build_top(&self) -> PathBuf {
        self.path.join("build")
    }
    pub fn spool(&self, output: &str) -> PathBuf {
        self.path.join(format!("{output}.nar.zst"))
    }

    pub async fn write_assignment(&self, a: &Assignment) -> anyhow::Result<()> {
        let json = serde_json::to_vec(a).context("failed to encode the assignment")?;
        let path = self.path.join("assignment.json");
        blocking("write assignment.json", move || write_durably(&path, &json)).await
    }

    /// Writes `report.json` durably; call before sending any part of the result.
    pub async fn write_report(&self, r: &StoredReport) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(r).context("failed to encode the report")?;
        let path = self.path.join("report.json");
        blocking("write report.json", move || write_durably(&path, &json)).await
    }

    fn load_pending(&self) -> anyhow::Result<Option<PendingBuild>> {
        let report_path = self.path.join("report.json");
        if !report_path.exists() {
            return Ok(None);
        }
        let report: StoredReport =
            serde_json::from_slice(&fs::read(&report_path).context("failed to read report.json")?)
                .context("failed to parse report.json")?;
        anyhow::ensure!(
            report.version == REPORT_VERSION,
            "report.json has version {}, this agent reads {REPORT_VERSION}",
            report.version
        );
        let assignment: Assignment = serde_json::from_slice(
            &fs::read(self.path.join("assignment.json"))
                .context("failed to read assignment.json")?,
        )
        .context("failed to parse assignment.json")?;
        Ok(Some(PendingBuild {
            dir: self.clone(),
            assignment,
            report,
        }))
    }

    /// Removes the output paths of the assignment (a builder that died with the agent may have
    /// left them half-written). Call only once the private store view is in place.
    pub fn remove_outputs(&self) {
        let Ok(json) = fs::read(self.path.join("assignment.json")) else {
            return;
        };
        let Ok(a) = serde_json::from_slice::<Assignment>(&json) else {
            return;
        };
        for o in a.outputs {
            if let Err(e) = remove_tree(Path::new(&o.path)) {
                tracing::warn!(path = %o.path, error = format!("{e:#}"), "failed to remove a partial output");
            }
        }
    }

    /// Removes the whole build dir on the blocking pool; failures are logged, not fatal (the
    /// next start retries).
    pub async fn remove(&self) {
        let path = self.path.clone();
        if let Err(e) = blocking("remove a build dir", move || remove_tree(&path)).await {
            tracing::warn!(dir = %self.path.display(), error = format!("{e:#}"), "failed to remove a build dir");
        }
    }

    /// [`BuildDir::remove`] for code that runs before the runtime (recovery at start).
    fn remove_now(&self) {
        if let Err(e) = remove_tree(&self.path) {
            tracing::warn!(dir = %self.path.display(), error = format!("{e:#}"), "failed to remove a build dir");
        }
    }
}

/// Runs blocking file work `f` on tokio's blocking pool, never on the runtime's thread (which
/// sends the heartbeats).
pub async fn blocking<T, F>(what: &'static str, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .with_context(|| format!("the blocking task to {what} failed"))?
}

/// Writes `path` by writing a temporary file, fsyncing it, renaming it over `path` and
/// fsyncing the directory, so a crash leaves either the old or the new content.
pub fn write_durably(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f =
        File::create(&tmp).with_context(|| format!("failed to create {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("failed to write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("failed to rename {}", tmp.display()))?;
    if let Some(parent) = path.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("failed to fsync {}", parent.display()))?;
    }
    Ok(())
}

/// Removes a tree, making directories writable first (builders and NAR restores may leave
/// read-only directories, which `remove_dir_all` cannot empty). A missing path is fine.
pub fn remove_tree(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("failed to stat {}", path.display())),
    };
    if meta.is_dir() {
        let mode = meta.permissions().mode();
        if mode & 0o700 != 0o700 {
            fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o700))
                .with_context(|| format!("failed to chmod {}", path.display()))?;
        }
        for entry in
            fs::read_dir(path).with_context(|| format!("failed to read {}", path.display()))?
        {
            remove_tree(&entry.context("failed to read a directory entry")?.path())?;
        }
        fs::remove_dir(path).with_context(|| format!("failed to remove {}", path.display()))
    } else {
        fs::remove_file(path).with_context(|| format!("failed to remove {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln::protocol::Bytes64;

    fn assignment(id: BuildId) -> Assignment {
        Assignment {
            build_id: id,
            attempt: 2,
            drv_path: "/gnu/store/aaaa-x.drv".into(),
            drv: Bytes64(vec![0xff, b'D']),
            system: "x86_64-linux".into(),
            outputs: vec![],
            inputs: vec![],
            priority: 0,
        }
    }

    #[tokio::test]
    async fn recover_keeps_decided_builds_and_discards_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let decided = state.build_dir(1, 2);
        decided.create().await.unwrap();
        decided.write_assignment(&assignment(1)).await.unwrap();
        let report = StoredReport::new(
            1,
            2,
            Outcome::Failed {
                reason: "x".into(),
                kind: kiln::protocol::FailureKind::Builder,
                missing_inputs: Vec::new(),
            },
            true,
        );
        decided.write_report(&report).await.unwrap();
        let undecided = state.build_dir(3, 2);
        undecided.create().await.unwrap();
        undecided.write_assignment(&assignment(3)).await.unwrap();
        let mut a3 = assignment(3);
        let partial = tmp.path().join("0123456789abcdfghijklmnpqrsvwxyz-partial");
        fs::create_dir(&partial).unwrap();
        a3.outputs.push(kiln::protocol::OutputSpec {
            name: "out".into(),
            path: partial.to_str().unwrap().into(),
        });
        undecided.write_assignment(&a3).await.unwrap();
        fs::create_dir(undecided.build_top()).unwrap();
        fs::set_permissions(
            undecided.build_top(),
            std::os::unix::fs::PermissionsExt::from_mode(0o500),
        )
        .unwrap();

        let pending = state.recover().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].report, report);
        assert_eq!(pending[0].assignment.drv.0, vec![0xff, b'D']);
        assert!(decided.path.exists());
        assert!(!undecided.path.exists());
        assert!(
            !partial.exists(),
            "a half-built output of a discarded build is removed"
        );
    }
}
