//! The substitutes a run produced, checked from the outside: every successful build's output
//! is fetched like a binary-cache client fetches it (narinfo, then the NAR file), its FileHash,
//! NarHash and NarSize are recomputed, it is restored and its files compared with what the
//! builder writes; then a real Nix client copies the closure of the graph's roots from the
//! coordinator and verifies it (`nix copy --from http://…`, `nix store verify`; over `https://`
//! when the run serves TLS, Nix trusting the run's CA through `NIX_SSL_CERT_FILE`).

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use kiln::derivation::Hash;
use kiln::nar::narinfo::NarInfo;

use crate::evidence::OutputRow;
use crate::graph::{ChaosDrv, ChaosGraph};

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout(Duration::from_secs(120))
        .build()
}

/// Check one served output; returns the NarHash (`sha256:<base32>`) and NarSize it serves,
/// or what is wrong with it.
pub fn check_output(base: &str, d: &ChaosDrv, scratch: &Path) -> Result<(String, u64), String> {
    check_output_with(&agent(), base, d, scratch)
}

/// [`check_output`] through `http` (for HTTPS: one that trusts the coordinator's CA).
pub fn check_output_with(
    http: &ureq::Agent,
    base: &str,
    d: &ChaosDrv,
    scratch: &Path,
) -> Result<(String, u64), String> {
    let base_name = d
        .out_path
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let hash = &base_name[..32.min(base_name.len())];
    let narinfo_url = format!("{base}/{hash}.narinfo");
    let text = http
        .get(&narinfo_url)
        .call()
        .map_err(|e| format!("GET {narinfo_url}: {e}"))?
        .into_string()
        .map_err(|e| format!("GET {narinfo_url}: reading the body: {e}"))?;
    let info = NarInfo::parse(&text).map_err(|e| format!("{narinfo_url} does not parse: {e}"))?;
    if info.store_path != d.out_path {
        return Err(format!(
            "{narinfo_url} names {}, not {}",
            info.store_path, d.out_path
        ));
    }
    let nar_url = format!("{base}/{}", info.url);
    let mut file = Vec::new();
    http.get(&nar_url)
        .call()
        .map_err(|e| format!("GET {nar_url}: {e}"))?
        .into_reader()
        .read_to_end(&mut file)
        .map_err(|e| format!("GET {nar_url}: reading the body: {e}"))?;
    let file_hash = Hash::sha256(&file);
    if let Some(fh) = &info.file_hash {
        if *fh != file_hash {
            return Err(format!(
                "{nar_url} has FileHash {}, the narinfo says {}",
                file_hash.to_nix_string(),
                fh.to_nix_string()
            ));
        }
    }
    if info.file_size.is_some_and(|s| s != file.len() as u64) {
        return Err(format!(
            "{nar_url} has {} bytes, the narinfo says {:?}",
            file.len(),
            info.file_size
        ));
    }
    let nar = zstd::decode_all(&file[..]).map_err(|e| format!("{nar_url} is not zstd: {e}"))?;
    let dest = scratch.join(&base_name);
    let summary = kiln::nar::restore_summary(&mut &nar[..], &dest)
        .map_err(|e| format!("{nar_url} is not a valid NAR: {e}"))?;
    let content = check_content(d, &dest);
    make_writable(&dest);
    let _ = std::fs::remove_dir_all(&dest);
    content?;
    if summary.nar_hash != info.nar_hash || summary.nar_size != info.nar_size {
        return Err(format!(
            "{nar_url} holds a NAR with hash {} and size {}, the narinfo says {} and {}",
            summary.nar_hash.to_nix_string(),
            summary.nar_size,
            info.nar_hash.to_nix_string(),
            info.nar_size
        ));
    }
    Ok((info.nar_hash.to_nix_string(), info.nar_size))
}

