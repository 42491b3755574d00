//! Fault points over HTTP, for tests that drive a real `kiln coordinator` process: the route
//! `POST /api/v1/faults/{point}` on the client listener exists only in builds with the cargo
//! feature `fault-points` (never in release builds). Documented in docs/protocol.md
//! ("Fault points").
//!
//! | point | does |
//! |---|---|
//! | `build_queue.panic`, `allocator.panic`, `agent_registry.panic`, `event_log.panic`, `hook_processor.panic` | the actor panics; `?at=handler` (default), `future`, `continuation` or `timer` says where |
//! | `agent_session.panic?agent=ID` | the same in the session actor of agent `ID` |
//! | `committer.fail_flush` | the next group commit flushes, then reports the flush as failed |
//! | `committer.stall`, `committer.resume` | the committer holds the next batch it takes (at most 120 s) / lets it go |
//!
//! A panic fired in a handler, future or continuation answers what the panicking actor
//! answers: 503 `unavailable`. The other points answer 200 `{"fired": point}`.

use actix::Addr;
use actix_web::{post, web, HttpResponse};
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::actors::allocator::Allocator;
use crate::actors::guard::faults::{InjectPanic, PanicAt};
use crate::actors::hook_processor::HookProcessor;
use crate::actors::registry::SessionOf;
use crate::actors::ActorError;
use crate::store::Committer;

/// What the fault points reach beyond the actors `AppState` already holds.
pub struct Targets {
    pub allocator: Addr<Allocator>,
    pub hooks: Addr<HookProcessor>,
    pub committer: Committer,
}

#[derive(Debug, Deserialize)]
struct FaultQuery {
    at: Option<String>,
    agent: Option<u64>,
}

#[post("/{point}")]
async fn fire(
    state: web::Data<AppState>,
    point: web::Path<String>,
    q: web::Query<FaultQuery>,
) -> Result<HttpResponse, ApiError> {
    let point = point.into_inner();
    let at: PanicAt =
        q.at.as_deref()
            .unwrap_or("handler")
            .parse()
            .map_err(ApiError::bad_request)?;
    let msg = InjectPanic(at);
    let t = &state.faults;
    let answer: Result<(), ActorError> = match point.as_str() {
        "build_queue.panic" => state.queue.send(msg).await.map_err(ApiError::mailbox)?,
        "allocator.panic" => t.allocator.send(msg).await.map_err(ApiError::mailbox)?,
        "agent_registry.panic" => state.registry.send(msg).await.map_err(ApiError::mailbox)?,
        "event_log.panic" => state.event_log.send(msg).await.map_err(ApiError::mailbox)?,
        "hook_processor.panic" => t.hooks.send(msg).await.map_err(ApiError::mailbox)?,
        "agent_session.panic" => {
            let agent = q.agent.ok_or_else(|| {
                ApiError::bad_request("agent_session.panic needs ?agent=ID (the agent's id)")
            })?;
            let session = state
                .registry
                .send(SessionOf(agent))
                .await
                .map_err(ApiError::mailbox)?
                .ok_or_else(|| {
                    ApiError::not_found(format!("agent {agent} has no session actor"))
                })?;
            session.send(msg).await.map_err(ApiError::mailbox)?
        }
        "committer.fail_flush" => {
            t.committer.faults().fail_next_flush();
            Ok(())
        }
        "committer.stall" => {
            t.committer.faults().stall();
            Ok(())
        }
        "committer.resume" => {
            t.committer.faults().resume();
            Ok(())
        }
        other => {
            return Err(ApiError::not_found(format!(
                "no fault point {other:?} (see docs/protocol.md, \"Fault points\")"
            )))
        }
    };
    answer?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "fired": point })))
}

/// The `/api/v1/faults` scope; registered before the client API's `/api/v1` scope, which
/// would otherwise take the path.
pub fn scope() -> actix_web::Scope {
    web::scope(&format!("{}/faults", crate::protocol::CLIENT_API)).service(fire)
}
