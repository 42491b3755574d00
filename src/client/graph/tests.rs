//! Tests of the graph generator: every `.drv` it writes passes the derivation module's own
//! check (file name and output paths as Nix computes them), and the graph has the shapes the
//! demo and the integration tests rely on.

use super::*;
use crate::derivation::check;

fn generate_in(dir: &Path, opts: &GraphOptions) -> Graph {
    generate(&dir.join("store"), opts).unwrap()
}

fn read(graph: &Graph, path: &str) -> Derivation {
    let _ = graph;
    Derivation::parse(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn every_drv_passes_the_derivation_check() {
    let dir = tempfile::tempdir().unwrap();
    let graph = generate_in(dir.path(), &GraphOptions::default());
    assert!(graph.drvs.len() >= 20, "{} derivations", graph.drvs.len());
    let sd = graph.store_dir.clone();
    let mut loader = move |p: &StorePath| -> anyhow::Result<Derivation> {
        Ok(Derivation::parse(&std::fs::read(sd.full_path(p))?)?)
    };
    for d in &graph.drvs {
        let drv = read(&graph, &d.drv_path);
        let report = check(&graph.store_dir, Path::new(&d.drv_path), &drv, &mut loader);
        assert!(report.is_ok(), "{report}");
        assert_eq!(
            report.expected_drv_path.as_deref(),
            Some(d.drv_path.as_str())
        );
        // The file is exactly what Nix would write.
        let bytes = std::fs::read(&d.drv_path).unwrap();
        assert_eq!(drv.print(), bytes, "{} prints back byte for byte", d.name);
        for (name, path) in &d.outputs {
            assert_eq!(drv.env_var(name.as_bytes()), Some(path.as_bytes()));
        }
    }
}

#[test]
fn graph_has_layers_a_diamond_multiple_outputs_and_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let graph = generate_in(dir.path(), &GraphOptions::default());
    let by_path: BTreeMap<&str, &GraphDrv> = graph
        .drvs
        .iter()
        .map(|d| (d.drv_path.as_str(), d))
        .collect();
    // Inputs come first, and depth reaches at least 3 layers.
    let mut depth: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &graph.drvs {
        let mut level = 0;
        for (input, _) in &d.inputs {
            let i = by_path[input.as_str()];
            level = level.max(depth.get(i.name.as_str()).copied().expect("inputs first") + 1);
        }
        depth.insert(&d.name, level);
    }
    assert!(depth.values().copied().max().unwrap() >= 3);

    // The diamond.
    let top = graph.get("diamond-top").unwrap();
    let left = graph.get("diamond-left").unwrap();
    let right = graph.get("diamond-right").unwrap();
    let bottom = graph.get("diamond-bottom").unwrap();
    for side in [left, right] {
        assert!(side.inputs.iter().any(|(p, _)| *p == top.drv_path));
        assert!(bottom.inputs.iter().any(|(p, _)| *p == side.drv_path));
    }

    // Multiple outputs, two of them used by one dependent.
    let multi = graph.get("multi").unwrap();
    let names: Vec<&str> = multi.outputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["dev", "lib", "out"]);
    let user = graph.get("uses-lib-dev").unwrap();
    assert_eq!(
        user.inputs,
        vec![(
            multi.drv_path.clone(),
            vec!["dev".to_string(), "lib".to_string()]
        )]
    );
    let user_drv = read(&graph, &user.drv_path);
    let inputs = user_drv.env_var(b"inputs").unwrap();
    for (_, p) in multi.outputs.iter().filter(|(n, _)| n != "out") {
        assert!(inputs.windows(p.len()).any(|w| w == p.as_bytes()));
    }

    // An environment value that is not UTF-8.
    let bytes_env = read(&graph, &graph.get("bytes-env").unwrap().drv_path);
    let payload = bytes_env.env_var(b"payload").unwrap();
    assert_eq!(payload, NON_UTF8_ENV);
    assert!(std::str::from_utf8(payload).is_err());
    assert!(read(&graph, &graph.get("bytes-log").unwrap().drv_path)
        .env_var(b"logBytes")
        .is_some());

    // Every derivation uses the builder script as /bin/sh -e <script>.
    for d in &graph.drvs {
        let drv = read(&graph, &d.drv_path);
        assert_eq!(drv.builder, b"/bin/sh");
        assert_eq!(
            drv.args,
            vec![b"-e".to_vec(), graph.builder.as_bytes().to_vec()]
        );
        assert_eq!(drv.input_srcs, vec![graph.builder.as_bytes().to_vec()]);
    }
}

