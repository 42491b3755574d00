//! The HTTP side: two actix-web listeners. The agent listener serves the agent API
//! (`/api/agent/v1`), substitutes (`/nix-cache-info`, `/<hash>.narinfo`, `/nar/…`) and
//! `/metrics`; the client listener serves the client API (`/api/v1`) and the event stream.
//! Handlers only translate HTTP to actor messages and back; errors become statuses in
//! [`error`] alone. Every route has a body limit.

pub mod agent_api;
pub mod auth;
pub mod client_api;
pub mod enrollment;
pub mod error;
#[cfg(feature = "fault-points")]
pub mod faults;
pub mod limits;
pub mod peer;
pub mod substitutes;
pub mod tls;

use std::sync::Arc;

use actix::Addr;
use actix_web::{web, App, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::actors::build_queue::BuildQueue;
use crate::actors::event_log::EventLog;
use crate::actors::registry::{AgentRegistry, Liveness, Sessions};
use crate::config::Config;
use crate::derivation::store_path::StoreDir;
use crate::store::nar_cache::NarCache;
use crate::store::records::OutputRecord;
use crate::store::{meta, Store, TreeId};

/// What every handler can reach.
pub struct AppState {
    pub queue: Addr<BuildQueue>,
    pub registry: Addr<AgentRegistry>,
    pub event_log: Addr<EventLog>,
    pub sessions: Arc<Sessions>,
    pub liveness: Arc<Liveness>,
    pub nars: Arc<NarCache>,
    pub store: Store,
    /// Caps on agent uploads in progress ([`limits::UploadSlots`]).
    pub upload_slots: Arc<limits::UploadSlots>,
    /// Writes of the client API that no actor owns (client tokens).
    pub committer: crate::store::Committer,
    pub config: Arc<Config>,
    pub prometheus: PrometheusHandle,
    /// What the fault points reach (test builds only).
    #[cfg(feature = "fault-points")]
    pub faults: faults::Targets,
}

impl AppState {
    /// The store dir this coordinator serves, if fixed yet (config, env, or the first
    /// submission, recorded in sled).
    pub fn store_dir(&self) -> Result<Option<StoreDir>, String> {
        if let Some(d) = &self.config.store_dir {
            return StoreDir::new(d).map(Some).map_err(|e| e.to_string());
        }
        match self.store.meta_str(meta::STORE_DIR) {
            Ok(Some(v)) => StoreDir::new(&v).map(Some).map_err(|e| e.to_string()),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl AppState {
    /// The available store path with this hash part, if any (substitutes and the agent API).
    pub fn output(&self, hash_part: &str) -> Result<Option<OutputRecord>, error::ApiError> {
        self.store
            .get(TreeId::Outputs, hash_part.as_bytes())
            .map_err(|e| {
                error::ApiError::new(
                    actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    e.to_string(),
                )
            })
    }
}

/// TLS settings of the two listeners (see [`tls`]).
pub struct TlsServers {
    pub agent: rustls::ServerConfig,
    pub client: rustls::ServerConfig,
}

/// Bind both listeners (with TLS when `tls` is given); returns the servers (not yet awaited)
/// and their bound addresses.
pub fn bind(
    state: web::Data<AppState>,
    listen: &str,
    client_listen: &str,
    tls: Option<TlsServers>,
) -> anyhow::Result<(
    actix_web::dev::Server,
    actix_web::dev::Server,
    String,
    String,
)> {
    use anyhow::Context as _;
    let limits = state.config.limits.clone();
    let small = move || {
        web::JsonConfig::default()
            .limit((limits.json_body_kb << 10) as usize)
            .error_handler(error::json_error)
    };
    let big_limit = (state.config.limits.submit_body_mb << 20) as usize;
    let header_timeout = std::time::Duration::from_millis(state.config.timeouts.request_header_ms);
    let (agent_tls, client_tls) = match tls {
        Some(t) => (Some(t.agent), Some(t.client)),
        None => (None, None),
    };
    let body_rate = web::Data::new(limits::BodyRate {
        min_bytes_per_s: state.config.limits.min_body_rate_bytes_per_s,
        window: std::time::Duration::from_millis(state.config.limits.min_body_rate_window_ms),
    });
    let rate1 = body_rate.clone();
    let s1 = state.clone();
    let small1 = small;
    let agent = HttpServer::new(move || {
        App::new()
            .app_data(s1.clone())
            .app_data(rate1.clone())
            .wrap(actix_web::middleware::from_fn(limits::body_rate))
            .app_data(small1())
            .app_data(web::QueryConfig::default().error_handler(error::query_error))
            .service(web::scope(crate::protocol::AGENT_API).configure(agent_api::routes))
            .configure(substitutes::routes)
    })
    .workers(2)
    // Small replies (work, heartbeats, narinfos) leave at once instead of waiting for an ACK.
    .tcp_nodelay(true)
    // A long-polling work request watches its connection (`peer`): an agent that went away
    // is leased nothing (plain TCP only; see peer.rs).
    .on_connect(peer::on_connect)
    .client_request_timeout(header_timeout);
    let agent = match agent_tls {
        Some(cfg) => agent.bind_rustls_0_23(listen, cfg),
        None => agent.bind(listen),
    }
    .with_context(|| format!("failed to listen on {listen} (agents, substitutes, metrics)"))?;
    let agent_addr = agent.addrs()[0].to_string();
    let s2 = state.clone();
    let gate = web::Data::new(auth::Gate::new(
        auth::AllowedHosts::new(client_listen, &state.config.client_api.allowed_hosts),
        client_tls.is_some(),
    ));
    let client = HttpServer::new(move || {
        let big = web::JsonConfig::default()
            .limit(big_limit)
            .error_handler(error::json_error);
        let app = App::new()
            .app_data(s2.clone())
            .app_data(gate.clone())
            .app_data(body_rate.clone())
            .app_data(small())
            .app_data(web::QueryConfig::default().error_handler(error::query_error))
            .wrap(actix_web::middleware::from_fn(limits::body_rate))
            .wrap(actix_web::middleware::from_fn(auth::gate));
        #[cfg(feature = "fault-points")]
        let app = app.service(faults::scope());
        app.service(
            web::scope(crate::protocol::CLIENT_API).configure(|c| client_api::routes(c, big)),
        )
    })
    .workers(2)
    .tcp_nodelay(true)
    .client_request_timeout(header_timeout);
    let client = match client_tls {
        Some(cfg) => client.bind_rustls_0_23(client_listen, cfg),
        None => client.bind(client_listen),
    }
    .with_context(|| format!("failed to listen on {client_listen} (client API)"))?;
    let client_bound = client.addrs()[0];
    let client_addr = client_bound.to_string();
    log_client_access(&state.store, client_bound);
    Ok((agent.run(), client.run(), agent_addr, client_addr))
}

/// Say at start who may use the client listener: with no client token, loopback only (loudly
/// when it is bound to a non-loopback address, where everyone else is refused).
fn log_client_access(store: &Store, bound: std::net::SocketAddr) {
    if auth::tokens_exist(store) {
        tracing::info!(client_listen = %bound, "client API requires a token (KILN_TOKEN or --token-file)");
    } else if auth::is_loopback(bound.ip()) {
        tracing::info!(client_listen = %bound, "no client token exists: the client API serves loopback connections only, without a token");
    } else {
        tracing::warn!(client_listen = %bound, "the client listener is bound to a non-loopback address but no client token exists: every non-loopback connection is refused until `kiln token new` creates one");
    }
}
