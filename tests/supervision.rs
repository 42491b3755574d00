//! Supervision, with the real actors on a real sled database, and with a real `kiln
//! coordinator` process over real HTTP. Needs `--features fault-points`.
//!
//! In process: every actor that stops or panics is rebuilt from its factory (its restart
//! counter says so) and afterwards its memory equals sled; shared state that is not the
//! actor's own (tokens, session actors) survives a registry restart.
//!
//! Real process: a panic fired in each actor through the fault-point route answers 503 with
//! `Retry-After`, the actor restarts (`kiln_actor_restarts_total` rises by one) and the next
//! real request through it succeeds; past the restart intensity the coordinator stops cleanly
//! with exit status 70 and one log line naming the actor; a full committer queue answers 503
//! `overloaded` with `Retry-After`; a failed flush stops the process with exit status 74
//! without answering, and the write it did not answer is durable after a restart.

#![cfg(feature = "fault-points")]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use kiln::actors::agent_session::{Beat, CorruptMemoryAndStop as CorruptSession};
use kiln::actors::allocator::{CorruptMemoryAndStop as CorruptAllocator, IndexSnapshot, TakeWork};
use kiln::actors::build_queue::{CorruptMemoryAndStop, LiveBuilds, PanicInHandler, Submit};
use kiln::actors::event_log::{Subscribe, SubscriberCount};
use kiln::actors::guard::faults::{InjectPanic, PanicAt};
use kiln::actors::hook_processor::{CorruptMemoryAndStop as CorruptHooks, PendingSnapshot};
use kiln::actors::registry::{
    CorruptMemoryAndStop as CorruptRegistry, CreateAgent, Open, RegistrySnapshot, SessionOf,
};
use kiln::actors::ActorError;
use kiln::config::{Config, HookConfig};
use kiln::derivation::store_path::StoreDir;
use kiln::protocol::{
    BuildState, Bytes64, NewAgent, OpenSession, SubmitBuilds, SubmittedDrv, PROTOCOL_VERSION,
    SESSION_HEADER,
};
use kiln::store::committer::CommitterOptions;
use kiln::store::nar_cache::NarCache;
use kiln::store::records::BuildRecord;
use kiln::store::{Committer, Store, StoreOptions, TreeId};
use kiln::supervisor::{Actors, Restarts};

/// Generous: only bounds a hang on a slow, shared machine.
const LIMIT: Duration = Duration::from_secs(120);

fn live_in_sled(store: &Store) -> HashMap<u64, BuildRecord> {
    store
        .scan::<BuildRecord>(TreeId::Builds)
        .map(|r| r.unwrap().1)
        .filter(|b| !b.state.is_terminal())
        .map(|b| (b.id, b))
        .collect()
}

fn runnable_in_sled(store: &Store) -> Vec<u64> {
    let mut ids: Vec<u64> = live_in_sled(store)
        .into_values()
        .filter(|b| b.state == BuildState::Runnable)
        .map(|b| b.id)
        .collect();
    ids.sort_unstable();
    ids
}

fn hook_work_in_sled(store: &Store) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for w in store.hook_work() {
        let (hook, seq, _) = w.unwrap();
        m.entry(hook).or_default().push(seq);
    }
    m
}

async fn wait_restarts(restarts: &Restarts, actor: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while restarts.count(actor) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{actor} did not restart {n} time(s)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(restarts.count(actor), n, "{actor}: exactly {n} restart(s)");
}

/// Poll `f` (async) until it returns `Some`.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real store, committer and NAR cache in a temp dir, with one hook (`fails`, on
/// `build-submitted`, always failing, so its work stays in sled).
struct Rig {
    _tmp: tempfile::TempDir,
    store: Store,
    committer: Committer,
    nars: Arc<NarCache>,
    config: Config,
    sd: StoreDir,
    sink: kiln::supervisor::EventSink,
}

