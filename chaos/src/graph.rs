//! Derivation graphs for chaos runs, made with Kiln's own derivation code (correct store
//! paths, the canonical `.drv` form), shaped by a scenario's `[graph]` table: size, layers,
//! inputs per build, and per build a builder duration, an output size and whether the builder
//! fails — all drawn from the seed.
//!
//! Every build runs one builder script with `/bin/sh -e`. Each run of a builder creates its
//! own stamp file `<stamp-dir>/<name>.<pid>.<ns>` (`start …`, then `end built|failed …`), so
//! the checker counts builder runs per derivation from files no agent or coordinator writes.
//! Outputs are deterministic: `data` (the name and the input paths, which makes references)
//! and `blob`, a slice of a seeded incompressible input source, so uploads are as large as
//! drawn.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kiln::derivation::{
    canonical_bytes, drv_path, make_text_path, Derivation, DerivationOutput, PathComputer,
    StoreDir, StorePath,
};

use crate::rng::Rng;
use crate::scenario::GraphSpec;

/// The system only `agents.alt_agents` build.
pub const ALT_SYSTEM: &str = "kiln-chaos-alt";

const BUILDER_SCRIPT: &str = r#"# kiln-chaos builder: every derivation of a chaos graph runs this with /bin/sh -e.
run="$stampDir/$name.$$.$(date +%s%N)"
echo "start $(date +%s%N)" > "$run"
echo "kiln-chaos: building $name"
sleep "$sleep"
if [ "${shouldFail:-}" = 1 ]; then
  echo "kiln-chaos: $name fails on purpose"
  echo "end failed $(date +%s%N)" >> "$run"
  exit 1
fi
mkdir -p "$out"
{
  echo "$name"
  for i in $inputs; do
    echo "$i"
  done
} > "$out/data"
tail -c +"$((blobOffset + 1))" "$blob" | head -c "$size" > "$out/blob"
echo "end built $(date +%s%N)" >> "$run"
"#;

/// One derivation of a chaos graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChaosDrv {
    pub index: usize,
    /// `chaos-0007`: also the prefix of its stamp files.
    pub name: String,
    pub drv_path: String,
    pub out_path: String,
    pub layer: usize,
    /// Indexes of the derivations it uses.
    pub inputs: Vec<usize>,
    pub system: String,
    pub sleep_ms: u64,
    /// Bytes of its `blob` output file.
    pub size: u64,
    /// Its builder exits 1.
    pub fails: bool,
}

/// A generated graph.
#[derive(Debug, Clone)]
pub struct ChaosGraph {
    pub store_dir: StoreDir,
    pub stamp_dir: PathBuf,
    /// Every derivation, inputs before the derivations that use them.
    pub drvs: Vec<ChaosDrv>,
    /// Derivations nothing depends on (failing ones included).
    pub sinks: Vec<usize>,
}

impl ChaosGraph {
    /// The derivation with this `.drv` path.
    pub fn by_drv(&self, drv_path: &str) -> Option<&ChaosDrv> {
        self.drvs.iter().find(|d| d.drv_path == drv_path)
    }

    /// Output paths of the sinks that should succeed: the roots whose closure a Nix client
    /// copies.
    pub fn root_outputs(&self) -> Vec<String> {
        self.sinks
            .iter()
            .map(|&i| &self.drvs[i])
            .filter(|d| !d.fails)
            .map(|d| d.out_path.clone())
            .collect()
    }

    /// Derivations that cannot succeed: failing ones and those using them.
    pub fn doomed(&self) -> Vec<bool> {
        let mut doomed = vec![false; self.drvs.len()];
        for d in &self.drvs {
            doomed[d.index] = d.fails || d.inputs.iter().any(|&i| doomed[i]);
        }
        doomed
    }
}

/// The per-build choices, drawn before any path is computed.
struct Plan {
    layer: usize,
    inputs: Vec<usize>,
    system: String,
    sleep_ms: u64,
    size: u64,
    offset: u64,
    fails: bool,
}

