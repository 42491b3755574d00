//! Agent API routes (`/api/agent/v1`): translate HTTP to actor messages and back.

use actix_web::dev::Payload;
use actix_web::{get, post, put, web, FromRequest, HttpRequest, HttpResponse};

use super::error::ApiError;
use super::AppState;
use crate::actors::agent_admin::InfraOutcome;
use crate::actors::agent_controls::infrastructure_failure;
use crate::actors::agent_session::{closure, path_info, Beat, RequestWork};
use crate::actors::allocator::RequestAlive;
use crate::actors::build_queue::{Finish, GetRecord, Progress};
use crate::actors::queue_state::Scanned;
use crate::actors::registry::{Open, SessionOf};
use crate::derivation::Hash;
use crate::protocol::BuiltOutput;
use crate::protocol::{
    BuildState, FailureKind, Heartbeat, HeartbeatReply, LogQuery, OpenSession, Outcome,
    ResultReport, StartReport, UploadQuery, WorkRequest, SESSION_HEADER,
};
use crate::store::keys::u64_key;
use crate::store::nar_cache::{nar_url, valid_output_name, LogLimits, NarCache, UploadKey};
use crate::store::records::{BuildRecord, OutputRecord};
use crate::store::{Store, TreeId};

/// An authenticated agent: the session token named a live session. Every authenticated
/// request counts as a sign of life.
pub struct AgentAuth(pub u64);

impl FromRequest for AgentAuth {
    type Error = ApiError;
    type Future = std::future::Ready<Result<AgentAuth, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let token = req
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| {
                req.headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_string)
            });
        let state = req.app_data::<web::Data<AppState>>();
        let r = match (token, state) {
            (Some(t), Some(s)) => match s.sessions.lookup(&t) {
                Some(agent) => {
                    s.liveness.touch(agent);
                    Ok(AgentAuth(agent))
                }
                None => Err(ApiError::new(
                    actix_web::http::StatusCode::UNAUTHORIZED,
                    "session_unknown",
                    "unknown session (the coordinator may have restarted): open a new session",
                )),
            },
            _ => Err(ApiError::new(
                actix_web::http::StatusCode::UNAUTHORIZED,
                "session_unknown",
                format!("missing {SESSION_HEADER} header: open a session first"),
            )),
        };
        std::future::ready(r)
    }
}

/// Check that the agent holds `build_id` at `attempt` (409 `stale_attempt` otherwise) and,
/// with `to`, move the build forward (start, first upload).
async fn progress(
    state: &AppState,
    auth: &AgentAuth,
    build_id: u64,
    attempt: u32,
    to: Option<BuildState>,
) -> Result<(), ApiError> {
    let msg = Progress {
        agent_id: auth.0,
        build_id,
        attempt,
        to,
    };
    state.queue.send(msg).await.map_err(ApiError::mailbox)??;
    Ok(())
}

#[post("/session")]
async fn open_session(
    state: web::Data<AppState>,
    body: web::Json<OpenSession>,
) -> Result<HttpResponse, ApiError> {
    let opened = state
        .registry
        .send(Open(body.into_inner()))
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(opened))
}

#[post("/heartbeat")]
async fn heartbeat(
    state: web::Data<AppState>,
    auth: AgentAuth,
    body: web::Json<Heartbeat>,
) -> Result<HttpResponse, ApiError> {
    let session = state
        .registry
        .send(SessionOf(auth.0))
        .await
        .map_err(ApiError::mailbox)?
        .ok_or_else(no_session)?;
    let commands = session
        .send(Beat {
            held: body.into_inner().builds,
        })
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(HeartbeatReply { commands }))
}

/// A token without a session actor (cannot happen after a successful opening).
fn no_session() -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::UNAUTHORIZED,
        "session_unknown",
        "open a session first",
    )
}