/// The served NarHash and NarSize must be the ones the coordinator recorded.
pub fn compare_recorded(
    d: &ChaosDrv,
    served: &(String, u64),
    recorded: Option<&OutputRow>,
) -> Result<(), String> {
    match recorded {
        Some(r) if r.nar_hash == served.0 && r.nar_size == served.1 => Ok(()),
        Some(r) => Err(format!(
            "the coordinator recorded NarHash {} ({} bytes) for {}, but serves {} ({} bytes)",
            r.nar_hash, r.nar_size, d.out_path, served.0, served.1
        )),
        None => Err(format!(
            "{} is served but the coordinator has no outputs record for it",
            d.out_path
        )),
    }
}

/// The restored output holds what the builder writes: `data` starting with the name and
/// listing the inputs, `blob` of the drawn size.
fn check_content(d: &ChaosDrv, dest: &Path) -> Result<(), String> {
    let data = std::fs::read_to_string(dest.join("data"))
        .map_err(|e| format!("{}: no readable data file: {e}", d.out_path))?;
    if data.lines().next() != Some(d.name.as_str()) {
        return Err(format!(
            "{}: data file starts with {:?}, not the name {}",
            d.out_path,
            data.lines().next(),
            d.name
        ));
    }
    let blob = std::fs::metadata(dest.join("blob"))
        .map_err(|e| format!("{}: no blob file: {e}", d.out_path))?;
    if blob.len() != d.size {
        return Err(format!(
            "{}: blob has {} bytes, the builder writes {}",
            d.out_path,
            blob.len(),
            d.size
        ));
    }
    Ok(())
}

pub(crate) fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        // Best effort: the removal that follows reports nothing either.
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755));
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
}

/// The outputs the closure of `roots` must hold: the roots and, transitively, the outputs of
/// their inputs (outputs list their inputs' paths, so they reference them).
pub fn expected_closure(graph: &ChaosGraph, roots: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack: Vec<usize> = graph
        .drvs
        .iter()
        .filter(|d| roots.contains(&d.out_path))
        .map(|d| d.index)
        .collect();
    while let Some(i) = stack.pop() {
        if out.insert(graph.drvs[i].out_path.clone()) {
            stack.extend(graph.drvs[i].inputs.iter().copied());
        }
    }
    out
}

/// Nix asks for a narinfo with `HEAD` before it fetches it: say so when the coordinator answers
/// `HEAD` differently from `GET`.
fn head_differs(http: &ureq::Agent, cache_url: &str, path: &str) -> Option<String> {
    let base = path.rsplit('/').next()?;
    let url = format!("{cache_url}/{}.narinfo", base.get(..32)?);
    let status = |method: &str| match http.request(method, &url).call() {
        Ok(r) => Some(r.status()),
        Err(ureq::Error::Status(s, _)) => Some(s),
        Err(_) => None,
    };
    let (get, head) = (status("GET")?, status("HEAD")?);
    (get != head).then(|| {
        format!("the coordinator answers GET {url} with {get} but HEAD with {head}; Nix probes narinfos with HEAD, so it cannot substitute from it")
    })
}

/// What the Nix client did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NixOutcome {
    pub ok: bool,
    pub problems: Vec<String>,
    /// Paths Nix holds after the copy (`nix path-info -r`).
    pub copied: usize,
}

/// A Nix command with a private configuration that trusts `public_key`.
fn nix(program: &str, conf: &Path, ca_file: Option<&Path>) -> Command {
    let mut c = Command::new(program);
    c.env("NIX_CONF_DIR", conf)
        .env_remove("NIX_REMOTE")
        .env("HOME", conf);
    if let Some(ca) = ca_file {
        c.env("NIX_SSL_CERT_FILE", ca);
    }
    c
}