fn plan(spec: &GraphSpec, seed: u64, system: &str, blob_len: u64) -> Vec<Plan> {
    let mut rng = Rng::derive(seed, &[0x67_72_61_70_68]);
    let n = spec.builds;
    let layers = spec.layers.clamp(1, n);
    let layer_of = |i: usize| i * layers / n;
    let mut plans: Vec<Plan> = Vec::with_capacity(n);
    for i in 0..n {
        let layer = layer_of(i);
        let mut inputs = Vec::new();
        if layer > 0 {
            let prev: Vec<usize> = (0..i).filter(|&j| layer_of(j) == layer - 1).collect();
            inputs.push(prev[rng.between(0, prev.len() as u64 - 1) as usize]);
            let earlier = (0..i).filter(|&j| layer_of(j) < layer).count();
            let extra = rng.between(0, spec.max_inputs.saturating_sub(1) as u64) as usize;
            for _ in 0..extra {
                let j = rng.between(0, earlier as u64 - 1) as usize;
                if !inputs.contains(&j) {
                    inputs.push(j);
                }
            }
            inputs.sort_unstable();
        }
        let kib = if rng.chance(spec.large_fraction) {
            rng.between(spec.large_output_kib[0], spec.large_output_kib[1])
        } else {
            rng.between(spec.output_kib[0], spec.output_kib[1])
        };
        let size = kib * 1024 + rng.between(0, 1023);
        let offset = rng.between(0, blob_len.saturating_sub(size));
        let system = if rng.chance(spec.alt_fraction) {
            ALT_SYSTEM.to_string()
        } else {
            system.to_string()
        };
        plans.push(Plan {
            layer,
            inputs,
            system,
            sleep_ms: rng.between(spec.duration_ms[0], spec.duration_ms[1]),
            size,
            offset,
            fails: false,
        });
    }
    let mut used = vec![false; n];
    for p in &plans {
        for &i in &p.inputs {
            used[i] = true;
        }
    }
    let sinks: Vec<usize> = (0..n).filter(|&i| !used[i]).collect();
    for k in rng.choose(sinks.len(), spec.failing) {
        plans[sinks[k]].fails = true;
    }
    plans
}

/// Make the graph in `store` (created if needed): the builder script, the blob, every `.drv`.
pub fn generate(
    store: &Path,
    stamp_dir: &Path,
    spec: &GraphSpec,
    seed: u64,
    system: &str,
) -> anyhow::Result<ChaosGraph> {
    std::fs::create_dir_all(store)
        .with_context(|| format!("failed to create store directory {}", store.display()))?;
    std::fs::create_dir_all(stamp_dir)
        .with_context(|| format!("failed to create stamp directory {}", stamp_dir.display()))?;
    let store_dir = StoreDir::new(store)
        .with_context(|| format!("{} cannot be a store directory", store.display()))?;
    let max_kib = spec.output_kib[1].max(spec.large_output_kib[1]);
    let blob_len = (max_kib + 64) * 1024;
    let blob_bytes = blob(seed, blob_len);
    let blob_path = text_file(&store_dir, "kiln-chaos-blob", &blob_bytes)?;
    let script_path = text_file(
        &store_dir,
        "kiln-chaos-builder.sh",
        BUILDER_SCRIPT.as_bytes(),
    )?;

    let plans = plan(spec, seed, system, blob_len);
    let loader_dir = store_dir.clone();
    let mut loader = move |p: &StorePath| -> anyhow::Result<Derivation> {
        let full = loader_dir.full_path(p);
        let bytes = std::fs::read(&full).with_context(|| format!("failed to read {full}"))?;
        Derivation::parse(&bytes).with_context(|| format!("{full} is not a valid .drv"))
    };
    let mut computer = PathComputer::new(store_dir.clone(), &mut loader);
    let mut drvs: Vec<ChaosDrv> = Vec::with_capacity(plans.len());
    for (i, p) in plans.into_iter().enumerate() {
        let name = format!("chaos-{i:04}");
        let env_inputs: Vec<String> = p.inputs.iter().map(|&j| drvs[j].out_path.clone()).collect();
        let mut env: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"builder".to_vec(), b"/bin/sh".to_vec()),
            (b"name".to_vec(), name.clone().into_bytes()),
            (b"system".to_vec(), p.system.clone().into_bytes()),
            (b"PATH".to_vec(), b"/usr/bin:/bin".to_vec()),
            (b"inputs".to_vec(), env_inputs.join(" ").into_bytes()),
            (
                b"stampDir".to_vec(),
                stamp_dir.as_os_str().as_encoded_bytes().to_vec(),
            ),
            (
                b"sleep".to_vec(),
                format!("{}.{:03}", p.sleep_ms / 1000, p.sleep_ms % 1000).into_bytes(),
            ),
            (b"size".to_vec(), p.size.to_string().into_bytes()),
            (b"blob".to_vec(), blob_path.clone().into_bytes()),
            (b"blobOffset".to_vec(), p.offset.to_string().into_bytes()),
            (b"out".to_vec(), Vec::new()),
        ];
        if p.fails {
            env.push((b"shouldFail".to_vec(), b"1".to_vec()));
        }
        env.sort();
        let mut input_drvs: Vec<(Vec<u8>, Vec<Vec<u8>>)> = p
            .inputs
            .iter()
            .map(|&j| (drvs[j].drv_path.clone().into_bytes(), vec![b"out".to_vec()]))
            .collect();
        input_drvs.sort();
        let mut input_srcs = vec![
            script_path.clone().into_bytes(),
            blob_path.clone().into_bytes(),
        ];
        input_srcs.sort();
        let mut drv = Derivation {
            outputs: vec![(
                b"out".to_vec(),
                DerivationOutput::input_addressed(Vec::new()),
            )],
            input_drvs,
            input_srcs,
            platform: p.system.clone().into_bytes(),
            builder: b"/bin/sh".to_vec(),
            args: vec![b"-e".to_vec(), script_path.clone().into_bytes()],
            env,
        };
        let paths = computer
            .output_paths(&drv)
            .with_context(|| format!("failed to compute the output path of {name}"))?;
        let out = paths
            .into_iter()
            .next()
            .and_then(|(_, p)| p)
            .with_context(|| format!("{name} has no input-addressed output path"))?;
        let out_path = store_dir.full_path(&out);
        drv.outputs[0].1.path = out_path.clone().into_bytes();
        if let Some((_, v)) = drv.env.iter_mut().find(|(k, _)| k == b"out") {
            *v = out_path.clone().into_bytes();
        }
        let path = drv_path(&store_dir, &drv)
            .with_context(|| format!("failed to compute the .drv path of {name}"))?;
        let full = store_dir.full_path(&path);
        let bytes = canonical_bytes(&store_dir, &drv)
            .with_context(|| format!("failed to print the .drv of {name}"))?;
        write_store_file(&full, &bytes)?;
        drvs.push(ChaosDrv {
            index: i,
            name,
            drv_path: full,
            out_path,
            layer: p.layer,
            inputs: p.inputs,
            system: p.system,
            sleep_ms: p.sleep_ms,
            size: p.size,
            fails: p.fails,
        });
    }
    let mut used = vec![false; drvs.len()];
    for d in &drvs {
        for &i in &d.inputs {
            used[i] = true;
        }
    }
    Ok(ChaosGraph {
        store_dir,
        stamp_dir: stamp_dir.to_path_buf(),
        sinks: (0..drvs.len()).filter(|&i| !used[i]).collect(),
        drvs,
    })
}