#[post("/work")]
async fn work(
    req: HttpRequest,
    state: web::Data<AppState>,
    auth: AgentAuth,
    body: web::Json<WorkRequest>,
) -> Result<HttpResponse, ApiError> {
    let session = state
        .registry
        .send(SessionOf(auth.0))
        .await
        .map_err(ApiError::mailbox)?
        .ok_or_else(no_session)?;
    let body = body.into_inner();
    let wait = std::time::Duration::from_millis(body.wait_ms);
    // Held until the answer, or until the agent is seen to have closed the connection: then
    // the allocator and the queue see the request gone (no lease for it).
    let mut alive = Some(std::sync::Arc::new(()));
    let weak = alive.as_ref().map(std::sync::Arc::downgrade);
    let ask = session.send(RequestWork {
        max: body.max_builds,
        request: body.request_id,
        wait,
        alive: weak.map(|w| RequestAlive(w, Some((state.liveness.clone(), auth.0)))),
    });
    let peer = req.conn_data::<super::peer::PeerSocket>().cloned();
    let reply = match peer {
        Some(peer) if !wait.is_zero() => super::peer::watching(ask, &peer, &mut alive).await,
        _ => ask.await,
    }
    .map_err(ApiError::mailbox)??;
    drop(alive);
    Ok(HttpResponse::Ok().json(reply))
}

#[post("/builds/{id}/start")]
async fn start(
    state: web::Data<AppState>,
    auth: AgentAuth,
    path: web::Path<u64>,
    body: web::Json<StartReport>,
) -> Result<HttpResponse, ApiError> {
    progress(
        &state,
        &auth,
        path.into_inner(),
        body.attempt,
        Some(BuildState::Building),
    )
    .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({})))
}

fn upload_key(build_id: u64, output: &str, q: &UploadQuery) -> Result<UploadKey, ApiError> {
    if !valid_output_name(output) {
        return Err(ApiError::bad_request(format!(
            "{output:?} is not a valid output name"
        )));
    }
    let file_hash: Hash = q
        .file_hash
        .parse()
        .map_err(|e| ApiError::bad_request(format!("file_hash {:?}: {e}", q.file_hash)))?;
    Ok(UploadKey {
        build_id,
        attempt: q.attempt,
        output: output.to_string(),
        file_hash,
        file_size: q.file_size,
    })
}

/// Refuses an output name the build does not declare (404 `no_such_output`), from the
/// build's record. Runs before the body is read.
async fn check_declared(state: &AppState, build_id: u64, output: &str) -> Result<(), ApiError> {
    let rec = state
        .queue
        .send(GetRecord(build_id))
        .await
        .map_err(ApiError::mailbox)??
        .ok_or_else(|| {
            ApiError::new(
                actix_web::http::StatusCode::NOT_FOUND,
                "no_such_build",
                format!("no build {build_id}"),
            )
        })?;
    if rec.outputs.iter().any(|(n, _)| n == output) {
        return Ok(());
    }
    let declared: Vec<&str> = rec.outputs.iter().map(|(n, _)| n.as_str()).collect();
    Err(ApiError::new(
        actix_web::http::StatusCode::NOT_FOUND,
        "no_such_output",
        format!(
            "build {build_id} declares no output {output:?} (it declares {}): upload only the derivation's outputs",
            declared.join(", ")
        ),
    ))
}

#[get("/builds/{id}/outputs/{name}")]
async fn upload_status(
    state: web::Data<AppState>,
    auth: AgentAuth,
    path: web::Path<(u64, String)>,
    q: web::Query<UploadQuery>,
) -> Result<HttpResponse, ApiError> {
    let (build_id, name) = path.into_inner();
    let key = upload_key(build_id, &name, &q)?;
    check_declared(&state, build_id, &name).await?;
    progress(&state, &auth, build_id, q.attempt, None).await?;
    Ok(HttpResponse::Ok().json(state.nars.upload_status(&key)?))
}

/// Every check (output name, size, lease, declared output) runs before the body is read: a
/// refusal answers without consuming the payload.
#[put("/builds/{id}/outputs/{name}")]
async fn upload(
    state: web::Data<AppState>,
    auth: AgentAuth,
    path: web::Path<(u64, String)>,
    q: web::Query<UploadQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (build_id, name) = path.into_inner();
    let key = upload_key(build_id, &name, &q)?;
    let limit = state.config.limits.output_nar_mb << 20;
    if key.file_size > limit {
        return Err(ApiError::new(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "a {} byte NAR is over the limit of {limit} bytes (limits.output_nar_mb)",
                key.file_size
            ),
        ));
    }
    check_declared(&state, build_id, &name).await?;
    let _slot = state.upload_slots.acquire(auth.0)?;
    progress(
        &state,
        &auth,
        build_id,
        q.attempt,
        Some(BuildState::Uploading),
    )
    .await?;
    let status = state.nars.receive(&key, q.offset, body).await?;
    Ok(HttpResponse::Ok().json(status))
}

