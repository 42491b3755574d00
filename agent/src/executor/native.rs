//! The `native` executor: runs a derivation's builder directly on this machine, as Nix does
//! without a sandbox, and spools its outputs as zstd-compressed NARs.
//!
//! The caller fetches the inputs first ([`crate::executor::inputs`]); [`NativeExecutor::run`]
//! then removes stale output paths, makes a fresh build dir, runs the builder (environment in
//! [`super::env`], process handling in [`super::process`]) and, on exit 0, checks every output
//! exists and spools each in one pass (dump → reference scan + NarHash → zstd → FileHash → file).
//!
//! Every file operation that can take long (removing output paths and the build dir, writing
//! the build dir, spooling) runs on tokio's blocking pool, never on the runtime's one thread,
//! which also sends the heartbeats. Only the fork of the builder stays on that thread (see
//! [`super::process`]: `PR_SET_PDEATHSIG` follows the forking thread).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kiln::derivation::Derivation;
use kiln::protocol::{Assignment, BuiltOutput};
use tokio::sync::watch;

use super::builtin;
use super::env::build_env;
use super::process::{self, Exit, Limits, StopReason};
use crate::nario::{self, HashCounter, RefScanner, Tee};
use crate::state::{blocking, remove_tree, BuildDir};

/// What became of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildResult {
    Built(Vec<BuiltOutput>),
    Failed(String),
    /// The build could not be prepared (its inputs could not be fetched): an infrastructure
    /// failure, which the coordinator retries (reported with `kind: setup`). `missing` names
    /// the inputs the coordinator answered 404 for (it lost them: it builds them again).
    SetupFailed {
        reason: String,
        missing: Vec<String>,
    },
    Stopped(StopReason),
}

#[derive(Debug, Clone)]
pub struct NativeExecutor {
    store_dir: PathBuf,
    limits: Limits,
    /// The HTTP client of `builtin:fetchurl`, made on its first use.
    http: std::sync::OnceLock<reqwest::Client>,
}

impl NativeExecutor {
    /// Also makes this process a child subreaper, so a builder's orphans can be reaped.
    pub fn new(store_dir: PathBuf, limits: Limits) -> NativeExecutor {
        process::become_subreaper();
        NativeExecutor {
            store_dir,
            limits,
            http: std::sync::OnceLock::new(),
        }
    }

