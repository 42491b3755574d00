//! The builder's environment, built the way Nix's `initEnv` builds it.
//!
//! Order matters and follows Nix: first `PATH=/path-not-set`, `HOME=/homeless-shelter`,
//! `NIX_STORE`, `NIX_BUILD_CORES=1`; then every pair of the derivation's env (raw bytes: Nix
//! accepts any bytes, so nothing here assumes UTF-8), so a derivation may override those four;
//! then `NIX_BUILD_TOP`, `TMPDIR`, `TEMPDIR`, `TMP`, `TEMP`, `PWD` (the build dir),
//! `NIX_LOG_FD=2` and `TERM=xterm-256color`, which a derivation cannot override.
//!
//! `passAsFile` (a whitespace-separated list of variable names): each named value is written to
//! `<build dir>/.attr-<nix base32 sha256 of the name>` and `<name>Path` is set to that file, as
//! Nix does. `__structuredAttrs` (a `__json` variable): best effort — the JSON is written to
//! `.attrs.json` with an `outputs` object (name -> path) added, `NIX_ATTRS_JSON_FILE` points to
//! it and the derivation's other variables are not exported; `.attrs.sh` is not written.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;
use std::path::Path;

use kiln::derivation::{base32, Derivation, Hash};

/// A file the builder expects in its build dir before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildFile {
    /// Name relative to the build dir.
    pub name: String,
    pub contents: Vec<u8>,
}

/// The builder's environment (in the order it was set; later pairs win) and the files to write.
#[derive(Debug, Clone, Default)]
pub struct BuildEnv {
    pub vars: Vec<(Vec<u8>, Vec<u8>)>,
    pub files: Vec<BuildFile>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("environment variable name {0:?} contains '=' or NUL, or is empty")]
    BadName(String),
    #[error("value of environment variable {0:?} contains a NUL byte")]
    NulInValue(String),
    #[error("__json is not valid JSON: {0}")]
    BadStructuredAttrs(serde_json::Error),
}

impl BuildEnv {
    fn set(&mut self, name: &[u8], value: &[u8]) {
        self.vars.retain(|(n, _)| n != name);
        self.vars.push((name.to_vec(), value.to_vec()));
    }

    /// The last value of `name`, if set.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.vars
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The pairs as `OsString`s, ready for `Command::envs`, checked for what `execve` refuses.
    pub fn os_vars(&self) -> Result<Vec<(OsString, OsString)>, EnvError> {
        self.vars
            .iter()
            .map(|(n, v)| {
                let shown = || String::from_utf8_lossy(n).into_owned();
                if n.is_empty() || n.contains(&b'=') || n.contains(&0) {
                    return Err(EnvError::BadName(shown()));
                }
                if v.contains(&0) {
                    return Err(EnvError::NulInValue(shown()));
                }
                Ok((OsString::from_vec(n.clone()), OsString::from_vec(v.clone())))
            })
            .collect()
    }
}

/// Builds the environment of `drv` for a builder running in `build_top`.
/// `outputs` maps output names to the store paths the builder must create.
pub fn build_env(
    drv: &Derivation,
    outputs: &[(String, String)],
    store_dir: &Path,
    build_top: &Path,
) -> Result<BuildEnv, EnvError> {
    let top = build_top.as_os_str().as_encoded_bytes();
    let mut env = BuildEnv::default();
    env.set(b"PATH", b"/path-not-set");
    env.set(b"HOME", b"/homeless-shelter");
    env.set(b"NIX_STORE", store_dir.as_os_str().as_encoded_bytes());
    env.set(b"NIX_BUILD_CORES", b"1");

    if let Some(json) = lookup(drv, b"__json") {
        structured_attrs(&mut env, json, outputs, top)?;
    } else {
        plain_attrs(&mut env, drv, top);
    }

    for name in [
        &b"NIX_BUILD_TOP"[..],
        b"TMPDIR",
        b"TEMPDIR",
        b"TMP",
        b"TEMP",
        b"PWD",
    ] {
        env.set(name, top);
    }
    env.set(b"NIX_LOG_FD", b"2");
    env.set(b"TERM", b"xterm-256color");
    Ok(env)
}

fn lookup<'a>(drv: &'a Derivation, name: &[u8]) -> Option<&'a [u8]> {
    drv.env
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

