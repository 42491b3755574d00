//! Checking a submission before the queue sees it: every `.drv` parses, is named for its
//! contents, declares the output paths Nix would compute, has its whole input closure known
//! (sent now or earlier), and every input source is available. Pure CPU and sled reads: the
//! build queue runs it on a blocking thread, then applies the result on its own loop.

use std::collections::{HashMap, HashSet};

use thiserror::Error;

use super::queue_state::{is_available, Target};
use crate::derivation::paths::drv_path;
use crate::derivation::store_path::{StoreDir, StorePath};
use crate::derivation::Derivation;
use crate::derivation::PathComputer;
use crate::protocol::SubmitBuilds;
use crate::store::records::DrvRecord;
use crate::store::{Store, StoreError, TreeId};

/// Why a submission was refused (all of them are the client's to fix: HTTP 422).
#[derive(Debug, Error)]
pub enum SubmitError {
    #[error("derivation {path}: {message}")]
    BadDerivation { path: String, message: String },
    #[error("derivation {path} does not match its contents: its contents make it {computed}; it was renamed or edited after it was written")]
    WrongName { path: String, computed: String },
    #[error("derivation {path}: output {output:?} is declared as {declared} but Nix computes {computed}")]
    WrongOutput {
        path: String,
        output: String,
        declared: String,
        computed: String,
    },
    #[error("input derivation {input} of {of} was neither sent nor known to the coordinator: send the whole .drv closure (kiln submit does)")]
    MissingInputDrv { input: String, of: String },
    #[error("input source {path} of {of} is not available on the coordinator: upload it first with PUT /api/v1/sources (kiln submit does)")]
    MissingSource { path: String, of: String },
    #[error(
        "{path} is asked to be built but its .drv was not sent and is not known to the coordinator"
    )]
    UnknownTarget { path: String },
    #[error("{0}")]
    StoreDir(String),
    #[error("derivation {path}: {message}; content-addressed and impure derivations cannot be built by this version yet")]
    Unsupported { path: String, message: String },
    #[error("the submission is empty: name at least one .drv to build")]
    Empty,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How much lower the CPU priority of a submission's parse and check is than the
/// coordinator's other threads (a nice value: 10 gives such a thread about a tenth of a core
/// that the request threads want).
const BACKGROUND_NICE: libc::c_int = 10;

/// Run `f` on a thread of its own at a lower CPU priority, and answer its result on the
/// returned channel (closed without a value if `f` panicked). A big submission's parse and
/// check are seconds of CPU: on the tokio blocking pool, at the same priority, they took the
/// cores the work requests needed (their p99 went to ~240 ms while 100,000 builds were
/// checked). A fresh thread, because a pool thread cannot get its priority back (raising it
/// needs `CAP_SYS_NICE`).
pub fn in_background<T, F>(name: &str, f: F) -> std::io::Result<tokio::sync::oneshot::Receiver<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lower_priority();
            let _ = tx.send(f());
        })?;
    Ok(rx)
}

/// Lower the calling thread's CPU priority by [`BACKGROUND_NICE`]. On Linux the nice value
/// is per thread, and `setpriority(PRIO_PROCESS, 0, ..)` sets the calling thread's.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread; no pointers are passed.
        // (A failed getpriority answers -1, which only makes the new value 9.)
        let r = unsafe {
            let now = libc::getpriority(libc::PRIO_PROCESS, 0);
            libc::setpriority(
                libc::PRIO_PROCESS,
                0,
                now.saturating_add(BACKGROUND_NICE).min(19),
            )
        };
        if r != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "could not lower the priority of a submission's check thread"
            );
        }
    }
}

/// A checked submission.
#[derive(Debug)]
pub struct Prepared {
    pub store_dir: StoreDir,
    /// `.drv` files the coordinator did not have yet.
    pub new_drvs: Vec<(String, Vec<u8>)>,
    pub targets: Vec<Target>,
}