    fn http(&self) -> &reqwest::Client {
        self.http.get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(30))
                .read_timeout(std::time::Duration::from_secs(120))
                .tcp_nodelay(true)
                .user_agent(concat!("kiln-agent/", env!("CARGO_PKG_VERSION")))
                .build()
                // Only the TLS backend's set-up can fail here, and the coordinator's client,
                // built at start with the same backend, succeeded.
                .unwrap_or_default()
        })
    }

    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Where a full store path of the assignment lives in this agent's store view.
    pub fn local_path(&self, store_path: &str) -> anyhow::Result<PathBuf> {
        let p = Path::new(store_path);
        let (Some(parent), Some(base)) = (p.parent(), p.file_name()) else {
            anyhow::bail!("{store_path} is not a store path");
        };
        anyhow::ensure!(
            parent == self.store_dir,
            "{store_path} is not in this agent's store dir {}: start the agent with --store-dir {}",
            self.store_dir.display(),
            parent.display()
        );
        Ok(self.store_dir.join(base))
    }

    /// Runs the builder of `a` with `dir` as the build's state dir (log, build dir, spool).
    pub async fn run(
        &self,
        a: &Assignment,
        dir: &BuildDir,
        stop: &mut watch::Receiver<Option<StopReason>>,
    ) -> anyhow::Result<BuildResult> {
        let drv = match Derivation::parse(&a.drv.0) {
            Ok(d) => d,
            Err(e) => return Ok(BuildResult::Failed(format!("invalid derivation: {e}"))),
        };
        let mut outputs = Vec::new();
        for o in &a.outputs {
            match self.local_path(&o.path) {
                Ok(local) => outputs.push((o.clone(), local)),
                Err(e) => return Ok(BuildResult::Failed(format!("{e:#}"))),
            }
        }
        // A builder killed with an earlier agent may have left a partial output.
        remove_all(&outputs)
            .await
            .context("failed to remove a stale output path")?;
        let exit = if drv.builder.starts_with(b"builtin:") {
            let outs: Vec<(String, PathBuf)> = outputs
                .iter()
                .map(|(o, l)| (o.name.clone(), l.clone()))
                .collect();
            builtin::run(self.http(), &drv, &outs, &dir.log(), stop).await?
        } else {
            self.run_builder(a, &drv, dir, stop).await?
        };
        let unfinished = match exit {
            Exit::Success => None,
            Exit::Failed(reason) => Some(BuildResult::Failed(reason)),
            Exit::Stopped(r) => Some(BuildResult::Stopped(r)),
        };
        if let Some(result) = unfinished {
            // As Nix does: what a failed builder left behind is not an output.
            if let Err(e) = remove_all(&outputs).await {
                tracing::warn!(
                    build_id = a.build_id,
                    error = format!("{e:#}"),
                    "failed to remove a partial output"
                );
            }
            return Ok(result);
        }
        for (o, local) in &outputs {
            if fs::symlink_metadata(local).is_err() {
                return Ok(BuildResult::Failed(format!(
                    "builder did not create output {} ({})",
                    o.name, o.path
                )));
            }
        }
        let outs: Vec<(String, PathBuf)> = outputs
            .iter()
            .map(|(o, l)| (o.name.clone(), l.clone()))
            .collect();
        if let Some(reason) = builtin::check_fixed_output(&drv, &outs).await? {
            if let Err(e) = remove_all(&outputs).await {
                tracing::warn!(
                    build_id = a.build_id,
                    error = format!("{e:#}"),
                    "failed to remove a wrong fixed output"
                );
            }
            return Ok(BuildResult::Failed(reason));
        }
        let candidates = reference_candidates(a);
        let mut built = Vec::new();
        for (o, local) in outputs {
            let spool = dir.spool(&o.name);
            let cands = candidates.clone();
            let s = tokio::task::spawn_blocking(move || spool_output(&local, &cands, &spool))
                .await
                .context("failed to join the spooling task")?
                .with_context(|| format!("failed to spool output {}", o.name))?;
            built.push(BuiltOutput {
                name: o.name,
                path: o.path,
                nar_hash: s.nar_hash,
                nar_size: s.nar_size,
                file_hash: s.file_hash,
                file_size: s.file_size,
                references: s.references,
            });
        }
        Ok(BuildResult::Built(built))
    }

    async fn run_builder(
        &self,
        a: &Assignment,
        drv: &Derivation,
        dir: &BuildDir,
        stop: &mut watch::Receiver<Option<StopReason>>,
    ) -> anyhow::Result<Exit> {
        let top = dir.build_top();
        let outs: Vec<(String, String)> = a
            .outputs
            .iter()
            .map(|o| (o.name.clone(), o.path.clone()))
            .collect();
        let env = match build_env(drv, &outs, &self.store_dir, &top) {
            Ok(env) => env,
            Err(e) => return Ok(Exit::Failed(e.to_string())),
        };
        let vars = match env.os_vars() {
            Ok(v) => v,
            Err(e) => return Ok(Exit::Failed(e.to_string())),
        };
        let (t, files) = (top.clone(), env.files.clone());
        blocking("prepare the build dir", move || {
            remove_tree(&t)?;
            fs::create_dir_all(&t).with_context(|| format!("failed to create {}", t.display()))?;
            for f in &files {
                fs::write(t.join(&f.name), &f.contents)
                    .with_context(|| format!("failed to write {} in the build dir", f.name))?;
            }
            Ok(())
        })
        .await?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.log())
            .context("failed to open the build log")?;
        let mut cmd = std::process::Command::new(OsStr::from_bytes(&drv.builder));
        cmd.args(drv.args.iter().map(|a| OsStr::from_bytes(a)))
            .env_clear()
            .envs(vars)
            .current_dir(&top);
        let child = match process::spawn(cmd, &log) {
            Ok(c) => c,
            Err(e) => {
                let builder = String::from_utf8_lossy(&drv.builder);
                return Ok(Exit::Failed(format!(
                    "failed to start builder {builder}: {e}"
                )));
            }
        };
        tracing::info!(
            build_id = a.build_id,
            attempt = a.attempt,
            pid = child.id(),
            "builder started"
        );
        let exit = process::supervise(child, &dir.log(), self.limits, stop).await;
        let t = top.clone();
        if let Err(e) = blocking("remove the build dir", move || remove_tree(&t)).await {
            tracing::warn!(
                build_id = a.build_id,
                error = format!("{e:#}"),
                "failed to remove the build dir"
            );
        }
        let exit = exit.context("failed to wait for the builder")?;
        tracing::info!(build_id = a.build_id, attempt = a.attempt, exit = ?exit, "builder ended");
        Ok(exit)
    }
}