/// Seeded incompressible bytes.
fn blob(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = Rng::derive(seed, &[0x62_6c_6f_62]);
    let mut v = Vec::with_capacity(len as usize + 8);
    while (v.len() as u64) < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len as usize);
    v
}

/// Store `contents` as a text path named `name`; returns its full path.
fn text_file(store_dir: &StoreDir, name: &str, contents: &[u8]) -> anyhow::Result<String> {
    let p = make_text_path(store_dir, name, contents, &[])
        .with_context(|| format!("failed to compute the store path of {name}"))?;
    let full = store_dir.full_path(&p);
    write_store_file(&full, contents)?;
    Ok(full)
}

/// Write a store file once, read-only. Store paths are named by their contents, so an
/// existing file already holds these bytes.
fn write_store_file(path: &str, contents: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if Path::new(path).exists() {
        return Ok(());
    }
    let tmp = format!("{path}.tmp-{}", std::process::id());
    std::fs::write(&tmp, contents).with_context(|| format!("failed to write {tmp}"))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
        .with_context(|| format!("failed to make {tmp} read-only"))?;
    std::fs::rename(&tmp, path).with_context(|| format!("failed to rename {tmp} to {path}"))?;
    Ok(())
}

/// Builder runs per derivation name, from the stamp files: (runs started, runs that ended).
pub fn count_runs(
    stamp_dir: &Path,
) -> anyhow::Result<std::collections::BTreeMap<String, (u64, u64)>> {
    let mut runs = std::collections::BTreeMap::new();
    let entries = std::fs::read_dir(stamp_dir)
        .with_context(|| format!("failed to read the stamp dir {}", stamp_dir.display()))?;
    for e in entries {
        let e =
            e.with_context(|| format!("failed to read the stamp dir {}", stamp_dir.display()))?;
        let file = e.file_name().to_string_lossy().into_owned();
        let Some((name, _)) = file.split_once('.') else {
            continue;
        };
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let entry: &mut (u64, u64) = runs.entry(name.to_string()).or_default();
        entry.0 += 1;
        if text.lines().any(|l| l.starts_with("end ")) {
            entry.1 += 1;
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln::derivation::check;

    fn spec(builds: usize) -> GraphSpec {
        toml::from_str(&format!(
            "builds = {builds}\nlayers = 4\nmax_inputs = 3\nfailing = 2\nalt_fraction = 0.3\nlarge_fraction = 0.5\noutput_kib = [1, 4]\nlarge_output_kib = [8, 16]\n"
        ))
        .unwrap()
    }

    #[test]
    fn graphs_are_valid_layered_and_seeded() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let g = generate(
            &store,
            &dir.path().join("stamps"),
            &spec(24),
            5,
            "x86_64-linux",
        )
        .unwrap();
        assert_eq!(g.drvs.len(), 24);
        let sd = g.store_dir.clone();
        let mut loader = move |p: &StorePath| -> anyhow::Result<Derivation> {
            Ok(Derivation::parse(&std::fs::read(sd.full_path(p))?)?)
        };
        for d in &g.drvs {
            let drv = Derivation::parse(&std::fs::read(&d.drv_path).unwrap()).unwrap();
            let report = check(&g.store_dir, Path::new(&d.drv_path), &drv, &mut loader);
            assert!(report.is_ok(), "{report}");
            for &i in &d.inputs {
                assert!(i < d.index, "inputs come first");
                assert!(g.drvs[i].layer < d.layer);
            }
            if d.layer > 0 {
                assert!(d.inputs.iter().any(|&i| g.drvs[i].layer == d.layer - 1));
            }
        }
        assert_eq!(g.drvs.iter().filter(|d| d.fails).count(), 2);
        for d in g.drvs.iter().filter(|d| d.fails) {
            assert!(g.sinks.contains(&d.index), "only sinks fail");
        }
        assert!(g.drvs.iter().any(|d| d.system == ALT_SYSTEM));
        assert!(g.drvs.iter().any(|d| d.size > 8 * 1024));
        assert_eq!(g.root_outputs().len(), g.sinks.len() - 2);
        // The same seed gives the same graph; another seed another one.
        let again = generate(
            &dir.path().join("s2"),
            &dir.path().join("st2"),
            &spec(24),
            5,
            "x86_64-linux",
        )
        .unwrap();
        let names = |g: &ChaosGraph| {
            g.drvs
                .iter()
                .map(|d| (d.inputs.clone(), d.size, d.fails))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&g), names(&again));
        let other = generate(
            &dir.path().join("s3"),
            &dir.path().join("st3"),
            &spec(24),
            6,
            "x86_64-linux",
        )
        .unwrap();
        assert_ne!(names(&g), names(&other));
    }

    /// Pins down the builder's contract with the checker: one stamp file per run, and the
    /// outputs it writes.
    #[test]
    fn the_builder_stamps_each_run_and_writes_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let stamps = dir.path().join("stamps");
        let g = generate(&store, &stamps, &spec(4), 9, "x86_64-linux").unwrap();
        let d = g
            .drvs
            .iter()
            .find(|d| !d.fails && d.inputs.is_empty())
            .unwrap();
        let drv = Derivation::parse(&std::fs::read(&d.drv_path).unwrap()).unwrap();
        let out = dir.path().join("out");
        for _ in 0..2 {
            let mut cmd = std::process::Command::new("/bin/sh");
            cmd.env_clear();
            for (k, v) in &drv.env {
                cmd.env(
                    String::from_utf8_lossy(k).as_ref(),
                    String::from_utf8_lossy(v).as_ref(),
                );
            }
            cmd.env("out", &out).env("sleep", "0");
            for a in &drv.args {
                cmd.arg(String::from_utf8_lossy(a).as_ref());
            }
            let st = cmd.status().unwrap();
            assert!(st.success());
            std::fs::remove_dir_all(&out).ok();
        }
        let runs = count_runs(&stamps).unwrap();
        assert_eq!(runs[&d.name], (2, 2));
        let mut cmd = std::process::Command::new("/bin/sh");
        for (k, v) in &drv.env {
            cmd.env(
                String::from_utf8_lossy(k).as_ref(),
                String::from_utf8_lossy(v).as_ref(),
            );
        }
        cmd.env("out", &out).env("sleep", "0");
        cmd.args(
            drv.args
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned()),
        );
        assert!(cmd.status().unwrap().success());
        assert_eq!(std::fs::metadata(out.join("blob")).unwrap().len(), d.size);
        assert!(std::fs::read_to_string(out.join("data"))
            .unwrap()
            .starts_with(&d.name));
    }
}
