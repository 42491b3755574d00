//! `kiln submit` (and the demo's submission): read the `.drv` closure of the targets from the
//! store directory, upload the input sources the coordinator lacks, and submit the builds.
//!
//! The coordinator checks every `.drv` it is sent against Nix's path computations and needs the
//! whole closure (the targets and their input derivations, recursively) plus every input
//! source, so the client sends exactly that. A source's references are found as Nix finds
//! them: by scanning its NAR for the hash parts of the other store paths (of the closure and
//! of the store directory); the coordinator accepts a source only under the path those
//! references and its NAR give, and sources referred to by sources are uploaded too.
//!
//! The coordinator builds only the derivations it is asked to build, so unless
//! `--only-targets` is given the client asks it to build the related derivations too
//! (`related`: every derivation of the closure with an output the coordinator does not have
//! yet and no live build, decided by the coordinator in the submission's own commit;
//! otherwise the targets would wait forever).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::Context as _;

use super::http::Client;
use crate::derivation::{Derivation, StoreDir, StorePath};
use crate::nar::refs::RefScanner;
use crate::nar::HashingWriter;
use crate::protocol::{Bytes64, MissingPaths, PathsQuery, SubmitBuilds, Submitted, SubmittedDrv};

/// How to submit.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    pub priority: i32,
    pub tags: Vec<(String, String)>,
    /// Ask for builds of the targets only, not of input derivations whose outputs are missing
    /// (`related: false`; the default asks for those too).
    pub only_targets: bool,
    /// Do not offer the new builds before this time (ms since the epoch; 0 = at once).
    pub defer_until_ms: u64,
}

/// One `.drv` of a closure.
#[derive(Debug, Clone)]
pub struct ClosureDrv {
    /// Full store path of the `.drv`.
    pub path: String,
    /// The file's bytes, sent as they are.
    pub contents: Vec<u8>,
    pub drv: Derivation,
}

