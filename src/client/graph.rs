//! A generator of derivation graphs with correct store paths, for `kiln demo` and the
//! integration tests.
//!
//! Derivations are made the way Nix makes them: a builder script stored as a
//! `builtins.toFile`-style text path, `/bin/sh -e <script>` as the builder, an environment with
//! `name`, `system`, `builder`, one variable per output and whatever the script reads, output
//! paths computed by `hashDerivationModulo` with empty output paths first and then filled in,
//! and each `.drv` written at its text path in the canonical form Nix writes.
//!
//! The default graph has layers of generic derivations with seeded random inputs, plus
//! special ones: a diamond, a derivation with outputs `out`, `lib` and `dev` whose dependent
//! uses two of them, an environment value that is not UTF-8 (written into the output), and a
//! log line that is not UTF-8. Every output lists the input paths it used, so references are
//! real. Builders can append start/end stamps (`date +%s%N`) to `<stamp dir>/stamps`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::derivation::{
    canonical_bytes, drv_path, make_text_path, Derivation, DerivationOutput, PathComputer,
    StoreDir, StorePath,
};

/// The bytes of the environment value that is not valid UTF-8 (`bytes-env`'s `payload`).
pub const NON_UTF8_ENV: &[u8] = b"caf\xff\xfe bytes";
/// The log line (without its newline) that `bytes-log` prints and that is not valid UTF-8.
pub const NON_UTF8_LOG: &[u8] = b"\xff\xfe this log line is not UTF-8";
/// The file in the stamp directory the builders append to.
pub const STAMP_FILE: &str = "stamps";

/// The builder every derivation runs, with `/bin/sh -e`.
const BUILDER_SCRIPT: &str = r#"# Kiln demo builder: every derivation of a Kiln demo graph runs this with /bin/sh -e.
stamp() {
  if [ -n "${stampDir:-}" ]; then
    echo "$name $1 $(date +%s%N)" >> "$stampDir/stamps"
  fi
}
stamp start
echo "kiln demo: building $name"
if [ -n "${logBytes:-}" ]; then
  printf '\377\376 this log line is not UTF-8\n'
fi
if [ -n "${sleep:-}" ]; then
  sleep "$sleep"
fi
if [ "${shouldFail:-}" = 1 ]; then
  echo "kiln demo: $name fails on purpose"
  stamp end
  exit 1
fi
for o in ${outputs:-out}; do
  eval "dir=\$$o"
  mkdir -p "$dir"
  {
    echo "$name $o"
    for i in ${inputs:-}; do
      echo "$i $(wc -c < "$i/data")"
    done
  } > "$dir/data"
done
if [ -n "${payload:-}" ]; then
  printf '%s\n' "$payload" > "$out/payload"
fi
if [ -n "${lib:-}" ] && [ -n "${dev:-}" ]; then
  echo "$lib" > "$dev/lib-path"
fi
stamp end
"#;

/// What graph to make.
#[derive(Debug, Clone)]
pub struct GraphOptions {
    /// Layers of generic derivations (each layer's derivations use 1 to 3 of the layer before).
    pub layers: usize,
    /// Generic derivations per layer.
    pub width: usize,
    /// Seeds the choice of inputs and sleeps: the same options give the same graph.
    pub seed: u64,
    /// Each builder sleeps between `sleep_ms.0` and `sleep_ms.1` milliseconds.
    pub sleep_ms: (u64, u64),
    /// Where builders append `<name> start|end <ns>` lines (to `stamps`); none when `None`.
    /// Must lie outside the store directory (agents get a private view of the store).
    pub stamp_dir: Option<PathBuf>,
    /// Names of derivations whose builder exits 1 after printing a log line.
    pub fail: BTreeSet<String>,
    /// The system of every derivation, e.g. `x86_64-linux`.
    pub system: String,
}

impl Default for GraphOptions {
    fn default() -> Self {
        GraphOptions {
            layers: 4,
            width: 4,
            seed: 1,
            sleep_ms: (100, 400),
            stamp_dir: None,
            fail: BTreeSet::new(),
            system: default_system(),
        }
    }
}

