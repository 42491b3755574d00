//! Derivations for load: trivial builds with correct store paths (computed by Kiln's own
//! derivation code, as Nix computes them), each padded to a size and optionally using input
//! derivations, made in memory (the coordinator gets the `.drv` bytes in the submission).
//!
//! Names carry a run id, so two runs against one coordinator never submit the same derivation
//! (which would return the existing build instead of queueing a new one).

use std::collections::BTreeMap;

use anyhow::Context as _;
use kiln::derivation::{drv_path, Derivation, DerivationOutput, PathComputer, StoreDir, StorePath};

/// One generated derivation.
#[derive(Debug, Clone)]
pub struct GenDrv {
    pub drv_path: String,
    pub out_path: String,
    /// The `.drv` file (ATerm).
    pub bytes: Vec<u8>,
}

/// Makes derivations of one run.
pub struct DrvGen {
    store_dir: StoreDir,
    system: String,
    run: String,
    /// Pad each derivation's environment so the `.drv` is about this many bytes.
    target_bytes: usize,
    /// Input derivations every generated derivation uses, by store path.
    inputs: BTreeMap<StorePath, (Derivation, GenDrv)>,
}

impl DrvGen {
    pub fn new(store_dir: StoreDir, system: &str, run: &str, target_bytes: usize) -> DrvGen {
        DrvGen {
            store_dir,
            system: system.to_string(),
            run: run.to_string(),
            target_bytes,
            inputs: BTreeMap::new(),
        }
    }

    /// Make `n` input derivations (no inputs of their own) that every later derivation uses;
    /// returns them (submit them first, or with the first request).
    pub fn make_inputs(&mut self, n: usize) -> anyhow::Result<Vec<GenDrv>> {
        let mut made = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("load-{}-input-{i}", self.run);
            let (drv, g) = self.make_with(&name, &BTreeMap::new())?;
            let p = self
                .store_dir
                .parse_path(g.drv_path.as_bytes())
                .with_context(|| format!("generated .drv path {} does not parse", g.drv_path))?;
            self.inputs.insert(p, (drv, g.clone()));
            made.push(g);
        }
        Ok(made)
    }

    /// The `i`th build of the run, using every input made by [`DrvGen::make_inputs`].
    pub fn make(&self, i: u64) -> anyhow::Result<GenDrv> {
        let name = format!("load-{}-{i}", self.run);
        Ok(self.make_with(&name, &self.inputs)?.1)
    }

    fn make_with(
        &self,
        name: &str,
        inputs: &BTreeMap<StorePath, (Derivation, GenDrv)>,
    ) -> anyhow::Result<(Derivation, GenDrv)> {
        let input_outs: Vec<&str> = inputs.values().map(|(_, g)| g.out_path.as_str()).collect();
        let script = format!("echo {name} > $out");
        let mut env: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"builder".to_vec(), b"/bin/sh".to_vec()),
            (b"inputs".to_vec(), input_outs.join(" ").into_bytes()),
            (b"name".to_vec(), name.as_bytes().to_vec()),
            (b"out".to_vec(), Vec::new()),
            (b"system".to_vec(), self.system.as_bytes().to_vec()),
        ];
        let mut drv = Derivation {
            outputs: vec![(b"out".to_vec(), DerivationOutput::default())],
            input_drvs: inputs
                .values()
                .map(|(_, g)| (g.drv_path.clone().into_bytes(), vec![b"out".to_vec()]))
                .collect(),
            input_srcs: vec![],
            platform: self.system.as_bytes().to_vec(),
            builder: b"/bin/sh".to_vec(),
            args: vec![b"-c".to_vec(), script.into_bytes()],
            env: Vec::new(),
        };
        drv.input_drvs.sort();
        // The size so far: the .drv without padding, with the output path twice (outputs
        // and env) — a store path is the store dir plus 34 characters plus the name.
        drv.env = env.clone();
        let base = drv.print().len()
            + 2 * (self.store_dir.as_str().len() + 34 + name.len())
            + "(\"pad\",\"\")".len()
            + 1;
        let pad = self.target_bytes.saturating_sub(base);
        env.push((b"pad".to_vec(), filler(name, pad).into_bytes()));
        env.sort();
        drv.env = env;
        let mut loader = |p: &StorePath| -> anyhow::Result<Derivation> {
            inputs
                .get(p)
                .map(|(d, _)| d.clone())
                .with_context(|| format!("{p} is not an input of this load run"))
        };
        let mut pc = PathComputer::new(self.store_dir.clone(), &mut loader);
        let paths = pc
            .output_paths(&drv)
            .with_context(|| format!("failed to compute the output path of {name}"))?;
        let out = paths
            .into_iter()
            .next()
            .and_then(|(_, p)| p)
            .with_context(|| format!("{name} has no input-addressed output path"))?;
        let out_path = self.store_dir.full_path(&out);
        drv.outputs[0].1.path = out_path.clone().into_bytes();
        if let Some((_, v)) = drv.env.iter_mut().find(|(k, _)| k == b"out") {
            *v = out_path.clone().into_bytes();
        }
        let path = drv_path(&self.store_dir, &drv)
            .with_context(|| format!("failed to compute the .drv path of {name}"))?;
        let bytes = drv.print();
        Ok((
            drv,
            GenDrv {
                drv_path: self.store_dir.full_path(&path),
                out_path,
                bytes,
            },
        ))
    }
}

/// `len` printable bytes that differ per derivation (a build's environment, as big as a real
/// one's).
fn filler(name: &str, len: usize) -> String {
    let mut s = String::with_capacity(len + 16);
    let mut x: u64 = name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789 ";
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push(ALPHABET[(x % ALPHABET.len() as u64) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivations_have_their_size_inputs_and_correct_paths() {
        let store = StoreDir::new("/nix/store").unwrap();
        let mut g = DrvGen::new(store.clone(), "x86_64-linux", "t1", 1536);
        let inputs = g.make_inputs(5).unwrap();
        let d = g.make(7).unwrap();
        let parsed = Derivation::parse(&d.bytes).unwrap();
        assert_eq!(parsed.input_drvs.len(), 5);
        for i in &inputs {
            assert!(parsed
                .input_drvs
                .iter()
                .any(|(p, _)| p == i.drv_path.as_bytes()));
        }
        // Within 5 % of the target size.
        assert!(
            (1460..=1612).contains(&d.bytes.len()),
            "{} bytes",
            d.bytes.len()
        );
        // The path is the one the contents give, and the output path is Nix's.
        let again = drv_path(&store, &parsed).unwrap();
        assert_eq!(store.full_path(&again), d.drv_path);
        assert_eq!(parsed.outputs[0].1.path, d.out_path.as_bytes());
        assert_ne!(g.make(8).unwrap().drv_path, d.drv_path);
    }
}
