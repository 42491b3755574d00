//! Client API routes (`/api/v1`) and the event stream: translate HTTP to actor messages.
//! Every route is behind [`super::auth::gate`], which maps it to a token scope.

use actix_web::{get, post, put, web, HttpRequest, HttpResponse};
use futures_util::stream;

use super::auth::Gate;
use super::error::ApiError;
use super::AppState;
use crate::actors::agent_admin::{Action, SetMode};
use crate::actors::agent_session::Command;
use crate::actors::build_queue::{
    Cancel, GetRecord, ListLive, LiveStates, SetPriority, Show, Submit,
};
use crate::actors::event_log::{event_json, Subscribe};
use crate::actors::queue_state::is_available;
use crate::actors::registry::{CreateAgent, ListAgents, SessionOf};
use crate::derivation::Hash;
use crate::protocol::{
    AgentCommand, BuildId, BuildState, BuildSummary, BuildsQuery, CancelReply, MissingPaths,
    NewAgent, NewToken, PathsQuery, SourceQuery, SubmitBuilds, TokenCreated, DEFAULT_LIST_LIMIT,
    NEXT_CURSOR_HEADER,
};
use crate::store::keys::u64_key;
use crate::store::records::BuildRecord;
use crate::store::{Store, StoreError, TreeId};

/// Most records one page of a filtered listing read from sled looks at; a page that stops
/// there says so with a cursor, so no request scans without bound.
const SCAN_BUDGET: usize = 200_000;

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        e.to_string(),
    )
}

#[post("/agents")]
async fn new_agent(
    state: web::Data<AppState>,
    body: web::Json<NewAgent>,
) -> Result<HttpResponse, ApiError> {
    let created = state
        .registry
        .send(CreateAgent(body.into_inner()))
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(created))
}

/// A new client token (admin scope; see `super::auth`). Only its hash is stored.
#[post("/tokens")]
async fn new_token(
    state: web::Data<AppState>,
    body: web::Json<NewToken>,
) -> Result<HttpResponse, ApiError> {
    let NewToken { name, scope } = body.into_inner();
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::bad_request(format!(
            "token name {name:?} must be 1 to 128 bytes"
        )));
    }
    let (token, batch) = super::auth::mint_token(&name, scope).map_err(internal)?;
    state
        .committer
        .commit(batch)
        .await
        .map_err(|e| ApiError::from(crate::actors::ActorError::Commit(e)))?;
    let id = super::auth::token_id(&super::auth::token_key(&token));
    tracing::info!(name = %name, id = %id, scope = scope.as_str(), "client token created");
    Ok(HttpResponse::Ok().json(TokenCreated {
        id,
        name,
        scope,
        token,
    }))
}

/// The client tokens (admin): id, name, scope, created, last used since start; never the
/// tokens.
#[get("/tokens")]
async fn list_tokens(
    state: web::Data<AppState>,
    gate: web::Data<Gate>,
) -> Result<HttpResponse, ApiError> {
    let list = web::block(move || super::auth::list_tokens(&state.store, |k| gate.last_used(k)))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    Ok(HttpResponse::Ok().json(list))
}

/// Revoke a client token by id, or by name when one token has it (admin). Refused for the
/// last admin token (see [`super::auth::revoke_token`]). The record is deleted before the
/// answer, and the gate reads records on every request, so the token is refused from the
/// next request on.
#[post("/tokens/{which}/revoke")]
async fn revoke_token(
    state: web::Data<AppState>,
    gate: web::Data<Gate>,
    which: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    use super::auth::TokenError;
    use actix_web::http::StatusCode as S;
    let which = which.into_inner();
    // Serialised: the last-admin check and the delete must see the same tokens.
    let _one_at_a_time = gate.revoking.lock().await;
    let store = state.store.clone();
    let r = web::block(move || super::auth::revoke_token(&store, &which, true))
        .await
        .map_err(internal)?;
    let rev = r.map_err(|e| {
        let msg = e.to_string();
        match e {
            TokenError::NotFound(_) => ApiError::new(S::NOT_FOUND, "no_such_token", msg),
            TokenError::Ambiguous { .. } => ApiError::new(S::CONFLICT, "ambiguous_token", msg),
            TokenError::LastAdmin { .. } => ApiError::new(S::CONFLICT, "last_admin_token", msg),
            TokenError::Store(_) => internal(msg),
        }
    })?;
    state
        .committer
        .commit(rev.batch)
        .await
        .map_err(|e| ApiError::from(crate::actors::ActorError::Commit(e)))?;
    gate.forget(&rev.key);
    tracing::info!(id = %rev.info.id, name = %rev.info.name, scope = rev.info.scope.as_str(), "client token revoked");
    Ok(HttpResponse::Ok().json(rev.info))
}