/// The `.drv` closure of some targets, and the input sources it needs.
#[derive(Debug, Clone)]
pub struct Closure {
    pub store_dir: StoreDir,
    /// Every derivation, inputs before the derivations that use them.
    pub drvs: Vec<ClosureDrv>,
    /// Full paths of every input source of every derivation.
    pub sources: BTreeSet<String>,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Read the `.drv` closure of `targets` (store paths in `store_dir`) from the file system.
pub fn collect_closure(store_dir: &StoreDir, targets: &[StorePath]) -> anyhow::Result<Closure> {
    let mut done: HashSet<StorePath> = HashSet::new();
    let mut drvs = Vec::new();
    let mut sources = BTreeSet::new();
    // Explicit post-order DFS: (path, parsed, index of the next input, who needs it).
    struct Frame {
        path: StorePath,
        contents: Vec<u8>,
        drv: Derivation,
        next: usize,
    }
    for target in targets {
        if done.contains(target) {
            continue;
        }
        let (contents, drv) = read_drv(store_dir, target, None)?;
        let mut on_stack = HashSet::from([target.clone()]);
        let mut stack = vec![Frame {
            path: target.clone(),
            contents,
            drv,
            next: 0,
        }];
        while let Some(top) = stack.last_mut() {
            if let Some((input, _)) = top.drv.input_drvs.get(top.next) {
                top.next += 1;
                let of = store_dir.full_path(&top.path);
                let sp = store_dir.parse_path(input).with_context(|| {
                    format!("derivation {of} names an input derivation outside the store directory")
                })?;
                if done.contains(&sp) {
                    continue;
                }
                anyhow::ensure!(
                    on_stack.insert(sp.clone()),
                    "input derivations form a cycle through {}: the store holds a corrupt .drv",
                    store_dir.full_path(&sp)
                );
                let (contents, drv) = read_drv(store_dir, &sp, Some(&of))?;
                stack.push(Frame {
                    path: sp,
                    contents,
                    drv,
                    next: 0,
                });
                continue;
            }
            let Some(f) = stack.pop() else { break };
            on_stack.remove(&f.path);
            for src in &f.drv.input_srcs {
                let sp = store_dir.parse_path(src).with_context(|| {
                    format!(
                        "derivation {} names an input source outside the store directory",
                        store_dir.full_path(&f.path)
                    )
                })?;
                sources.insert(store_dir.full_path(&sp));
            }
            done.insert(f.path.clone());
            drvs.push(ClosureDrv {
                path: store_dir.full_path(&f.path),
                contents: f.contents,
                drv: f.drv,
            });
        }
    }
    Ok(Closure {
        store_dir: store_dir.clone(),
        drvs,
        sources,
    })
}

fn read_drv(
    store_dir: &StoreDir,
    path: &StorePath,
    of: Option<&str>,
) -> anyhow::Result<(Vec<u8>, Derivation)> {
    let full = store_dir.full_path(path);
    let role = match of {
        Some(of) => format!("input derivation {full} of {of}"),
        None => format!("derivation {full}"),
    };
    let contents = std::fs::read(&full).with_context(|| {
        format!("failed to read {role}: is the store directory {store_dir} right? (--store-dir or KILN_STORE_DIR)")
    })?;
    let drv =
        Derivation::parse(&contents).with_context(|| format!("{role} is not a valid .drv file"))?;
    Ok((contents, drv))
}

/// `kiln submit FILE...`: resolve the store directory and the targets, then [`submit`].
pub fn submit_files(
    client: &Client,
    store_dir: Option<&Path>,
    files: &[PathBuf],
    options: &SubmitOptions,
) -> anyhow::Result<Submitted> {
    let mut full = Vec::with_capacity(files.len());
    for f in files {
        let abs = std::path::absolute(f)
            .with_context(|| format!("failed to make {} absolute", f.display()))?;
        full.push(abs.as_os_str().as_encoded_bytes().to_vec());
    }
    let refs: Vec<&[u8]> = full.iter().map(Vec::as_slice).collect();
    let dir = StoreDir::resolve(store_dir, &refs)
        .context("cannot tell which store directory the derivations are in")?;
    let mut targets = Vec::with_capacity(full.len());
    for (f, p) in files.iter().zip(&full) {
        let sp = dir.parse_path(p).with_context(|| {
            format!(
                "{} is not a .drv file in the store directory {dir}",
                f.display()
            )
        })?;
        anyhow::ensure!(
            sp.is_derivation(),
            "{} is not a derivation (its name does not end in .drv): pass the .drv files to build",
            f.display()
        );
        targets.push(sp);
    }
    submit(client, &dir, &targets, options)
}

/// Submit `targets` with their closure: upload missing sources, then `POST /api/v1/builds`.
pub fn submit(
    client: &Client,
    store_dir: &StoreDir,
    targets: &[StorePath],
    options: &SubmitOptions,
) -> anyhow::Result<Submitted> {
    let closure = collect_closure(store_dir, targets)?;
    upload_sources(client, &closure)?;
    let builds: Vec<String> = targets.iter().map(|t| store_dir.full_path(t)).collect();
    let body = SubmitBuilds {
        derivations: closure
            .drvs
            .iter()
            .map(|d| SubmittedDrv {
                path: d.path.clone(),
                contents: Bytes64(d.contents.clone()),
            })
            .collect(),
        builds,
        priority: options.priority,
        tags: options.tags.clone(),
        defer_until_ms: options.defer_until_ms,
        related: !options.only_targets,
    };
    Ok(client.post_json("builds", &body)?)
}

/// Upload every input source of the closure, and every store path those sources refer to
/// (recursively), that the coordinator does not have.
pub fn upload_sources(client: &Client, closure: &Closure) -> anyhow::Result<()> {
    if closure.sources.is_empty() {
        return Ok(());
    }
    let scanned = source_closure(closure)?;
    let query = PathsQuery {
        paths: scanned.keys().cloned().collect(),
    };
    let missing: MissingPaths = client.post_json("sources/missing", &query)?;
    for path in &missing.missing {
        let Some((nar_hash, refs)) = scanned.get(path) else {
            anyhow::bail!(
                "the coordinator says {path} is missing, but it was not asked about it: is it a Kiln coordinator?"
            );
        };
        upload_source(client, path, nar_hash, refs)
            .with_context(|| format!("failed to upload input source {path}"))?;
    }
    Ok(())
}

/// The closure's sources and, recursively, the store paths they refer to, each with its NAR
/// hash and references. A source may mention a store path no derivation names (a
/// `builtins.toFile` text naming another one): the coordinator names a source by its
/// references too, so those are found by scanning for the hash parts of every entry of the
/// store directory and of the closure's `.drv`s and their outputs, and uploaded as well. References to
/// `.drv` files and to outputs of the closure's derivations are kept but not uploaded (the
/// coordinator gets those by submission and by building).
fn source_closure(closure: &Closure) -> anyhow::Result<BTreeMap<String, (String, Vec<String>)>> {
    let sd = &closure.store_dir;
    // Hash part -> full path of every store path a source could refer to.
    let mut by_hash: BTreeMap<String, String> = BTreeMap::new();
    let dir = Path::new(sd.as_str());
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("failed to list {}", dir.display()))?;
        // Lock files (`<path>.lock`, `<path>.chroot`: Nix's, beside the path they lock),
        // temporary names and the like are not store paths: skipped.
        let name = e.file_name();
        let name = name.as_encoded_bytes();
        if name.ends_with(b".lock") || name.ends_with(b".chroot") {
            continue;
        }
        if let Ok(sp) = StorePath::from_base_name_bytes(name) {
            by_hash.insert(sp.hash_part().to_string(), sd.full_path(&sp));
        }
    }
    let mut built: HashSet<String> = HashSet::new();
    for d in &closure.drvs {
        let sp = sd.parse_path(d.path.as_bytes())?;
        by_hash.insert(sp.hash_part().to_string(), d.path.clone());
        for (_, out) in &d.drv.outputs {
            // An output need not exist here yet (it is built on the farm), but a source (a
            // Guix builder script, say) may name it: a candidate either way.
            let p = lossy(&out.path);
            if let Ok(sp) = sd.parse_path(p.as_bytes()) {
                by_hash.insert(sp.hash_part().to_string(), p.clone());
            }
            built.insert(p);
        }
    }
    for p in &closure.sources {
        let sp = sd.parse_path(p.as_bytes())?;
        by_hash.insert(sp.hash_part().to_string(), p.clone());
    }
    let mut scanned = BTreeMap::new();
    let mut todo: Vec<String> = closure.sources.iter().cloned().collect();
    while let Some(path) = todo.pop() {
        if scanned.contains_key(&path) {
            continue;
        }
        let sp = sd.parse_path(path.as_bytes())?;
        let (nar_hash, refs) = scan_source(Path::new(&path), sp.hash_part(), &by_hash)?;
        for r in &refs {
            if !scanned.contains_key(r) && !r.ends_with(".drv") && !built.contains(r) {
                todo.push(r.clone());
            }
        }
        scanned.insert(path, (nar_hash, refs));
    }
    Ok(scanned)
}

