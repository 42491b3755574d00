//! How every network call of the agent is retried.
//!
//! A call is an async closure that returns `Ok`, or a [`CallError`] that says whether trying
//! again can help. Transient errors (connection refused or reset, timeouts, a transfer that
//! stalled, 5xx, 408, 429) are retried with the waits of Kiln's one retry policy
//! ([`kiln::retry::Policy::AGENT`]: exponential, full jitter, capped at 30 s, no limit on the
//! total time by default, because the coordinator may be restarting and the agent must keep
//! its results until it is back). A `Retry-After` header (seconds or an HTTP-date, on any
//! answer) replaces the backoff for that one wait. Everything else (4xx) is permanent and
//! returned to the caller, who knows what a `stale_attempt` or a `hash_mismatch` means for it.

use std::future::Future;
use std::time::{Duration, SystemTime};

use kiln::protocol::ErrorBody;

use crate::metrics;

/// A refusal from the coordinator: an HTTP status and the `{"error":{"code","message"}}` body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("coordinator answered {status} {code}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// Why one try of a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Trying again may succeed; wait `retry_after` when the coordinator said so.
    #[error("transient failure: {message}")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The session token is unknown (the coordinator restarted): open a new session and retry.
    #[error("session unknown to the coordinator")]
    SessionUnknown,
    /// Trying again cannot help.
    #[error(transparent)]
    Rejected(ApiError),
}

impl CallError {
    pub fn transient(message: impl Into<String>) -> CallError {
        CallError::Transient {
            message: message.into(),
            retry_after: None,
        }
    }

    /// The error code the coordinator sent, when it refused the call.
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Rejected(e) => Some(e.code.as_str()),
            _ => None,
        }
    }
}

/// The retry policy of the agent's calls (see [`kiln::retry`]).
pub type Policy = kiln::retry::Policy;

/// Runs `op` until it succeeds, fails permanently, or (with `max_elapsed`) runs out of time.
/// [`CallError::SessionUnknown`] is returned at once: the caller reopens the session.
pub async fn retry<T, F, Fut>(what: &str, policy: &Policy, mut op: F) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    let mut backoff = policy.backoff();
    loop {
        let (message, retry_after) = match op().await {
            Ok(v) => return Ok(v),
            Err(CallError::Transient {
                message,
                retry_after,
            }) => (message, retry_after),
            Err(other) => return Err(other),
        };
        let Some(next) = backoff.next_wait() else {
            return Err(CallError::Transient {
                message,
                retry_after,
            });
        };
        let wait = Policy::wait(next, retry_after);
        metrics::RETRIES.inc();
        tracing::warn!(call = what, error = %message, wait_ms = wait.as_millis() as u64, "call failed, retrying");
        tokio::time::sleep(wait).await;
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP-date ([`kiln::retry`]).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    kiln::retry::parse_retry_after(value, SystemTime::now())
}

/// Classifies a non-success HTTP answer from its status, `Retry-After` header and body.
pub fn classify(status: u16, retry_after: Option<&str>, body: &[u8]) -> CallError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (code, message) = match parsed {
        Some(b) => (b.error.code, b.error.message),
        None => (
            String::new(),
            String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        ),
    };
    let retry_after = retry_after.and_then(parse_retry_after);
    let transient = status >= 500 || status == 408 || status == 429;
    if transient {
        return CallError::Transient {
            message: format!("HTTP {status} {code}: {message}"),
            retry_after,
        };
    }
    if status == 401 && code == "session_unknown" {
        return CallError::SessionUnknown;
    }
    CallError::Rejected(ApiError {
        status,
        code,
        message,
    })
}

/// Classifies an error of the HTTP client itself (no answer, or a broken one): always
/// transient, since the coordinator or the link may come back.
pub fn classify_transport(err: &reqwest::Error) -> CallError {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    if message.contains("certificate") {
        message.push_str(
            " (TLS: check --ca-file names the CA that signed the coordinator's certificate, and \
             --client-cert/--client-key if it requires mutual TLS)",
        );
    }
    CallError::transient(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn body(code: &str) -> Vec<u8> {
        format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#).into_bytes()
    }

    #[test]
    fn server_errors_and_throttling_are_transient() {
        for status in [500, 502, 503, 504, 408, 429] {
            assert!(
                matches!(classify(status, None, b"oops"), CallError::Transient { .. }),
                "{status}"
            );
        }
    }

    #[test]
    fn retry_after_is_kept_on_503() {
        match classify(503, Some("7"), &body("busy")) {
            CallError::Transient { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn client_errors_are_permanent_with_their_code() {
        for (status, code) in [
            (401, "unauthorized"),
            (400, "unsupported_protocol"),
            (409, "stale_attempt"),
            (409, "upload_offset"),
            (422, "hash_mismatch"),
            (404, "not_found"),
        ] {
            match classify(status, None, &body(code)) {
                CallError::Rejected(e) => {
                    assert_eq!(e.status, status);
                    assert_eq!(e.code, code);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_session_asks_for_a_new_session() {
        assert!(matches!(
            classify(401, None, &body("session_unknown")),
            CallError::SessionUnknown
        ));
    }

    #[test]
    fn a_non_json_error_body_still_classifies() {
        match classify(404, None, &[0xff, 0xfe, b'x']) {
            CallError::Rejected(e) => assert_eq!(e.code, ""),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(" 12 "), Some(Duration::from_secs(12)));
        // An HTTP-date long past means "now".
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after(""), None);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_success() {
        let tries = AtomicU32::new(0);
        let got = retry("test", &Policy::default(), || async {
            if tries.fetch_add(1, Ordering::SeqCst) < 5 {
                Err(CallError::transient("down"))
            } else {
                Ok(42)
            }
        })
        .await;
        assert_eq!(got.ok(), Some(42));
        assert_eq!(tries.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_not_retried() {
        let tries = AtomicU32::new(0);
        let got: Result<(), _> = retry("test", &Policy::default(), || async {
            tries.fetch_add(1, Ordering::SeqCst);
            Err(classify(409, None, &body("stale_attempt")))
        })
        .await;
        assert_eq!(
            got.err()
                .and_then(|e| e.code().map(str::to_owned))
                .as_deref(),
            Some("stale_attempt")
        );
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_replaces_the_backoff() {
        let start = tokio::time::Instant::now();
        let tries = AtomicU32::new(0);
        let _ = retry("test", &Policy::default(), || async {
            if tries.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(CallError::Transient {
                    message: "busy".into(),
                    retry_after: Some(Duration::from_secs(9)),
                })
            } else {
                Ok(())
            }
        })
        .await;
        assert_eq!(start.elapsed().as_secs(), 9);
    }
}