/// `kiln agent pause|resume|drain NAME` (admin scope).
#[post("/agents/{name}/{action}")]
async fn agent_control(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (name, action) = path.into_inner();
    let action = match action.as_str() {
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "drain" => Action::Drain,
        other => {
            return Err(ApiError::not_found(format!(
                "no agent action {other:?}: use pause, resume, drain or rotate-secret"
            )))
        }
    };
    if !crate::actors::enrollment::valid_name(&name) {
        return Err(ApiError::bad_request(format!(
            "{name:?} is not a valid agent name"
        )));
    }
    let info = state
        .registry
        .send(SetMode { name, action })
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(info))
}

#[get("/agents")]
async fn agents(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let list = state
        .registry
        .send(ListAgents)
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(list))
}

async fn missing_sources(
    state: web::Data<AppState>,
    body: web::Json<PathsQuery>,
) -> Result<HttpResponse, ApiError> {
    let mut missing = Vec::new();
    for p in &body.paths {
        if !is_available(&state.store, p).map_err(internal)? {
            missing.push(p.clone());
        }
    }
    Ok(HttpResponse::Ok().json(MissingPaths { missing }))
}

#[put("/sources")]
async fn put_source(
    state: web::Data<AppState>,
    q: web::Query<SourceQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let store_dir = match state.store_dir().map_err(ApiError::bad_request)? {
        Some(d) => d,
        None => crate::derivation::store_path::StoreDir::resolve(None, &[q.path.as_bytes()])
            .map_err(|e| ApiError::bad_request(format!("source path {:?}: {e}", q.path)))?,
    };
    let parse = |p: &str| {
        store_dir
            .parse_path(p.as_bytes())
            .map_err(|e| ApiError::bad_request(format!("source path {p:?}: {e}")))
    };
    let path = parse(&q.path)?;
    let references = q
        .references
        .split(',')
        .filter(|s| !s.is_empty())
        .map(parse)
        .collect::<Result<Vec<_>, _>>()?;
    let nar_hash: Hash = q
        .nar_hash
        .parse()
        .map_err(|e| ApiError::bad_request(format!("nar_hash {:?}: {e}", q.nar_hash)))?;
    if is_available(&state.store, &q.path).map_err(internal)? {
        return Ok(HttpResponse::Ok().json(serde_json::json!({"existing": true})));
    }
    let limit = state.config.limits.source_nar_mb << 20;
    state
        .nars
        .receive_source(
            crate::store::nar_cache::SourceClaim {
                store_dir,
                path,
                references,
            },
            &nar_hash,
            limit,
            body,
        )
        .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({})))
}

/// Body chunks on their way to the parse thread: the most of a submission's body in memory
/// before it is parsed (actix's chunks are up to 64 KiB each).
const BODY_CHUNKS_IN_FLIGHT: usize = 16;

/// Bodies up to this size (by their `Content-Length`) are read whole and parsed on the
/// request's thread; bigger ones, and bodies of unknown size, are parsed while they arrive.
const SMALL_BODY: usize = 1 << 20;

/// From this many builds on, the memory a submission freed is handed back to the system
/// after its answer is made.
const BIG_SUBMISSION: usize = 1000;