/// One derivation of a generated graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphDrv {
    pub name: String,
    /// Full path of the `.drv`.
    pub drv_path: String,
    /// Output name -> full output path, sorted by name.
    pub outputs: Vec<(String, String)>,
    /// Input `.drv` path -> the outputs used from it.
    pub inputs: Vec<(String, Vec<String>)>,
    /// Its builder exits 1.
    pub fails: bool,
    /// It uses, directly or not, a derivation that fails: it can never be built.
    pub blocked: bool,
}

/// A generated graph.
#[derive(Debug, Clone)]
pub struct Graph {
    pub store_dir: StoreDir,
    /// Full path of the builder script (an input source of every derivation).
    pub builder: String,
    /// Every derivation, inputs before the derivations that use them.
    pub drvs: Vec<GraphDrv>,
}

impl Graph {
    /// Every `.drv` path, inputs first.
    pub fn drv_paths(&self) -> Vec<String> {
        self.drvs.iter().map(|d| d.drv_path.clone()).collect()
    }

    /// The derivation called `name`.
    pub fn get(&self, name: &str) -> Option<&GraphDrv> {
        self.drvs.iter().find(|d| d.name == name)
    }

    /// How many derivations should build successfully.
    pub fn expected_successes(&self) -> usize {
        self.drvs.iter().filter(|d| !d.fails && !d.blocked).count()
    }
}

/// This machine's system string as Nix spells it (`x86_64-linux`, `aarch64-darwin`, ...).
pub fn default_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        "arm" => "armv7l",
        a => a,
    };
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        o => o,
    };
    format!("{arch}-{os}")
}

/// SplitMix64: a tiny seeded generator whose sequence never changes with a crate version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next() % (hi - lo + 1)
    }
}

