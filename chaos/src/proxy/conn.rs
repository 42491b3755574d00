//! One proxied connection, exchange by exchange: read the agent's request head, decide the
//! faults, forward the request body while reading the coordinator's reply (a reply can come
//! early), forward the reply, log the exchange, and end the connection the way a fault, a
//! window or the peers say. With TLS, both ends are TLS sessions the proxy terminates
//! ([`super::tls`]); everything past the handshakes works on the decrypted bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_rustls::rustls::HandshakeKind;

use super::http1::{self, Framing, RequestHead, Sink};
use super::log::{Ending, Exchange, FaultDone, FaultSource};
use super::route::{self, Route};
use super::wire::{Budget, Cut, Flow, Mode, ModeRx, Pacer, Reader, Side, Stop, Stream, WriteHalf};
use super::{Action, Phase, ProxyTls, Shared, CONNECTION_SITE, KEEP, LATENCY_SITE};
use crate::rng::Rng;

/// One proxied connection: both halves of both ends, the pacers, the connection's reset
/// budget, and a view of the mode.
struct Conn {
    client_r: Reader,
    client_w: WriteHalf,
    up_r: Reader,
    up_w: WriteHalf,
    up_pacer: Pacer,
    down_pacer: Pacer,
    budget: Budget,
    mode: ModeRx,
}

/// What to do with the connection after an exchange.
enum Next {
    KeepAlive,
    Close,
    Reset,
}

fn reset_stream(s: &TcpStream) {
    // Linger 0: close sends RST instead of FIN. Failure leaves a FIN, which is still an end.
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Open the coordinator's side (TCP, 10 s at most); on failure reset the agent's.
async fn connect_upstream(shared: &Shared, client: &TcpStream) -> Option<TcpStream> {
    let addr = *shared.upstream.lock().unwrap_or_else(|p| p.into_inner());
    match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        _ => {
            shared.count(|c| c.upstream_unreachable += 1);
            reset_stream(client);
            None
        }
    }
}

/// Both TLS handshakes: the agent's first (the proxy is its server), then the coordinator's
/// (the proxy is its client). A connection accepted during a blackhole window waits for the
/// window to end before its handshake (the ClientHello stays in the kernel, as a real network
/// would deliver it by retransmission after the window); one accepted or caught by a
/// partition is reset. `None`: the connection is over (counted, and reset where it can be).
async fn handshakes(
    shared: &Shared,
    tls: &ProxyTls,
    client: TcpStream,
    mode: &mut ModeRx,
) -> Option<(Stream, Stream)> {
    // Bounded by the window: the schedule ends it, and a stopped proxy refuses.
    loop {
        let m = *mode.borrow_and_update();
        match m {
            Mode::Normal => break,
            Mode::Refuse => {
                shared.count(|c| c.partition_resets += 1);
                reset_stream(&client);
                return None;
            }
            Mode::Blackhole => {
                if mode.changed().await.is_err() {
                    reset_stream(&client);
                    return None;
                }
            }
        }
    }
    const HANDSHAKE: Duration = Duration::from_secs(10);
    let client = match tokio::time::timeout(HANDSHAKE, tls.acceptor.accept(client)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(proxy = %shared.name, error = %e, "tls handshake with the agent failed");
            shared.count(|c| c.tls_failures += 1);
            return None;
        }
        Err(_) => {
            shared.count(|c| c.tls_failures += 1);
            return None;
        }
    };
    let resumed = client.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
    shared.count(|c| {
        c.tls_handshakes += 1;
        c.tls_resumed += u64::from(resumed);
    });
    let upstream = connect_upstream(shared, client.get_ref().0).await?;
    let connect = tls.connector.connect(tls.upstream_name.clone(), upstream);
    let upstream = match tokio::time::timeout(HANDSHAKE, connect).await {
        Ok(Ok(s)) => s,
        other => {
            if let Ok(Err(e)) = other {
                tracing::debug!(proxy = %shared.name, error = %e, "tls handshake with the coordinator failed");
            }
            shared.count(|c| c.upstream_unreachable += 1);
            reset_stream(client.get_ref().0);
            return None;
        }
    };
    let resumed = upstream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
    shared.count(|c| {
        c.upstream_tls_handshakes += 1;
        c.upstream_tls_resumed += u64::from(resumed);
    });
    Some((
        Stream::TlsServer(Box::new(client)),
        Stream::TlsClient(Box::new(upstream)),
    ))
}