/// `POST /api/v1/builds`. The body is parsed while it arrives, on a thread of its own at a
/// lower priority (`submission::in_background`), from a bounded channel of body chunks: the
/// request's JSON is never held whole, and each `.drv` is decoded from base64 straight into
/// its `SubmittedDrv` (see docs/performance.md, "One big submission"). The answers for a body
/// that is too big, too slow, not JSON or not a submission are those `web::Json` gave.
async fn submit(
    state: web::Data<AppState>,
    req: HttpRequest,
    mut body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    use actix_web::error::JsonPayloadError as J;
    use actix_web::HttpMessage as _;
    use futures_util::StreamExt as _;
    let refused = |e: J| super::error::json_payload_error(&e);
    let json = match req.mime_type() {
        Ok(Some(m)) => m.subtype() == "json" || m.suffix().is_some_and(|s| s == "json"),
        _ => false,
    };
    if !json {
        return Err(refused(J::ContentType));
    }
    let limit = (state.config.limits.submit_body_mb << 20) as usize;
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(length) = declared.filter(|l| *l > limit) {
        return Err(refused(J::OverflowKnownLength { length, limit }));
    }
    let sub = match declared {
        // A small body (the usual `kiln submit`, the load generator's requests) is read
        // whole and parsed here, as `web::Json` did.
        Some(length) if length <= SMALL_BODY => {
            let mut bytes = web::BytesMut::with_capacity(length);
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| refused(J::Payload(e)))?;
                if bytes.len() + chunk.len() > limit {
                    return Err(refused(J::Overflow { limit }));
                }
                bytes.extend_from_slice(&chunk);
            }
            serde_json::from_slice::<SubmitBuilds>(&bytes)
                .map_err(|e| refused(J::Deserialize(e)))?
        }
        _ => parse_streamed(body, limit).await?,
    };
    // Checked before the queue sees any of it, so a refused submission stores nothing.
    let max = state.config.limits.max_drv_bytes;
    if let Some(d) = sub
        .derivations
        .iter()
        .find(|d| d.contents.0.len() as u64 > max)
    {
        return Err(ApiError::new(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            "drv_too_large",
            format!(
                "derivation {} is {} bytes, over the limit of {max} bytes (limits.max_drv_bytes): nothing of this submission was stored. A .drv this big usually inlines a file or a long list in its environment: pass it as an input source instead, or raise limits.max_drv_bytes in the coordinator's config",
                d.path,
                d.contents.0.len()
            ),
        ));
    }
    let submitted = state
        .queue
        .send(Submit(sub))
        .await
        .map_err(ApiError::mailbox)??;
    if submitted.builds.len() < BIG_SUBMISSION {
        return Ok(HttpResponse::Ok().json(submitted));
    }
    // A big answer (~170 bytes per build) is made in a buffer of its exact size (growing one
    // by doubling left up to twice that), and sent in pieces, so the connection's write
    // buffer does not take a copy of all of it.
    let mut counted = Counted(0);
    serde_json::to_writer(&mut counted, &submitted).map_err(internal)?;
    let mut json = Vec::with_capacity(counted.0);
    serde_json::to_writer(&mut json, &submitted).map_err(internal)?;
    drop(submitted);
    let json = web::Bytes::from(json);
    let len = json.len();
    let pieces = futures_util::stream::iter(
        (0..len)
            .step_by(REPLY_PIECE)
            .map(move |at| Ok::<_, actix_web::Error>(json.slice(at..(at + REPLY_PIECE).min(len)))),
    );
    // glibc keeps freed memory in its arenas: hand the submission's back, off this thread.
    tokio::task::spawn_blocking(crate::telemetry::release_memory);
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .no_chunking(len as u64)
        .streaming(pieces))
}

/// The size of each piece a big submission's answer is sent in.
const REPLY_PIECE: usize = 64 << 10;

/// Counts the bytes written to it (the size of a big answer before it is made).
struct Counted(usize);

impl std::io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Parse a submission's body while it arrives: its chunks go through a bounded channel to
/// `serde_json::from_reader` on a low-priority thread of its own.
async fn parse_streamed(mut body: web::Payload, limit: usize) -> Result<SubmitBuilds, ApiError> {
    use actix_web::error::JsonPayloadError as J;
    use futures_util::StreamExt as _;
    let refused = |e: J| super::error::json_payload_error(&e);
    let (tx, rx) = tokio::sync::mpsc::channel(BODY_CHUNKS_IN_FLIGHT);
    let parsed = crate::actors::submission::in_background("kiln-submit-parse", move || {
        serde_json::from_reader::<_, SubmitBuilds>(ChunkReader {
            rx,
            chunk: web::Bytes::new(),
        })
    })
    .map_err(|e| internal(format!("could not start a submission parse thread: {e}")))?;
    // Dropped (the parse thread then reads the end of the body) on any early return.
    let mut tx = Some(tx);
    let mut received = 0usize;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| refused(J::Payload(e)))?;
        received += chunk.len();
        if received > limit {
            return Err(refused(J::Overflow { limit }));
        }
        if let Some(t) = &tx {
            if t.send(chunk).await.is_err() {
                // The parse already failed: read the rest (so the client, still sending,
                // gets the answer), then answer its error.
                tx = None;
            }
        }
    }
    drop(tx);
    parsed
        .await
        .map_err(|_| internal("the submission's parse thread panicked"))?
        .map_err(|e| refused(J::Deserialize(e)))
}