fn rig() -> Rig {
    let tmp = tempfile::tempdir().unwrap();
    let store_path = tmp.path().join("store");
    std::fs::create_dir_all(&store_path).unwrap();
    let sd = StoreDir::new(&store_path).unwrap();
    let store = Store::open(&tmp.path().join("state"), &StoreOptions::default()).unwrap();
    let mut config = Config::default();
    config.hooks.push(HookConfig {
        name: "fails".into(),
        events: vec!["build-submitted".into()],
        exec: vec!["/bin/false".into()],
        parallelism: 1,
        max_attempts: 1000,
        timeout_ms: 60_000,
    });
    let sink: kiln::supervisor::EventSink = Arc::new(OnceLock::new());
    let committer = Committer::start(
        store.clone(),
        CommitterOptions {
            max_batch: 64,
            hook_routes: [("build-submitted".to_string(), vec!["fails".to_string()])].into(),
            ..Default::default()
        },
        kiln::supervisor::event_listener(sink.clone()),
    )
    .unwrap();
    // `supervisor::start` wants the store dir recorded (a restarting queue reads it there).
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
    Rig {
        _tmp: tmp,
        store,
        committer,
        nars,
        config,
        sd,
        sink,
    }
}

fn start(r: &Rig) -> Actors {
    kiln::supervisor::start(
        &r.config,
        r.store.clone(),
        r.committer.clone(),
        r.nars.clone(),
        Some(r.sd.clone()),
        r.sink.clone(),
    )
    .unwrap()
}

