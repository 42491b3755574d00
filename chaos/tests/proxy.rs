//! The fault proxy on real loopback sockets, driven by the agent's own HTTP client (reqwest,
//! which streams bodies chunked) against a small recording HTTP server. Pins down: exchanges
//! on a keep-alive connection are framed (Content-Length and chunked) and forwarded byte for
//! byte; the log names route, build and attempt; a reply reset after the server answered, an
//! upload cut at a share of its body, blackholes that end when an end gives up, partition
//! windows; and that one seed gives the same decisions.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_chaos::proxy::{
    Action, Ending, Exchange, FaultPlan, FaultSource, Mode, Phase, Proxy, ProxyConfig, Route,
    RouteSel, Rule,
};
use sha2::Digest as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What the recording server saw of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    target: String,
    body_len: u64,
    body_sha: String,
    /// The body ended before its declared end.
    cut: bool,
}

/// A recording HTTP/1.1 server: keep-alive, Content-Length or chunked request bodies. It
/// answers `200` with `reply(target)`; with `stall_close`, it closes a connection whose body
/// stops arriving for that long (a server's stall detection).
struct Server {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Idle connections the server closed (its keep-alive timeout).
    idle_closed: Arc<std::sync::atomic::AtomicU64>,
}

async fn read_body(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    head: &str,
    stall: Option<Duration>,
) -> (Vec<u8>, bool) {
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    let timed = |d: Option<Duration>| d.unwrap_or(Duration::from_secs(3600));
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut line = String::new();
            match tokio::time::timeout(timed(stall), r.read_line(&mut line)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return (body, true),
            }
            let size =
                usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).unwrap_or(0);
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = String::new();
                    match r.read_line(&mut t).await {
                        Ok(n) if n > 0 && t != "\r\n" => {}
                        _ => return (body, false),
                    }
                }
            }
            let mut chunk = vec![0; size + 2];
            match tokio::time::timeout(timed(stall), r.read_exact(&mut chunk)).await {
                Ok(Ok(_)) => body.extend_from_slice(&chunk[..size]),
                _ => return (body, true),
            }
        }
    }
    let len: usize = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut buf = vec![0; 64 * 1024];
    while body.len() < len {
        let want = (len - body.len()).min(buf.len());
        match tokio::time::timeout(timed(stall), r.read(&mut buf[..want])).await {
            Ok(Ok(n)) if n > 0 => body.extend_from_slice(&buf[..n]),
            _ => return (body, true),
        }
    }
    (body, false)
}

impl Server {
    async fn start(reply: fn(&str) -> String, stall_close: Option<Duration>) -> Server {
        Server::start_with(reply, stall_close, None).await
    }