/// Removes the local output paths (blocking pool).
async fn remove_all(outputs: &[(kiln::protocol::OutputSpec, PathBuf)]) -> anyhow::Result<()> {
    let paths: Vec<PathBuf> = outputs.iter().map(|(_, p)| p.clone()).collect();
    blocking("remove output paths", move || {
        paths.iter().try_for_each(|p| remove_tree(p))
    })
    .await
}

/// Hash part -> full store path, for every input and output path of the assignment.
fn reference_candidates(a: &Assignment) -> Vec<(String, String)> {
    let mut c: Vec<(String, String)> = a
        .inputs
        .iter()
        .map(|i| i.path.as_str())
        .chain(a.outputs.iter().map(|o| o.path.as_str()))
        .filter_map(|p| {
            let base = Path::new(p).file_name()?.to_str()?;
            Some((base.get(..32)?.to_owned(), p.to_owned()))
        })
        .collect();
    c.sort();
    c.dedup();
    c
}

/// What spooling an output measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spooled {
    pub nar_hash: String,
    pub nar_size: u64,
    pub file_hash: String,
    pub file_size: u64,
    /// Full store paths, sorted.
    pub references: Vec<String>,
}

/// Dumps `path` as a NAR in one pass into the reference scanner and NarHash counter, and
/// through zstd (level 3) and the FileHash counter into `dest` (fsynced). Blocking.
pub fn spool_output(
    path: &Path,
    candidates: &[(String, String)],
    dest: &Path,
) -> anyhow::Result<Spooled> {
    let file =
        fs::File::create(dest).with_context(|| format!("failed to create {}", dest.display()))?;
    let compressed = HashCounter::new(std::io::BufWriter::new(file));
    let encoder = zstd::Encoder::new(compressed, 3).context("failed to start zstd")?;
    let nar = HashCounter::new(encoder);
    let scanner = RefScanner::new(candidates.iter().map(|(h, _)| h.as_str()));
    let mut tee = Tee(scanner, nar);
    nario::dump(path, &mut tee).with_context(|| format!("failed to archive {}", path.display()))?;
    let Tee(scanner, nar) = tee;
    let (nar_hash, nar_size, encoder) = nar.finish();
    let compressed = encoder.finish().context("failed to finish zstd")?;
    let (file_hash, file_size, writer) = compressed.finish();
    let file = writer
        .into_inner()
        .map_err(|e| e.into_error())
        .context("failed to flush the spool file")?;
    file.sync_all().context("failed to fsync the spool file")?;
    let found = scanner.found();
    let mut references: Vec<String> = candidates
        .iter()
        .filter(|(h, _)| found.binary_search(h).is_ok())
        .map(|(_, p)| p.clone())
        .collect();
    references.sort();
    Ok(Spooled {
        nar_hash,
        nar_size,
        file_hash,
        file_size,
        references,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_scan_over_a_real_dumped_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path();
        let dep = format!("{}/0123456789abcdfghijklmnpqrsvwxyz-dep", store.display());
        let unused = format!(
            "{}/zyxwvsrqpnmlkjihgfdcba9876543210-unused",
            store.display()
        );
        let me = format!("{}/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-me", store.display());
        fs::create_dir_all(format!("{me}/bin")).unwrap();
        fs::write(
            format!("{me}/bin/x"),
            format!("#!{dep}/bin/sh\nexec {me}/bin/y\n"),
        )
        .unwrap();
        std::os::unix::fs::symlink(format!("{dep}/lib"), format!("{me}/lib")).unwrap();
        let cands = vec![
            ("0123456789abcdfghijklmnpqrsvwxyz".to_owned(), dep.clone()),
            ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_owned(), me.clone()),
            ("zyxwvsrqpnmlkjihgfdcba9876543210".to_owned(), unused),
        ];
        let spool = tmp.path().join("out.nar.zst");
        let s = spool_output(Path::new(&me), &cands, &spool).unwrap();
        let mut want = vec![dep, me.clone()];
        want.sort();
        assert_eq!(s.references, want);
        // The spooled file decompresses to the NAR that was hashed.
        let nar = zstd::decode_all(fs::File::open(&spool).unwrap()).unwrap();
        assert_eq!(nar.len() as u64, s.nar_size);
        assert_eq!(fs::metadata(&spool).unwrap().len(), s.file_size);
        let mut direct = Vec::new();
        nario::dump(Path::new(&me), &mut direct).unwrap();
        assert_eq!(nar, direct);
    }
}