pub(super) async fn serve(shared: Arc<Shared>, client: TcpStream, conn: u64) {
    let mut mode = shared.mode.subscribe();
    if *mode.borrow() == Mode::Refuse {
        shared.count(|c| c.refused += 1);
        reset_stream(&client);
        return;
    }
    let _ = client.set_nodelay(true);
    let (client, upstream) = match &shared.tls {
        None => {
            let Some(upstream) = connect_upstream(&shared, &client).await else {
                return;
            };
            (Stream::Plain(client), Stream::Plain(upstream))
        }
        Some(tls) => match handshakes(&shared, tls, client, &mut mode).await {
            Some(ends) => ends,
            None => return,
        },
    };
    let plan = &shared.plan;
    let mut rng = Rng::derive(plan.seed, &[shared.index, conn, CONNECTION_SITE]);
    let budget = rng.chance(plan.connection_reset_probability).then(|| {
        rng.between(
            plan.connection_reset_after_bytes.0,
            plan.connection_reset_after_bytes.1,
        )
    });
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let mut c = Conn {
        client_r: Reader::new(cr, Side::Client),
        client_w: cw,
        up_r: Reader::new(ur, Side::Upstream),
        up_w: uw,
        up_pacer: Pacer::new(plan.bandwidth),
        down_pacer: Pacer::new(plan.bandwidth),
        budget: Budget::new(budget),
        mode,
    };
    let mut seq = 0u64;
    // Bounded: each turn handles one exchange, and ends the loop unless the peers keep the
    // connection alive for another.
    let next = loop {
        match exchange(&shared, &mut c, conn, seq).await {
            (Next::KeepAlive, counted) => seq += u64::from(counted),
            (other, _) => break other,
        }
    };
    let Conn {
        client_r,
        mut client_w,
        up_r,
        mut up_w,
        ..
    } = c;
    match next {
        Next::Reset => {
            let half = client_r.into_half();
            if half.is_pair_of(&client_w) {
                reset_stream(half.unsplit(client_w).tcp());
            }
            // The coordinator's side ends with a FIN after exactly the bytes forwarded, and
            // the proxy reads what it still sends: a reset there could make its kernel drop
            // bytes it already received, and the fault would cut somewhere else than planned.
            tokio::spawn(close_gently(up_r, up_w));
        }
        _ => {
            let _ = client_w.shutdown().await;
            let _ = up_w.shutdown().await;
        }
    }
}