/// A derivation to make: its name, outputs, inputs (name, outputs) and extra environment.
struct Spec {
    name: String,
    outputs: Vec<&'static str>,
    inputs: Vec<(String, Vec<&'static str>)>,
    extra_env: Vec<(&'static str, Vec<u8>)>,
}

impl Spec {
    fn new(name: impl Into<String>, inputs: Vec<(String, Vec<&'static str>)>) -> Spec {
        Spec {
            name: name.into(),
            outputs: vec!["out"],
            inputs,
            extra_env: Vec::new(),
        }
    }
}

fn out_of(name: &str) -> (String, Vec<&'static str>) {
    (name.to_string(), vec!["out"])
}

/// The specs of the graph, inputs before dependents.
fn specs(opts: &GraphOptions) -> Vec<Spec> {
    let mut rng = Rng(opts.seed);
    let width = opts.width.max(1);
    let layers = opts.layers.max(1);
    let mut specs = Vec::new();
    // Special derivations of layer 0.
    specs.push(Spec::new("diamond-top", vec![]));
    let mut multi = Spec::new("multi", vec![]);
    multi.outputs = vec!["out", "lib", "dev"];
    specs.push(multi);
    // Generic layers.
    let mut prev: Vec<String> = Vec::new();
    for layer in 0..layers {
        let mut this = Vec::new();
        let mut layer_specs = Vec::new();
        for i in 0..width {
            let name = format!("layer{layer}-{i}");
            let mut inputs = Vec::new();
            if !prev.is_empty() {
                let n = rng.between(1, 3.min(prev.len() as u64)) as usize;
                let mut pool = prev.clone();
                for _ in 0..n {
                    let k = rng.between(0, pool.len() as u64 - 1) as usize;
                    inputs.push(out_of(&pool.swap_remove(k)));
                }
            }
            if layer == 1 && i == 0 {
                inputs.push(out_of("multi"));
            }
            layer_specs.push(Spec::new(name.clone(), inputs));
            this.push(name);
        }
        // Every derivation of the layer before is used by one of this layer, so that the last
        // derivation's closure is the whole graph.
        for p in &prev {
            let used = layer_specs
                .iter()
                .any(|s| s.inputs.iter().any(|(n, _)| n == p));
            if !used {
                let k = rng.between(0, layer_specs.len() as u64 - 1) as usize;
                layer_specs[k].inputs.push(out_of(p));
            }
        }
        specs.extend(layer_specs);
        prev = this;
    }
    let first = "layer0-0".to_string();
    // The diamond: top -> left, right -> bottom.
    specs.push(Spec::new(
        "diamond-left",
        vec![out_of("diamond-top"), out_of(&first)],
    ));
    specs.push(Spec::new("diamond-right", vec![out_of("diamond-top")]));
    specs.push(Spec::new(
        "diamond-bottom",
        vec![out_of("diamond-left"), out_of("diamond-right")],
    ));
    // Two outputs of one derivation used by one dependent.
    specs.push(Spec::new(
        "uses-lib-dev",
        vec![("multi".to_string(), vec!["lib", "dev"])],
    ));
    // Bytes that are not UTF-8: in an environment value, and in the log.
    let mut env = Spec::new("bytes-env", vec![out_of(&first)]);
    env.extra_env.push(("payload", NON_UTF8_ENV.to_vec()));
    specs.push(env);
    let mut log = Spec::new("bytes-log", vec![out_of("bytes-env")]);
    log.extra_env.push(("logBytes", b"1".to_vec()));
    specs.push(log);
    // One derivation that uses the ends of everything.
    let mut last: Vec<(String, Vec<&'static str>)> = prev.iter().map(|n| out_of(n)).collect();
    for n in ["diamond-bottom", "uses-lib-dev", "bytes-log"] {
        last.push(out_of(n));
    }
    specs.push(Spec::new("final", last));
    for s in &mut specs {
        let ms = rng.between(opts.sleep_ms.0, opts.sleep_ms.1);
        s.extra_env.push((
            "sleep",
            format!("{}.{:03}", ms / 1000, ms % 1000).into_bytes(),
        ));
    }
    specs
}

/// Make the graph in `store` (created if needed): the builder script and every `.drv`.
pub fn generate(store: &Path, opts: &GraphOptions) -> anyhow::Result<Graph> {
    std::fs::create_dir_all(store)
        .with_context(|| format!("failed to create store directory {}", store.display()))?;
    let store_dir = StoreDir::new(store)
        .with_context(|| format!("{} cannot be a store directory", store.display()))?;
    if let Some(d) = &opts.stamp_dir {
        std::fs::create_dir_all(d)
            .with_context(|| format!("failed to create stamp directory {}", d.display()))?;
    }
    let script = make_text_path(
        &store_dir,
        "kiln-demo-builder.sh",
        BUILDER_SCRIPT.as_bytes(),
        &[],
    )
    .context("failed to compute the builder script's store path")?;
    let script_path = store_dir.full_path(&script);
    write_store_file(&script_path, BUILDER_SCRIPT.as_bytes())?;

    let loader_dir = store_dir.clone();
    let mut loader = move |p: &StorePath| -> anyhow::Result<Derivation> {
        let full = loader_dir.full_path(p);
        let bytes = std::fs::read(&full).with_context(|| format!("failed to read {full}"))?;
        Derivation::parse(&bytes).with_context(|| format!("{full} is not a valid .drv"))
    };
    let mut computer = PathComputer::new(store_dir.clone(), &mut loader);

    let mut made: BTreeMap<String, GraphDrv> = BTreeMap::new();
    let mut order = Vec::new();
    for spec in specs(opts) {
        let drv = make_drv(&spec, &made, opts, &script_path, &store_dir, &mut computer)
            .with_context(|| format!("failed to make derivation {}", spec.name))?;
        order.push(spec.name.clone());
        made.insert(spec.name.clone(), drv);
    }
    let drvs = order.into_iter().filter_map(|n| made.remove(&n)).collect();
    Ok(Graph {
        store_dir,
        builder: script_path,
        drvs,
    })
}

fn make_drv(
    spec: &Spec,
    made: &BTreeMap<String, GraphDrv>,
    opts: &GraphOptions,
    script: &str,
    store_dir: &StoreDir,
    computer: &mut PathComputer<'_>,
) -> anyhow::Result<GraphDrv> {
    let mut input_drvs = Vec::new();
    let mut input_paths = Vec::new();
    let mut blocked = false;
    for (name, outs) in &spec.inputs {
        let input = made.get(name).with_context(|| {
            format!("input {name} is not made yet (the specs are out of order)")
        })?;
        blocked |= input.fails || input.blocked;
        for o in outs {
            let (_, p) = input
                .outputs
                .iter()
                .find(|(n, _)| n == o)
                .with_context(|| format!("input {name} has no output {o}"))?;
            input_paths.push(p.clone());
        }
        let mut used: Vec<Vec<u8>> = outs.iter().map(|o| o.as_bytes().to_vec()).collect();
        used.sort();
        input_drvs.push((input.drv_path.as_bytes().to_vec(), used));
    }
    input_drvs.sort();
    input_paths.sort();
    let fails = opts.fail.contains(&spec.name);

    let mut env: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"builder".to_vec(), b"/bin/sh".to_vec()),
        (b"name".to_vec(), spec.name.as_bytes().to_vec()),
        (b"system".to_vec(), opts.system.as_bytes().to_vec()),
        (b"PATH".to_vec(), b"/usr/bin:/bin".to_vec()),
        (b"inputs".to_vec(), input_paths.join(" ").into_bytes()),
    ];
    if spec.outputs.len() > 1 {
        env.push((b"outputs".to_vec(), spec.outputs.join(" ").into_bytes()));
    }
    if let Some(d) = &opts.stamp_dir {
        env.push((
            b"stampDir".to_vec(),
            d.as_os_str().as_encoded_bytes().to_vec(),
        ));
    }
    if fails {
        env.push((b"shouldFail".to_vec(), b"1".to_vec()));
    }
    for (k, v) in &spec.extra_env {
        env.push((k.as_bytes().to_vec(), v.clone()));
    }
    // As Nix's derivationStrict: outputs (and their variables) empty while hashing.
    for o in &spec.outputs {
        env.push((o.as_bytes().to_vec(), Vec::new()));
    }
    env.sort();
    let mut outputs: Vec<(Vec<u8>, DerivationOutput)> = spec
        .outputs
        .iter()
        .map(|o| {
            (
                o.as_bytes().to_vec(),
                DerivationOutput::input_addressed(Vec::new()),
            )
        })
        .collect();
    outputs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut drv = Derivation {
        outputs,
        input_drvs,
        input_srcs: vec![script.as_bytes().to_vec()],
        platform: opts.system.as_bytes().to_vec(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-e".to_vec(), script.as_bytes().to_vec()],
        env,
    };

    let paths = computer
        .output_paths(&drv)
        .context("failed to compute the output paths")?;
    let mut out_list = Vec::new();
    for (name, path) in paths {
        let path = path.context(
            "an output path is not known before building (the graph must be input-addressed)",
        )?;
        let full = store_dir.full_path(&path);
        if let Some((_, o)) = drv.outputs.iter_mut().find(|(n, _)| *n == name) {
            o.path = full.as_bytes().to_vec();
        }
        if let Some((_, v)) = drv.env.iter_mut().find(|(k, _)| *k == name) {
            *v = full.as_bytes().to_vec();
        }
        out_list.push((String::from_utf8_lossy(&name).into_owned(), full));
    }
    let path = drv_path(store_dir, &drv).context("failed to compute the .drv path")?;
    let full = store_dir.full_path(&path);
    let bytes = canonical_bytes(store_dir, &drv).context("failed to print the .drv")?;
    write_store_file(&full, &bytes)?;
    Ok(GraphDrv {
        name: spec.name.clone(),
        drv_path: full,
        outputs: out_list,
        inputs: drv
            .input_drvs
            .iter()
            .map(|(p, o)| {
                let p = String::from_utf8_lossy(p).into_owned();
                (
                    p,
                    o.iter()
                        .map(|o| String::from_utf8_lossy(o).into_owned())
                        .collect(),
                )
            })
            .collect(),
        fails,
        blocked,
    })
}

/// Write a store file once, read-only as store files are. Store paths are named by their
/// contents, so an existing file already holds these bytes.
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

#[cfg(test)]
mod tests;
