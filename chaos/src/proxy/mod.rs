//! The fault-injecting TCP proxy: one per agent, between the agent and the coordinator's agent
//! listener. It frames HTTP/1.1 exchanges on keep-alive connections ([`http1`]), so faults can
//! target a route and a phase ("reset the reply of `POST …/work` after the coordinator
//! answered", "reset an upload at half its body"), and it logs every exchange it forwards
//! ([`log::Exchange`]) as evidence independent of the coordinator.
//!
//! Faults: latency (drawn per request), a bandwidth cap (per connection and direction),
//! connection-level resets after a drawn number of bytes, targeted rules (reset or blackhole
//! an exchange after N bytes or a share of its body), and windows set by the schedule
//! ([`Mode`]): blackhole (accept, never forward) and partition (reset and refuse). Every
//! random decision comes from [`Rng::derive`] over (seed, proxy, connection, exchange, rule),
//! so one seed gives the same decisions.
//!
//! With [`ProxyTls`] it terminates TLS both ways (server to its agent, client to the
//! coordinator) and does all of the above on the decrypted exchanges ([`tls`]).
//!
//! Usable from tests: [`Proxy::start`] in front of an address with a [`FaultPlan`], then
//! [`Proxy::exchanges`] to read its log.

mod conn;
pub mod http1;
pub mod log;
pub mod route;
pub mod tls;
pub mod wire;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::rng::Rng;
pub use log::{ConnCounts, Ending, Exchange, FaultDone, FaultSource};
pub use route::{Route, RouteSel};
pub use tls::ProxyTls;
use wire::Cut;
pub use wire::Mode;

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Reset both connections (RST).
    Reset,
    /// Stop forwarding this exchange, both ways, and swallow what arrives, until one end gives
    /// up (then the other is reset).
    Blackhole,
}

/// Which message of an exchange a rule targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The request, on its way to the coordinator.
    Request,
    /// The reply, after the coordinator answered.
    Reply,
}

/// A targeted fault rule (see `RuleSpec` in the scenario format for each field).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub route: RouteSel,
    pub phase: Phase,
    pub action: Action,
    pub probability: f64,
    pub after_bytes: (u64, u64),
    pub after_fraction: Option<(f64, f64)>,
    pub min_assigned: u32,
    pub skip: u64,
    pub limit: Option<u64>,
}

impl Rule {
    /// A rule that always fires on `route` in `phase`, at byte 0.
    pub fn always(route: RouteSel, phase: Phase, action: Action) -> Rule {
        Rule {
            route,
            phase,
            action,
            probability: 1.0,
            after_bytes: (0, 0),
            after_fraction: None,
            min_assigned: 0,
            skip: 0,
            limit: None,
        }
    }
}

/// Every fault of one proxy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    pub seed: u64,
    pub latency_ms: (u64, u64),
    /// Bytes per second per connection and direction; 0 = unlimited.
    pub bandwidth: u64,
    pub connection_reset_probability: f64,
    pub connection_reset_after_bytes: (u64, u64),
    pub rules: Vec<Rule>,
}

/// How to start a proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The agent behind it (logged with every exchange).
    pub name: String,
    /// Its number, part of every decision's coordinates.
    pub index: u64,
    pub plan: FaultPlan,
    /// Also append each exchange as one JSON line to this file.
    pub log_file: Option<PathBuf>,
    /// Terminate TLS from the agent and speak TLS to the coordinator; `None`: plain TCP.
    pub tls: Option<ProxyTls>,
}

/// Bytes of a JSON body (or of an error reply) the proxy keeps to read what it says.
const KEEP: usize = 1 << 20;
/// Decision coordinates that are not rules.
const LATENCY_SITE: u64 = u64::MAX;
const CONNECTION_SITE: u64 = u64::MAX - 1;

struct Shared {
    name: String,
    index: u64,
    plan: FaultPlan,
    tls: Option<ProxyTls>,
    upstream: Mutex<SocketAddr>,
    mode: watch::Sender<Mode>,
    log: Mutex<Vec<Exchange>>,
    log_file: Option<Mutex<std::fs::File>>,
    counts: Mutex<ConnCounts>,
    rule_seen: Vec<AtomicU64>,
    rule_fired: Vec<AtomicU64>,
    uploads_in_flight: AtomicU64,
    /// Session and heartbeat exchanges wait until then (see [`Proxy::lag_control`]).
    control_lag_until: Mutex<Option<std::time::Instant>>,
}

