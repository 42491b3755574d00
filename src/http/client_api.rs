//! Client API routes (`/api/v1`) and the event stream: translate HTTP to actor messages.
//! Every route is behind [`super::auth::gate`], which maps it to a token scope.

use actix_web::{get, post, put, web, HttpRequest, HttpResponse};
use futures_util::stream;

use super::error::ApiError;
use super::AppState;
use crate::actors::build_queue::{Cancel, GetRecord, List, Show, Submit};
use crate::actors::event_log::{event_json, Subscribe};
use crate::actors::queue_state::is_available;
use crate::actors::registry::{CreateAgent, ListAgents};
use crate::derivation::Hash;
use crate::protocol::{
    BuildState, BuildsQuery, MissingPaths, NewAgent, NewToken, PathsQuery, SourceQuery,
    SubmitBuilds, TokenCreated,
};

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
    tracing::info!(name = %name, scope = scope.as_str(), "client token created");
    Ok(HttpResponse::Ok().json(TokenCreated { name, scope, token }))
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
    let store_dir = state.store_dir().map_err(ApiError::bad_request)?;
    let check = |p: &str| -> Result<(), ApiError> {
        match &store_dir {
            Some(d) => d.parse_path(p.as_bytes()).map(|_| ()),
            None => crate::derivation::store_path::StoreDir::resolve(None, &[p.as_bytes()])
                .and_then(|d| d.parse_path(p.as_bytes()).map(|_| ())),
        }
        .map_err(|e| ApiError::bad_request(format!("source path {p:?}: {e}")))
    };
    check(&q.path)?;
    let refs: Vec<String> = q
        .references
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    for r in &refs {
        check(r)?;
    }
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
        .receive_source(&q.path, &nar_hash, refs, limit, body)
        .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({})))
}

async fn submit(
    state: web::Data<AppState>,
    body: web::Json<SubmitBuilds>,
) -> Result<HttpResponse, ApiError> {
    let submitted = state
        .queue
        .send(Submit(body.into_inner()))
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(submitted))
}

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
    let limit = q.limit.unwrap_or(100_000);
    let builds = state
        .queue
        .send(List { state: st, limit })
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(builds))
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

#[post("/builds/{id}/cancel")]
async fn cancel(state: web::Data<AppState>, id: web::Path<u64>) -> Result<HttpResponse, ApiError> {
    let s = state
        .queue
        .send(Cancel(id.into_inner()))
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
    .service(agents)
    .service(put_source)
    .service(show)
    .service(log)
    .service(cancel)
    .service(events);
}