/// Check a submission. `store_dir` is the coordinator's, if already fixed.
///
/// Memory: the submission's bytes are held once, as they came (each `.drv` in its
/// `SubmittedDrv`), and moved, never copied, into the result. A `.drv` is parsed when a check
/// needs it and dropped after: the parsed form of a small derivation is several times its
/// bytes, so parsing each once and keeping it (as this did) made a 100,000-build submission
/// hold ~1.5 KB per build on top of its bytes. Parsing is cheap next to the hashing each
/// check does anyway.
pub fn prepare(
    store: &Store,
    store_dir: Option<&StoreDir>,
    req: SubmitBuilds,
) -> Result<Prepared, SubmitError> {
    let SubmitBuilds {
        derivations,
        builds,
        related,
        ..
    } = req;
    if builds.is_empty() {
        return Err(SubmitError::Empty);
    }
    let store_dir = match store_dir {
        Some(d) => d.clone(),
        None => {
            let paths: Vec<&[u8]> = derivations
                .iter()
                .map(|d| d.path.as_bytes())
                .chain(builds.iter().map(|b| b.as_bytes()))
                .collect();
            StoreDir::resolve(None, &paths).map_err(|e| SubmitError::StoreDir(e.to_string()))?
        }
    };

    // Which derivations were sent: path -> its place in the request (the last copy of a path
    // sent twice, as a map of them would keep).
    let mut sent: HashMap<&str, usize> = HashMap::with_capacity(derivations.len());
    for (i, d) in derivations.iter().enumerate() {
        sent.insert(d.path.as_str(), i);
    }
    let sent_drv = |path: &str| -> Option<Result<Derivation, SubmitError>> {
        let d = &derivations[*sent.get(path)?];
        Some(Derivation::parse(&d.contents.0).map_err(|e| bad(path, e.to_string())))
    };

    // Parse and name-check every derivation sent.
    for d in &derivations {
        let sp = store_dir
            .parse_path(d.path.as_bytes())
            .map_err(|e| bad(&d.path, e.to_string()))?;
        if !d.path.ends_with(".drv") {
            return Err(bad(
                &d.path,
                "the path of a derivation must end in .drv".into(),
            ));
        }
        let drv = Derivation::parse(&d.contents.0).map_err(|e| bad(&d.path, e.to_string()))?;
        let computed = drv_path(&store_dir, &drv).map_err(|e| bad(&d.path, e.to_string()))?;
        if computed != sp {
            return Err(SubmitError::WrongName {
                path: d.path.clone(),
                computed: store_dir.full_path(&computed),
            });
        }
    }

    // Known derivations: those sent, then those in sled.
    let load = |path: &str| -> Result<Option<Derivation>, SubmitError> {
        if let Some(d) = sent_drv(path) {
            return d.map(Some);
        }
        match store.get::<DrvRecord>(TreeId::Derivations, path.as_bytes())? {
            Some(r) => Derivation::parse(&r.contents)
                .map(Some)
                .map_err(|e| bad(path, format!("stored copy does not parse: {e}"))),
            None => Ok(None),
        }
    };

    // Output paths of every sent derivation must be what Nix computes.
    {
        let sd = store_dir.clone();
        let mut loader = |p: &StorePath| -> anyhow::Result<Derivation> {
            let full = sd.full_path(p);
            match load(&full) {
                Ok(Some(d)) => Ok(d),
                Ok(None) => anyhow::bail!("not sent and not known to the coordinator"),
                Err(e) => Err(anyhow::anyhow!("{e}")),
            }
        };
        let mut pc = PathComputer::new(store_dir.clone(), &mut loader);
        let mut paths: Vec<&str> = sent.keys().copied().collect();
        paths.sort_unstable();
        for path in paths {
            let drv = match sent_drv(path) {
                Some(d) => d?,
                None => continue,
            };
            for (input, _) in &drv.input_drvs {
                let input = String::from_utf8_lossy(input).into_owned();
                if !sent.contains_key(input.as_str())
                    && !store.contains(TreeId::Derivations, input.as_bytes())?
                {
                    return Err(SubmitError::MissingInputDrv {
                        input,
                        of: path.to_string(),
                    });
                }
            }
            let computed = pc
                .output_paths(&drv)
                .map_err(|e| bad(path, e.to_string()))?;
            for ((name, out), (cname, cpath)) in drv.outputs.iter().zip(computed.iter()) {
                let name = String::from_utf8_lossy(name).into_owned();
                debug_assert_eq!(name.as_bytes(), cname.as_slice());
                let Some(cpath) = cpath else {
                    return Err(SubmitError::Unsupported {
                        path: path.to_string(),
                        message: format!("output {name:?} has no path before it is built"),
                    });
                };
                let c = store_dir.full_path(cpath);
                if out.path != c.as_bytes() {
                    return Err(SubmitError::WrongOutput {
                        path: path.to_string(),
                        output: name,
                        declared: String::from_utf8_lossy(&out.path).into_owned(),
                        computed: c,
                    });
                }
            }
        }
    }

    // Resolve the targets: the builds asked for. (Every target is resolved here, by
    // `target`: a step that adds targets computed from the closure adds them to this list.)
    let mut targets = Vec::with_capacity(builds.len());
    for t in builds {
        targets.push(target(store, &load, t)?);
    }
    if related {
        targets = with_related(store, targets, &load)?;
    }
    // A path sent twice is stored once: the last copy, the one checked above.
    let last: Vec<bool> = derivations
        .iter()
        .enumerate()
        .map(|(i, d)| sent.get(d.path.as_str()) == Some(&i))
        .collect();
    drop(sent);

    // The `.drv`s the coordinator does not have yet, moved out of the request.
    let mut new_drvs = Vec::new();
    for (d, last) in derivations.into_iter().zip(last) {
        if last && !store.contains(TreeId::Derivations, d.path.as_bytes())? {
            new_drvs.push((d.path, d.contents.0));
        }
    }
    new_drvs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(Prepared {
        store_dir,
        new_drvs,
        targets,
    })
}

