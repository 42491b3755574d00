//! The build queue actor, in process on a real sled database with the real committer: a result
//! sent twice back to back is accepted once, and the repeat is answered `duplicate: true` only
//! after the first one's commit has completed. The committer's listener (called after the
//! flush, before the commit's requests are answered) holds the first commit open until the
//! test has seen the queue handle the repeat; the order in which things happen is then read
//! from a log. The failure half (503 when the first commit fails) is pinned in the queue
//! state's unit tests, where a commit can be made to fail.

mod common;

use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use common::simple_drv;
use kiln::actors::build_queue::{Allocate, Finish, GetRecord, Submit};
use kiln::config::Config;
use kiln::derivation::store_path::StoreDir;
use kiln::protocol::{BuildState, BuiltOutput, Bytes64, SubmitBuilds, SubmittedDrv};
use kiln::store::committer::CommitterOptions;
use kiln::store::nar_cache::NarCache;
use kiln::store::records::{EventRecord, NarFileRecord};
use kiln::store::{Batch, Committer, Store, StoreOptions, TreeId};

type Log = Arc<Mutex<Vec<&'static str>>>;

#[test]
fn a_duplicate_result_is_answered_only_after_the_first_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let store_path = tmp.path().join("store");
    std::fs::create_dir_all(&store_path).unwrap();
    let sd = StoreDir::new(&store_path).unwrap();
    let store = Store::open(&tmp.path().join("state"), &StoreOptions::default()).unwrap();
    let log: Log = Arc::default();
    let (held_tx, held_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let listener = {
        let log = log.clone();
        let release_rx = Mutex::new(release_rx);
        Box::new(move |events: &[EventRecord]| {
            if events.iter().any(|e| e.kind == "build-succeeded") {
                log.lock().unwrap().push("first durable");
                held_tx.send(()).unwrap();
                // Bounded: the test releases it, or it gives up after 120 s.
                let _ = release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(120));
                log.lock().unwrap().push("first released");
            }
        })
    };
    let committer = Committer::start(
        store.clone(),
        CommitterOptions {
            max_batch: 64,
            ..Default::default()
        },
        listener,
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
    let sink: kiln::supervisor::EventSink = Arc::new(OnceLock::new());
    let config = Config::default();

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
        let (p, b) = simple_drv(&sd, "dup", "echo > $out");
        let submitted = actors
            .queue
            .send(Submit(SubmitBuilds {
                derivations: vec![SubmittedDrv {
                    path: p.clone(),
                    contents: Bytes64(b),
                }],
                builds: vec![p],
                priority: 0,
                tags: vec![],
                defer_until_ms: 0,
                related: false,
            }))
            .await
            .unwrap()
            .unwrap();
        let id = submitted.builds[0].id;
        let leased = actors
            .queue
            .send(Allocate {
                agent_id: 1,
                request: None,
                candidates: vec![id],
                alive: None,
            })
            .await
            .unwrap()
            .unwrap()
            .builds;
        assert_eq!(leased.len(), 1);
        // The verified upload the result names.
        let mut upload = Batch::new();
        let nar = NarFileRecord {
            file_size: 1,
            nar_hash: "sha256:n".into(),
            nar_size: 1,
            created_ms: 1,
        };
        upload.put(TreeId::NarFiles, b"sha256:f", &nar).unwrap();
        committer.commit(upload).await.unwrap();
        let out = leased[0].outputs[0].1.clone();
        let finish = || Finish {
            agent_id: 1,
            build_id: id,
            attempt: 1,
            outcome: Ok(vec![BuiltOutput {
                name: "out".into(),
                path: out.clone(),
                nar_hash: "sha256:n".into(),
                nar_size: 1,
                file_hash: "sha256:f".into(),
                file_size: 1,
                references: vec![],
            }]),
            log_attempt: 0,
            // No reference scan: the HTTP layer scans real NARs (tests/output_references.rs);
            // this pins the queue's handling of a repeat.
            scanned: None,
            lost_inputs: Vec::new(),
        };
        // Both are in the queue's mailbox before either is handled.
        let first = actors.queue.send(finish());
        let repeat = actors.queue.send(finish());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let answered = log.clone();
        actix::spawn(async move {
            let r = repeat.await;
            answered.lock().unwrap().push("repeat answered");
            let _ = done_tx.send(r);
        });
        let mut held_rx = held_rx;
        tokio::time::timeout(Duration::from_secs(120), held_rx.recv())
            .await
            .expect("the first result's commit reached the listener");
        // The queue handles its mailbox in order: once this answers, the repeat was handled
        // too (and, were it answered at once, its answer is on its way).
        let rec = actors.queue.send(GetRecord(id)).await.unwrap().unwrap();
        assert_eq!(rec.map(|r| r.state), Some(BuildState::Succeeded));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        release_tx.send(()).unwrap();
        let dup = tokio::time::timeout(Duration::from_secs(120), done_rx)
            .await
            .expect("the repeat is answered")
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(dup.duplicate);
        let ack = first.await.unwrap().unwrap();
        assert!(!ack.duplicate, "the first report is the accepted one");
        assert_eq!(
            *log.lock().unwrap(),
            vec!["first durable", "first released", "repeat answered"],
            "the repeat was answered before the first result's commit completed"
        );
        actix::System::current().stop();
    });
}