async fn submit(actors: &Actors, sd: &StoreDir, prefix: &str, n: usize) -> Vec<u64> {
    let mut derivations = Vec::new();
    let mut builds = Vec::new();
    for i in 0..n {
        let (p, b) = simple_drv(sd, &format!("{prefix}-{i}"), "echo > $out");
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
    submitted.builds.iter().map(|b| b.id).collect()
}

#[test]
fn a_stopped_build_queue_restarts_from_sled_and_a_panic_is_a_restart() {
    let r = rig();
    actix::System::new().block_on(async move {
        let actors = start(&r);
        let store = r.store.clone();
        assert_eq!(submit(&actors, &r.sd, "sup", 5).await.len(), 5);
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

        // A panic in a handler: an explicit Unavailable answer, a restart, and a working actor.
        let res = actors
            .queue
            .send(PanicInHandler)
            .await
            .expect("the mailbox stays open");
        assert!(matches!(res, Err(ActorError::Unavailable(_))), "{res:?}");
        wait_restarts(&actors.restarts, "build_queue", 2).await;
        let again = actors
            .queue
            .send(LiveBuilds)
            .await
            .expect("the restarted actor answers");
        assert_eq!(again, live_in_sled(&store));

        // A panic in the future of a `ResponseActFuture` and in its continuation.
        for (at, n) in [(PanicAt::Future, 3), (PanicAt::Continuation, 4)] {
            let res = actors.queue.send(InjectPanic(at)).await.unwrap();
            assert!(matches!(res, Err(ActorError::Unavailable(_))), "{res:?}");
            wait_restarts(&actors.restarts, "build_queue", n).await;
            assert_eq!(
                actors.queue.send(LiveBuilds).await.unwrap(),
                live_in_sled(&store)
            );
        }
        // And it serves writes again.
        assert_eq!(submit(&actors, &r.sd, "sup-after", 1).await.len(), 1);
        assert_eq!(
            actors.queue.send(LiveBuilds).await.unwrap(),
            live_in_sled(&store)
        );
        assert!(actors.restarts.has_given_up().is_none());
        actix::System::current().stop();
    });
}

#[test]
fn every_other_actor_is_rebuilt_from_its_factory_and_its_memory_equals_sled() {
    let r = rig();
    actix::System::new().block_on(async move {
        let actors = start(&r);
        let store = r.store.clone();
        let ids = submit(&actors, &r.sd, "all", 4).await;
        assert_eq!(ids.len(), 4);

        // Allocator: its index is the runnable builds of sled.
        let index = eventually("the allocator's index", || async {
            let ix = actors.allocator.send(IndexSnapshot).await.unwrap();
            (ix == runnable_in_sled(&store)).then_some(ix)
        })
        .await;
        assert_eq!(index.len(), 4);
        actors.allocator.do_send(CorruptAllocator);
        wait_restarts(&actors.restarts, "allocator", 1).await;
        let ix = actors.allocator.send(IndexSnapshot).await.unwrap();
        assert_eq!(ix, runnable_in_sled(&store), "allocator memory equals sled");
        let res = actors.allocator.send(InjectPanic(PanicAt::Handler)).await;
        assert!(res.is_err(), "the reply of a panicking handler is dropped");
        wait_restarts(&actors.restarts, "allocator", 2).await;
        assert_eq!(
            actors.allocator.send(IndexSnapshot).await.unwrap(),
            runnable_in_sled(&store)
        );
        // Serves again: proposes work.
        let taken = actors
            .allocator
            .send(TakeWork {
                agent: kiln::actors::runnable_index::AgentMatch {
                    systems: vec!["x86_64-linux".into()],
                    ..Default::default()
                },
                max: 1,
                wait: Duration::ZERO,
                alive: None,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(taken.len(), 1);

        // Hook processor: its pending runs are the hook work in sled.
        let sled_work = hook_work_in_sled(&store);
        assert_eq!(
            sled_work["fails"].len(),
            4,
            "one per submitted build: {sled_work:?}"
        );
        eventually("the hook processor's pending runs", || async {
            let p = actors.hooks.send(PendingSnapshot).await.unwrap();
            (p == hook_work_in_sled(&store)).then_some(())
        })
        .await;
        actors.hooks.do_send(CorruptHooks);
        wait_restarts(&actors.restarts, "hook_processor", 1).await;
        assert_eq!(
            actors.hooks.send(PendingSnapshot).await.unwrap(),
            hook_work_in_sled(&store),
            "hook processor memory equals sled"
        );
        let res = actors
            .hooks
            .send(InjectPanic(PanicAt::Future))
            .await
            .unwrap();
        assert!(matches!(res, Err(ActorError::Unavailable(_))), "{res:?}");
        wait_restarts(&actors.restarts, "hook_processor", 2).await;
        assert_eq!(
            actors.hooks.send(PendingSnapshot).await.unwrap(),
            hook_work_in_sled(&store)
        );

        // Event log: a restart drops its subscribers (their streams end) and a new subscriber
        // gets every event of sled, in order.
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        actors
            .event_log
            .send(Subscribe { since: None, tx })
            .await
            .unwrap();
        assert_eq!(actors.event_log.send(SubscriberCount).await.unwrap(), 1);
        let res = actors
            .event_log
            .send(InjectPanic(PanicAt::Continuation))
            .await
            .unwrap();
        assert!(matches!(res, Err(ActorError::Unavailable(_))), "{res:?}");
        wait_restarts(&actors.restarts, "event_log", 1).await;
        assert_eq!(actors.event_log.send(SubscriberCount).await.unwrap(), 0);
        assert!(rx.recv().await.is_none(), "the old stream ended");
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        actors
            .event_log
            .send(Subscribe { since: Some(0), tx })
            .await
            .unwrap();
        let in_sled = store.last_event_seq().unwrap();
        assert_eq!(in_sled, 4, "one event per submitted build");
        for seq in 1..=in_sled {
            let e = rx.recv().await.expect("replayed");
            assert_eq!(e.seq, seq, "replayed in order, no gap");
        }
        // The restart asked the hook processor to reload from sled: it still matches.
        assert_eq!(
            actors.hooks.send(PendingSnapshot).await.unwrap(),
            hook_work_in_sled(&store)
        );

        // Agent registry: its memory (the next id, names being registered) starts over from
        // sled; the shared maps (tokens, session actors) survive it.
        let a1 = actors
            .registry
            .send(CreateAgent(NewAgent {
                name: "a1".into(),
                systems: vec!["x86_64-linux".into()],
            }))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a1.id, 1);
        let opened = actors
            .registry
            .send(Open(OpenSession {
                name: "a1".into(),
                secret: a1.secret.clone(),
                protocol_version: PROTOCOL_VERSION,
                systems: vec!["x86_64-linux".into()],
                max_parallel_builds: 1,
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
            .send(SessionOf(a1.id))
            .await
            .unwrap()
            .expect("a session actor");
        assert_eq!(
            actors.registry.send(RegistrySnapshot).await.unwrap(),
            (Some(2), vec![])
        );
        actors.registry.do_send(CorruptRegistry);
        wait_restarts(&actors.restarts, "agent_registry", 1).await;
        assert_eq!(
            actors.registry.send(RegistrySnapshot).await.unwrap(),
            (None, vec![]),
            "nothing cached: the next id comes from sled on first use"
        );
        let a2 = actors
            .registry
            .send(CreateAgent(NewAgent {
                name: "a2".into(),
                systems: vec!["x86_64-linux".into()],
            }))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a2.id, 2, "the id sled says is next, not the corrupted one");
        let res = actors
            .registry
            .send(InjectPanic(PanicAt::Continuation))
            .await
            .unwrap();
        assert!(matches!(res, Err(ActorError::Unavailable(_))), "{res:?}");
        wait_restarts(&actors.restarts, "agent_registry", 2).await;
        assert_eq!(actors.sessions.lookup(&opened.session_token), Some(a1.id));
        let kept = actors
            .registry
            .send(SessionOf(a1.id))
            .await
            .unwrap()
            .expect("the session actor is still known");
        assert_eq!(kept, session, "the same session actor, not a second one");

        // Agent session: rebuilt for the same agent, with none of the old memory.
        session.do_send(CorruptSession);
        wait_restarts(&actors.restarts, "agent_session", 1).await;
        assert_eq!(
            session.send(Beat { held: vec![] }).await.unwrap().unwrap(),
            vec![],
            "no command survives the restart"
        );
        let res = session.send(InjectPanic(PanicAt::Timer)).await.unwrap();
        assert!(res.is_ok(), "{res:?}");
        wait_restarts(&actors.restarts, "agent_session", 2).await;
        assert_eq!(
            session.send(Beat { held: vec![] }).await.unwrap().unwrap(),
            vec![]
        );

        // None of this went past the default intensity (5 in 60 s per actor).
        assert!(actors.restarts.has_given_up().is_none());
        // Nothing restarted that was not made to.
        assert_eq!(actors.restarts.count("build_queue"), 0);
        actix::System::current().stop();
    });
}

// ---- real process ----

/// `kiln_actor_restarts_total{actor}` as `/metrics` shows it.
fn metric(c: &Coordinator, name_and_labels: &str) -> Option<f64> {
    let text = ureq::get(&c.agent("/metrics"))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn restarts_of(c: &Coordinator, actor: &str) -> Option<u64> {
    metric(
        c,
        &format!("kiln_actor_restarts_total{{actor=\"{actor}\"}}"),
    )
    .map(|v| v as u64)
}

fn wait_restart_metric(c: &Coordinator, actor: &str, n: u64) {
    wait_for(&format!("{actor} restart {n} in /metrics"), LIMIT, || {
        (restarts_of(c, actor)? >= n).then_some(())
    });
    assert_eq!(restarts_of(c, actor), Some(n), "{actor}: exactly {n}");
}

/// A request with an optional session token: (status, Retry-After, JSON body).
fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, Option<String>, serde_json::Value) {
    let mut req = ureq::request(method, url).timeout(LIMIT);
    if let Some(t) = token {
        req = req.set(SESSION_HEADER, t);
    }
    let r = match body {
        Some(b) => req.send_json(b.clone()),
        // The client listener refuses a state-changing request without a JSON content type.
        None if method != "GET" => req.set("Content-Type", "application/json").call(),
        None => req.call(),
    };
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => panic!("{method} {url}: no answer: {e}"),
    };
    let code = resp.status();
    let retry_after = resp.header("retry-after").map(str::to_owned);
    let text = resp.into_string().unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (code, retry_after, json)
}

fn fire(c: &Coordinator, point: &str) -> (u16, Option<String>, serde_json::Value) {
    call(
        "POST",
        &c.url(&format!("/api/v1/faults/{point}")),
        None,
        None,
    )
}

fn submit_one(
    c: &Coordinator,
    sd: &StoreDir,
    name: &str,
) -> (u16, Option<String>, serde_json::Value) {
    let (path, bytes) = simple_drv(sd, name, "echo > $out");
    let body = serde_json::json!({
        "derivations": [{"path": path, "contents": b64(&bytes)}],
        "builds": [path],
    });
    call("POST", &c.url("/api/v1/builds"), None, Some(&body))
}

fn exit_status(c: &mut Coordinator) -> std::process::ExitStatus {
    let child = c.child.as_mut().expect("a running coordinator");
    let st = wait_for("the coordinator to exit", LIMIT, || {
        child.try_wait().unwrap()
    });
    c.child = None;
    st
}

#[test]
fn a_panic_in_each_actor_of_a_real_coordinator_restarts_it_and_the_next_request_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let hook_out = tmp.path().join("hook.out");
    let hook = format!(
        "[[hooks]]\nname = \"record\"\nevents = [\"build-submitted\"]\nexec = [\"/bin/sh\", \"-c\", \"cat >> '{}'; echo >> '{}'\"]\n",
        hook_out.display(),
        hook_out.display()
    );
    let c = Coordinator::start(tmp.path(), &store, &hook);
    for actor in kiln::supervisor::ACTORS {
        assert_eq!(restarts_of(&c, actor), Some(0), "{actor} starts at 0");
    }
    let (code, _, agent) = call(
        "POST",
        &c.url("/api/v1/agents"),
        None,
        Some(&serde_json::json!({"name": "w1", "systems": ["x86_64-linux"]})),
    );
    assert_eq!(code, 200, "{agent}");
    let open = serde_json::json!({
        "name": "w1", "secret": agent["secret"], "protocol_version": PROTOCOL_VERSION,
        "systems": ["x86_64-linux"], "max_parallel_builds": 1,
    });
    let (code, _, session) = call("POST", &c.agent("/api/agent/v1/session"), None, Some(&open));
    assert_eq!(code, 200, "{session}");
    let token = session["session_token"].as_str().unwrap().to_owned();
    let agent_id = session["agent_id"].as_u64().unwrap();

    // (point, where, the answer of the fault route)
    let plan = [
        ("build_queue", "future", 503),
        ("allocator", "timer", 200),
        ("agent_registry", "continuation", 503),
        ("agent_session", "handler", 503),
        ("event_log", "handler", 503),
        ("hook_processor", "future", 503),
    ];
    for (i, (actor, at, want)) in plan.into_iter().enumerate() {
        let point = if actor == "agent_session" {
            format!("{actor}.panic?at={at}&agent={agent_id}")
        } else {
            format!("{actor}.panic?at={at}")
        };
        let (code, retry_after, body) = fire(&c, &point);
        assert_eq!(code, want, "{point}: {body}");
        if code == 503 {
            assert_eq!(retry_after.as_deref(), Some("1"), "{point}: Retry-After");
            assert_eq!(body["error"]["code"], "unavailable", "{point}: {body}");
        }
        wait_restart_metric(&c, actor, 1);
        // The next real request through the actor succeeds.
        match actor {
            "build_queue" => {
                let (code, _, b) = submit_one(&c, &sd, "after-queue");
                assert_eq!(code, 200, "{b}");
                let (code, _, list) = call("GET", &c.url("/api/v1/builds"), None, None);
                assert_eq!(code, 200, "{list}");
            }
            "allocator" => {
                let (code, _, work) = call(
                    "POST",
                    &c.agent("/api/agent/v1/work"),
                    Some(&token),
                    Some(&serde_json::json!({"max_builds": 1})),
                );
                assert_eq!(code, 200, "{work}");
                assert_eq!(
                    work["builds"].as_array().map(Vec::len),
                    Some(1),
                    "the rebuilt index proposed the runnable build: {work}"
                );
            }
            "agent_registry" => {
                let (code, _, a2) = call(
                    "POST",
                    &c.url("/api/v1/agents"),
                    None,
                    Some(&serde_json::json!({"name": "w2", "systems": ["x86_64-linux"]})),
                );
                assert_eq!(code, 200, "{a2}");
                assert_eq!(a2["id"], 2);
                let (code, _, agents) = call("GET", &c.url("/api/v1/agents"), None, None);
                assert_eq!(code, 200, "{agents}");
            }
            "agent_session" => {
                let (code, _, hb) = call(
                    "POST",
                    &c.agent("/api/agent/v1/heartbeat"),
                    Some(&token),
                    Some(&serde_json::json!({})),
                );
                assert_eq!(code, 200, "{hb}");
            }
            "event_log" => {
                let agent = ureq::AgentBuilder::new().timeout_read(LIMIT).build();
                let resp = agent
                    .get(&c.url("/api/v1/events?since=0"))
                    .call()
                    .expect("event stream");
                let mut lines = std::io::BufReader::new(resp.into_reader()).lines();
                let first = lines
                    .find_map(|l| l.ok().filter(|l| l.starts_with("id: ")))
                    .expect("an event");
                assert_eq!(first, "id: 1", "replayed from the start");
            }
            "hook_processor" => {
                let (code, _, b) = submit_one(&c, &sd, "after-hooks");
                assert_eq!(code, 200, "{b}");
                let id = b["builds"][0]["id"].as_u64().unwrap();
                let needle = format!("\"build_id\":{id}");
                wait_for("the hook to run on the new build", LIMIT, || {
                    std::fs::read_to_string(&hook_out)
                        .ok()
                        .filter(|t| t.contains(&needle))
                });
            }
            _ => unreachable!(),
        }
        // Only this actor restarted, and only once.
        for (j, (other, _, _)) in plan.iter().enumerate() {
            let want = u64::from(j <= i);
            assert_eq!(restarts_of(&c, other), Some(want), "{other} after {actor}");
        }
    }
    assert!(!c.log().contains("restart intensity exceeded"));
    let log = c.log();
    assert!(
        log.contains("actor code panicked") && log.contains("backtrace"),
        "the guard and the panic hook logged the panics"
    );
}

#[test]
fn past_the_restart_intensity_the_coordinator_stops_cleanly_with_exit_status_70() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let mut c = Coordinator::start(
        tmp.path(),
        &store,
        "[supervision]\nmax_restarts = 2\nwindow_s = 3600\n",
    );
    let (code, _, acked) = submit_one(&c, &sd, "kept");
    assert_eq!(code, 200, "{acked}");
    let drv = acked["builds"][0]["drv_path"].as_str().unwrap().to_owned();
    // R = 2 restarts are fine; the third in the window is one too many.
    for n in 1..=2 {
        assert_eq!(fire(&c, "allocator.panic").0, 503);
        wait_restart_metric(&c, "allocator", n);
    }
    assert!(!c.log().contains("restart intensity exceeded"));
    let (code, _, _) = fire(&c, "allocator.panic");
    assert_eq!(code, 503);
    let st = exit_status(&mut c);
    assert_eq!(st.code(), Some(70), "exit status: {st}");
    let log = c.log();
    let line = log
        .lines()
        .find(|l| l.contains("restart intensity exceeded"))
        .unwrap_or_else(|| panic!("no escalation line in:\n{log}"));
    assert!(
        line.contains("allocator")
            && line.contains("restarts=3")
            && line.contains("max_restarts=2"),
        "the line names the actor and the counts: {line}"
    );
    assert_eq!(
        log.matches("restart intensity exceeded").count(),
        1,
        "one line, not a loop"
    );
    for step in [
        "stopping the listeners",
        "listeners stopped",
        "committer drained",
    ] {
        assert!(log.contains(step), "{step:?} missing from:\n{log}");
    }
    // The acknowledged submission is in the state dir.
    let dump = state_dump(&c.state_dir);
    assert!(dump.contains(&drv), "{dump}");
}

#[test]
fn a_full_committer_queue_refuses_writes_with_503_and_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    // The test config's `[store]` table comes last; a second one would be invalid TOML, so
    // the config is rewritten whole and the coordinator started again.
    let mut c = Coordinator::start(tmp.path(), &store, "");
    c.kill9();
    std::fs::write(
        &c.config,
        format!(
            "store_dir = {:?}\n[store]\nbackground_flush_ms = 0\nmax_queued = 2\n",
            store.display().to_string()
        ),
    )
    .unwrap();
    c.spawn();
    assert_eq!(fire(&c, "committer.stall").0, 200);
    // Three writers: the committer takes the first and holds it; two wait in the queue. They
    // start one at a time, so the queue is never full before the committer took the first.
    let writer = |i: usize| {
        let (url, sd) = (c.url("/api/v1/builds"), sd.clone());
        std::thread::spawn(move || {
            let (path, bytes) = simple_drv(&sd, &format!("held-{i}"), "echo > $out");
            let body = serde_json::json!({
                "derivations": [{"path": path, "contents": b64(&bytes)}],
                "builds": [path],
            });
            call("POST", &url, None, Some(&body))
        })
    };
    let mut writers = vec![writer(0)];
    wait_for("the committer to hold the first write", LIMIT, || {
        c.log()
            .contains("fault point committer.stall: holding a batch")
            .then_some(())
    });
    for i in 1..=2 {
        writers.push(writer(i));
        wait_for(
            &format!("{i} write(s) queued behind the held one"),
            LIMIT,
            || (metric(&c, "kiln_commit_queue_depth")? == i as f64).then_some(()),
        );
    }
    let (code, retry_after, body) = submit_one(&c, &sd, "refused");
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("store.max_queued = 2")),
        "{body}"
    );
    assert_eq!(fire(&c, "committer.resume").0, 200);
    for w in writers {
        let (code, _, body) = w.join().unwrap();
        assert_eq!(code, 200, "{body}");
    }
    // Retrying after Retry-After, as an agent would: accepted.
    let (code, _, body) = submit_one(&c, &sd, "refused");
    assert_eq!(code, 200, "{body}");
    // The refusal changed nothing: four builds, none twice.
    let (_, _, list) = call("GET", &c.url("/api/v1/builds"), None, None);
    assert_eq!(list.as_array().map(Vec::len), Some(4), "{list}");
}