fn bad(path: &str, message: String) -> SubmitError {
    SubmitError::BadDerivation {
        path: path.to_string(),
        message,
    }
}

/// One build to queue: the derivation at `path` (sent or known, through `load`), with the
/// paths it needs (input sources, which must be available, and the outputs it uses of its
/// input derivations).
fn target(
    store: &Store,
    load: &dyn Fn(&str) -> Result<Option<Derivation>, SubmitError>,
    path: String,
) -> Result<Target, SubmitError> {
    let drv = load(&path)?.ok_or_else(|| SubmitError::UnknownTarget { path: path.clone() })?;
    let mut needs = Vec::new();
    for src in &drv.input_srcs {
        let p = String::from_utf8_lossy(src).into_owned();
        if !is_available(store, &p)? {
            return Err(SubmitError::MissingSource { path: p, of: path });
        }
        needs.push(p);
    }
    for (input, wanted) in &drv.input_drvs {
        let input = String::from_utf8_lossy(input).into_owned();
        let idrv = load(&input)?.ok_or_else(|| SubmitError::MissingInputDrv {
            input: input.clone(),
            of: path.clone(),
        })?;
        for w in wanted {
            let out = idrv.outputs.iter().find(|(n, _)| n == w).ok_or_else(|| {
                bad(
                    &path,
                    format!(
                        "it uses output {:?} of {input}, which has no such output",
                        String::from_utf8_lossy(w)
                    ),
                )
            })?;
            needs.push(String::from_utf8_lossy(&out.1.path).into_owned());
        }
    }
    needs.sort();
    needs.dedup();
    Ok(Target {
        system: String::from_utf8_lossy(&drv.platform).into_owned(),
        outputs: drv
            .outputs
            .into_iter()
            .map(|(n, o)| {
                (
                    String::from_utf8_lossy(&n).into_owned(),
                    String::from_utf8_lossy(&o.path).into_owned(),
                )
            })
            .collect(),
        needs,
        drv_path: path,
    })
}

/// `targets` and, before them, a target for every derivation of their `.drv` closure with an
/// output that is not available (`related`): inputs before the derivations that use them
/// (post-order). The queue keeps the live build of a derivation that already has one, so
/// only the missing work is added. Walks the closure once (explicit stack, visited set):
/// time and memory proportional to the closure.
fn with_related(
    store: &Store,
    targets: Vec<Target>,
    load: &dyn Fn(&str) -> Result<Option<Derivation>, SubmitError>,
) -> Result<Vec<Target>, SubmitError> {
    let named: HashSet<String> = targets.iter().map(|t| t.drv_path.clone()).collect();
    let mut seen: HashSet<String> = named.clone();
    let mut related = Vec::new();
    let inputs = |d: &Derivation| -> Vec<String> {
        d.input_drvs
            .iter()
            .rev()
            .map(|(p, _)| String::from_utf8_lossy(p).into_owned())
            .collect()
    };
    for t in &targets {
        let drv = load(&t.drv_path)?.ok_or_else(|| SubmitError::UnknownTarget {
            path: t.drv_path.clone(),
        })?;
        // (path, its derivation's outputs, inputs still to visit) frames of a post-order walk.
        let mut stack: Vec<(String, Vec<String>, Vec<String>)> =
            vec![(t.drv_path.clone(), outputs_of(&drv), inputs(&drv))];
        while let Some(top) = stack.last_mut() {
            if let Some(input) = top.2.pop() {
                if !seen.insert(input.clone()) {
                    continue;
                }
                let idrv = load(&input)?.ok_or_else(|| SubmitError::MissingInputDrv {
                    input: input.clone(),
                    of: top.0.clone(),
                })?;
                let next = (input, outputs_of(&idrv), inputs(&idrv));
                stack.push(next);
                continue;
            }
            let Some((path, outputs, _)) = stack.pop() else {
                break;
            };
            if named.contains(&path) {
                continue;
            }
            let mut lacking = false;
            for o in &outputs {
                if !is_available(store, o)? {
                    lacking = true;
                    break;
                }
            }
            if lacking {
                related.push(target(store, load, path)?);
            }
        }
    }
    related.extend(targets);
    Ok(related)
}

/// A derivation's output paths.
fn outputs_of(d: &Derivation) -> Vec<String> {
    d.outputs
        .iter()
        .map(|(_, o)| String::from_utf8_lossy(&o.path).into_owned())
        .collect()
}

/// The build of a derivation the coordinator already stores (to build a lost input again):
/// as a submission of it alone would make it.
pub fn stored_target(store: &Store, drv_path: &str) -> Result<Target, SubmitError> {
    let load = |path: &str| -> Result<Option<Derivation>, SubmitError> {
        match store.get::<DrvRecord>(TreeId::Derivations, path.as_bytes())? {
            Some(r) => Derivation::parse(&r.contents)
                .map(Some)
                .map_err(|e| bad(path, format!("stored copy does not parse: {e}"))),
            None => Ok(None),
        }
    };
    target(store, &load, drv_path.to_string())
}
