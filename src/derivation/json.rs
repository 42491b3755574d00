//! The JSON `nix show-derivation` prints (Nix 2.8, `src/nix/show-derivation.cc` with the
//! indenting writer of `src/libutil/json.cc`), written over bytes: strings escape `"` `\`
//! `\n` `\r` `\t` and other bytes below 0x20 as `\u00XX`, and every other byte (including
//! invalid UTF-8) goes out raw, exactly as Nix writes it. serde_json cannot do this because it
//! only writes valid UTF-8.

use std::collections::{BTreeMap, BTreeSet};

use super::output::{method_algo, OutputKind};
use super::paths::{make_fixed_output_path, output_path_name, store_path, PathError};
use super::store_path::StoreDir;
use super::Derivation;

/// Append `s` as a JSON string the way Nix's `toJSON` does.
pub(crate) fn push_json_string(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// An indenting JSON writer with Nix's layout: each member on its own line, two spaces per
/// level, `"key": value`, and empty containers as `{}` / `[]`.
pub(crate) struct JsonWriter {
    pub out: Vec<u8>,
    /// One entry per open container: whether nothing has been written in it yet.
    first: Vec<bool>,
}

impl JsonWriter {
    pub fn new() -> JsonWriter {
        JsonWriter {
            out: Vec::new(),
            first: Vec::new(),
        }
    }

    fn comma(&mut self) {
        if let Some(first) = self.first.last_mut() {
            if *first {
                *first = false;
            } else {
                self.out.push(b',');
            }
        }
        self.newline();
    }

    fn newline(&mut self) {
        self.out.push(b'\n');
        let n = self.first.len() * 2;
        self.out.resize(self.out.len() + n, b' ');
    }

    pub fn open(&mut self, c: u8) {
        self.out.push(c);
        self.first.push(true);
    }

    pub fn close(&mut self, c: u8) {
        let empty = self.first.pop().unwrap_or(true);
        if !empty {
            self.newline();
        }
        self.out.push(c);
    }

    pub fn key(&mut self, k: &[u8]) {
        self.comma();
        push_json_string(&mut self.out, k);
        self.out.extend_from_slice(b": ");
    }

    pub fn attr(&mut self, k: &[u8], v: &[u8]) {
        self.key(k);
        push_json_string(&mut self.out, v);
    }

    pub fn elem(&mut self, v: &[u8]) {
        self.comma();
        push_json_string(&mut self.out, v);
    }
}

/// Write one derivation's JSON object (the value under its drv path). `drv_name` is the
/// name from the `.drv` path, which Nix uses to recompute fixed output paths.
pub(crate) fn write_derivation(
    w: &mut JsonWriter,
    store_dir: &StoreDir,
    drv: &Derivation,
    drv_name: &str,
) -> Result<(), PathError> {
    w.open(b'{');
    w.key(b"outputs");
    w.open(b'{');
    // Nix holds outputs in a map (sorted; the first of duplicates wins).
    let mut outputs = BTreeMap::new();
    for (n, o) in &drv.outputs {
        outputs.entry(n.as_slice()).or_insert(o);
    }
    for (n, o) in outputs {
        let kind = o.kind().map_err(|source| PathError::Output {
            name: String::from_utf8_lossy(n).into_owned(),
            source,
        })?;
        w.key(n);
        w.open(b'{');
        match kind {
            OutputKind::InputAddressed { path } => {
                let p = store_path(store_dir, "output path", path)?;
                w.attr(b"path", store_dir.full_path(&p).as_bytes());
            }
            OutputKind::Fixed { method, hash, .. } => {
                let name = output_path_name(drv_name, &String::from_utf8_lossy(n));
                let p = make_fixed_output_path(store_dir, method, &hash, &name)
                    .map_err(|_| PathError::BadName(name))?;
                w.attr(b"path", store_dir.full_path(&p).as_bytes());
                w.attr(b"hashAlgo", method_algo(method, hash.algo).as_bytes());
                w.attr(b"hash", hash.to_base16().as_bytes());
            }
            OutputKind::Floating { method, algo } => {
                w.attr(b"hashAlgo", method_algo(method, algo).as_bytes());
            }
            OutputKind::Deferred => {}
            OutputKind::Impure { method, algo } => {
                w.attr(b"hashAlgo", method_algo(method, algo).as_bytes());
                w.key(b"impure");
                w.out.extend_from_slice(b"true");
            }
        }
        w.close(b'}');
    }
    w.close(b'}');

    w.key(b"inputSrcs");
    w.open(b'[');
    let mut srcs = BTreeSet::new();
    for p in &drv.input_srcs {
        srcs.insert(store_dir.full_path(&store_path(store_dir, "input source", p)?));
    }
    for s in srcs {
        w.elem(s.as_bytes());
    }
    w.close(b']');

    w.key(b"inputDrvs");
    w.open(b'{');
    let mut inputs = BTreeMap::new();
    for (p, names) in &drv.input_drvs {
        let sp = store_path(store_dir, "input derivation", p)?;
        // Nix keeps the last of duplicate input derivations.
        inputs.insert(
            store_dir.full_path(&sp),
            names.iter().collect::<BTreeSet<_>>(),
        );
    }
    for (p, names) in inputs {
        w.key(p.as_bytes());
        w.open(b'[');
        for n in names {
            w.elem(n);
        }
        w.close(b']');
    }
    w.close(b'}');

    w.attr(b"system", &drv.platform);
    w.attr(b"builder", &drv.builder);
    w.key(b"args");
    w.open(b'[');
    for a in &drv.args {
        w.elem(a);
    }
    w.close(b']');

    w.key(b"env");
    w.open(b'{');
    // Nix keeps the last of duplicate environment variables.
    let env: BTreeMap<&[u8], &[u8]> = drv
        .env
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    for (k, v) in env {
        w.attr(k, v);
    }
    w.close(b'}');
    w.close(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_nix_does() {
        let mut out = Vec::new();
        push_json_string(&mut out, b"a\"\\\n\r\t\x01\x1f\x7f\xff/");
        assert_eq!(out, b"\"a\\\"\\\\\\n\\r\\t\\u0001\\u001f\x7f\xff/\"");
    }

    #[test]
    fn layout_matches_nix() {
        let mut w = JsonWriter::new();
        w.open(b'{');
        w.key(b"a");
        w.open(b'{');
        w.close(b'}');
        w.key(b"b");
        w.open(b'[');
        w.elem(b"x");
        w.elem(b"y");
        w.close(b']');
        w.close(b'}');
        assert_eq!(
            String::from_utf8(w.out).unwrap(),
            "{\n  \"a\": {},\n  \"b\": [\n    \"x\",\n    \"y\"\n  ]\n}"
        );
    }
}