impl Shared {
    fn count(&self, f: impl FnOnce(&mut ConnCounts)) {
        f(&mut self.counts.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn record(&self, e: Exchange) {
        if let Some(file) = &self.log_file {
            if let Ok(line) = serde_json::to_string(&e) {
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(err) = writeln!(f, "{line}") {
                    tracing::warn!(proxy = %self.name, error = %err, "failed to append to the proxy log");
                }
            }
        }
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }

    /// The first rule that fires for this message, as a cut.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        conn: u64,
        seq: u64,
        route: Route,
        phase: Phase,
        head_len: u64,
        body_len: Option<u64>,
        assigned: usize,
    ) -> Option<Cut> {
        for (i, rule) in self.plan.rules.iter().enumerate() {
            if rule.phase != phase || !rule.route.matches(route) {
                continue;
            }
            if rule.min_assigned > 0
                && (route != Route::Work || assigned < rule.min_assigned as usize)
            {
                continue;
            }
            let seen = self.rule_seen[i].fetch_add(1, Ordering::SeqCst) + 1;
            if seen <= rule.skip {
                continue;
            }
            let mut rng = Rng::derive(self.plan.seed, &[self.index, conn, seq, i as u64]);
            if !rng.chance(rule.probability) {
                continue;
            }
            let fired = self.rule_fired[i].fetch_add(1, Ordering::SeqCst);
            if rule.limit.is_some_and(|l| fired >= l) {
                continue;
            }
            let at = match (rule.after_fraction, body_len) {
                (Some((lo, hi)), Some(len)) => {
                    head_len + (rng.between_f(lo, hi) * len as f64).round() as u64
                }
                _ => rng.between(rule.after_bytes.0, rule.after_bytes.1),
            };
            return Some(Cut {
                at,
                action: rule.action,
                rule: Some(i),
            });
        }
        None
    }
}

/// A running proxy. Dropping it stops it and resets every connection it holds.
pub struct Proxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `upstream`. Must run inside a tokio
    /// runtime, which then runs the proxy.
    pub async fn start(config: ProxyConfig, upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("failed to bind a loopback port for the proxy")?;
        let addr = listener
            .local_addr()
            .context("failed to read the proxy's address")?;
        let log_file = match &config.log_file {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("failed to open the proxy log {}", p.display()))?,
            )),
            None => None,
        };
        let n = config.plan.rules.len();
        let shared = Arc::new(Shared {
            name: config.name,
            index: config.index,
            plan: config.plan,
            tls: config.tls,
            upstream: Mutex::new(upstream),
            mode: watch::channel(Mode::Normal).0,
            log: Mutex::new(Vec::new()),
            log_file,
            counts: Mutex::new(ConnCounts::default()),
            rule_seen: (0..n).map(|_| AtomicU64::new(0)).collect(),
            rule_fired: (0..n).map(|_| AtomicU64::new(0)).collect(),
            uploads_in_flight: AtomicU64::new(0),
            control_lag_until: Mutex::new(None),
        });
        let task = tokio::spawn(accept_loop(shared.clone(), listener));
        Ok(Proxy { shared, addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://…` when the proxy terminates TLS.
    pub fn url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    /// Hold session openings and heartbeats (new ones too) for `d` from now, while every
    /// other exchange goes through: the agent's control connection is still stalled (TCP
    /// retransmission backoff after a partition) while its fresh data connections are not.
    pub fn lag_control(&self, d: Duration) {
        *self
            .shared
            .control_lag_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now() + d);
    }

    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    pub fn set_upstream(&self, addr: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = addr;
    }

    /// Every exchange so far, in the order they ended.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn counts(&self) -> ConnCounts {
        self.shared
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Builds this agent was assigned (work replies it forwarded) whose result the
    /// coordinator has not accepted yet (as far as this proxy saw).
    pub fn held_builds(&self) -> usize {
        let log = self.shared.log.lock().unwrap_or_else(|p| p.into_inner());
        let mut held = std::collections::BTreeSet::new();
        for e in log.iter() {
            match e.route {
                Route::Work if e.status == Some(200) => held.extend(e.assigned.iter().map(|a| a.0)),
                Route::Result if e.status == Some(200) => {
                    if let Some(b) = e.build {
                        held.remove(&b);
                    }
                }
                _ => {}
            }
        }
        held.len()
    }

    /// Uploads whose request body is being forwarded right now.
    pub fn uploads_in_flight(&self) -> u64 {
        self.shared.uploads_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set_mode(Mode::Refuse);
        self.task.abort();
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut conns = tokio::task::JoinSet::new();
    let mut next = 0u64;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                shared.count(|c| c.connections += 1);
                conns.spawn(conn::serve(shared.clone(), stream, next));
                next += 1;
            }
            Err(e) => {
                tracing::warn!(proxy = %shared.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        while conns.try_join_next().is_some() {}
    }
}
