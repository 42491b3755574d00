//! The coordinator's agent API, as the agent calls it: sessions, JSON calls, streamed bodies.
//!
//! Every call goes through [`Coordinator::call`], which runs it under the [`retry`] policy and
//! handles a forgotten session: on 401 `session_unknown` (the coordinator restarted) it opens
//! a new session, naming the builds the agent still holds, and tries again. Only one task
//! reopens; the others see the new token. Commands that come with a session opening are
//! forwarded to the session loop through `commands`.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln::protocol::{
    AgentCommand, BuildId, HeldBuild, HeldPhase, OpenSession, SessionOpened, AGENT_API,
    PROTOCOL_VERSION, SESSION_HEADER,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::sync::mpsc;

use crate::metrics;
use crate::retry::{self, classify, classify_transport, ApiError, CallError, Policy};

/// Who the agent is, as sent when a session opens.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub secret: String,
    pub systems: Vec<String>,
    pub max_parallel_builds: u32,
    /// Sent at every session opening: the coordinator registers the agent with it when no
    /// agent of this name exists yet (`--registration-token-file`).
    pub registration_token: Option<String>,
}

/// The builds the agent holds, by id: reported on session open and on every heartbeat.
#[derive(Debug, Clone, Default)]
pub struct Held(Arc<Mutex<BTreeMap<BuildId, HeldBuild>>>);

impl Held {
    pub fn set(&self, build_id: BuildId, attempt: u32, phase: HeldPhase) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(
            build_id,
            HeldBuild {
                build_id,
                attempt,
                phase,
            },
        );
    }
    pub fn remove(&self, build_id: BuildId) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&build_id);
    }
    pub fn list(&self) -> Vec<HeldBuild> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

pub struct Coordinator {
    http: reqwest::Client,
    /// Base URL without a trailing slash.
    base: String,
    identity: Identity,
    policy: Policy,
    /// The current session token; `None` before the first opening.
    token: tokio::sync::Mutex<Option<String>>,
    held: Held,
    /// Commands that arrive with a session opening, for the session loop.
    commands: mpsc::UnboundedSender<AgentCommand>,
    /// A transfer that moves no byte for this long is aborted and resumed.
    transfer_stall: Duration,
}

