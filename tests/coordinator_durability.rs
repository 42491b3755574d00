//! Durability with sled's periodic flush off: a submission acknowledged with 200 OK survives a
//! SIGKILL of the coordinator sent right after the OK (the committer flushes before it answers).

mod common;

use common::*;
use kiln::derivation::store_path::StoreDir;

#[test]
fn acknowledged_submissions_survive_sigkill_right_after_the_ok() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let store_dir = StoreDir::new(&store).unwrap();
    let mut c = Coordinator::start(tmp.path(), &store, "");
    let mut acked: Vec<(u64, String)> = Vec::new();
    for i in 0..50 {
        let (path, bytes) = simple_drv(&store_dir, &format!("durable-{i}"), "echo hi > $out");
        let body = serde_json::json!({
            "derivations": [{"path": path, "contents": b64(&bytes)}],
            "builds": [path],
        });
        let (code, reply) = post(&c.url("/api/v1/builds"), &body);
        // Kill within moments of the OK: nothing but the assertion runs in between.
        c.kill9();
        assert_eq!(code, 200, "submission {i} refused: {reply}");
        let id = reply["builds"][0]["id"].as_u64().unwrap();
        acked.push((id, path));
        c.spawn();
        for (id, path) in &acked {
            let (code, b) = get(&c.url(&format!("/api/v1/builds/{id}")));
            assert_eq!(
                code,
                200,
                "acknowledged build {id} lost after SIGKILL number {}",
                i + 1
            );
            assert_eq!(b["summary"]["drv_path"].as_str(), Some(path.as_str()));
        }
    }
    // Ids were never reused across the restarts.
    let mut ids: Vec<u64> = acked.iter().map(|(i, _)| *i).collect();
    ids.dedup();
    assert_eq!(ids.len(), 50);
}