#[test]
fn a_failed_flush_stops_the_coordinator_without_answering_and_the_write_is_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let mut c = Coordinator::start(tmp.path(), &store, "");
    let (code, _, first) = submit_one(&c, &sd, "before");
    assert_eq!(code, 200, "{first}");
    assert_eq!(fire(&c, "committer.fail_flush").0, 200);
    let (path, bytes) = simple_drv(&sd, "unanswered", "echo > $out");
    let body = serde_json::json!({
        "derivations": [{"path": path, "contents": b64(&bytes)}],
        "builds": [path],
    });
    let r = ureq::post(&c.url("/api/v1/builds"))
        .timeout(LIMIT)
        .send_json(body);
    match r {
        Err(ureq::Error::Transport(_)) => {}
        Ok(resp) => panic!("answered {}: {:?}", resp.status(), resp.into_string()),
        Err(ureq::Error::Status(code, resp)) => {
            panic!("answered {code}: {:?}", resp.into_string())
        }
    }
    let st = exit_status(&mut c);
    assert_eq!(st.code(), Some(74), "exit status: {st}");
    let log = c.log();
    assert!(
        log.contains("state database write failed") && log.contains("committer.fail_flush"),
        "{log}"
    );
    // The write nobody was told about is durable, once.
    c.spawn();
    let (code, _, list) = call("GET", &c.url("/api/v1/builds"), None, None);
    assert_eq!(code, 200, "{list}");
    let drvs: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["drv_path"].as_str())
        .collect();
    assert_eq!(drvs.iter().filter(|d| **d == path).count(), 1, "{list}");
    // Event numbering continues after what sled kept: no sequence number is reused.
    let (code, _, after) = submit_one(&c, &sd, "after");
    assert_eq!(code, 200, "{after}");
    c.stop();
    let dump = state_dump(&c.state_dir);
    let seqs: Vec<u64> = dump
        .lines()
        .filter_map(|l| l.strip_prefix("events "))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{dump}");
    let submitted = dump
        .lines()
        .filter(|l| l.starts_with("events ") && l.contains("build-submitted"))
        .count();
    assert_eq!(
        submitted, 3,
        "one event per build, none lost or doubled:\n{dump}"
    );
}