/// The request body as `std::io::Read`, for `serde_json::from_reader` on the parse thread:
/// chunks from the route's channel; the end of the body when the route drops its sender.
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<web::Bytes>,
    chunk: web::Bytes,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use bytes::Buf as _;
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.chunk = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Ok(n)
    }
}

/// `GET /api/v1/builds`: a page of builds in id order, after `cursor`, at most `limit` (0 =
/// no limit), optionally of one state. Live states come from the queue's per-state index;
/// finished states and "every build" are read from sled on a blocking thread. A page cut
/// short carries the next cursor in the `x-kiln-next-cursor` header.
async fn list(
    state: web::Data<AppState>,
    q: web::Query<BuildsQuery>,
) -> Result<HttpResponse, ApiError> {
    let st = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(BuildState::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown state {s:?}: use one of blocked, runnable, allocated, building, uploading, succeeded, failed, canceled"
            ))
        })?),
    };
    let limit = match q.limit {
        None => DEFAULT_LIST_LIMIT,
        Some(0) => usize::MAX,
        Some(n) => n,
    };
    let after = q.cursor.unwrap_or(0);
    let store = state.store.clone();
    let (builds, next) = match st {
        Some(s) if !s.is_terminal() => {
            let page = state
                .queue
                .send(ListLive {
                    state: s,
                    after,
                    limit,
                })
                .await
                .map_err(ApiError::mailbox)?;
            let next = if page.more {
                page.builds.last().map(|b| b.0)
            } else {
                None
            };
            let builds = web::block(move || summaries(&store, &page.builds))
                .await
                .map_err(internal)?
                .map_err(internal)?;
            (builds, next)
        }
        _ => {
            let (mut builds, next) = web::block(move || scan_page(&store, st, after, limit))
                .await
                .map_err(internal)?
                .map_err(internal)?;
            if st.is_none() && !builds.is_empty() {
                // Memory may be ahead of sled for live builds: show its state.
                let ids: Vec<BuildId> = builds.iter().map(|b| b.id).collect();
                let live = state
                    .queue
                    .send(LiveStates(ids))
                    .await
                    .map_err(ApiError::mailbox)?;
                let live: std::collections::HashMap<BuildId, (BuildState, i32)> =
                    live.into_iter().map(|(id, s, p)| (id, (s, p))).collect();
                for b in &mut builds {
                    if let Some((s, p)) = live.get(&b.id) {
                        b.state = *s;
                        b.priority = *p;
                    }
                }
            }
            (builds, next)
        }
    };
    let mut reply = HttpResponse::Ok();
    if let Some(n) = next {
        reply.insert_header((NEXT_CURSOR_HEADER, n.to_string()));
    }
    Ok(reply.json(builds))
}

/// Summaries of live builds: the record from sled, state and priority from memory. A build
/// whose submission is not durable yet is left out.
fn summaries(
    store: &Store,
    page: &[(BuildId, BuildState, i32)],
) -> Result<Vec<BuildSummary>, StoreError> {
    let mut out = Vec::with_capacity(page.len());
    for (id, s, p) in page {
        if let Some(r) = store.get::<BuildRecord>(TreeId::Builds, &u64_key(*id))? {
            let mut b = crate::actors::queue_state::summary(&r);
            b.state = *s;
            b.priority = *p;
            out.push(b);
        }
    }
    Ok(out)
}

/// Builds after `after` in id order, of state `st` if given, at most `limit`, looking at no
/// more than [`SCAN_BUDGET`] records when filtering; and the cursor of the next page if any.
fn scan_page(
    store: &Store,
    st: Option<BuildState>,
    after: BuildId,
    limit: usize,
) -> Result<(Vec<BuildSummary>, Option<BuildId>), StoreError> {
    let mut out = Vec::new();
    let mut last = after;
    for (scanned, r) in store.builds_after(after).enumerate() {
        let r = r?;
        if out.len() >= limit || (st.is_some() && limit != usize::MAX && scanned >= SCAN_BUDGET) {
            return Ok((out, Some(last)));
        }
        last = r.id;
        if st.is_none_or(|s| s == r.state) {
            out.push(crate::actors::queue_state::summary(&r));
        }
    }
    Ok((out, None))
}

#[get("/builds/{id}")]
async fn show(state: web::Data<AppState>, id: web::Path<u64>) -> Result<HttpResponse, ApiError> {
    let d = state
        .queue
        .send(Show(id.into_inner()))
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(d))
}

