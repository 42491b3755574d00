//! Checking a submission before the queue sees it: every `.drv` parses, is named for its
//! contents, declares the output paths Nix would compute, has its whole input closure known
//! (sent now or earlier), and every input source is available. Pure CPU and sled reads: the
//! build queue runs it on a blocking thread, then applies the result on its own loop.

use std::collections::HashMap;

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
        let mut needs = Vec::new();
        for src in &drv.input_srcs {
            let p = String::from_utf8_lossy(src).into_owned();
            if !is_available(store, &p)? {
                return Err(SubmitError::MissingSource {
                    path: p,
                    of: t.clone(),
                });
            }
            needs.push(p);
        }
        for (input, wanted) in &drv.input_drvs {
            let input = String::from_utf8_lossy(input).into_owned();
            let idrv = load(&input)?.ok_or_else(|| SubmitError::MissingInputDrv {
                input: input.clone(),
                of: t.clone(),
            })?;
            for w in wanted {
                let out = idrv.outputs.iter().find(|(n, _)| n == w).ok_or_else(|| {
                    bad(
                        t,
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
        targets.push(Target {
            drv_path: t.clone(),
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
        });
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