fn plain_attrs(env: &mut BuildEnv, drv: &Derivation, top: &[u8]) {
    let pass_as_file: Vec<&[u8]> = lookup(drv, b"passAsFile")
        .map(|v| {
            v.split(|c| c.is_ascii_whitespace())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    for (name, value) in &drv.env {
        if !pass_as_file.contains(&name.as_slice()) {
            env.set(name, value);
            continue;
        }
        let file = format!(".attr-{}", base32::encode(&Hash::sha256(name).bytes));
        let mut path_var = name.clone();
        path_var.extend_from_slice(b"Path");
        let mut path = top.to_vec();
        path.push(b'/');
        path.extend_from_slice(file.as_bytes());
        env.set(&path_var, &path);
        env.files.push(BuildFile {
            name: file,
            contents: value.clone(),
        });
    }
}

fn structured_attrs(
    env: &mut BuildEnv,
    json: &[u8],
    outputs: &[(String, String)],
    top: &[u8],
) -> Result<(), EnvError> {
    let mut attrs: serde_json::Value =
        serde_json::from_slice(json).map_err(EnvError::BadStructuredAttrs)?;
    if let Some(obj) = attrs.as_object_mut() {
        let outs = outputs
            .iter()
            .map(|(n, p)| (n.clone(), serde_json::Value::String(p.clone())))
            .collect();
        obj.insert("outputs".into(), serde_json::Value::Object(outs));
    }
    let contents = serde_json::to_vec(&attrs).map_err(EnvError::BadStructuredAttrs)?;
    let mut path = top.to_vec();
    path.extend_from_slice(b"/.attrs.json");
    env.set(b"NIX_ATTRS_JSON_FILE", &path);
    env.files.push(BuildFile {
        name: ".attrs.json".into(),
        contents,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv(env: &[(&[u8], &[u8])]) -> Derivation {
        Derivation {
            env: env.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
            ..Derivation::default()
        }
    }

    fn outputs() -> Vec<(String, String)> {
        vec![("out".into(), "/s/aaaa-x".into())]
    }

    #[test]
    fn defaults_then_derivation_then_fixed_variables() {
        let d = drv(&[
            (b"PATH", b"/bin"),
            (b"TMPDIR", b"/elsewhere"),
            (b"out", b"/s/aaaa-x"),
        ]);
        let env = build_env(&d, &outputs(), Path::new("/s"), Path::new("/b")).unwrap();
        assert_eq!(
            env.get(b"PATH"),
            Some(&b"/bin"[..]),
            "a derivation overrides PATH"
        );
        assert_eq!(env.get(b"HOME"), Some(&b"/homeless-shelter"[..]));
        assert_eq!(env.get(b"NIX_STORE"), Some(&b"/s"[..]));
        assert_eq!(env.get(b"NIX_BUILD_CORES"), Some(&b"1"[..]));
        assert_eq!(
            env.get(b"TMPDIR"),
            Some(&b"/b"[..]),
            "TMPDIR is the build dir"
        );
        assert_eq!(env.get(b"NIX_BUILD_TOP"), Some(&b"/b"[..]));
        assert_eq!(env.get(b"NIX_LOG_FD"), Some(&b"2"[..]));
        assert_eq!(env.get(b"TERM"), Some(&b"xterm-256color"[..]));
        assert_eq!(env.get(b"out"), Some(&b"/s/aaaa-x"[..]));
        assert_eq!(env.vars.iter().filter(|(n, _)| n == b"TMPDIR").count(), 1);
    }

    #[test]
    fn values_are_bytes_not_utf8() {
        let value: &[u8] = &[0xff, 0xfe, b'a', 0x80];
        let env = build_env(
            &drv(&[(b"weird", value)]),
            &outputs(),
            Path::new("/s"),
            Path::new("/b"),
        )
        .unwrap();
        let os = env.os_vars().unwrap();
        let (_, v) = os.iter().find(|(n, _)| n == "weird").unwrap();
        assert_eq!(v.as_encoded_bytes(), value);
    }

    #[test]
    fn nul_in_a_value_is_refused_with_the_name() {
        let env = build_env(
            &drv(&[(b"bad", b"a\0b")]),
            &outputs(),
            Path::new("/s"),
            Path::new("/b"),
        )
        .unwrap();
        let err = env.os_vars().unwrap_err().to_string();
        assert!(err.contains("bad"), "{err}");
    }

    #[test]
    fn pass_as_file_writes_a_file_and_sets_name_path() {
        let d = drv(&[
            (b"passAsFile", b" big\tother "),
            (b"big", &[0xff, b'x', b'\n']),
            (b"small", b"s"),
        ]);
        let env = build_env(&d, &outputs(), Path::new("/s"), Path::new("/b")).unwrap();
        assert_eq!(env.get(b"big"), None, "passed as a file, not as a variable");
        assert_eq!(env.get(b"small"), Some(&b"s"[..]));
        // Nix names the file after the sha256 of the variable name, in Nix base32.
        let name = format!(".attr-{}", base32::encode(&Hash::sha256(b"big").bytes));
        assert_eq!(env.get(b"bigPath"), Some(format!("/b/{name}").as_bytes()));
        assert_eq!(
            env.files,
            vec![BuildFile {
                name,
                contents: vec![0xff, b'x', b'\n']
            }]
        );
    }

    #[test]
    fn structured_attrs_write_attrs_json_with_outputs() {
        let d = drv(&[
            (b"__json", br#"{"a":1,"outputs":["out"]}"#),
            (b"hidden", b"x"),
        ]);
        let env = build_env(&d, &outputs(), Path::new("/s"), Path::new("/b")).unwrap();
        assert_eq!(
            env.get(b"NIX_ATTRS_JSON_FILE"),
            Some(&b"/b/.attrs.json"[..])
        );
        assert_eq!(env.get(b"hidden"), None);
        let json: serde_json::Value = serde_json::from_slice(&env.files[0].contents).unwrap();
        assert_eq!(json["a"], 1);
        assert_eq!(json["outputs"]["out"], "/s/aaaa-x");
    }
}
