//! The store path computations Nix does, and the derivation form they hash.
//!
//! Every store path is `<storedir>/<h>-<name>` where `<h>` is the Nix base32 of the SHA-256 of
//! the fingerprint `<type>:sha256:<hex>:<storedir>:<name>`, XOR-folded to 20 bytes
//! (`Store::makeStorePath` in Nix 2.8's `src/libstore/store-api.cc`). The `<type>` says what
//! kind of path it is: `text:<refs>` for files written by `builtins.toFile` and for `.drv`
//! files, `source` for recursive SHA-256 fixed outputs, `output:<id>` for everything built.
//!
//! [`nix_unparse`] prints a derivation the way Nix's `Derivation::unparse` does when it
//! hashes: maps sorted, duplicate keys resolved as Nix resolves them, fixed output paths
//! recomputed, and the fields Nix writes without escaping (output names and paths, input
//! paths, the system) left unescaped. For any file Nix wrote, this equals the file.

use std::collections::{BTreeMap, BTreeSet};

use sha2::Digest as _;
use thiserror::Error;

use super::hash::{Hash, HashAlgo};
use super::output::{method_algo, FileIngestionMethod, OutputError, OutputKind};
use super::print::{push_escaped, push_list, push_raw};
use super::store_path::{StoreDir, StorePath, StorePathError};
use super::{base32, Derivation};

/// Why a path computation could not be done.
#[derive(Debug, Error)]
pub enum PathError {
    #[error("the derivation has no `name` environment variable (nor `name` in `__json`), so its paths cannot be computed")]
    NoName,
    #[error("derivation name {0:?} is not valid in a store path")]
    BadName(String),
    #[error("{what} {path:?}: {source}")]
    StorePath {
        what: &'static str,
        path: String,
        source: StorePathError,
    },
    #[error("output {name:?}: {source}")]
    Output { name: String, source: OutputError },
    #[error("invalid derivation: {0}")]
    Type(String),
    #[error("cannot read input derivation {path}: {message}")]
    Load { path: String, message: String },
    #[error("input derivation {input} has no output {output:?}")]
    MissingOutput { input: String, output: String },
    #[error("input derivations form a cycle through {0}")]
    Cycle(String),
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `<type>:sha256:<hex>:<storedir>:<name>`, hashed, folded to 20 bytes: Nix's
/// `makeStorePath`.
pub fn make_store_path(
    store_dir: &StoreDir,
    ty: &str,
    inner_hash: &Hash,
    name: &str,
) -> Result<StorePath, StorePathError> {
    let fingerprint = format!(
        "{ty}:{}:{}:{}:{name}",
        inner_hash.algo,
        inner_hash.to_base16(),
        store_dir.as_str()
    );
    let digest = sha2::Sha256::digest(fingerprint.as_bytes());
    let mut folded = [0u8; 20];
    for (i, b) in digest.iter().enumerate() {
        folded[i % 20] ^= b;
    }
    StorePath::from_hash(&folded, name)
}

/// The name of output `output` of a derivation named `drv_name`: `drv_name` for `out`,
/// `drv_name-output` otherwise.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_string()
    } else {
        format!("{drv_name}-{output}")
    }
}

/// The path of an input-addressed output: `output:<id>` over the derivation's hash modulo.
pub fn make_output_path(
    store_dir: &StoreDir,
    output: &str,
    hash: &Hash,
    drv_name: &str,
) -> Result<StorePath, StorePathError> {
    let name = output_path_name(drv_name, output);
    make_store_path(store_dir, &format!("output:{output}"), hash, &name)
}

/// `<type>:<ref1>:<ref2>…` with the references sorted as Nix sorts store paths.
fn type_with_references(store_dir: &StoreDir, ty: &str, references: &[StorePath]) -> String {
    let refs: BTreeSet<&StorePath> = references.iter().collect();
    let mut s = ty.to_string();
    for r in refs {
        s.push(':');
        s.push_str(&store_dir.full_path(r));
    }
    s
}

