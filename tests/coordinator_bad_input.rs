//! Bad input is refused with a 4xx whose message names the problem, and changes nothing:
//! `kiln state dump` is identical before and after.

mod common;

use common::*;
use kiln::derivation::store_path::StoreDir;

fn expect_refused(what: &str, (code, body): (u16, serde_json::Value), status: u16, needle: &str) {
    assert_eq!(
        code, status,
        "{what}: expected HTTP {status}, got {code}: {body}"
    );
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(needle),
        "{what}: the message should name the problem ({needle:?}), got {msg:?}"
    );
}

#[test]
fn bad_input_is_refused_with_a_clear_4xx_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let mut c = Coordinator::start(
        tmp.path(),
        &store,
        "[limits]\njson_body_kb = 16\nsubmit_body_mb = 1\n",
    );

    // Some state first, so "unchanged" means something.
    let (code, agent) = post(
        &c.url("/api/v1/agents"),
        &serde_json::json!({"name": "a1", "systems": ["x86_64-linux"]}),
    );
    assert_eq!(code, 200, "{agent}");
    let (good, good_bytes) = simple_drv(&sd, "good", "echo > $out");
    let (code, r) = post(
        &c.url("/api/v1/builds"),
        &serde_json::json!({"derivations": [{"path": good, "contents": b64(&good_bytes)}], "builds": [good]}),
    );
    assert_eq!(code, 200, "{r}");
    c.stop();
    let before = state_dump(&c.state_dir);
    assert!(
        before.contains("builds 1 "),
        "the baseline build is in the dump:\n{before}"
    );
    c.spawn();

    // A malformed .drv.
    let bad_path = format!("{}/{}-bad.drv", sd.as_str(), "0".repeat(32));
    expect_refused(
        "malformed drv",
        post(
            &c.url("/api/v1/builds"),
            &serde_json::json!({"derivations": [{"path": bad_path, "contents": b64(b"Derive([(\"out\"")}], "builds": [bad_path]}),
        ),
        422,
        "byte",
    );

    // A .drv whose name does not match its contents.
    let (other, other_bytes) = simple_drv(&sd, "other", "echo other > $out");
    expect_refused(
        "renamed drv",
        post(
            &c.url("/api/v1/builds"),
            &serde_json::json!({"derivations": [{"path": other, "contents": b64(&good_bytes)}], "builds": [other]}),
        ),
        422,
        "does not match its contents",
    );
    let _ = other_bytes;

    // An input .drv that was not sent.
    let mut dep = kiln::derivation::Derivation::parse(&good_bytes).unwrap();
    let missing_input = format!("{}/{}-missing.drv", sd.as_str(), "1".repeat(32));
    dep.input_drvs
        .push((missing_input.clone().into_bytes(), vec![b"out".to_vec()]));
    let dep_bytes = dep.print();
    let dep_path = sd.full_path(&kiln::derivation::paths::drv_path(&sd, &dep).unwrap());
    expect_refused(
        "input drv not sent",
        post(
            &c.url("/api/v1/builds"),
            &serde_json::json!({"derivations": [{"path": dep_path, "contents": b64(&dep_bytes)}], "builds": [dep_path]}),
        ),
        422,
        "missing.drv",
    );

    // Unknown agent, and a known agent with a wrong secret.
    for name in ["nobody", "a1"] {
        expect_refused(
            "agent authentication",
            post(
                &c.agent("/api/agent/v1/session"),
                &serde_json::json!({"name": name, "secret": "wrong", "protocol_version": 1,
                    "systems": [], "max_parallel_builds": 1}),
            ),
            401,
            "wrong secret",
        );
    }
    // An agent request without a session.
    expect_refused(
        "no session",
        post(
            &c.agent("/api/agent/v1/work"),
            &serde_json::json!({"max_builds": 1}),
        ),
        401,
        "session",
    );

    // Oversized bodies: a JSON route over its 16 KiB limit, and a submission over 1 MiB.
    let big = "x".repeat(20 << 10);
    expect_refused(
        "oversized agent creation",
        post(
            &c.url("/api/v1/agents"),
            &serde_json::json!({"name": big, "systems": ["x"]}),
        ),
        413,
        "limit",
    );
    let huge = "y".repeat(2 << 20);
    expect_refused(
        "oversized submission",
        post(
            &c.url("/api/v1/builds"),
            &serde_json::json!({"derivations": [], "builds": [huge]}),
        ),
        413,
        "limit",
    );

    // A NAR whose hash does not match the claim.
    let src = tmp.path().join("src");
    std::fs::write(&src, b"some source").unwrap();
    let mut nar = Vec::new();
    kiln::nar::dump(&src, &mut nar).unwrap();
    let wrong = kiln::derivation::Hash::sha256(b"not this nar");
    let src_path = format!("{}/{}-src", sd.as_str(), "2".repeat(32));
    let r = ureq::put(&c.url("/api/v1/sources"))
        .set("Content-Type", "application/x-nix-archive")
        .query("path", &src_path)
        .query("nar_hash", &wrong.to_nix_string())
        .send_bytes(&nar);
    expect_refused("NAR with the wrong hash", response(r), 422, "hashes to");

    // The right NAR under a path that is not its own, and under its own path with references
    // it was not added with: refused, naming the path a store gives it.
    let nar_hash = kiln::derivation::Hash::sha256(&nar);
    let flat = kiln::nar::ca::flat_file(&mut &nar[..]).unwrap();
    let own = kiln::nar::ca::candidates(&sd, "src", &nar_hash, flat.as_ref(), &[], None).unwrap();
    let own_path = sd.full_path(&own[0].path);
    for (what, refs) in [("foreign path", ""), ("claimed reference", good.as_str())] {
        let path = if refs.is_empty() {
            &src_path
        } else {
            &own_path
        };
        let r = ureq::put(&c.url("/api/v1/sources"))
            .set("Content-Type", "application/x-nix-archive")
            .query("path", path)
            .query("nar_hash", &nar_hash.to_nix_string())
            .query("references", refs)
            .send_bytes(&nar);
        let (code, body) = response(r);
        assert_eq!(body["error"]["code"], "wrong_source_path", "{what}: {body}");
        let needle = if refs.is_empty() {
            own_path.clone()
        } else {
            // With the reference, its path would be another one.
            kiln::nar::ca::candidates(
                &sd,
                "src",
                &nar_hash,
                flat.as_ref(),
                &[sd.parse_path(good.as_bytes()).unwrap()],
                None,
            )
            .unwrap()[0]
                .path
                .hash_part()
                .to_string()
        };
        expect_refused(what, (code, body), 422, &needle);
    }

    c.stop();
    let after = state_dump(&c.state_dir);
    assert_eq!(before, after, "refused requests changed the state");
}