/// What a source NAR hashes to and which closure paths it mentions.
pub fn scan_source(
    path: &Path,
    own_hash: &str,
    by_hash: &BTreeMap<String, String>,
) -> anyhow::Result<(String, Vec<String>)> {
    let candidates = by_hash.keys().filter(|h| h.as_str() != own_hash).cloned();
    let mut w = HashingWriter::new(RefScanner::new(candidates));
    crate::nar::dump(path, &mut w).with_context(|| format!("failed to read {}", path.display()))?;
    let (scanner, hash, _size) = w.finish();
    let refs = scanner
        .into_found()
        .into_iter()
        .filter_map(|h| by_hash.get(&h).cloned())
        .collect();
    Ok((hash.to_string(), refs))
}

fn upload_source(
    client: &Client,
    path: &str,
    nar_hash: &str,
    refs: &[String],
) -> anyhow::Result<()> {
    let query = [
        ("path", path.to_string()),
        ("nar_hash", nar_hash.to_string()),
        ("references", refs.join(",")),
    ];
    let owned = PathBuf::from(path);
    let open =
        move || -> anyhow::Result<Box<dyn Read + Send>> { Ok(Box::new(nar_stream(owned.clone()))) };
    let _: serde_json::Value = client.put_stream("sources", &query, &open)?;
    Ok(())
}

/// The NAR of `path` as a reader, written by a thread so that a large source is streamed to
/// the coordinator in constant memory. A failure while dumping is returned by `read`, so a
/// truncated NAR is never sent as if it were whole.
fn nar_stream(path: PathBuf) -> ChannelReader {
    let (tx, rx) = mpsc::sync_channel::<Result<Vec<u8>, String>>(4);
    std::thread::spawn(move || {
        let mut w = ChannelWriter { tx: tx.clone() };
        let result = crate::nar::dump(&path, &mut w).map_err(|e| e.to_string());
        let result = result.and_then(|()| w.flush().map_err(|e| e.to_string()));
        if let Err(e) = result {
            // The reader may be gone (request failed): nothing left to tell.
            let _ = tx.send(Err(format!(
                "failed to write the NAR of {}: {e}",
                path.display()
            )));
        }
    });
    ChannelReader {
        rx,
        buf: Vec::new(),
        pos: 0,
    }
}

