//! The coordinator's actors, one per file, and what they share: the error type every actor
//! answers with, and the panic guard every handler runs in.
//!
//! actix facts this module designs around (checked on actix 0.13.5; pinned by tests in
//! `supervisor`): `actix::Supervisor` restarts an actor that *stops*, keeping the same struct
//! and mailbox; a panic in a handler is not a restart, the address just closes. So handlers run
//! inside [`guarded`], which turns a panic into an explicit stop, and every actor's
//! `Supervised::restarting` reloads its state from sled.

pub mod agent_session;
pub mod allocator;
pub mod build_queue;
pub mod event_log;
pub mod hook_processor;
pub mod queue_state;
pub mod registry;
pub mod submission;

use std::panic::{catch_unwind, AssertUnwindSafe};

use thiserror::Error;

use crate::store::committer::CommitError;
use crate::store::StoreError;
use queue_state::QueueError;
use submission::SubmitError;

/// Every failure an actor reports. `http::error` maps these to statuses in one place.
#[derive(Debug, Error)]
pub enum ActorError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Submit(#[from] SubmitError),
    #[error("{0}")]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The actor is restarting or overloaded; the caller should retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
}

/// Run a handler body; a panic becomes a stop of the actor (so the supervisor restarts it
/// from sled) and an `Unavailable` answer instead of a closed mailbox.
pub fn guarded<A, T>(
    actor_name: &'static str,
    ctx: &mut A::Context,
    body: impl FnOnce(&mut A::Context) -> Result<T, ActorError>,
) -> Result<T, ActorError>
where
    A: actix::Actor<Context = actix::Context<A>>,
{
    match catch_unwind(AssertUnwindSafe(|| body(ctx))) {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(actor = actor_name, panic = %what, "handler panicked; stopping the actor so it restarts from sled");
            use actix::ActorContext as _;
            ctx.stop();
            Err(ActorError::Unavailable(format!(
                "the {actor_name} is restarting after an internal error; retry"
            )))
        }
    }
}