/// How the agent checks the coordinator's certificate and proves its own (mutual TLS).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Trust only the CA certificates in this PEM file (else the built-in web roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate chain and its key (PEM), for a coordinator that requires one.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// The one HTTP client of the agent. rustls (ring) keeps a TLS session cache per client, so
/// reconnects resume sessions.
fn http_client(tls: &TlsOptions) -> anyhow::Result<reqwest::Client> {
    use anyhow::Context as _;
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        // Above the longest long poll (`MAX_WORK_WAIT`): a long poll sends no byte while it
        // waits.
        .read_timeout(Duration::from_secs(60))
        // Requests are small and answered at once: no Nagle delay on any connection.
        .tcp_nodelay(true)
        .user_agent(concat!("kiln-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &tls.ca_file {
        let pem = std::fs::read(ca)
            .with_context(|| format!("failed to read the CA file {}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("the CA file {} is not PEM certificates", ca.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "the CA file {} holds no certificate",
            ca.display()
        );
        b = b.tls_built_in_root_certs(false);
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    if let Some((cert, key)) = &tls.client_cert {
        let mut pem = std::fs::read(cert)
            .with_context(|| format!("failed to read the client certificate {}", cert.display()))?;
        pem.push(b'\n');
        pem.extend(
            std::fs::read(key)
                .with_context(|| format!("failed to read the client key {}", key.display()))?,
        );
        let id = reqwest::Identity::from_pem(&pem).with_context(|| {
            format!(
                "client certificate {} and key {} are not a usable PEM pair",
                cert.display(),
                key.display()
            )
        })?;
        b = b.identity(id);
    }
    b.build()
        .map_err(|e| anyhow::anyhow!("failed to build the HTTP client: {e}"))
}

impl Coordinator {
    pub fn new(
        base: &str,
        identity: Identity,
        held: Held,
        commands: mpsc::UnboundedSender<AgentCommand>,
    ) -> anyhow::Result<Coordinator> {
        let http = http_client(&TlsOptions::default())?;
        Ok(Coordinator {
            http,
            base: base.trim_end_matches('/').to_owned(),
            identity,
            policy: Policy::default(),
            token: tokio::sync::Mutex::new(None),
            held,
            commands,
            transfer_stall: crate::transfer::DEFAULT_STALL,
        })
    }

    /// Use these TLS settings for every later request (`--ca-file`, `--client-cert`).
    pub fn set_tls(&mut self, tls: &TlsOptions) -> anyhow::Result<()> {
        self.http = http_client(tls)?;
        Ok(())
    }

    /// Sets the stall timeout of uploads and downloads (`--transfer-stall-timeout`).
    pub fn set_transfer_stall(&mut self, stall: Duration) {
        self.transfer_stall = stall;
    }

    pub fn transfer_stall(&self) -> Duration {
        self.transfer_stall
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    pub fn agent_url(&self, path: &str) -> String {
        format!("{}{AGENT_API}/{}", self.base, path.trim_start_matches('/'))
    }

    /// The builds this agent holds, as reported to the coordinator.
    pub fn held(&self) -> &Held {
        &self.held
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Opens a session (retrying transient failures). 401 `unauthorized` and 400
    /// `unsupported_protocol` come back as [`CallError::Rejected`]: fatal for the agent.
    pub async fn open_session(&self) -> Result<SessionOpened, CallError> {
        let mut token = self.token.lock().await;
        self.open_locked(&mut token).await
    }

    async fn open_locked(&self, token: &mut Option<String>) -> Result<SessionOpened, CallError> {
        let url = self.agent_url("session");
        let opened: SessionOpened = retry::retry("open session", &self.policy, || async {
            let body = OpenSession {
                name: self.identity.name.clone(),
                secret: self.identity.secret.clone(),
                protocol_version: PROTOCOL_VERSION,
                systems: self.identity.systems.clone(),
                max_parallel_builds: self.identity.max_parallel_builds,
                builds: self.held.list(),
                registration_token: self.identity.registration_token.clone(),
                offers: Vec::new(),
                requires: Vec::new(),
            };
            decode(
                send(
                    self.http
                        .post(&url)
                        .json(&body)
                        .timeout(Duration::from_secs(30)),
                )
                .await?,
            )
        })
        .await?;
        *token = Some(opened.session_token.clone());
        tracing::info!(
            agent_id = opened.agent_id,
            heartbeat_ms = opened.heartbeat_interval_ms,
            "session opened"
        );
        let _ = self.commands.send(AgentCommand::SetHeartbeat {
            interval_ms: opened.heartbeat_interval_ms,
        });
        for c in &opened.commands {
            let _ = self.commands.send(c.clone());
        }
        Ok(opened)
    }

    /// Opens a new session unless another task already replaced `stale`.
    async fn reopen(&self, stale: &str) -> Result<(), CallError> {
        let mut token = self.token.lock().await;
        if token.as_deref() == Some(stale) {
            tracing::warn!("coordinator forgot the session, opening a new one");
            metrics::RECONNECTS.inc();
            self.open_locked(&mut token).await?;
        }
        Ok(())
    }

    /// Runs `op` with the current session token under the retry policy.
    pub async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, CallError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let op = &op;
        let this = self;
        retry::retry(what, &self.policy, move || async move {
            let token = this.token.lock().await.clone().unwrap_or_default();
            match op(token.clone()).await {
                Err(CallError::SessionUnknown) => {
                    this.reopen(&token).await?;
                    Err(CallError::Transient {
                        message: "session reopened".into(),
                        retry_after: Some(Duration::ZERO),
                    })
                }
                other => other,
            }
        })
        .await
    }

    /// POSTs `body` as JSON to `path` under the agent API and decodes the JSON reply.
    pub async fn post<Req, Resp>(
        &self,
        what: &str,
        path: &str,
        body: &Req,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize + Sync,
        Resp: DeserializeOwned,
    {
        self.post_within(what, path, body, Duration::from_secs(30))
            .await
    }

    /// [`Coordinator::post`] with a whole-request timeout of `timeout` (a long poll needs more
    /// than the usual 30 s).
    pub async fn post_within<Req, Resp>(
        &self,
        what: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize + Sync,
        Resp: DeserializeOwned,
    {
        let url = self.agent_url(path);
        self.call(what, |token| {
            let rb = self
                .http
                .post(&url)
                .header(SESSION_HEADER, token)
                .json(body)
                .timeout(timeout);
            async move { decode(send(rb).await?) }
        })
        .await
    }
}

/// The longest long poll the agent asks for (`--work-wait-ms`): below the client's 60 s read
/// timeout, since a long poll sends no byte while it waits.
pub const MAX_WORK_WAIT: Duration = Duration::from_secs(50);

/// A fresh id for one logical work request (`WorkRequest::request_id`): 128 random bits in
/// hex. The caller sends it on every retry of that request, so the coordinator answers a retry
/// with the assignments it already leased when the first reply was lost.
pub fn new_request_id() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

/// Sends a request; returns the body of a 2xx answer, or the classified failure.
pub async fn send(rb: reqwest::RequestBuilder) -> Result<bytes::Bytes, CallError> {
    let resp = rb.send().await.map_err(|e| classify_transport(&e))?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.bytes().await.map_err(|e| classify_transport(&e))?;
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        Err(classify(status, retry_after.as_deref(), &body))
    }
}

/// Decodes a JSON reply; an undecodable 2xx reply is a permanent error (a protocol mismatch).
pub fn decode<T: DeserializeOwned>(body: bytes::Bytes) -> Result<T, CallError> {
    serde_json::from_slice(&body).map_err(|e| {
        CallError::Rejected(ApiError {
            status: 200,
            code: "bad_reply".into(),
            message: format!("failed to decode the coordinator's reply: {e}"),
        })
    })
}

/// A request body streaming `path` from `offset` to its end, counting the bytes sent.
pub async fn file_body(path: &Path, offset: u64) -> Result<reqwest::Body, CallError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| local_error(path, e))?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(|e| local_error(path, e))?;
    let stream = futures_util::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                metrics::UPLOAD_BYTES.add(n as u64);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

/// A failure on the agent's own disk: permanent for this call.
pub fn local_error(path: &Path, e: std::io::Error) -> CallError {
    CallError::Rejected(ApiError {
        status: 0,
        code: "local_io".into(),
        message: format!("failed to read {}: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_fresh_and_valid_on_the_wire() {
        let (a, b) = (super::new_request_id(), super::new_request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
    }
}
