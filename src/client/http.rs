//! The one HTTP client of the client API (`/api/v1`), over blocking `ureq`.
//!
//! Every client command and `kiln demo` go through [`Client`], so that errors read the same
//! everywhere: a coordinator that cannot be reached says how to point the client at one, and an
//! [`ErrorBody`] from the coordinator is shown with its message, code and HTTP status. A 503
//! (an actor mailbox closed while it restarts, a full commit queue) or a 429 is retried a few
//! times with Kiln's one retry policy ([`crate::retry::Policy::CLIENT`]), honouring
//! `Retry-After`.

use std::io::Read;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{ErrorBody, CLIENT_API};

/// The coordinator's client listener when neither `--coordinator` nor `KILN_COORDINATOR` is set.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:8746";

/// Attempts at one request while the coordinator answers 503 or 429.
const BUSY_ATTEMPTS: u32 = 5;

/// Why a request to the coordinator failed. Each message says what happened, to which request,
/// and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the coordinator at {url} ({detail}): is `kiln coordinator` running? \
         Set --coordinator or KILN_COORDINATOR"
    )]
    Unreachable { url: String, detail: String },
    #[error(
        "the coordinator at {url} did not prove who it is ({detail}): pass the CA that signed its \
         certificate with --ca-file or KILN_CA_FILE (`kiln tls init` writes ca.pem)"
    )]
    Untrusted { url: String, detail: String },
    #[error("the coordinator URL {url:?} is not usable ({detail}): give one like {DEFAULT_COORDINATOR} with --coordinator or KILN_COORDINATOR")]
    BadUrl { url: String, detail: String },
    #[error("the coordinator refused {request}: {message} ({code}, HTTP {status})")]
    Refused {
        request: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error(
        "the coordinator answered {request} with HTTP {status} and no Kiln error body ({body:?}): \
         is {url} a Kiln coordinator's client listener?"
    )]
    UnexpectedStatus {
        request: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error(
        "the coordinator was still busy (HTTP 503) after {attempts} attempts at {request}: \
         try again later, and see the coordinator's log"
    )]
    Busy { request: String, attempts: u32 },
    #[error(
        "the coordinator's answer to {request} could not be read ({detail}): are `kiln` and the \
         coordinator the same version?"
    )]
    BadResponse { request: String, detail: String },
    #[error("{request} failed while talking to the coordinator at {url}: {detail}")]
    Transport {
        request: String,
        url: String,
        detail: String,
    },
}

impl ClientError {
    /// The HTTP status the coordinator answered with, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } | ClientError::UnexpectedStatus { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}

/// A client of one coordinator's client API.
#[derive(Clone)]
pub struct Client {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:8746`.
    base: String,
    /// Sent as `Authorization: Bearer <token>` when set.
    token: Option<String>,
    agent: ureq::Agent,
}

/// A request body, built again for each attempt (a 503 retry resends it).
pub enum Body<'a> {
    Empty,
    Json(serde_json::Value),
    /// A stream, opened anew for every attempt.
    Stream(&'a dyn Fn() -> anyhow::Result<Box<dyn Read + Send>>),
}

impl Client {
    /// A client of the coordinator at `base` (e.g. `http://127.0.0.1:8746`); an `https://`
    /// base trusts the built-in web roots.
    pub fn new(base: &str, token: Option<String>) -> Client {
        Client::from_builder(base, token, Client::builder())
    }

    /// A client that trusts only the CA certificates in `ca_file` for `https://` (the
    /// `ca.pem` of `kiln tls init`), or the built-in web roots when `None`.
    pub fn with_ca(
        base: &str,
        token: Option<String>,
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Client> {
        let mut builder = Client::builder();
        if let Some(ca) = ca_file {
            crate::http::tls::install_default_provider();
            let config = crate::http::tls::client_config(ca, None)?;
            builder = builder.tls_config(std::sync::Arc::new(config));
        }
        Ok(Client::from_builder(base, token, builder))
    }

    fn builder() -> ureq::AgentBuilder {
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(300))
            .timeout_write(Duration::from_secs(300))
    }