/// The path of a text file with `contents` and `references`, as `builtins.toFile` and
/// `.drv` files get it.
pub fn make_text_path(
    store_dir: &StoreDir,
    name: &str,
    contents: &[u8],
    references: &[StorePath],
) -> Result<StorePath, StorePathError> {
    let ty = type_with_references(store_dir, "text", references);
    make_store_path(store_dir, &ty, &Hash::sha256(contents), name)
}

/// The path of a fixed output (or of a path added with a known hash and no references).
pub fn make_fixed_output_path(
    store_dir: &StoreDir,
    method: FileIngestionMethod,
    hash: &Hash,
    name: &str,
) -> Result<StorePath, StorePathError> {
    if hash.algo == HashAlgo::Sha256 && method == FileIngestionMethod::Recursive {
        return make_store_path(store_dir, "source", hash, name);
    }
    let inner = format!(
        "fixed:out:{}{}:{}:",
        method.prefix(),
        hash.algo,
        hash.to_base16()
    );
    make_store_path(
        store_dir,
        "output:out",
        &Hash::sha256(inner.as_bytes()),
        name,
    )
}

/// `/<base32 of sha256("nix-output:<output>")>`: what Nix puts in the environment for outputs
/// whose path is not known when the derivation is written.
pub fn hash_placeholder(output: &str) -> String {
    format!(
        "/{}",
        base32::encode(&Hash::sha256(format!("nix-output:{output}").as_bytes()).bytes)
    )
}

impl Derivation {
    /// The value of environment variable `key` (the last one, as Nix keeps it).
    pub fn env_var(&self, key: &[u8]) -> Option<&[u8]> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    /// The derivation's name, which Nix uses for the `.drv` file and the output paths: the
    /// `name` environment variable, or for `__structuredAttrs` derivations (whose
    /// environment holds only `__json` and the outputs) the `name` field of `__json`.
    pub fn name(&self) -> Result<String, PathError> {
        if let Some(name) = self.env_var(b"name") {
            return std::str::from_utf8(name)
                .map(str::to_string)
                .map_err(|_| PathError::BadName(lossy(name)));
        }
        let json = self.env_var(b"__json").ok_or(PathError::NoName)?;
        // Other strings in `__json` may hold invalid UTF-8; replacing those bytes cannot
        // change a valid name.
        let value: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(json))
            .map_err(|e| PathError::BadName(format!("__json is not valid JSON: {e}")))?;
        match value.get("name") {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            _ => Err(PathError::NoName),
        }
    }
}

/// What kind of derivation this is, from the kinds of its outputs (Nix's
/// `BasicDerivation::type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivationType {
    InputAddressed,
    Deferred,
    Fixed,
    Floating,
    Impure,
}

/// The derivation's type; fails where Nix fails (no outputs, mixed kinds, several fixed
/// outputs or one not named `out`, floating outputs with different hash algorithms).
pub fn derivation_type(drv: &Derivation) -> Result<DerivationType, PathError> {
    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut floating_algo = None;
    let mut fixed_name: Option<&[u8]> = None;
    for (name, o) in &drv.outputs {
        let kind = o.kind().map_err(|source| PathError::Output {
            name: lossy(name),
            source,
        })?;
        let label = match kind {
            OutputKind::InputAddressed { .. } => "input-addressed",
            OutputKind::Deferred => "deferred",
            OutputKind::Fixed { .. } => {
                fixed_name = Some(name);
                "fixed"
            }
            OutputKind::Impure { .. } => "impure",
            OutputKind::Floating { algo, .. } => {
                if floating_algo.is_some_and(|a| a != algo) {
                    return Err(PathError::Type(
                        "all floating outputs must use the same hash type".into(),
                    ));
                }
                floating_algo = Some(algo);
                "floating"
            }
        };
        *seen.entry(label).or_default() += 1;
    }
    if seen.len() > 1 {
        let kinds: Vec<&str> = seen.keys().copied().collect();
        return Err(PathError::Type(format!(
            "can't mix derivation output types ({})",
            kinds.join(", ")
        )));
    }
    let Some((&label, &count)) = seen.iter().next() else {
        return Err(PathError::Type("must have at least one output".into()));
    };
    Ok(match label {
        "input-addressed" => DerivationType::InputAddressed,
        "deferred" => DerivationType::Deferred,
        "impure" => DerivationType::Impure,
        "floating" => DerivationType::Floating,
        _ => {
            if count > 1 {
                return Err(PathError::Type("only one fixed output is allowed".into()));
            }
            if fixed_name != Some(b"out".as_slice()) {
                return Err(PathError::Type(
                    "single fixed output must be named \"out\"".into(),
                ));
            }
            DerivationType::Fixed
        }
    })
}

