//! `hashDerivationModulo` and output paths, as Nix 2.8 computes them
//! (`src/libstore/derivations.cc`, `derivationStrict` in `src/libexpr/primops.cc`).
//!
//! An input-addressed output's path hashes the derivation with every input derivation
//! replaced by *its* hash modulo, so the whole input closure is read. [`PathComputer`] reads
//! input `.drv` files through a caller-supplied loader, memoises each one's hash, and walks the
//! graph with an explicit stack (no recursion, so deep closures cannot overflow the stack;
//! a cycle, which a real store cannot hold, is reported as an error).
//!
//! Fixed-output derivations hash to `sha256("fixed:out:<method><algo>:<hex>:<path>")`, so
//! changing how a fixed output is fetched does not change its dependants.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::output::{method_algo, OutputKind};
use super::paths::{
    derivation_type, make_fixed_output_path, make_output_path, nix_unparse, output_path_name,
    store_path, DerivationType, Inputs, PathError,
};
use super::store_path::{StoreDir, StorePath};
use super::{Derivation, Hash};

/// Whether a hash modulo is final (`Regular`) or depends on outputs not known yet
/// (`Deferred`: floating content-addressed or impure somewhere in the closure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrvHashKind {
    Regular,
    Deferred,
}

/// A derivation's hash modulo: one hash per output name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvHash {
    pub hashes: BTreeMap<Vec<u8>, Hash>,
    pub kind: DrvHashKind,
}

/// An output name and the path Nix computes for it (None when known only after building).
pub type OutputPath = (Vec<u8>, Option<StorePath>);

/// Loads an input `.drv` file given its store path.
pub type Loader<'l> = dyn FnMut(&StorePath) -> anyhow::Result<Derivation> + 'l;

/// Computes hashes modulo and output paths, memoising the hash of every input derivation.
pub struct PathComputer<'l> {
    store_dir: StoreDir,
    loader: &'l mut Loader<'l>,
    memo: HashMap<StorePath, DrvHash>,
}

/// One frame of the explicit depth-first walk: a loaded derivation and how many of its
/// inputs have been looked at.
struct Frame {
    path: StorePath,
    drv: Derivation,
    next_input: usize,
}

