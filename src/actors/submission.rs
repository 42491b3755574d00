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

/// A checked submission.
#[derive(Debug)]
pub struct Prepared {
    pub store_dir: StoreDir,
    /// `.drv` files the coordinator did not have yet.
    pub new_drvs: Vec<(String, Vec<u8>)>,
    pub targets: Vec<Target>,
}

/// Check a submission. `store_dir` is the coordinator's, if already fixed.
pub fn prepare(
    store: &Store,
    store_dir: Option<&StoreDir>,
    req: SubmitBuilds,
) -> Result<Prepared, SubmitError> {
    if req.builds.is_empty() {
        return Err(SubmitError::Empty);
    }
    let store_dir = match store_dir {
        Some(d) => d.clone(),
        None => {
            let paths: Vec<&[u8]> = req
                .derivations
                .iter()
                .map(|d| d.path.as_bytes())
                .chain(req.builds.iter().map(|b| b.as_bytes()))
                .collect();
            StoreDir::resolve(None, &paths).map_err(|e| SubmitError::StoreDir(e.to_string()))?
        }
    };
    let bad = |path: &str, message: String| SubmitError::BadDerivation {
        path: path.to_string(),
        message,
    };

    // Parse and name-check every derivation sent.
    let mut sent: HashMap<String, (Derivation, Vec<u8>)> = HashMap::new();
    // The submission's bytes are moved, not copied: a big submission is held once.
    for d in req.derivations {
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
        sent.insert(d.path, (drv, d.contents.0));
    }

    // Known derivations: those sent, then those in sled.
    let load = |path: &str| -> Result<Option<Derivation>, SubmitError> {
        if let Some((d, _)) = sent.get(path) {
            return Ok(Some(d.clone()));
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
        let mut paths: Vec<&String> = sent.keys().collect();
        paths.sort();
        for path in paths {
            let (drv, _) = &sent[path];
            for (input, _) in &drv.input_drvs {
                let input = String::from_utf8_lossy(input).into_owned();
                if !sent.contains_key(&input)
                    && !store.contains(TreeId::Derivations, input.as_bytes())?
                {
                    return Err(SubmitError::MissingInputDrv {
                        input,
                        of: path.clone(),
                    });
                }
            }
            let computed = pc.output_paths(drv).map_err(|e| bad(path, e.to_string()))?;
            for ((name, out), (cname, cpath)) in drv.outputs.iter().zip(computed.iter()) {
                let name = String::from_utf8_lossy(name).into_owned();
                debug_assert_eq!(name.as_bytes(), cname.as_slice());
                let Some(cpath) = cpath else {
                    return Err(SubmitError::Unsupported {
                        path: path.clone(),
                        message: format!("output {name:?} has no path before it is built"),
                    });
                };
                let c = store_dir.full_path(cpath);
                if out.path != c.as_bytes() {
                    return Err(SubmitError::WrongOutput {
                        path: path.clone(),
                        output: name,
                        declared: String::from_utf8_lossy(&out.path).into_owned(),
                        computed: c,
                    });
                }
            }
        }
    }

    // Resolve the targets.
    let mut targets = Vec::new();
    for t in &req.builds {
        let drv = load(t)?.ok_or_else(|| SubmitError::UnknownTarget { path: t.clone() })?;
        targets.push(resolve_target(store, t, &drv, &load)?);
    }
    if req.related {
        targets = with_related(store, targets, &load)?;
    }

    let mut new_drvs = Vec::new();
    for (path, (_, bytes)) in sent {
        if !store.contains(TreeId::Derivations, path.as_bytes())? {
            new_drvs.push((path, bytes));
        }
    }
    new_drvs.sort();
    Ok(Prepared {
        store_dir,
        new_drvs,
        targets,
    })
}

/// The build of derivation `t` (parsed: `drv`): its system, outputs and the paths it needs
/// (input sources, which must be available, and the wanted outputs of its input derivations,
/// loaded with `load`).
fn resolve_target(
    store: &Store,
    t: &str,
    drv: &Derivation,
    load: &dyn Fn(&str) -> Result<Option<Derivation>, SubmitError>,
) -> Result<Target, SubmitError> {
    let mut needs = Vec::new();
    for src in &drv.input_srcs {
        let p = String::from_utf8_lossy(src).into_owned();
        if !is_available(store, &p)? {
            return Err(SubmitError::MissingSource {
                path: p,
                of: t.to_string(),
            });
        }
        needs.push(p);
    }
    for (input, wanted) in &drv.input_drvs {
        let input = String::from_utf8_lossy(input).into_owned();
        let idrv = load(&input)?.ok_or_else(|| SubmitError::MissingInputDrv {
            input: input.clone(),
            of: t.to_string(),
        })?;
        for w in wanted {
            let out = idrv.outputs.iter().find(|(n, _)| n == w).ok_or_else(|| {
                SubmitError::BadDerivation {
                    path: t.to_string(),
                    message: format!(
                        "it uses output {:?} of {input}, which has no such output",
                        String::from_utf8_lossy(w)
                    ),
                }
            })?;
            needs.push(String::from_utf8_lossy(&out.1.path).into_owned());
        }
    }
    needs.sort();
    needs.dedup();
    Ok(Target {
        drv_path: t.to_string(),
        system: String::from_utf8_lossy(&drv.platform).into_owned(),
        outputs: drv
            .outputs
            .iter()
            .map(|(n, o)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(&o.path).into_owned(),
                )
            })
            .collect(),
        needs,
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
    for t in &targets {
        let drv = load(&t.drv_path)?.ok_or_else(|| SubmitError::UnknownTarget {
            path: t.drv_path.clone(),
        })?;
        // (path, its derivation, inputs still to visit) frames of a post-order walk.
        let mut stack: Vec<(String, Derivation, Vec<String>)> = Vec::new();
        let inputs = |d: &Derivation| -> Vec<String> {
            d.input_drvs
                .iter()
                .rev()
                .map(|(p, _)| String::from_utf8_lossy(p).into_owned())
                .collect()
        };
        let first = inputs(&drv);
        stack.push((t.drv_path.clone(), drv, first));
        while let Some(top) = stack.last_mut() {
            if let Some(input) = top.2.pop() {
                if !seen.insert(input.clone()) {
                    continue;
                }
                let idrv = load(&input)?.ok_or_else(|| SubmitError::MissingInputDrv {
                    input: input.clone(),
                    of: top.0.clone(),
                })?;
                let next = inputs(&idrv);
                stack.push((input, idrv, next));
                continue;
            }
            let Some((path, drv, _)) = stack.pop() else {
                break;
            };
            if named.contains(&path) {
                continue;
            }
            let mut lacking = false;
            for (_, o) in &drv.outputs {
                if !is_available(store, &String::from_utf8_lossy(&o.path))? {
                    lacking = true;
                    break;
                }
            }
            if lacking {
                related.push(resolve_target(store, &path, &drv, load)?);
            }
        }
    }
    related.extend(targets);
    Ok(related)
}

/// The build of a derivation the coordinator already stores (to build a lost input again):
/// as a submission of it alone would make it.
pub fn stored_target(store: &Store, drv_path: &str) -> Result<Target, SubmitError> {
    let load =
        |path: &str| -> Result<Option<Derivation>, SubmitError> {
            match store.get::<DrvRecord>(TreeId::Derivations, path.as_bytes())? {
                Some(r) => Derivation::parse(&r.contents).map(Some).map_err(|e| {
                    SubmitError::BadDerivation {
                        path: path.to_string(),
                        message: format!("stored copy does not parse: {e}"),
                    }
                }),
                None => Ok(None),
            }
        };
    let drv = load(drv_path)?.ok_or_else(|| SubmitError::UnknownTarget {
        path: drv_path.to_string(),
    })?;
    resolve_target(store, drv_path, &drv, &load)
}