#[test]
fn same_seed_same_graph_and_failures_block_dependents() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let opts = GraphOptions {
        fail: BTreeSet::from(["diamond-left".to_string()]),
        ..GraphOptions::default()
    };
    let ga = generate(&a.path().join("s"), &opts).unwrap();
    let gb = generate(&b.path().join("s"), &opts).unwrap();
    let names_a: Vec<_> = ga
        .drvs
        .iter()
        .map(|d| (d.name.clone(), d.inputs.len()))
        .collect();
    let names_b: Vec<_> = gb
        .drvs
        .iter()
        .map(|d| (d.name.clone(), d.inputs.len()))
        .collect();
    assert_eq!(names_a, names_b);
    assert!(ga.get("diamond-left").unwrap().fails);
    assert!(ga.get("diamond-bottom").unwrap().blocked);
    assert!(ga.get("final").unwrap().blocked);
    assert!(!ga.get("diamond-right").unwrap().blocked);
    assert_eq!(ga.expected_successes(), ga.drvs.len() - 3);
    // Generating again in the same store is a no-op with the same paths.
    let again = generate(&a.path().join("s"), &opts).unwrap();
    assert_eq!(again.drv_paths(), ga.drv_paths());
}

/// Runs the builder of every derivation the way the native executor would (outputs created
/// in the store dir, inputs before dependents) and checks what the builders leave behind:
/// stamps, the non-UTF-8 payload, references to inputs and the failing builder's exit.
#[test]
fn builders_run_and_leave_stamps_payload_and_references() {
    let dir = tempfile::tempdir().unwrap();
    let opts = GraphOptions {
        sleep_ms: (0, 0),
        stamp_dir: Some(dir.path().join("stamps")),
        fail: BTreeSet::from(["bytes-log".to_string()]),
        layers: 2,
        width: 2,
        ..GraphOptions::default()
    };
    let graph = generate_in(dir.path(), &opts);
    for d in graph.drvs.iter().filter(|d| !d.blocked) {
        let drv = read(&graph, &d.drv_path);
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.env_clear();
        for (k, v) in &drv.env {
            use std::os::unix::ffi::OsStrExt as _;
            cmd.env(
                std::ffi::OsStr::from_bytes(k),
                std::ffi::OsStr::from_bytes(v),
            );
        }
        let args: Vec<_> = drv
            .args
            .iter()
            .map(|a| String::from_utf8(a.clone()).unwrap())
            .collect();
        let out = cmd.args(&args).output().unwrap();
        assert_eq!(out.status.success(), !d.fails, "{}: {:?}", d.name, out);
        if d.name == "bytes-log" {
            let needle = NON_UTF8_LOG;
            assert!(out.stdout.windows(needle.len()).any(|w| w == needle));
        }
    }
    let payload = std::fs::read(format!(
        "{}/payload",
        graph.get("bytes-env").unwrap().outputs[0].1
    ))
    .unwrap();
    assert_eq!(payload, [NON_UTF8_ENV, b"\n"].concat());
    let multi = graph.get("multi").unwrap();
    let lib = &multi.outputs.iter().find(|(n, _)| n == "lib").unwrap().1;
    let dev = &multi.outputs.iter().find(|(n, _)| n == "dev").unwrap().1;
    assert_eq!(
        std::fs::read_to_string(format!("{dev}/lib-path")).unwrap(),
        format!("{lib}\n")
    );
    let user_out = &graph.get("uses-lib-dev").unwrap().outputs[0].1;
    let data = std::fs::read_to_string(format!("{user_out}/data")).unwrap();
    assert!(
        data.contains(lib.as_str()) && data.contains(dev.as_str()),
        "{data}"
    );
    let stamps = std::fs::read_to_string(dir.path().join("stamps").join(STAMP_FILE)).unwrap();
    assert!(
        stamps
            .lines()
            .any(|l| l.starts_with("diamond-bottom start ")),
        "{stamps}"
    );
    assert!(
        stamps.lines().any(|l| l.starts_with("bytes-log end ")),
        "{stamps}"
    );
}