impl<'l> PathComputer<'l> {
    /// A computer for derivations in `store_dir`, reading inputs with `loader`.
    pub fn new(store_dir: StoreDir, loader: &'l mut Loader<'l>) -> PathComputer<'l> {
        PathComputer {
            store_dir,
            loader,
            memo: HashMap::new(),
        }
    }

    /// The store directory.
    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    fn load(&mut self, path: &StorePath) -> Result<Derivation, PathError> {
        (self.loader)(path).map_err(|e| PathError::Load {
            path: self.store_dir.full_path(path),
            message: format!("{e:#}"),
        })
    }

    /// The name of an input derivation, from its path (`<name>.drv`).
    fn name_from_path(&self, path: &StorePath) -> Result<String, PathError> {
        path.name()
            .strip_suffix(".drv")
            .map(str::to_string)
            .ok_or_else(|| {
                PathError::Type(format!(
                    "input derivation {} does not end in .drv",
                    self.store_dir.full_path(path)
                ))
            })
    }

    /// Make sure the hash modulo of every input derivation in `drv`'s closure is memoised.
    fn ensure_inputs(&mut self, drv: &Derivation) -> Result<(), PathError> {
        for (p, _) in &drv.input_drvs {
            let sp = store_path(&self.store_dir, "input derivation", p)?;
            if !self.memo.contains_key(&sp) {
                self.walk(sp)?;
            }
        }
        Ok(())
    }

    /// Depth-first, post-order walk from `root`, memoising each derivation's hash.
    fn walk(&mut self, root: StorePath) -> Result<(), PathError> {
        let drv = self.load(&root)?;
        let mut on_stack: HashSet<StorePath> = HashSet::from([root.clone()]);
        let mut stack = vec![Frame {
            path: root,
            drv,
            next_input: 0,
        }];
        while let Some(top) = stack.last_mut() {
            if let Some((p, _)) = top.drv.input_drvs.get(top.next_input) {
                top.next_input += 1;
                let sp = store_path(&self.store_dir, "input derivation", p)?;
                if self.memo.contains_key(&sp) {
                    continue;
                }
                if on_stack.contains(&sp) {
                    return Err(PathError::Cycle(self.store_dir.full_path(&sp)));
                }
                let drv = self.load(&sp)?;
                on_stack.insert(sp.clone());
                stack.push(Frame {
                    path: sp,
                    drv,
                    next_input: 0,
                });
                continue;
            }
            // Every input is memoised: hash this one.
            let Some(frame) = stack.pop() else { break };
            let name = self.name_from_path(&frame.path)?;
            let h = self.hash_with_inputs_known(&frame.drv, &name, false)?;
            on_stack.remove(&frame.path);
            self.memo.insert(frame.path, h);
        }
        Ok(())
    }

    /// `hashDerivationModulo(drv, mask)` for a derivation called `name` (its `name`
    /// attribute; for an input, its file name without `.drv`).
    pub fn hash_derivation_modulo(
        &mut self,
        drv: &Derivation,
        name: &str,
        mask: bool,
    ) -> Result<DrvHash, PathError> {
        self.ensure_inputs(drv)?;
        self.hash_with_inputs_known(drv, name, mask)
    }

    /// The hash modulo of an input derivation, loading it (and its closure) if needed.
    pub fn input_hash(&mut self, path: &StorePath) -> Result<DrvHash, PathError> {
        if !self.memo.contains_key(path) {
            self.walk(path.clone())?;
        }
        self.memo
            .get(path)
            .cloned()
            .ok_or_else(|| PathError::Cycle(self.store_dir.full_path(path)))
    }

    fn hash_with_inputs_known(
        &self,
        drv: &Derivation,
        name: &str,
        mask: bool,
    ) -> Result<DrvHash, PathError> {
        let ty = derivation_type(drv)?;
        let all = |h: &Hash| {
            drv.outputs
                .iter()
                .map(|(n, _)| (n.clone(), h.clone()))
                .collect()
        };
        match ty {
            DerivationType::Fixed => {
                let mut hashes = BTreeMap::new();
                for (n, o) in &drv.outputs {
                    let Ok(OutputKind::Fixed { method, hash, .. }) = o.kind() else {
                        return Err(PathError::Type(
                            "fixed derivation with a non-fixed output".into(),
                        ));
                    };
                    let out_name = output_path_name(name, &String::from_utf8_lossy(n));
                    let path = make_fixed_output_path(&self.store_dir, method, &hash, &out_name)
                        .map_err(|_| PathError::BadName(out_name.clone()))?;
                    let s = format!(
                        "fixed:out:{}:{}:{}",
                        method_algo(method, hash.algo),
                        hash.to_base16(),
                        self.store_dir.full_path(&path)
                    );
                    hashes.insert(n.clone(), Hash::sha256(s.as_bytes()));
                }
                return Ok(DrvHash {
                    hashes,
                    kind: DrvHashKind::Regular,
                });
            }
            DerivationType::Impure => {
                return Ok(DrvHash {
                    hashes: all(&Hash::sha256(b"impure")),
                    kind: DrvHashKind::Deferred,
                });
            }
            _ => {}
        }
        let mut kind = if ty == DerivationType::Floating {
            DrvHashKind::Deferred
        } else {
            DrvHashKind::Regular
        };
        let mut inputs = Inputs::new();
        for (p, outputs) in &drv.input_drvs {
            let sp = store_path(&self.store_dir, "input derivation", p)?;
            let res = self
                .memo
                .get(&sp)
                .ok_or_else(|| PathError::Cycle(self.store_dir.full_path(&sp)))?;
            if res.kind == DrvHashKind::Deferred {
                kind = DrvHashKind::Deferred;
            }
            for o in outputs {
                let h = res.hashes.get(o).ok_or_else(|| PathError::MissingOutput {
                    input: self.store_dir.full_path(&sp),
                    output: String::from_utf8_lossy(o).into_owned(),
                })?;
                inputs
                    .entry(h.to_base16().into_bytes())
                    .or_default()
                    .insert(o.clone());
            }
        }
        let text = nix_unparse(&self.store_dir, drv, name, mask, Some(&inputs))?;
        Ok(DrvHash {
            hashes: all(&Hash::sha256(&text)),
            kind,
        })
    }

    /// The path Nix computes for each output, in the derivation's output order; `None` where
    /// the path is not known before the build (floating, impure, or deferred because an input
    /// is). This is what `derivationStrict` would write for a derivation with these inputs.
    pub fn output_paths(&mut self, drv: &Derivation) -> Result<Vec<OutputPath>, PathError> {
        let name = drv.name()?;
        let bad_name = |n: &str| PathError::BadName(n.to_string());
        match derivation_type(drv)? {
            DerivationType::Fixed => {
                let mut out = Vec::new();
                for (n, o) in &drv.outputs {
                    if let Ok(OutputKind::Fixed { method, hash, .. }) = o.kind() {
                        let p = make_fixed_output_path(&self.store_dir, method, &hash, &name)
                            .map_err(|_| bad_name(&name))?;
                        out.push((n.clone(), Some(p)));
                    }
                }
                Ok(out)
            }
            DerivationType::Floating | DerivationType::Impure => {
                Ok(drv.outputs.iter().map(|(n, _)| (n.clone(), None)).collect())
            }
            DerivationType::InputAddressed | DerivationType::Deferred => {
                let h = self.hash_derivation_modulo(drv, &name, true)?;
                let mut out = Vec::new();
                for (n, _) in &drv.outputs {
                    let path = match (h.kind, h.hashes.get(n)) {
                        (DrvHashKind::Regular, Some(hash)) => {
                            let o = String::from_utf8_lossy(n);
                            Some(
                                make_output_path(&self.store_dir, &o, hash, &name)
                                    .map_err(|_| bad_name(&output_path_name(&name, &o)))?,
                            )
                        }
                        _ => None,
                    };
                    out.push((n.clone(), path));
                }
                Ok(out)
            }
        }
    }
}