/// Half-close, then read and drop whatever arrives until EOF (at most 10 s).
async fn close_gently(mut r: Reader, mut w: WriteHalf) {
    let _ = w.shutdown().await;
    let dropped = AtomicU64::new(0);
    let _ = tokio::time::timeout(Duration::from_secs(10), r.drain(&dropped, false)).await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counts an upload while its body is being forwarded.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(c: &'a AtomicU64) -> InFlight<'a> {
        c.fetch_add(1, Ordering::SeqCst);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a blackhole ended.
enum HoleEnd {
    Client,
    Upstream,
    /// The window ended; `lost` when bytes were swallowed.
    Window {
        lost: bool,
    },
    Refused,
}

/// Swallow both directions. `forever`: a rule's blackhole, which ends only when an end gives
/// up (the coordinator giving up counts only when `watch_upstream`); otherwise a window, which
/// ends with the mode.
async fn blackhole(c: &mut Conn, forever: bool, watch_upstream: bool) -> HoleEnd {
    let dropped = AtomicU64::new(0);
    let up_dropped = AtomicU64::new(0);
    let mut mode = c.mode.clone();
    let wait_mode = async {
        loop {
            let m = *mode.borrow_and_update();
            match m {
                Mode::Refuse => return HoleEnd::Refused,
                Mode::Normal if !forever => return HoleEnd::Window { lost: false },
                _ => {}
            }
            if mode.changed().await.is_err() {
                return HoleEnd::Refused;
            }
        }
    };
    tokio::pin!(wait_mode);
    let Conn { client_r, up_r, .. } = c;
    let up = up_r.drain(&up_dropped, watch_upstream);
    tokio::pin!(up);
    // The coordinator closing its side (say, an idle keep-alive timeout) is news the agent
    // cannot get through a blackhole: unless it ends a request the coordinator waited for, the
    // hole goes on, and the agent's side is reset only when the hole ends.
    let mut up_closed = false;
    // At most two turns: the coordinator's side ends once.
    let end = loop {
        tokio::select! {
            _ = client_r.drain(&dropped, false) => break HoleEnd::Client,
            _ = &mut up, if !up_closed => {
                if watch_upstream {
                    break HoleEnd::Upstream;
                }
                up_closed = true;
            }
            m = &mut wait_mode => break m,
        }
    };
    match end {
        HoleEnd::Window { .. } => HoleEnd::Window {
            lost: up_closed
                || dropped.load(Ordering::Relaxed) + up_dropped.load(Ordering::Relaxed) > 0,
        },
        other => other,
    }
}

/// What forwarding the request did.
#[derive(Default)]
struct ReqOut {
    decoded: Vec<u8>,
    forwarded: u64,
    result: Option<Result<(), Stop>>,
}

/// What forwarding the reply did.
#[derive(Default)]
struct ReplyOut {
    status: Option<u16>,
    facts: route::ReplyFacts,
    forwarded: u64,
    close: bool,
    result: Option<Result<(), Stop>>,
}

#[allow(clippy::too_many_arguments)]
async fn forward_request(
    shared: &Shared,
    client_r: &mut Reader,
    up_w: &mut WriteHalf,
    pacer: &mut Pacer,
    budget: &Budget,
    mut mode: ModeRx,
    head: &RequestHead,
    route: Route,
    cut: Option<Cut>,
) -> ReqOut {
    let _upload = (route == Route::Upload).then(|| InFlight::new(&shared.uploads_in_flight));
    let mut out = ReqOut::default();
    let mut flow = Flow {
        dst: up_w,
        side: Side::Upstream,
        pacer,
        conn_budget: budget,
        cut,
        sent: 0,
    };
    let head_len = head.raw.len() as u64;
    let result = async {
        if route.is_json() {
            let mut raw = Vec::new();
            let body = http1::walk_body(
                client_r,
                &mut mode,
                head.framing,
                &mut Sink::Collect(&mut raw),
                KEEP,
            )
            .await?;
            out.decoded = body.decoded;
            flow.send(&head.raw).await?;
            flow.send(&raw).await?;
        } else {
            flow.send(&head.raw).await?;
            http1::walk_body(
                client_r,
                &mut mode,
                head.framing,
                &mut Sink::Flow(&mut flow),
                0,
            )
            .await?;
        }
        flow.finish().await
    }
    .await;
    out.forwarded = flow.sent.saturating_sub(head_len);
    out.result = Some(result);
    out
}

#[allow(clippy::too_many_arguments)]
async fn forward_reply(
    shared: &Shared,
    up_r: &mut Reader,
    client_w: &mut WriteHalf,
    pacer: &mut Pacer,
    budget: &Budget,
    mut mode: ModeRx,
    method: &str,
    route: Route,
    conn: u64,
    seq: u64,
) -> ReplyOut {
    let mut out = ReplyOut::default();
    let mut head_len = 0;
    let mut sent = 0;
    let result = async {
        let head = loop {
            let h = http1::read_response(up_r, &mut mode, method).await?;
            if (100..200).contains(&h.status) && h.status != 101 {
                let mut flow = Flow {
                    dst: &mut *client_w,
                    side: Side::Client,
                    pacer: &mut *pacer,
                    conn_budget: budget,
                    cut: None,
                    sent: 0,
                };
                flow.send(&h.raw).await?;
                continue;
            }
            break h;
        };
        out.status = Some(head.status);
        out.close = head.close;
        head_len = head.raw.len() as u64;
        let small = matches!(head.framing, Framing::Length(n) if n <= KEEP as u64);
        let collect = route.is_json() || (head.status >= 400 && small);
        let mut raw = Vec::new();
        let mut body_len = head.framing.known_len();
        if collect {
            let body = http1::walk_body(
                up_r,
                &mut mode,
                head.framing,
                &mut Sink::Collect(&mut raw),
                KEEP,
            )
            .await?;
            out.facts = route::reply_facts(route, head.status, &body.decoded);
            body_len = Some(raw.len() as u64);
        }
        let cut = shared.decide(
            conn,
            seq,
            route,
            Phase::Reply,
            head_len,
            body_len,
            out.facts.assigned.len(),
        );
        let mut flow = Flow {
            dst: &mut *client_w,
            side: Side::Client,
            pacer: &mut *pacer,
            conn_budget: budget,
            cut,
            sent: 0,
        };
        let r = async {
            flow.send(&head.raw).await?;
            if collect {
                flow.send(&raw).await?;
            } else {
                http1::walk_body(up_r, &mut mode, head.framing, &mut Sink::Flow(&mut flow), 0)
                    .await?;
            }
            flow.finish().await
        }
        .await;
        sent = flow.sent;
        r
    }
    .await;
    out.forwarded = sent.saturating_sub(head_len);
    out.result = Some(result);
    out
}

/// One request and its reply. Returns what to do with the connection, and whether an
/// exchange was counted (a blackhole window between exchanges counts none).
async fn exchange(shared: &Shared, c: &mut Conn, conn: u64, seq: u64) -> (Next, bool) {
    let read = tokio::select! {
        r = http1::read_request(&mut c.client_r, &mut c.mode) => r,
        // The coordinator closed the idle connection (keep-alive timeout): close the agent's
        // side too, as a direct connection would be.
        () = c.up_r.closed() => return (Next::Close, false),
    };
    let head = match read {
        Ok(Some(h)) => h,
        Ok(None) => return (Next::Close, false),
        Err(Stop::Blackhole) => {
            return match blackhole(c, false, false).await {
                HoleEnd::Window { lost: false } => (Next::KeepAlive, false),
                HoleEnd::Refused => {
                    shared.count(|n| n.partition_resets += 1);
                    (Next::Reset, false)
                }
                _ => (Next::Reset, false),
            };
        }
        Err(Stop::Refused) => {
            shared.count(|n| n.partition_resets += 1);
            return (Next::Reset, false);
        }
        Err(_) => return (Next::Reset, false),
    };
    let t_ms = now_ms();
    let target = route::classify(&head.method, &head.target);
    let route = target.route;
    let head_len = head.raw.len() as u64;
    let req_cut = shared.decide(
        conn,
        seq,
        route,
        Phase::Request,
        head_len,
        head.framing.known_len(),
        0,
    );
    let plan = &shared.plan;
    let mut rng = Rng::derive(plan.seed, &[shared.index, conn, seq, LATENCY_SITE]);
    let latency = rng.between(plan.latency_ms.0, plan.latency_ms.1);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if matches!(route, Route::Session | Route::Heartbeat) {
        let until = *shared
            .control_lag_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(until) = until {
            tokio::time::sleep_until(until.into()).await;
        }
    }

    let (req, reply) = {
        let Conn {
            client_r,
            client_w,
            up_r,
            up_w,
            up_pacer,
            down_pacer,
            budget,
            mode,
        } = c;
        let req_fut = forward_request(
            shared,
            client_r,
            up_w,
            up_pacer,
            budget,
            mode.clone(),
            &head,
            route,
            req_cut,
        );
        let reply_fut = forward_reply(
            shared,
            up_r,
            client_w,
            down_pacer,
            budget,
            mode.clone(),
            &head.method,
            route,
            conn,
            seq,
        );
        tokio::pin!(req_fut, reply_fut);
        let mut req: Option<ReqOut> = None;
        let mut reply: Option<ReplyOut> = None;
        // At most two turns: each branch completes once.
        while reply.is_none() {
            tokio::select! {
                r = &mut req_fut, if req.is_none() => {
                    let failed = matches!(r.result, Some(Err(_)));
                    req = Some(r);
                    if failed {
                        break;
                    }
                }
                r = &mut reply_fut => reply = Some(r),
            }
        }
        (req.unwrap_or_default(), reply)
    };
    let reply = reply.unwrap_or_default();
    let req_done = matches!(req.result, Some(Ok(())));

    let mut e = Exchange {
        t_ms,
        end_ms: 0,
        agent: shared.name.clone(),
        conn,
        seq,
        method: head.method.clone(),
        route,
        path: target.path.clone(),
        build: target.build,
        attempt: target.attempt.or_else(|| route::body_attempt(&req.decoded)),
        offset: target.offset,
        status: reply.status,
        code: reply.facts.code.clone(),
        duplicate: reply.facts.duplicate,
        assigned: reply.facts.assigned.clone(),
        request_len: head.framing.known_len(),
        request_forwarded: req.forwarded,
        reply_forwarded: reply.forwarded,
        fault: None,
        ending: Ending::Completed,
    };
    // The stop that ended the exchange, and the phase it hit.
    let stop = match (&req.result, &reply.result) {
        (Some(Err(s)), _) => Some((s.clone(), Phase::Request)),
        (_, Some(Err(s))) => Some((s.clone(), Phase::Reply)),
        _ => None,
    };
    let next = match stop {
        None => {
            if reply.close || head.close || !req_done {
                Next::Close
            } else {
                Next::KeepAlive
            }
        }
        Some((s, phase)) => settle(shared, c, &mut e, s, phase).await,
    };
    e.end_ms = now_ms();
    shared.record(e);
    (next, true)
}

/// Decide what a stopped exchange does to the connection, and record it in `e`.
async fn settle(shared: &Shared, c: &mut Conn, e: &mut Exchange, s: Stop, phase: Phase) -> Next {
    let done = |action, source, rule| FaultDone {
        action,
        phase,
        source,
        rule,
    };
    match s {
        Stop::Fault {
            action: Action::Reset,
            rule,
        } => {
            let source = if rule.is_some() {
                FaultSource::Rule
            } else {
                FaultSource::Connection
            };
            e.fault = Some(done(Action::Reset, source, rule));
            e.ending = Ending::Reset;
            Next::Reset
        }
        Stop::Fault {
            action: Action::Blackhole,
            rule,
        } => {
            e.fault = Some(done(Action::Blackhole, FaultSource::Rule, rule));
            // Only a request the coordinator still waits for can be given up by it.
            let watch_upstream = phase == Phase::Request;
            e.ending = match blackhole(c, true, watch_upstream).await {
                HoleEnd::Client => Ending::ClientGaveUp,
                HoleEnd::Upstream => Ending::UpstreamGaveUp,
                HoleEnd::Window { .. } | HoleEnd::Refused => Ending::Reset,
            };
            Next::Reset
        }
        Stop::Blackhole => {
            e.fault = Some(done(Action::Blackhole, FaultSource::Window, None));
            e.ending = match blackhole(c, false, false).await {
                HoleEnd::Client => Ending::ClientClosed,
                HoleEnd::Upstream => Ending::UpstreamClosed,
                HoleEnd::Window { .. } => Ending::WindowEnded,
                HoleEnd::Refused => Ending::Reset,
            };
            Next::Reset
        }
        Stop::Refused => {
            shared.count(|n| n.partition_resets += 1);
            e.fault = Some(done(Action::Reset, FaultSource::Window, None));
            e.ending = Ending::Reset;
            Next::Reset
        }
        Stop::Eof(Side::Client) | Stop::Io(Side::Client) => {
            e.ending = Ending::ClientClosed;
            Next::Reset
        }
        Stop::Eof(Side::Upstream) | Stop::Io(Side::Upstream) => {
            e.ending = Ending::UpstreamClosed;
            Next::Reset
        }
        Stop::Protocol(why) => {
            tracing::warn!(proxy = %shared.name, reason = %why, "cannot frame an exchange, resetting");
            e.ending = Ending::ProtocolError;
            Next::Reset
        }
    }
}
