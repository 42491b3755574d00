//! Allocation with the real actors on a real sled database (needs `--features fault-points`
//! for the index snapshot):
//! - a lease that fails (the committer's queue is full) gives back to the allocator's index
//!   exactly the builds it proposed — no rescan, nothing lost, nothing extra;
//! - the index is filled from the queue's one scan at start, and again from the queue's memory
//!   after an allocator restart: each time it equals the runnable builds of sled.

#![cfg(feature = "fault-points")]

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::simple_drv;
use kiln::actors::agent_session::RequestWork;
use kiln::actors::allocator::{CorruptMemoryAndStop, IndexSnapshot};
use kiln::actors::build_queue::Submit;
use kiln::actors::registry::{CreateAgent, Open, SessionOf};
use kiln::actors::ActorError;
use kiln::config::Config;
use kiln::derivation::store_path::StoreDir;
use kiln::protocol::{
    BuildState, Bytes64, NewAgent, OpenSession, SubmitBuilds, SubmittedDrv, PROTOCOL_VERSION,
};
use kiln::store::committer::{CommitError, CommitterOptions};
use kiln::store::nar_cache::NarCache;
use kiln::store::records::BuildRecord;
use kiln::store::{Committer, Store, StoreOptions, TreeId};

const LIMIT: Duration = Duration::from_secs(120);

fn runnable_in_sled(store: &Store) -> Vec<u64> {
    let mut ids: Vec<u64> = store
        .scan::<BuildRecord>(TreeId::Builds)
        .map(|r| r.unwrap().1)
        .filter(|b| b.state == BuildState::Runnable)
        .map(|b| b.id)
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
fn a_failed_lease_gives_back_exactly_its_builds() {
    let tmp = tempfile::tempdir().unwrap();
    let store_path = tmp.path().join("store");
    std::fs::create_dir_all(&store_path).unwrap();
    let sd = StoreDir::new(&store_path).unwrap();
    let store = Store::open(&tmp.path().join("state"), &StoreOptions::default()).unwrap();
    let sink: kiln::supervisor::EventSink = Arc::new(OnceLock::new());
    // One place in the committer's queue: a test that holds it makes every write refused.
    let committer = Committer::start(
        store.clone(),
        CommitterOptions {
            max_queued: 1,
            ..Default::default()
        },
        kiln::supervisor::event_listener(sink.clone()),
    )
    .unwrap();
    let mut b = kiln::store::Batch::new();
    b.put_raw(
        TreeId::Meta,
        kiln::store::meta::STORE_DIR,
        sd.as_str().as_bytes(),
    );
    committer.commit_blocking(b).unwrap();
    let nars = Arc::new(
        NarCache::new(
            &tmp.path().join("state"),
            store.clone(),
            committer.clone(),
            None,
        )
        .unwrap(),
    );
    let mut config = Config::default();
    // Expiry off: with it on, a session opening also stores its time, a second write that
    // would take the committer's one place while the opening commits.
    config.agents.expire_after_ms = 0;
    actix::System::new().block_on(async move {
        let actors = kiln::supervisor::start(
            &config,
            store.clone(),
            committer.clone(),
            nars,
            Some(sd.clone()),
            sink,
        )
        .unwrap();
        let mut derivations = Vec::new();
        let mut builds = Vec::new();
        for i in 0..3 {
            let (p, b) = simple_drv(&sd, &format!("give-back-{i}"), "echo > $out");
            derivations.push(SubmittedDrv {
                path: p.clone(),
                contents: Bytes64(b),
            });
            builds.push(p);
        }
        let submitted = actors
            .queue
            .send(Submit(SubmitBuilds {
                derivations,
                builds,
                priority: 0,
                tags: vec![],
                defer_until_ms: 0,
                related: false,
            }))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(submitted.builds.len(), 3);
        let all = runnable_in_sled(&store);
        assert_eq!(all.len(), 3);
        assert_eq!(actors.allocator.send(IndexSnapshot).await.unwrap(), all);

        let agent = actors
            .registry
            .send(CreateAgent(NewAgent {
                name: "a1".into(),
                systems: vec!["x86_64-linux".into()],
            }))
            .await
            .unwrap()
            .unwrap();
        actors
            .registry
            .send(Open(OpenSession {
                name: "a1".into(),
                secret: agent.secret,
                protocol_version: PROTOCOL_VERSION,
                systems: vec!["x86_64-linux".into()],
                max_parallel_builds: 2,
                builds: vec![],
                registration_token: None,
                offers: vec![],
                requires: vec![],
            }))
            .await
            .unwrap()
            .unwrap();
        let session = actors
            .registry
            .send(SessionOf(agent.id))
            .await
            .unwrap()
            .expect("a session actor");

        // Hold the only place in the committer's queue: the lease cannot be committed.
        let held = committer.reserve().unwrap();
        let refused = session
            .send(RequestWork {
                max: 2,
                request: Some("r-1".into()),
                wait: Duration::ZERO,
                alive: None,
            })
            .await
            .unwrap();
        assert!(
            matches!(
                refused,
                Err(ActorError::Commit(CommitError::Overloaded { .. }))
            ),
            "{refused:?}"
        );
        // Exactly the two proposed builds came back: the index is whole again.
        let deadline = std::time::Instant::now() + LIMIT;
        loop {
            let ix = actors.allocator.send(IndexSnapshot).await.unwrap();
            if ix == all {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "index {ix:?} != {all:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(runnable_in_sled(&store), all, "nothing was leased");
        assert_eq!(
            actors.restarts.count("allocator"),
            0,
            "no restart, no rescan"
        );

        // With room again, the same request leases the two best builds.
        drop(held);
        let reply = session
            .send(RequestWork {
                max: 2,
                request: Some("r-1".into()),
                wait: Duration::ZERO,
                alive: None,
            })
            .await
            .unwrap()
            .unwrap();
        let got: Vec<u64> = reply.builds.iter().map(|a| a.build_id).collect();
        assert_eq!(got, all[..2].to_vec());
        assert_eq!(
            actors.allocator.send(IndexSnapshot).await.unwrap(),
            runnable_in_sled(&store)
        );

        // An allocator restart refills from the queue's memory: still equal to sled.
        actors.allocator.do_send(CorruptMemoryAndStop);
        let deadline = std::time::Instant::now() + LIMIT;
        while actors.restarts.count("allocator") < 1 {
            assert!(std::time::Instant::now() < deadline, "no allocator restart");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            actors.allocator.send(IndexSnapshot).await.unwrap(),
            runnable_in_sled(&store)
        );
        actix::System::current().stop();
    });
}
