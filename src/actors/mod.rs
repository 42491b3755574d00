//! The coordinator's actors, one per file, and what they share: the error type every actor
//! answers with, the panic guard every piece of actor code runs in ([`guard`]), and the restart
//! counters with the restart intensity ([`restarts`]).
//!
//! actix facts this module designs around (checked on actix 0.13.5; pinned by tests in
//! [`guard`]): `actix::Supervisor` restarts an actor that *stops*, keeping the same struct
//! and mailbox; a panic in a handler is not a restart, the address just closes. So actor code
//! runs inside the guard, which turns a panic into an explicit stop, and every actor's
//! `Supervised::restarting` replaces the struct with a fresh one from its factory
//! ([`guard::restart`]), which reloads what the actor owns from sled.

pub mod agent_admin;
pub mod agent_controls;
pub mod agent_session;
pub mod allocator;
pub mod build_queue;
pub mod credentials;
pub mod enrollment;
pub mod event_log;
pub mod guard;
pub mod hook_processor;
pub mod queue_state;
pub mod registry;
pub mod restarts;
pub mod runnable_index;
pub mod session_open;
pub mod submission;
pub mod symbols;

use thiserror::Error;

pub use guard::{catch, guarded, Guarded, Rebuild};
pub use restarts::Restarts;

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
    /// Authenticated, but not allowed: `code` is the stable error code (e.g.
    /// `system_not_allowed`).
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
}
