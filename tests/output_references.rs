//! Outputs are what they claim: the coordinator scans each uploaded output's NAR for the
//! store paths of the build's input closure and outputs, and refuses (422 `bad_result`,
//! naming both lists; the build fails) a success report whose references are not exactly the
//! ones found: one listed that the NAR does not contain, or one it contains left out. A report
//! with the right references is accepted and its narinfo lists them. Real coordinator process,
//! agent played over real HTTP, real NARs.

mod common;
mod leases_common;

use common::*;
use kiln::derivation::store_path::StoreDir;
use kiln::derivation::{Derivation, DerivationOutput, PathComputer, StorePath};
use leases_common::{register, state_of, submit, Nar, RawAgent};
use serde_json::{json, Value};

/// A derivation with one input source whose output path is what Nix computes.
fn drv_with_source(sd: &StoreDir, name: &str, source: &str) -> (String, Vec<u8>) {
    let mut drv = Derivation {
        outputs: vec![(b"out".to_vec(), DerivationOutput::default())],
        input_drvs: vec![],
        input_srcs: vec![source.as_bytes().to_vec()],
        platform: b"x86_64-linux".to_vec(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), format!("cat {source} > $out").into_bytes()],
        env: vec![
            (b"builder".to_vec(), b"/bin/sh".to_vec()),
            (b"name".to_vec(), name.as_bytes().to_vec()),
            (b"out".to_vec(), Vec::new()),
            (b"system".to_vec(), b"x86_64-linux".to_vec()),
        ],
    };
    let mut loader =
        |p: &StorePath| -> anyhow::Result<Derivation> { anyhow::bail!("no inputs: {p}") };
    let mut pc = PathComputer::new(sd.clone(), &mut loader);
    let paths = pc.output_paths(&drv).unwrap();
    let out = sd.full_path(paths[0].1.as_ref().unwrap());
    drv.outputs[0].1.path = out.clone().into_bytes();
    drv.env[2].1 = out.into_bytes();
    let path = sd.full_path(&kiln::derivation::paths::drv_path(sd, &drv).unwrap());
    (path, drv.print())
}

fn with_refs(nar: &Nar, out: &str, refs: &[&str]) -> Value {
    let mut v = nar.success(out);
    v["outputs"][0]["references"] = json!(refs);
    v
}

#[test]
fn a_result_whose_references_are_not_its_nars_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, "");

    // An input source, under its own path.
    let src_file = tmp.path().join("dep");
    std::fs::write(&src_file, b"a dependency\n").unwrap();
    let mut src_nar = Vec::new();
    kiln::nar::dump(&src_file, &mut src_nar).unwrap();
    let src_hash = kiln::derivation::Hash::sha256(&src_nar);
    let src = sd.full_path(
        &kiln::nar::ca::candidates(&sd, "dep", &src_hash, None, &[], None).unwrap()[0].path,
    );
    let (code, r) = response(
        ureq::put(&c.url("/api/v1/sources"))
            .set("Content-Type", "application/x-nix-archive")
            .query("path", &src)
            .query("nar_hash", &src_hash.to_nix_string())
            .query("references", "")
            .send_bytes(&src_nar),
    );
    assert_eq!(code, 200, "{r}");

    let drvs: Vec<(String, Vec<u8>)> = ["omits", "invents", "honest"]
        .iter()
        .map(|n| drv_with_source(&sd, n, &src))
        .collect();
    let ids = submit(&c, &drvs);
    let secret = register(&c, "a1");
    let (a, _) = RawAgent::open(&c, "a1", &secret, json!([]));
    let w = a.work(Some("w1"), 3);
    let out_of = |id: u64| -> String {
        w["builds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["build_id"].as_u64() == Some(id))
            .unwrap_or_else(|| panic!("build {id} not assigned: {w}"))["outputs"][0]["path"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for &id in &ids {
        assert_eq!(a.start(id, 1).0, 200);
    }
    let mentions_src = format!("copied from {src}\n");

    // The NAR mentions the source; the report omits it.
    let (omits, invents, honest) = (ids[0], ids[1], ids[2]);
    let nar = Nar::of_file(tmp.path(), mentions_src.as_bytes());
    assert_eq!(a.upload(omits, 1, &nar).0, 200);
    let (code, r) = a.result(omits, 1, with_refs(&nar, &out_of(omits), &[]));
    assert_eq!(
        (code, r["error"]["code"].as_str()),
        (422, Some("bad_result")),
        "{r}"
    );
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("lists references []") && msg.contains(&format!("refers to [{src}]")),
        "both lists named: {msg}"
    );
    assert_eq!(state_of(&c, omits), "failed");

    // The NAR does not mention the source; the report claims it.
    let nar = Nar::of_file(tmp.path(), b"self-contained\n");
    assert_eq!(a.upload(invents, 1, &nar).0, 200);
    let (code, r) = a.result(invents, 1, with_refs(&nar, &out_of(invents), &[&src]));
    assert_eq!(
        (code, r["error"]["code"].as_str()),
        (422, Some("bad_result")),
        "{r}"
    );
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("lists references [{src}]")) && msg.contains("refers to []"),
        "both lists named: {msg}"
    );
    assert_eq!(state_of(&c, invents), "failed");

    // The right references: accepted, and the narinfo lists them.
    let out = out_of(honest);
    let nar = Nar::of_file(tmp.path(), format!("{mentions_src}and {out}\n").as_bytes());
    assert_eq!(a.upload(honest, 1, &nar).0, 200);
    let (code, r) = a.result(honest, 1, with_refs(&nar, &out, &[&src, &out]));
    assert_eq!(code, 200, "{r}");
    assert_eq!(state_of(&c, honest), "succeeded");
    let hash = |p: &str| p.rsplit('/').next().unwrap()[..32].to_string();
    let (code, ni) = get(&c.agent(&format!("/{}.narinfo", hash(&out))));
    assert_eq!(code, 200, "{ni}");
    let ni = ni.as_str().unwrap();
    let refs_line = ni
        .lines()
        .find_map(|l| l.strip_prefix("References: "))
        .unwrap();
    let mut want = [
        src.rsplit('/').next().unwrap().to_string(),
        out.rsplit('/').next().unwrap().to_string(),
    ];
    want.sort();
    assert_eq!(refs_line, want.join(" "), "{ni}");
}
