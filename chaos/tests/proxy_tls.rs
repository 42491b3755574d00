//! The fault proxy terminating TLS both ways, on real loopback sockets: the agent's HTTP client
//! (reqwest with rustls, trusting only the test's CA, as `kiln-agent --ca-file` does) talks TLS
//! to the proxy, the proxy talks TLS to a recording HTTPS server, and the certificates come
//! from Kiln's own `kiln tls init` code. Pins down: exchanges are forwarded and logged from the
//! decrypted bytes; a reply reset after the server answered still lands where the rule says (the
//! server got the whole request, the client got an error, the log says so); an upload cut at
//! half reaches the server with exactly the bytes the log says were forwarded; reconnects after
//! a cut resume TLS sessions on both links; a client that does not trust the CA is refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_chaos::proxy::{
    Action, Ending, Exchange, FaultPlan, FaultSource, Phase, Proxy, ProxyConfig, ProxyTls, Route,
    RouteSel, Rule,
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

/// What the recording server saw of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    target: String,
    body: Vec<u8>,
    /// The body ended before its declared length.
    cut: bool,
}

/// A recording HTTPS/1.1 server (keep-alive, Content-Length bodies) serving `cert`.
struct Server {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    handshakes: Arc<AtomicU64>,
}

impl Server {
    async fn start(files: &kiln::http::tls::InitFiles) -> Server {
        let cert =
            kiln::http::tls::ReloadingCert::load(&files.server_cert, &files.server_key).unwrap();
        let config = kiln::http::tls::server_config(cert, None).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handshakes = Arc::new(AtomicU64::new(0));
        let (seen2, hs2) = (seen.clone(), handshakes.clone());
        tokio::spawn(async move {
            // Ends with the test's runtime.
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen, hs) = (acceptor.clone(), seen2.clone(), hs2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    hs.fetch_add(1, Ordering::SeqCst);
                    serve(tls, seen).await;
                });
            }
        });
        Server {
            addr,
            seen,
            handshakes,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Keep-alive: one request after the other until the client closes or cuts a body.
async fn serve(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    let (r, mut w) = tokio::io::split(tls);
    let mut r = BufReader::new(r);
    // Bounded by the client: each turn needs a new request.
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match r.read_line(&mut line).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let mut words = head.split_whitespace();
        let method = words.next().unwrap_or_default().to_string();
        let target = words.next().unwrap_or_default().to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = Vec::new();
        let got = (&mut r)
            .take(len as u64)
            .read_to_end(&mut body)
            .await
            .unwrap_or(0);
        let cut = got < len;
        seen.lock().unwrap().push(Seen {
            method,
            target: target.clone(),
            body,
            cut,
        });
        if cut {
            return;
        }
        let text = if target.ends_with("/work") {
            r#"{"builds":[{"build_id":9,"attempt":1}],"commands":[]}"#.to_string()
        } else {
            format!("{{\"echo\":{target:?}}}")
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if w.write_all(resp.as_bytes()).await.is_err() || w.flush().await.is_err() {
            return;
        }
    }
}

/// The agent's client: rustls, trusting only `ca` (as `kiln-agent --ca-file`).
fn client(ca: Option<&std::path::Path>) -> reqwest::Client {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(60));
    if let Some(ca) = ca {
        b = b.tls_built_in_root_certs(false);
        for c in reqwest::Certificate::from_pem_bundle(&std::fs::read(ca).unwrap()).unwrap() {
            b = b.add_root_certificate(c);
        }
    }
    b.build().unwrap()
}