    /// Also close a connection idle for `idle_close` between requests.
    async fn start_with(
        reply: fn(&str) -> String,
        stall_close: Option<Duration>,
        idle_close: Option<Duration>,
    ) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let idle_closed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let closed2 = idle_closed.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else {
                    return;
                };
                let seen = s2.clone();
                let closed = closed2.clone();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut r = BufReader::new(r);
                    loop {
                        let mut head = String::new();
                        let idle = idle_close.unwrap_or(Duration::from_secs(3600));
                        match tokio::time::timeout(idle, r.fill_buf()).await {
                            Ok(Ok(b)) if !b.is_empty() => {}
                            Ok(_) => return,
                            Err(_) => {
                                closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                return;
                            }
                        }
                        loop {
                            let mut line = String::new();
                            match r.read_line(&mut line).await {
                                Ok(n) if n > 0 => {}
                                _ => return,
                            }
                            head.push_str(&line);
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut first = head.split_whitespace();
                        let method = first.next().unwrap_or("").to_string();
                        let target = first.next().unwrap_or("").to_string();
                        let (body, cut) = read_body(&mut r, &head, stall_close).await;
                        seen.lock().unwrap().push(Seen {
                            method,
                            target: target.clone(),
                            body_len: body.len() as u64,
                            body_sha: format!("{:x}", sha2::Sha256::digest(&body)),
                            cut,
                        });
                        if cut {
                            return;
                        }
                        let text = reply(&target);
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
                            text.len()
                        );
                        if w.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Server {
            addr,
            seen,
            idle_closed,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn default_reply(target: &str) -> String {
    if target.ends_with("/work") {
        r#"{"builds":[{"build_id":9,"attempt":1}],"commands":[]}"#.to_string()
    } else {
        format!("{{\"echo\":{:?}}}", target)
    }
}

fn plan(seed: u64, rules: Vec<Rule>) -> FaultPlan {
    FaultPlan {
        seed,
        rules,
        ..FaultPlan::default()
    }
}

async fn proxy(upstream: std::net::SocketAddr, plan: FaultPlan) -> Proxy {
    Proxy::start(
        ProxyConfig {
            name: "agent-t".into(),
            index: 0,
            plan,
            log_file: None,
            tls: None,
        },
        upstream,
    )
    .await
    .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

/// Poll until the proxy logged `n` exchanges (bounded: 60 s).
async fn logged(p: &Proxy, n: usize) -> Vec<Exchange> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = p.exchanges();
        if log.len() >= n {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy logged {} exchanges, waited for {n}: {log:?}",
            log.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_exchanges_are_framed_forwarded_and_logged() {
    let server = Server::start(default_reply, None).await;
    let p = proxy(server.addr, plan(1, vec![])).await;
    let c = client();
    let base = p.url();

    let r = c
        .get(format!("{base}/nix-cache-info"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("nix-cache-info"));

    let r = c
        .post(format!("{base}/api/agent/v1/builds/5/start"))
        .header("content-type", "application/json")
        .body(r#"{"attempt":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();

    // A chunked body, as reqwest streams one without a length.
    let log_body = bytes(300 * 1024, 3);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = log_body
        .chunks(7000)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let r = c
        .put(format!("{base}/api/agent/v1/builds/5/log?attempt=2"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();

    let upload = bytes(1 << 20, 9);
    let r = c
        .put(format!(
            "{base}/api/agent/v1/builds/5/outputs/out?attempt=2&file_hash=x&file_size=1048576&offset=0"
        ))
        .body(upload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();

    let seen = server.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(
        seen[2].body_sha,
        sha(&log_body),
        "chunked body forwarded byte for byte"
    );
    assert_eq!(seen[3].body_sha, sha(&upload));
    assert!(seen.iter().all(|s| !s.cut));

    let log = logged(&p, 4).await;
    let routes: Vec<Route> = log.iter().map(|e| e.route).collect();
    assert_eq!(
        routes,
        [Route::Other, Route::Start, Route::Log, Route::Upload]
    );
    // reqwest may open a second connection while the first goes back to its pool: exchange
    // numbers count per connection.
    let mut per_conn: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for e in &log {
        per_conn.entry(e.conn).or_default().push(e.seq);
    }
    for seqs in per_conn.values() {
        assert_eq!(*seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "{log:?}");
    }
    for e in &log[1..] {
        assert_eq!((e.build, e.attempt), (Some(5), Some(2)), "{e:?}");
    }
    assert_eq!(log[3].offset, Some(0));
    assert_eq!(log[3].request_forwarded, 1 << 20);
    assert_eq!(log[3].request_len, Some(1 << 20));
    assert!(log
        .iter()
        .all(|e| e.ending == Ending::Completed && e.status == Some(200) && e.fault.is_none()));
}

/// Read one response (Content-Length framed) from a raw socket; returns its body.
async fn read_response(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> String {
    let mut len = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(!line.is_empty(), "the connection closed before a reply");
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.unwrap();
    String::from_utf8(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_several_exchanges() {
    let server = Server::start(default_reply, None).await;
    let p = proxy(server.addr, plan(6, vec![])).await;
    let s = TcpStream::connect(p.addr()).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"POST /api/agent/v1/builds/3/result HTTP/1.1\r\nhost: x\r\ncontent-length: 13\r\n\r\n{\"attempt\":4}")
        .await
        .unwrap();
    assert!(read_response(&mut r).await.contains("result"));
    w.write_all(b"PUT /api/agent/v1/builds/3/log?attempt=4 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ntrailer: t\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut r).await.contains("log"));
    w.write_all(b"GET /nar/abc.nar.zst HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut r).await.contains("nar"));
    let log = logged(&p, 3).await;
    assert!(log.iter().all(|e| e.conn == log[0].conn), "{log:?}");
    assert_eq!(log.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(
        log.iter().map(|e| e.route).collect::<Vec<_>>(),
        [Route::Result, Route::Log, Route::Nar]
    );
    assert_eq!((log[0].build, log[0].attempt), (Some(3), Some(4)));
    assert_eq!((log[1].build, log[1].attempt), (Some(3), Some(4)));
    let seen = server.seen();
    assert_eq!(
        seen[1].body_len, 11,
        "the chunked body decodes to hello world"
    );
    assert_eq!(seen[1].body_sha, sha(b"hello world"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_reply_reset_after_the_server_answered_is_lost_and_logged() {
    let server = Server::start(default_reply, None).await;
    let mut rule = Rule::always(RouteSel::Work, Phase::Reply, Action::Reset);
    rule.min_assigned = 1;
    rule.limit = Some(1);
    let p = proxy(server.addr, plan(2, vec![rule])).await;
    let c = client();
    let url = format!("{}/api/agent/v1/work", p.url());
    let first = c
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"max_builds":1}"#)
        .send()
        .await;
    let lost = match first {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(lost, "the first work reply must not arrive");
    // The limit is 1: the retry gets through.
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"max_builds":1}"#)
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("\"build_id\":9"));
    assert_eq!(server.seen().len(), 2, "the server answered both");
    let log = logged(&p, 2).await;
    let e = &log[0];
    assert_eq!(e.route, Route::Work);
    assert_eq!(e.status, Some(200), "the coordinator answered");
    assert_eq!(e.assigned, vec![(9, 1)]);
    let f = e.fault.expect("a fault");
    assert_eq!(
        (f.action, f.phase, f.source),
        (Action::Reset, Phase::Reply, FaultSource::Rule)
    );
    assert_eq!(e.ending, Ending::Reset);
    assert_eq!(e.reply_forwarded, 0);
    assert_eq!(log[1].ending, Ending::Completed);
    assert_eq!(
        kiln_chaos::counters::reset_kind(e),
        Some("resets_work_reply")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_at_half_reaches_the_server_half() {
    let server = Server::start(default_reply, None).await;
    let mut rule = Rule::always(RouteSel::Upload, Phase::Request, Action::Reset);
    rule.after_fraction = Some((0.5, 0.5));
    let p = proxy(server.addr, plan(3, vec![rule])).await;
    let body = bytes(1 << 20, 1);
    let r = client()
        .put(format!(
            "{}/api/agent/v1/builds/8/outputs/out?attempt=1&file_hash=x&file_size=1048576",
            p.url()
        ))
        .body(body.clone())
        .send()
        .await;
    assert!(r.is_err(), "the client sees the connection break");
    let log = logged(&p, 1).await;
    let e = &log[0];
    assert_eq!(e.request_forwarded, 512 * 1024, "{e:?}");
    assert_eq!(e.ending, Ending::Reset);
    assert_eq!(
        kiln_chaos::counters::reset_kind(e),
        Some("resets_mid_upload")
    );
    // The server sees the body end after exactly the forwarded half (a FIN, not a reset).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let seen = loop {
        if let Some(s) = server.seen().first().cloned() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server saw nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(seen.cut);
    assert_eq!(seen.body_len, 512 * 1024);
    assert_eq!(seen.body_sha, sha(&body[..512 * 1024]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_upload_ends_when_the_server_gives_up() {
    // The server closes a connection whose body stalls for 1 s: its stall detection.
    let server = Server::start(default_reply, Some(Duration::from_secs(1))).await;
    let mut rule = Rule::always(RouteSel::Upload, Phase::Request, Action::Blackhole);
    rule.after_fraction = Some((0.25, 0.25));
    let p = proxy(server.addr, plan(4, vec![rule])).await;
    let r = client()
        .put(format!(
            "{}/api/agent/v1/builds/8/outputs/out?attempt=1&file_hash=x&file_size=262144",
            p.url()
        ))
        .body(bytes(256 * 1024, 2))
        .send()
        .await;
    assert!(r.is_err(), "no reply gets through a blackhole");
    let log = logged(&p, 1).await;
    let e = &log[0];
    assert_eq!(e.request_forwarded, 64 * 1024);
    assert_eq!(e.fault.map(|f| f.action), Some(Action::Blackhole));
    assert_eq!(e.ending, Ending::UpstreamGaveUp, "{e:?}");
    assert_eq!(server.seen()[0].body_len, 64 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_windows_refuse_and_blackhole_windows_swallow() {
    let server = Server::start(default_reply, None).await;
    let p = proxy(server.addr, plan(5, vec![])).await;
    let url = format!("{}/x", p.url());
    p.set_mode(Mode::Refuse);
    assert!(client().get(&url).send().await.is_err());
    assert!(p.counts().refused >= 1);

    p.set_mode(Mode::Blackhole);
    let short = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    assert!(short.get(&url).send().await.is_err(), "nothing comes back");
    assert!(server.seen().is_empty(), "nothing was forwarded");

    p.set_mode(Mode::Normal);
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(server.seen().len(), 1);
}

/// Which of 16 fresh connections (one request each) a 50 % rule resets.
async fn pattern(seed: u64) -> Vec<bool> {
    let server = Server::start(default_reply, None).await;
    let mut rule = Rule::always(RouteSel::Any, Phase::Request, Action::Reset);
    rule.probability = 0.5;
    let p = proxy(server.addr, plan(seed, vec![rule])).await;
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    for i in 0..16 {
        let _ = c.get(format!("{}/r{i}", p.url())).send().await;
        logged(&p, i + 1).await;
    }
    let mut log = p.exchanges();
    log.sort_by_key(|e| e.conn);
    log.iter().map(|e| e.fault.is_some()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_seed_gives_the_same_decisions() {
    let a = pattern(7).await;
    let b = pattern(7).await;
    let c = pattern(8).await;
    assert_eq!(a, b);
    assert_ne!(a, c, "another seed, other decisions");
    assert!(a.iter().any(|f| *f) && a.iter().any(|f| !*f), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_budget_cuts_the_connection_once() {
    let server = Server::start(default_reply, None).await;
    let p = proxy(
        server.addr,
        FaultPlan {
            seed: 9,
            connection_reset_probability: 1.0,
            connection_reset_after_bytes: (100_000, 100_000),
            ..FaultPlan::default()
        },
    )
    .await;
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    let body = bytes(300_000, 4);
    let head = format!(
        "PUT /api/agent/v1/builds/1/outputs/out?attempt=1 HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(&body).await;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    let log = logged(&p, 1).await;
    let e = &log[0];
    assert_eq!(
        e.request_forwarded + head.len() as u64,
        100_000,
        "the budget counts head and body: {e:?}"
    );
    assert_eq!(e.fault.map(|f| f.source), Some(FaultSource::Connection));
    assert!(rest.is_empty(), "no reply after the reset");
}

/// Pins down that a blackhole window is silent both ways: the coordinator closing an idle
/// connection during the window does not reach the agent (a reset there would tell the agent
/// something a partitioned link cannot); the agent's side is reset when the window ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_hides_the_coordinator_closing_an_idle_connection() {
    let server = Server::start_with(default_reply, None, Some(Duration::from_millis(300))).await;
    let p = proxy(server.addr, plan(10, vec![])).await;
    let s = TcpStream::connect(p.addr()).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut r).await.contains("/a"));
    p.set_mode(Mode::Blackhole);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while server.idle_closed.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never closed the idle connection"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut buf = [0u8; 16];
    let quiet = tokio::time::timeout(Duration::from_millis(300), r.read(&mut buf)).await;
    assert!(
        quiet.is_err(),
        "the agent heard of the close during the window: {quiet:?}"
    );
    p.set_mode(Mode::Normal);
    let ended = tokio::time::timeout(Duration::from_secs(60), r.read(&mut buf))
        .await
        .expect("the connection ends when the window does");
    assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
}