/// The log, decompressed while it streams (bounded memory whatever the compression ratio).
#[get("/builds/{id}/log")]
async fn log(state: web::Data<AppState>, id: web::Path<u64>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let rec = state
        .queue
        .send(GetRecord(id))
        .await
        .map_err(ApiError::mailbox)??
        .ok_or_else(|| ApiError::not_found(format!("no build {id}")))?;
    if rec.log_attempt == 0 {
        return Err(ApiError::not_found(format!("build {id} has no log (yet)")));
    }
    let body = match state.nars.log_stream(id, rec.log_attempt).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found(format!(
                "the log file of build {id} is missing from the state dir"
            )))
        }
        Err(e) => return Err(internal(e)),
    };
    Ok(HttpResponse::Ok()
        .content_type("text/plain")
        .streaming(body))
}

/// `POST /api/v1/builds/{id}/cancel?dependents=true`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelQuery {
    #[serde(default)]
    dependents: bool,
}

/// Cancel a build; the agents that held a canceled build get a `cancel` command with their
/// next heartbeat or work reply (and from reconciliation, should that be lost).
#[post("/builds/{id}/cancel")]
async fn cancel(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    q: web::Query<CancelQuery>,
) -> Result<HttpResponse, ApiError> {
    let c = state
        .queue
        .send(Cancel {
            id: id.into_inner(),
            dependents: q.dependents,
        })
        .await
        .map_err(ApiError::mailbox)??;
    // The cancel is durable: tell the holders now. An agent without a session actor (or one
    // restarting) is told by reconciliation on its next heartbeat or session opening.
    for (agent, command) in &c.stops {
        match state.registry.send(SessionOf(*agent)).await {
            Ok(Some(session)) => session.do_send(Command(command.clone())),
            Ok(None) => tracing::info!(
                agent_id = *agent,
                "canceled build's agent has no session: its next heartbeat is answered with cancel"
            ),
            Err(e) => tracing::warn!(
                agent_id = *agent,
                error = %e,
                "registry unavailable: the agent's next heartbeat is answered with cancel"
            ),
        }
    }
    let was_running = c.stops.iter().any(
        |(_, cmd)| matches!(cmd, AgentCommand::Cancel { build_id, .. } if *build_id == c.build.id),
    );
    Ok(HttpResponse::Ok().json(CancelReply {
        canceled: 1 + c.dependents.len(),
        was_running,
        build: c.build,
        dependents: c.dependents,
    }))
}

/// The body of `POST /builds/{id}/priority`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PriorityBody {
    priority: i32,
}

#[post("/builds/{id}/priority")]
async fn priority(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    body: web::Json<PriorityBody>,
) -> Result<HttpResponse, ApiError> {
    let s = state
        .queue
        .send(SetPriority {
            id: id.into_inner(),
            priority: body.priority,
        })
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(s))
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    since: Option<u64>,
}

/// Server-sent events from the durable log; `Last-Event-ID` (or `?since=N`) resumes after N.
#[get("/events")]
async fn events(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let since = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or(q.since);
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    state
        .event_log
        .send(Subscribe { since, tx })
        .await
        .map_err(ApiError::mailbox)?;
    let body = stream::unfold(rx, |mut rx| async move {
        let e = rx.recv().await?;
        let chunk = format!(
            "id: {}\nevent: {}\ndata: {}\n\n",
            e.seq,
            e.kind,
            event_json(&e)
        );
        Some((Ok::<_, actix_web::Error>(web::Bytes::from(chunk)), rx))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body))
}

/// `big` is the JSON limit of the routes that carry whole closures (submissions and path
/// queries); the other routes keep the scope's small limit.
pub fn routes(cfg: &mut web::ServiceConfig, big: web::JsonConfig) {
    cfg.service(
        web::resource("/builds")
            .app_data(big.clone())
            .route(web::post().to(submit))
            .route(web::get().to(list)),
    )
    .service(
        web::resource("/sources/missing")
            .app_data(big)
            .route(web::post().to(missing_sources)),
    )
    .service(new_agent)
    .service(new_token)
    .service(list_tokens)
    .service(revoke_token)
    .service(agents)
    .configure(super::enrollment::routes)
    .service(agent_control)
    .service(put_source)
    .service(show)
    .service(log)
    .service(cancel)
    .service(priority)
    .service(events);
}