#[put("/builds/{id}/log")]
async fn upload_log(
    state: web::Data<AppState>,
    auth: AgentAuth,
    path: web::Path<u64>,
    q: web::Query<LogQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let build_id = path.into_inner();
    progress(&state, &auth, build_id, q.attempt, None).await?;
    let _slot = state.upload_slots.acquire(auth.0)?;
    let limits = LogLimits {
        compressed: state.config.limits.log_mb << 20,
        decompressed: state.config.limits.log_decompressed_mb << 20,
        stall: state.nars.stall(),
    };
    state
        .nars
        .receive_log(build_id, q.attempt, limits, body)
        .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({})))
}

#[post("/builds/{id}/result")]
async fn result(
    state: web::Data<AppState>,
    auth: AgentAuth,
    path: web::Path<u64>,
    body: web::Json<ResultReport>,
) -> Result<HttpResponse, ApiError> {
    let build_id = path.into_inner();
    let report = body.into_inner();
    let log_attempt = if state.nars.log_path(build_id, report.attempt).exists() {
        report.attempt
    } else {
        0
    };
    let (outcome, claimed_missing) = match report.outcome {
        Outcome::Succeeded { outputs } => (Ok(outputs), Vec::new()),
        Outcome::Failed {
            reason,
            kind,
            missing_inputs,
        } => {
            let claimed = if kind == FailureKind::Setup {
                missing_inputs
            } else {
                Vec::new()
            };
            (Err((reason, kind)), claimed)
        }
    };
    let lost_inputs = if claimed_missing.is_empty() {
        Vec::new()
    } else {
        let (store, nars) = (state.store.clone(), state.nars.clone());
        let (agent_id, attempt) = (auth.0, report.attempt);
        tokio::task::spawn_blocking(move || {
            lost_inputs(&store, &nars, build_id, agent_id, attempt, claimed_missing)
        })
        .await
        .map_err(|e| ApiError::internal(format!("the lost-input check did not finish: {e}")))??
    };
    let scanned = match &outcome {
        Ok(outputs) => {
            let (store, nars, outputs) = (state.store.clone(), state.nars.clone(), outputs.clone());
            let (agent_id, attempt) = (auth.0, report.attempt);
            tokio::task::spawn_blocking(move || {
                scan_outputs(&store, &nars, build_id, agent_id, attempt, &outputs)
            })
            .await
            .map_err(|e| ApiError::internal(format!("the reference scan did not finish: {e}")))??
        }
        Err(_) => None,
    };
    // A success that rewrites the record of a path (a lost input built again) changes the
    // closures that hold it.
    let replaces = match &outcome {
        Ok(outputs) => outputs.iter().any(|o| {
            state
                .store
                .contains(
                    TreeId::Outputs,
                    crate::store::keys::output_key(&o.path).as_bytes(),
                )
                .unwrap_or(true)
        }),
        Err(_) => false,
    };
    // What this result says of the agent's infrastructure (see `agent_controls`): a success,
    // a setup or upload failure (its kind, or for an agent that sends no kind its reason), or
    // neither (the builder failed).
    let infra = match &outcome {
        Ok(_) => Some(false),
        Err((reason, kind)) if *kind != FailureKind::Builder || infrastructure_failure(reason) => {
            Some(true)
        }
        Err(_) => None,
    };
    let msg = Finish {
        agent_id: auth.0,
        build_id,
        attempt: report.attempt,
        outcome,
        log_attempt,
        scanned,
        lost_inputs,
    };
    let ack = state.queue.send(msg).await.map_err(ApiError::mailbox)??;
    if replaces {
        crate::actors::agent_session::forget_closures();
    }
    if let (Some(failure), false) = (infra, ack.duplicate) {
        state.registry.do_send(InfraOutcome {
            agent_id: auth.0,
            failure,
        });
    }
    Ok(HttpResponse::Ok().json(ack))
}