    fn from_builder(base: &str, token: Option<String>, builder: ureq::AgentBuilder) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            agent: builder.build(),
        }
    }

    /// The base URL this client talks to.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /api/v1/<path>` with query pairs, decoded as JSON.
    pub fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ClientError> {
        let resp = self.call("GET", path, query, Body::Empty)?;
        decode(resp, &self.describe("GET", path))
    }

    /// `GET /api/v1/<path>` with query pairs, decoded as JSON, and the value of one response
    /// header (e.g. the next cursor of a listing).
    pub fn get_json_header<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        header: &str,
    ) -> Result<(T, Option<String>), ClientError> {
        let resp = self.call("GET", path, query, Body::Empty)?;
        let h = resp.header(header).map(str::to_string);
        Ok((decode(resp, &self.describe("GET", path))?, h))
    }

    /// `POST /api/v1/<path>` with a JSON body, answer decoded as JSON.
    pub fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let request = self.describe("POST", path);
        let value = serde_json::to_value(body).map_err(|e| ClientError::BadResponse {
            request: request.clone(),
            detail: format!("the request body could not be encoded: {e}"),
        })?;
        let resp = self.call("POST", path, &[], Body::Json(value))?;
        decode(resp, &request)
    }

    /// `POST /api/v1/<path>` without a body, answer decoded as JSON.
    pub fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.call("POST", path, &[], Body::Empty)?;
        decode(resp, &self.describe("POST", path))
    }

    /// `POST /api/v1/<path>?query` without a body, answer decoded as JSON.
    pub fn post_empty_query<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ClientError> {
        let resp = self.call("POST", path, query, Body::Empty)?;
        decode(resp, &self.describe("POST", path))
    }

    /// `PUT /api/v1/<path>?query` with a streamed body, answer decoded as JSON.
    pub fn put_stream<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        body: &dyn Fn() -> anyhow::Result<Box<dyn Read + Send>>,
    ) -> Result<T, ClientError> {
        let resp = self.call("PUT", path, query, Body::Stream(body))?;
        decode(resp, &self.describe("PUT", path))
    }

    /// `GET /api/v1/<path>`, the raw body copied to `out` (logs are bytes, not UTF-8).
    pub fn get_to(&self, path: &str, out: &mut dyn std::io::Write) -> Result<u64, ClientError> {
        let request = self.describe("GET", path);
        let resp = self.call("GET", path, &[], Body::Empty)?;
        std::io::copy(&mut resp.into_reader(), out).map_err(|e| ClientError::Transport {
            request,
            url: self.base.clone(),
            detail: format!("reading or writing the body failed: {e}"),
        })
    }

    fn describe(&self, method: &str, path: &str) -> String {
        format!("{method} {CLIENT_API}/{}", path.trim_start_matches('/'))
    }

    /// Send one request; retry while the coordinator answers 503; map every failure.
    fn call(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: Body<'_>,
    ) -> Result<ureq::Response, ClientError> {
        let request = self.describe(method, path);
        let url = format!("{}{CLIENT_API}/{}", self.base, path.trim_start_matches('/'));
        let mut attempt = 0;
        let mut backoff = crate::retry::Policy::CLIENT.backoff();
        loop {
            attempt += 1;
            let mut req = self.agent.request(method, &url);
            for (k, v) in query {
                req = req.query(k, v);
            }
            if let Some(token) = &self.token {
                req = req.set("Authorization", &format!("Bearer {token}"));
            }
            let result = match &body {
                // A body-less POST still says JSON: the coordinator refuses state-changing
                // requests without a non-simple content type (browser safety).
                Body::Empty if method != "GET" && method != "HEAD" => {
                    req.set("Content-Type", "application/json").call()
                }
                Body::Empty => req.call(),
                Body::Json(v) => req.send_json(v),
                Body::Stream(open) => {
                    let reader = open().map_err(|e| ClientError::Transport {
                        request: request.clone(),
                        url: self.base.clone(),
                        detail: format!("{e:#}"),
                    })?;
                    req.set("Content-Type", "application/x-nix-archive")
                        .send(reader)
                }
            };
            match result {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(status @ (503 | 429), resp)) if attempt < BUSY_ATTEMPTS => {
                    let next = backoff
                        .next_wait()
                        .unwrap_or(crate::retry::Policy::CLIENT.cap);
                    let wait = crate::retry::Policy::wait(next, retry_after(&resp));
                    tracing::debug!(request = %request, attempt, status, wait_ms = wait.as_millis() as u64, "coordinator busy, retrying");
                    std::thread::sleep(wait);
                }
                Err(ureq::Error::Status(503, resp)) => {
                    // A 503 may still carry an ErrorBody that says more than "busy".
                    return Err(match status_error(503, resp, &request, &self.base) {
                        e @ ClientError::Refused { .. } => e,
                        _ => ClientError::Busy {
                            request,
                            attempts: attempt,
                        },
                    });
                }
                Err(ureq::Error::Status(status, resp)) => {
                    return Err(status_error(status, resp, &request, &self.base))
                }
                Err(ureq::Error::Transport(t)) => {
                    return Err(transport_error(t, &request, &self.base))
                }
            }
        }
    }
}

fn retry_after(resp: &ureq::Response) -> Option<Duration> {
    crate::retry::parse_retry_after(resp.header("Retry-After")?, std::time::SystemTime::now())
}

fn status_error(status: u16, resp: ureq::Response, request: &str, base: &str) -> ClientError {
    let mut raw = Vec::new();
    // The body is only read to explain the error: a failure here leaves it empty.
    let _ = resp.into_reader().take(64 * 1024).read_to_end(&mut raw);
    match serde_json::from_slice::<ErrorBody>(&raw) {
        Ok(body) => ClientError::Refused {
            request: request.to_string(),
            status,
            code: body.error.code,
            message: body.error.message,
        },
        Err(_) => {
            let mut text = String::from_utf8_lossy(&raw).into_owned();
            if text.len() > 200 {
                let cut = (0..=200)
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                text.truncate(cut);
                text.push('…');
            }
            ClientError::UnexpectedStatus {
                request: request.to_string(),
                url: base.to_string(),
                status,
                body: text,
            }
        }
    }
}

fn transport_error(t: ureq::Transport, request: &str, base: &str) -> ClientError {
    let detail = match t.message() {
        Some(m) => format!("{}: {m}", t.kind()),
        None => t.to_string(),
    };
    let detail = match std::error::Error::source(&t) {
        Some(src) if !detail.contains(&src.to_string()) => format!("{detail}: {src}"),
        _ => detail,
    };
    if detail.contains("certificate") || detail.contains("UnknownIssuer") {
        return ClientError::Untrusted {
            url: base.to_string(),
            detail,
        };
    }
    match t.kind() {
        ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns => ClientError::Unreachable {
            url: base.to_string(),
            detail,
        },
        ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => ClientError::BadUrl {
            url: base.to_string(),
            detail,
        },
        _ => ClientError::Transport {
            request: request.to_string(),
            url: base.to_string(),
            detail,
        },
    }
}

fn decode<T: DeserializeOwned>(resp: ureq::Response, request: &str) -> Result<T, ClientError> {
    resp.into_json::<T>().map_err(|e| ClientError::BadResponse {
        request: request.to_string(),
        detail: e.to_string(),
    })
}