/// Parse `path` as a store path, naming `what` it is on failure.
pub(crate) fn store_path(
    store_dir: &StoreDir,
    what: &'static str,
    path: &[u8],
) -> Result<StorePath, PathError> {
    store_dir
        .parse_path(path)
        .map_err(|source| PathError::StorePath {
            what,
            path: lossy(path),
            source,
        })
}

/// Input derivations as Nix hashes them: either the paths with their output names, or (in
/// `hashDerivationModulo`) the hex hashes of the inputs with the output names used.
pub(crate) type Inputs = BTreeMap<Vec<u8>, BTreeSet<Vec<u8>>>;

/// The derivation printed as Nix's `Derivation::unparse(store, mask, actualInputs)` prints
/// it. `name` is the derivation's name (for fixed output paths). With `mask`, output paths
/// and the environment variables named after outputs are blanked.
pub(crate) fn nix_unparse(
    store_dir: &StoreDir,
    drv: &Derivation,
    name: &str,
    mask: bool,
    actual_inputs: Option<&Inputs>,
) -> Result<Vec<u8>, PathError> {
    let mut outputs = BTreeMap::new();
    for (n, o) in &drv.outputs {
        // Nix keeps the first of duplicate outputs.
        outputs.entry(n.as_slice()).or_insert(o);
    }
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(b"Derive([");
    for (i, (n, o)) in outputs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let kind = o.kind().map_err(|source| PathError::Output {
            name: lossy(n),
            source,
        })?;
        let (path, algo, hash) = match kind {
            OutputKind::InputAddressed { path } => {
                let p = store_path(store_dir, "output path", path)?;
                (store_dir.full_path(&p), String::new(), String::new())
            }
            OutputKind::Fixed { method, hash, .. } => {
                let p = make_fixed_output_path(
                    store_dir,
                    method,
                    &hash,
                    &output_path_name(name, &lossy(n)),
                )
                .map_err(|source| PathError::StorePath {
                    what: "fixed output path",
                    path: lossy(n),
                    source,
                })?;
                (
                    store_dir.full_path(&p),
                    method_algo(method, hash.algo),
                    hash.to_base16(),
                )
            }
            OutputKind::Floating { method, algo } => {
                (String::new(), method_algo(method, algo), String::new())
            }
            OutputKind::Deferred => (String::new(), String::new(), String::new()),
            OutputKind::Impure { method, algo } => {
                (String::new(), method_algo(method, algo), "impure".into())
            }
        };
        out.push(b'(');
        push_raw(&mut out, n);
        out.push(b',');
        push_raw(&mut out, if mask { b"" } else { path.as_bytes() });
        out.push(b',');
        push_raw(&mut out, algo.as_bytes());
        out.push(b',');
        push_raw(&mut out, hash.as_bytes());
        out.push(b')');
    }
    out.extend_from_slice(b"],[");
    let owned;
    let inputs = match actual_inputs {
        Some(inputs) => inputs,
        None => {
            let mut m = Inputs::new();
            for (p, names) in &drv.input_drvs {
                let sp = store_path(store_dir, "input derivation", p)?;
                // Nix keeps the last of duplicate input derivations.
                m.insert(
                    store_dir.full_path(&sp).into_bytes(),
                    names.iter().cloned().collect(),
                );
            }
            owned = m;
            &owned
        }
    };
    for (i, (p, names)) in inputs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'(');
        push_raw(&mut out, p);
        out.push(b',');
        push_list(&mut out, names.iter().map(Vec::as_slice), push_raw);
        out.push(b')');
    }
    out.extend_from_slice(b"],");
    let mut srcs = BTreeSet::new();
    for p in &drv.input_srcs {
        srcs.insert(store_dir.full_path(&store_path(store_dir, "input source", p)?));
    }
    push_list(&mut out, srcs.iter().map(|s| s.as_bytes()), push_raw);
    out.push(b',');
    push_raw(&mut out, &drv.platform);
    out.push(b',');
    push_escaped(&mut out, &drv.builder);
    out.push(b',');
    push_list(&mut out, drv.args.iter().map(Vec::as_slice), push_escaped);
    out.extend_from_slice(b",[");
    // Nix keeps the last of duplicate environment variables.
    let env: BTreeMap<&[u8], &[u8]> = drv
        .env
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    for (i, (k, v)) in env.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'(');
        push_escaped(&mut out, k);
        out.push(b',');
        let masked = mask && outputs.contains_key(k);
        push_escaped(&mut out, if masked { b"" } else { v });
        out.push(b')');
    }
    out.extend_from_slice(b"])");
    Ok(out)
}