/// Poll until `pred` holds for the proxy's log (bounded: 60 s).
async fn logged(p: &Proxy, pred: impl Fn(&[Exchange]) -> bool) -> Vec<Exchange> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = p.exchanges();
        if pred(&log) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy's log never got there: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_terminates_tls_both_ways_and_still_places_its_faults() {
    let dir = tempfile::tempdir().unwrap();
    let files = kiln::http::tls::init(
        &dir.path().join("tls"),
        &["localhost".to_string(), "127.0.0.1".to_string()],
    )
    .unwrap();
    let server = Server::start(&files).await;
    let lost_reply = Rule {
        limit: Some(1),
        ..Rule::always(RouteSel::Work, Phase::Reply, Action::Reset)
    };
    let mut cut = Rule::always(RouteSel::Upload, Phase::Request, Action::Reset);
    cut.after_fraction = Some((0.5, 0.5));
    cut.limit = Some(1);
    let tls = ProxyTls::from_files(
        &files.server_cert,
        &files.server_key,
        &files.ca,
        "localhost",
    )
    .unwrap();
    let p = Proxy::start(
        ProxyConfig {
            name: "agent-tls".into(),
            index: 0,
            plan: FaultPlan {
                seed: 7,
                rules: vec![lost_reply, cut],
                ..FaultPlan::default()
            },
            log_file: None,
            tls: Some(tls),
        },
        server.addr,
    )
    .await
    .unwrap();
    let base = p.url();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    let c = client(Some(&files.ca));

    // Forwarded both ways, decrypted in the middle: the log reads the route and the build.
    let r = c
        .post(format!("{base}/api/agent/v1/builds/5/start"))
        .header("content-type", "application/json")
        .body(r#"{"attempt":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"echo":"/api/agent/v1/builds/5/start"}"#
    );

    // The work reply is reset after the server answered: the server has the request, the
    // client an error.
    let lost = c
        .post(format!("{base}/api/agent/v1/work"))
        .header("content-type", "application/json")
        .body(r#"{"request_id":"r1"}"#)
        .send()
        .await;
    let lost_text = match lost {
        Ok(r) => r.text().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(
        lost_text.is_err(),
        "the reset reply reached the client: {lost_text:?}"
    );
    // The retry (a new connection: the reset ended the last one) gets its reply.
    let r = c
        .post(format!("{base}/api/agent/v1/work"))
        .header("content-type", "application/json")
        .body(r#"{"request_id":"r1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("\"build_id\":9"));

    // An upload cut at half its body.
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let cut_upload = c
        .put(format!(
            "{base}/api/agent/v1/builds/5/outputs/out?attempt=2&offset=0"
        ))
        .header("content-type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await;
    assert!(cut_upload.is_err() || !cut_upload.unwrap().status().is_success());

    let log = logged(&p, |l| {
        l.iter().filter(|e| e.route == Route::Upload).count() >= 1
    })
    .await;
    let start = log.iter().find(|e| e.route == Route::Start).unwrap();
    assert_eq!(
        (start.build, start.attempt, start.status),
        (Some(5), Some(2), Some(200))
    );
    assert_eq!(start.ending, Ending::Completed);

    let works: Vec<&Exchange> = log.iter().filter(|e| e.route == Route::Work).collect();
    assert_eq!(works.len(), 2, "{works:?}");
    assert_eq!(
        works[0].status,
        Some(200),
        "the server answered the lost one"
    );
    assert_eq!(works[0].assigned, vec![(9, 1)]);
    assert_eq!(works[0].ending, Ending::Reset);
    let f = works[0].fault.as_ref().unwrap();
    assert_eq!(
        (f.action, f.phase, f.source),
        (Action::Reset, Phase::Reply, FaultSource::Rule)
    );
    assert_eq!(works[1].ending, Ending::Completed);
    assert_ne!(
        works[0].conn, works[1].conn,
        "the retry came on a new connection"
    );

    let up = log.iter().find(|e| e.route == Route::Upload).unwrap();
    assert_eq!(up.ending, Ending::Reset);
    assert_eq!(up.request_len, Some(body.len() as u64));
    assert!(
        up.request_forwarded > 0 && up.request_forwarded < body.len() as u64,
        "{up:?}"
    );

    // The server saw everything but the cut upload whole, and the upload's first
    // `request_forwarded` bytes, exactly: the cut went through TLS where the rule put it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let seen = server.seen();
        if seen.iter().any(|s| s.method == "PUT") {
            break seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never saw the upload: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let works_seen = seen
        .iter()
        .filter(|s| s.target == "/api/agent/v1/work")
        .count();
    assert_eq!(works_seen, 2, "both work requests reached the server whole");
    assert!(seen.iter().filter(|s| s.method == "POST").all(|s| !s.cut));
    let put = seen.iter().find(|s| s.method == "PUT").unwrap();
    assert!(put.cut, "the server got the whole upload");
    assert_eq!(put.body.len() as u64, up.request_forwarded);
    assert_eq!(put.body[..], body[..put.body.len()]);

    // Real TLS on both links, and the reconnects after the cuts resumed their sessions: the
    // agent's with the proxy (session tickets the proxy issued) and the proxy's with the server.
    let counts = p.counts();
    assert!(counts.tls_handshakes >= 2, "{counts:?}");
    assert!(
        counts.tls_resumed >= 1,
        "the agent's reconnect did not resume: {counts:?}"
    );
    assert!(counts.upstream_tls_handshakes >= 2, "{counts:?}");
    assert!(
        counts.upstream_tls_resumed >= 1,
        "the proxy's reconnect to the server did not resume: {counts:?}"
    );
    assert!(
        server.handshakes.load(Ordering::SeqCst) >= 2,
        "the server side saw no TLS"
    );

    // A client that does not trust the run's CA never gets through the proxy's handshake.
    let failures_before = p.counts().tls_failures;
    let untrusted = client(None)
        .get(format!("{base}/nix-cache-info"))
        .send()
        .await;
    assert!(untrusted.is_err(), "a client without the CA got an answer");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while p.counts().tls_failures == failures_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failed handshake was not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !server.seen().iter().any(|s| s.target == "/nix-cache-info"),
        "the untrusted client's request reached the server"
    );
}
