//! The one place where failures become HTTP statuses and `ErrorBody` JSON.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::actors::queue_state::QueueError;
use crate::actors::submission::SubmitError;
use crate::actors::ActorError;
use crate::protocol::{ErrorBody, ErrorDetail};
use crate::store::committer::CommitError;
use crate::store::nar_cache::UploadError;

/// The `Retry-After` of every 503, in seconds.
pub const RETRY_AFTER_S: &str = "1";

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// A mailbox that is closed (the actor is restarting): retry soon.
    pub fn mailbox(_e: actix::MailboxError) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the coordinator is restarting an internal component; retry shortly",
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    /// Every 503 (an actor restarting, the committer's queue full, shutting down) tells the
    /// caller when to come back; `kiln-agent` waits that long instead of its own backoff.
    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            r.insert_header(("Retry-After", RETRY_AFTER_S));
        }
        r.json(ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
            },
        })
    }
}

impl From<ActorError> for ApiError {
    fn from(e: ActorError) -> ApiError {
        use StatusCode as S;
        let msg = e.to_string();
        match e {
            ActorError::Queue(q) => match q {
                QueueError::NoSuchBuild(_) => ApiError::new(S::NOT_FOUND, "no_such_build", msg),
                QueueError::StaleAttempt { .. } => ApiError::new(S::CONFLICT, "stale_attempt", msg),
                QueueError::WrongState(..) => ApiError::new(S::CONFLICT, "wrong_state", msg),
                QueueError::BadResult(_) => {
                    ApiError::new(S::UNPROCESSABLE_ENTITY, "bad_result", msg)
                }
                QueueError::NotUploaded { .. } => {
                    ApiError::new(S::UNPROCESSABLE_ENTITY, "output_not_uploaded", msg)
                }
                QueueError::Store(_) => ApiError::new(S::INTERNAL_SERVER_ERROR, "store", msg),
            },
            ActorError::Submit(s) => match s {
                SubmitError::Store(_) => ApiError::new(S::INTERNAL_SERVER_ERROR, "store", msg),
                SubmitError::MissingInputDrv { .. } => {
                    ApiError::new(S::UNPROCESSABLE_ENTITY, "missing_input_derivation", msg)
                }
                SubmitError::MissingSource { .. } => {
                    ApiError::new(S::UNPROCESSABLE_ENTITY, "missing_source", msg)
                }
                SubmitError::WrongName { .. } => {
                    ApiError::new(S::UNPROCESSABLE_ENTITY, "wrong_drv_name", msg)
                }
                SubmitError::WrongOutput { .. } => {
                    ApiError::new(S::UNPROCESSABLE_ENTITY, "wrong_output_path", msg)
                }
                _ => ApiError::new(S::UNPROCESSABLE_ENTITY, "bad_derivation", msg),
            },
            ActorError::Commit(CommitError::Overloaded { .. }) => {
                ApiError::new(S::SERVICE_UNAVAILABLE, "overloaded", msg)
            }
            ActorError::Commit(_) | ActorError::Unavailable(_) => {
                ApiError::new(S::SERVICE_UNAVAILABLE, "unavailable", msg)
            }
            ActorError::Store(_) | ActorError::Internal(_) => {
                ApiError::new(S::INTERNAL_SERVER_ERROR, "internal", msg)
            }
            ActorError::NotFound(_) => ApiError::new(S::NOT_FOUND, "not_found", msg),
            ActorError::Unauthorized(_) => ApiError::new(S::UNAUTHORIZED, "unauthorized", msg),
            ActorError::Conflict(_) => ApiError::new(S::CONFLICT, "conflict", msg),
            ActorError::Forbidden { code, .. } => ApiError::new(S::FORBIDDEN, code, msg),
            ActorError::BadRequest(m) if m.starts_with("unsupported_protocol") => {
                ApiError::new(S::BAD_REQUEST, "unsupported_protocol", m)
            }
            ActorError::BadRequest(_) => ApiError::new(S::BAD_REQUEST, "bad_request", msg),
        }
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> ApiError {
        use StatusCode as S;
        let msg = e.to_string();
        match e {
            UploadError::Offset { .. } => ApiError::new(S::CONFLICT, "upload_offset", msg),
            UploadError::TooLarge(_) | UploadError::LogTooLarge(_) => {
                ApiError::new(S::PAYLOAD_TOO_LARGE, "too_large", msg)
            }
            UploadError::Stalled(_) => ApiError::new(S::REQUEST_TIMEOUT, "transfer_stalled", msg),
            UploadError::Superseded => ApiError::new(S::CONFLICT, "upload_superseded", msg),
            UploadError::HashMismatch(_) => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "hash_mismatch", msg)
            }
            UploadError::WrongSourcePath(_) => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "wrong_source_path", msg)
            }
            UploadError::BadRequest(_) => ApiError::new(S::BAD_REQUEST, "bad_request", msg),
            UploadError::Body(_) => ApiError::new(S::BAD_REQUEST, "body", msg),
            UploadError::Commit(_) => ApiError::new(S::SERVICE_UNAVAILABLE, "unavailable", msg),
            UploadError::Io(_) | UploadError::Store(_) => {
                ApiError::new(S::INTERNAL_SERVER_ERROR, "internal", msg)
            }
        }
    }
}

/// JSON and query extraction errors become `ErrorBody` 400s (413 for oversized bodies) that
/// say what was wrong.
pub fn json_error(
    err: actix_web::error::JsonPayloadError,
    _req: &actix_web::HttpRequest,
) -> actix_web::Error {
    json_payload_error(&err).into()
}

/// The answer to a JSON body that could not be taken (also for routes that read their body
/// themselves, e.g. the streamed submission).
pub fn json_payload_error(err: &actix_web::error::JsonPayloadError) -> ApiError {
    use actix_web::error::JsonPayloadError as J;
    match err {
        J::OverflowKnownLength { length, limit } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body of {length} bytes is over this route's limit of {limit} bytes"),
        ),
        J::Overflow { limit } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body is over this route's limit of {limit} bytes"),
        ),
        J::Payload(actix_web::error::PayloadError::Io(io))
            if io.kind() == std::io::ErrorKind::TimedOut =>
        {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_too_slow", io.to_string())
        }
        other => ApiError::bad_request(format!("request body is not the expected JSON: {other}")),
    }
}

pub fn query_error(
    err: actix_web::error::QueryPayloadError,
    _req: &actix_web::HttpRequest,
) -> actix_web::Error {
    ApiError::bad_request(format!("bad query string: {err}")).into()
}