/// `nix copy --from <cache>` the closure of `roots` into a fresh local store under `work`,
/// then `nix store verify` it and compare its paths with `expected`. An `https://` cache is
/// verified against `ca_file` (Nix 2.8 reads it from `NIX_SSL_CERT_FILE`); `http` makes the
/// harness's own probe when the copy fails.
#[allow(clippy::too_many_arguments)]
pub fn nix_copy_and_verify(
    cache_url: &str,
    ca_file: Option<&Path>,
    http: &ureq::Agent,
    store_dir: &str,
    public_key: &str,
    roots: &[String],
    expected: &BTreeSet<String>,
    work: &Path,
) -> NixOutcome {
    let mut out = NixOutcome::default();
    if roots.is_empty() {
        out.problems
            .push("the graph has no successful root to copy".to_string());
        return out;
    }
    let conf = work.join("nix-conf");
    let root = work.join("nix-root");
    let setup = (|| -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&conf).context("failed to create the Nix config dir")?;
        std::fs::write(
            conf.join("nix.conf"),
            format!(
                "build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command\nrequire-sigs = true\ntrusted-public-keys = {public_key}\n"
            ),
        )
        .context("failed to write nix.conf")?;
        Ok(root.clone())
    })();
    let root = match setup {
        Ok(r) => r,
        Err(e) => {
            out.problems.push(format!("{e:#}"));
            return out;
        }
    };
    // Both stores must be told the store dir: Nix refuses a cache for another one.
    let store = format!("local?root={}&store={store_dir}", root.display());
    let from = format!("{cache_url}?store={store_dir}");
    let run = |what: &str, cmd: &mut Command| -> Result<String, String> {
        match cmd.output() {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
            Ok(o) => Err(format!(
                "{what} failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!(
                "{what} could not run: {e} (install Debian's nix-bin: scripts/test does)"
            )),
        }
    };
    let copy = run(
        "nix copy",
        nix("nix", &conf, ca_file)
            .args(["copy", "--from", &from, "--to", &store])
            .args(roots),
    );
    if let Err(e) = copy {
        out.problems.push(e);
        if let Some(why) = head_differs(http, cache_url, &roots[0]) {
            out.problems.push(why);
        }
        return out;
    }
    match run(
        "nix store verify",
        nix("nix", &conf, ca_file)
            .args(["store", "verify", "--recursive", "--store", &store])
            .args(roots),
    ) {
        Ok(_) => {}
        Err(e) => out.problems.push(e),
    }
    match run(
        "nix path-info",
        nix("nix", &conf, ca_file)
            .args(["path-info", "--recursive", "--store", &store])
            .args(roots),
    ) {
        Ok(text) => {
            let got: BTreeSet<String> = text.lines().map(str::to_string).collect();
            out.copied = got.len();
            if &got != expected {
                let missing: Vec<&String> = expected.difference(&got).take(5).collect();
                let extra: Vec<&String> = got.difference(expected).take(5).collect();
                out.problems.push(format!(
                    "the copied closure has {} paths, the graph's roots need {}; missing (first 5): {missing:?}; unexpected (first 5): {extra:?}",
                    got.len(),
                    expected.len()
                ));
            }
        }
        Err(e) => out.problems.push(e),
    }
    out.ok = out.problems.is_empty();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_closure_follows_inputs_transitively() {
        let dir = tempfile::tempdir().unwrap();
        let spec: crate::scenario::GraphSpec =
            toml::from_str("builds = 12\nlayers = 4\nmax_inputs = 2\n").unwrap();
        let g = crate::graph::generate(
            &dir.path().join("store"),
            &dir.path().join("stamps"),
            &spec,
            4,
            "x86_64-linux",
        )
        .unwrap();
        let last = g.drvs.last().unwrap();
        let closure = expected_closure(&g, std::slice::from_ref(&last.out_path));
        assert!(closure.contains(&last.out_path));
        for &i in &last.inputs {
            assert!(closure.contains(&g.drvs[i].out_path));
            for &j in &g.drvs[i].inputs {
                assert!(closure.contains(&g.drvs[j].out_path), "inputs of inputs");
            }
        }
        // Nothing outside the inputs' closure.
        let all = expected_closure(&g, &g.root_outputs());
        assert!(all.len() <= g.drvs.len());
        assert!(closure.len() <= all.len());
        assert!(expected_closure(&g, &[]).is_empty());
    }
}
