//! Supervision, with the real actors on a real sled database: an actor that stops restarts
//! from sled (its memory equals sled again, and its restart counter says 1), and a panic in a
//! handler becomes a restart, not a dead mailbox. Needs `--features fault-points`.

#![cfg(feature = "fault-points")]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::{b64, simple_drv};
use kiln::actors::build_queue::{CorruptMemoryAndStop, LiveBuilds, PanicInHandler, Submit};
use kiln::actors::ActorError;
use kiln::config::Config;
use kiln::derivation::store_path::StoreDir;
use kiln::protocol::{Bytes64, SubmitBuilds, SubmittedDrv};
use kiln::store::committer::CommitterOptions;
use kiln::store::nar_cache::NarCache;
use kiln::store::records::BuildRecord;
use kiln::store::{Committer, Store, StoreOptions, TreeId};

fn live_in_sled(store: &Store) -> HashMap<u64, BuildRecord> {
    store
        .scan::<BuildRecord>(TreeId::Builds)
        .map(|r| r.unwrap().1)
        .filter(|b| !b.state.is_terminal())
        .map(|b| (b.id, b))
        .collect()
}

async fn wait_restarts(restarts: &kiln::supervisor::Restarts, actor: &str, n: u64) {
    for _ in 0..500 {
        if restarts.count(actor) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{actor} did not restart {n} time(s)");
}

#[test]
fn a_stopped_build_queue_restarts_from_sled_and_a_panic_is_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let store_path = tmp.path().join("store");
    std::fs::create_dir_all(&store_path).unwrap();
    let sd = StoreDir::new(&store_path).unwrap();
    let store = Store::open(&tmp.path().join("state"), &StoreOptions::default()).unwrap();
    let sink: kiln::supervisor::EventSink = Arc::new(OnceLock::new());
    let committer = Committer::start(
        store.clone(),
        CommitterOptions {
            fsync: false,
            max_batch: 64,
            ..Default::default()
        },
        kiln::supervisor::event_listener(sink.clone()),
    )
    .unwrap();
    let nars = Arc::new(
        NarCache::new(
            &tmp.path().join("state"),
            store.clone(),
            committer.clone(),
            None,
        )
        .unwrap(),
    );
    let config = Config::default();

    actix::System::new().block_on(async move {
        let actors = kiln::supervisor::start(
            &config,
            store.clone(),
            committer,
            nars,
            Some(sd.clone()),
            sink,
        )
        .unwrap();
        let mut derivations = Vec::new();
        let mut builds = Vec::new();
        for i in 0..5 {
            let (p, b) = simple_drv(&sd, &format!("sup-{i}"), "echo > $out");
            derivations.push(SubmittedDrv {
                path: p.clone(),
                contents: Bytes64(b),
            });
            builds.push(p);
        }
        let _ = b64;
        let submitted = actors
            .queue
            .send(Submit(SubmitBuilds {
                derivations,
                builds,
                priority: 0,
                tags: vec![],
            }))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(submitted.builds.len(), 5);
        let before = actors.queue.send(LiveBuilds).await.unwrap();
        assert_eq!(
            before,
            live_in_sled(&store),
            "memory equals sled before the fault"
        );
        assert_eq!(actors.restarts.count("build_queue"), 0);

        // Memory changes without a commit, then the actor stops.
        actors.queue.do_send(CorruptMemoryAndStop);
        wait_restarts(&actors.restarts, "build_queue", 1).await;
        let after = actors.queue.send(LiveBuilds).await.unwrap();
        assert_eq!(after.len(), 5);
        assert_eq!(
            after,
            live_in_sled(&store),
            "after the restart memory equals sled"
        );
        assert_eq!(actors.restarts.count("build_queue"), 1);

        // A panic in a handler: an explicit Unavailable answer, a restart, and a working actor.
        let r = actors
            .queue
            .send(PanicInHandler)
            .await
            .expect("the mailbox stays open");
        assert!(matches!(r, Err(ActorError::Unavailable(_))), "{r:?}");
        wait_restarts(&actors.restarts, "build_queue", 2).await;
        let again = actors
            .queue
            .send(LiveBuilds)
            .await
            .expect("the restarted actor answers");
        assert_eq!(again, live_in_sled(&store));
        assert_eq!(actors.restarts.count("build_queue"), 2);
        actix::System::current().stop();
    });
}
