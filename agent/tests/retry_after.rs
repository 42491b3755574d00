//! The agent honours `Retry-After` at the session level: a coordinator whose committer queue
//! is full answers 503 `overloaded` with `Retry-After` (as `kiln coordinator` does, see
//! tests/supervision.rs in the workspace root), and the agent's client waits that long before
//! it tries again, instead of its own, much shorter backoff; then the call succeeds.
//!
//! The stand-in coordinator is hand-written HTTP/1.1 on 127.0.0.1:0, answering exactly what the
//! real one answers. The one assertion on time is a lower bound (the wait was at least the
//! `Retry-After`), which a slow machine cannot break.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln::protocol::{Heartbeat, HeartbeatReply};
use kiln_agent::client::{Coordinator, Held, Identity};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

const RETRY_AFTER_S: u64 = 3;

/// Reads one request (head and `Content-Length` body); returns its request line.
async fn read_request(r: &mut BufReader<tokio::net::TcpStream>) -> Option<String> {
    let mut first = String::new();
    if r.read_line(&mut first).await.ok()? == 0 {
        return None;
    }
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).await.ok()?;
    Some(first.trim_end().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_with_retry_after_is_waited_out_then_the_call_succeeds() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let seen2 = seen.clone();
    let server = tokio::spawn(async move {
        // Bounded: two requests are all this test makes.
        for n in 0..2 {
            let (sock, _) = listener.accept().await.unwrap();
            let mut r = BufReader::new(sock);
            let line = read_request(&mut r).await.expect("a request");
            seen2.lock().unwrap().push((Instant::now(), line));
            let (status, extra, body) = if n == 0 {
                (
                    "503 Service Unavailable",
                    format!("Retry-After: {RETRY_AFTER_S}\r\n"),
                    r#"{"error":{"code":"overloaded","message":"the state database's write queue is full (2 batches waiting, store.max_queued = 2); retry shortly"}}"#,
                )
            } else {
                ("200 OK", String::new(), r#"{"commands":[]}"#)
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            r.get_mut().write_all(reply.as_bytes()).await.unwrap();
            r.get_mut().shutdown().await.unwrap();
        }
    });
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let client = Coordinator::new(
        &base,
        Identity {
            name: "w".into(),
            secret: "s".into(),
            systems: vec!["x86_64-linux".into()],
            max_parallel_builds: 1,
            registration_token: None,
        },
        Held::default(),
        tx,
    )
    .unwrap();
    let reply: HeartbeatReply = tokio::time::timeout(
        Duration::from_secs(120),
        client.post("heartbeat", "/heartbeat", &Heartbeat::default()),
    )
    .await
    .expect("the call ends")
    .expect("the retry succeeds");
    assert!(reply.commands.is_empty());
    server.await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "one refusal, one retry: {seen:?}");
    assert!(seen
        .iter()
        .all(|(_, l)| l.starts_with("POST /api/agent/v1/heartbeat ")));
    let waited = seen[1].0.duration_since(seen[0].0);
    // The default backoff's first wait is 100–300 ms: only Retry-After explains this wait.
    assert!(
        waited >= Duration::from_secs(RETRY_AFTER_S),
        "the agent retried after {waited:?}, before the coordinator's Retry-After of {RETRY_AFTER_S} s"
    );
}