/// The bytes Nix would write for this derivation (its canonical form).
pub fn canonical_bytes(store_dir: &StoreDir, drv: &Derivation) -> Result<Vec<u8>, PathError> {
    nix_unparse(store_dir, drv, &drv.name()?, false, None)
}

/// The path of the `.drv` file itself: a text path named `<name>.drv` over the canonical
/// contents, referencing the input sources and input derivations.
pub fn drv_path(store_dir: &StoreDir, drv: &Derivation) -> Result<StorePath, PathError> {
    let name = drv.name()?;
    let contents = nix_unparse(store_dir, drv, &name, false, None)?;
    let mut refs = Vec::with_capacity(drv.input_srcs.len() + drv.input_drvs.len());
    for p in &drv.input_srcs {
        refs.push(store_path(store_dir, "input source", p)?);
    }
    for (p, _) in &drv.input_drvs {
        refs.push(store_path(store_dir, "input derivation", p)?);
    }
    let file_name = format!("{name}.drv");
    make_text_path(store_dir, &file_name, &contents, &refs)
        .map_err(|_| PathError::BadName(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nix() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    #[test]
    fn text_path_matches_nix() {
        // `builtins.toFile "hello" "hello"` in Nix 2.8 with the default store dir.
        let p = make_text_path(&nix(), "hello", b"hello", &[]).unwrap();
        assert_eq!(
            nix().full_path(&p),
            "/nix/store/i4f75pn3bxkxdk2kld86k5qazq4cqj8i-hello"
        );
    }

    #[test]
    fn fixed_output_path_uses_source_for_recursive_sha256() {
        let h = Hash::sha256(b"x");
        let a = make_fixed_output_path(&nix(), FileIngestionMethod::Recursive, &h, "x").unwrap();
        let b = make_store_path(&nix(), "source", &h, "x").unwrap();
        assert_eq!(a, b);
        let c = make_fixed_output_path(&nix(), FileIngestionMethod::Flat, &h, "x").unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn output_names() {
        assert_eq!(output_path_name("hello", "out"), "hello");
        assert_eq!(output_path_name("hello", "dev"), "hello-dev");
    }

    #[test]
    fn placeholder_matches_nix() {
        // `builtins.placeholder "out"` in Nix.
        assert_eq!(
            hash_placeholder("out"),
            "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
        );
    }
}