struct ChannelWriter {
    tx: mpsc::SyncSender<Result<Vec<u8>, String>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx.send(Ok(buf.to_vec())).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped reading")
        })?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct ChannelReader {
    rx: mpsc::Receiver<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(std::io::Error::other(e)),
                // The writer finished: end of the NAR.
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::graph::{generate, GraphOptions};

    #[test]
    fn closure_of_the_last_derivation_finds_every_input_drv_and_source() {
        let dir = tempfile::tempdir().unwrap();
        let graph = generate(&dir.path().join("store"), &GraphOptions::default()).unwrap();
        let last = graph.get("final").unwrap();
        let target = graph
            .store_dir
            .parse_path(last.drv_path.as_bytes())
            .unwrap();
        let closure = collect_closure(&graph.store_dir, &[target]).unwrap();
        let got: BTreeSet<&str> = closure.drvs.iter().map(|d| d.path.as_str()).collect();
        let want: BTreeSet<&str> = graph.drvs.iter().map(|d| d.drv_path.as_str()).collect();
        assert_eq!(got, want);
        assert_eq!(closure.sources, BTreeSet::from([graph.builder.clone()]));
        // Inputs come before the derivations that use them.
        let pos: std::collections::HashMap<&str, usize> = closure
            .drvs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.path.as_str(), i))
            .collect();
        for d in &closure.drvs {
            for (input, _) in &d.drv.input_drvs {
                assert!(pos[String::from_utf8_lossy(input).as_ref()] < pos[d.path.as_str()]);
            }
        }
        assert_eq!(closure.drvs.last().unwrap().path, last.drv_path);
    }

    #[test]
    fn closure_of_a_middle_derivation_is_only_its_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let graph = generate(&dir.path().join("store"), &GraphOptions::default()).unwrap();
        let bottom = graph.get("diamond-bottom").unwrap();
        let target = graph
            .store_dir
            .parse_path(bottom.drv_path.as_bytes())
            .unwrap();
        let closure = collect_closure(&graph.store_dir, &[target.clone(), target]).unwrap();
        let mut names: Vec<String> = closure
            .drvs
            .iter()
            .map(|d| d.drv.name().unwrap().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "diamond-bottom",
                "diamond-left",
                "diamond-right",
                "diamond-top",
                "layer0-0"
            ]
        );
    }

    #[test]
    fn a_missing_input_drv_names_the_file_and_who_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let graph = generate(&dir.path().join("store"), &GraphOptions::default()).unwrap();
        let top = graph.get("diamond-top").unwrap();
        std::fs::remove_file(&top.drv_path).unwrap();
        let left = graph.get("diamond-left").unwrap();
        let target = graph
            .store_dir
            .parse_path(left.drv_path.as_bytes())
            .unwrap();
        let err = format!(
            "{:#}",
            collect_closure(&graph.store_dir, &[target]).unwrap_err()
        );
        assert!(
            err.contains(&top.drv_path) && err.contains(&left.drv_path),
            "{err}"
        );
        assert!(err.contains("--store-dir"), "{err}");
    }

    #[test]
    fn source_references_are_found_by_scanning_its_nar() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreDir::new(dir.path()).unwrap();
        let a = format!("{}/{}-a", store, "0".repeat(32));
        let b = format!("{}/{}-b", store, "1".repeat(32));
        std::fs::write(&a, format!("see {b}\n")).unwrap();
        std::fs::write(&b, "nothing\n").unwrap();
        let by_hash = BTreeMap::from([("0".repeat(32), a.clone()), ("1".repeat(32), b.clone())]);
        let (hash, refs) = scan_source(Path::new(&a), &"0".repeat(32), &by_hash).unwrap();
        assert_eq!(refs, vec![b.clone()]);
        assert_eq!(
            hash,
            crate::nar::hash_path(Path::new(&a))
                .unwrap()
                .nar_hash
                .to_string()
        );
        // The streamed NAR is the NAR.
        let mut streamed = Vec::new();
        nar_stream(PathBuf::from(&a))
            .read_to_end(&mut streamed)
            .unwrap();
        let mut direct = Vec::new();
        crate::nar::dump(Path::new(&a), &mut direct).unwrap();
        assert_eq!(streamed, direct);
        let err = nar_stream(dir.path().join("absent"))
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
    }
}