/// Scan each reported output's uploaded NAR for references among the build's input closure
/// and outputs (the candidates the agent scanned for: its assignment's inputs and outputs).
/// Only for a build this agent holds at this attempt; anything else is left to the queue to
/// refuse (`None`), so a report on someone else's build costs no scan. Blocking.
fn scan_outputs(
    store: &Store,
    nars: &NarCache,
    build_id: u64,
    agent_id: u64,
    attempt: u32,
    outputs: &[BuiltOutput],
) -> Result<Option<Scanned>, ApiError> {
    let internal = |e: &dyn std::fmt::Display| ApiError::internal(e.to_string());
    let b: Option<BuildRecord> = store
        .get(TreeId::Builds, &u64_key(build_id))
        .map_err(|e| internal(&e))?;
    let Some(b) = b.filter(|b| b.agent_id == agent_id && b.attempt == attempt) else {
        return Ok(None);
    };
    let mut candidates: Vec<String> = closure(store, &b.needs)
        .map_err(|e| internal(&e))?
        .into_iter()
        .map(|p| p.path)
        .collect();
    candidates.extend(b.outputs.iter().map(|(_, p)| p.clone()));
    let mut scanned = Scanned::new();
    for o in outputs {
        if scanned.contains_key(&o.file_hash) {
            continue;
        }
        if let Some(found) = nars
            .scan_references(&o.file_hash, &candidates)
            .map_err(|e| internal(&e))?
        {
            scanned.insert(o.file_hash.clone(), found);
        }
    }
    Ok(Some(scanned))
}

/// Of the inputs an agent says the coordinator answered 404 for, those it has indeed lost:
/// in the input closure of the build (which this agent holds at this attempt), with a record
/// in `outputs` whose NAR file is missing from the cache. Anything else is an ordinary setup
/// failure (a claim cannot make a build wait on a path it does not need, or rebuild a path
/// that is there). Invalidates the cached closures when one is found, as the path will be
/// built again, perhaps with another NAR. Blocking.
fn lost_inputs(
    store: &Store,
    nars: &NarCache,
    build_id: u64,
    agent_id: u64,
    attempt: u32,
    mut claimed: Vec<String>,
) -> Result<Vec<String>, ApiError> {
    let internal = |e: &dyn std::fmt::Display| ApiError::internal(e.to_string());
    let b: Option<BuildRecord> = store
        .get(TreeId::Builds, &u64_key(build_id))
        .map_err(|e| internal(&e))?;
    let Some(b) = b.filter(|b| b.agent_id == agent_id && b.attempt == attempt) else {
        return Ok(Vec::new());
    };
    claimed.sort();
    claimed.dedup();
    let in_closure: std::collections::BTreeSet<String> = closure(store, &b.needs)
        .map_err(|e| internal(&e))?
        .into_iter()
        .map(|p| p.path)
        .collect();
    let mut lost = Vec::new();
    for p in claimed {
        if !in_closure.contains(&p) {
            continue;
        }
        let rec: Option<OutputRecord> = store
            .get(
                TreeId::Outputs,
                crate::store::keys::output_key(&p).as_bytes(),
            )
            .map_err(|e| internal(&e))?;
        let Some(rec) = rec.filter(|r| r.path == p) else {
            continue;
        };
        let url = nar_url(&rec.file_hash);
        let present = nars
            .nar_file(url.strip_prefix("nar/").unwrap_or(&url))
            .is_some_and(|f| f.exists());
        if !present {
            tracing::warn!(build_id, agent_id, path = %p, file_hash = %rec.file_hash, "an input's NAR file is missing from the cache; it will be built again");
            lost.push(p);
        }
    }
    if !lost.is_empty() {
        crate::actors::agent_session::forget_closures();
    }
    Ok(lost)
}

#[get("/paths/{hash}")]
async fn path_by_hash(
    state: web::Data<AppState>,
    _auth: AgentAuth,
    hash: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let rec = state.output(&hash)?;
    match rec {
        Some(o) => Ok(HttpResponse::Ok().json(path_info(&o))),
        None => Err(ApiError::not_found(format!(
            "no available store path with hash {hash}"
        ))),
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(open_session)
        .service(heartbeat)
        .service(work)
        .service(start)
        .service(upload_status)
        .service(upload)
        .service(upload_log)
        .service(result)
        .service(path_by_hash);
}
