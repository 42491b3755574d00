//! The proxy's log: one record per HTTP exchange it saw, with what it did to it. This is the
//! harness's evidence independent of the coordinator: which (build, attempt) each report
//! named, what the coordinator answered, which work replies carried which leases, and which
//! of them never reached the agent.

use serde::{Deserialize, Serialize};

use super::route::Route;
use super::{Action, Phase};

/// What the proxy did to an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultDone {
    pub action: Action,
    /// Where it hit: while the request or the reply was being forwarded.
    pub phase: Phase,
    /// `rule` (a targeted rule, `rule` = its index), `connection` (the connection-level reset)
    /// or `window` (a blackhole or partition window).
    pub source: FaultSource,
    pub rule: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultSource {
    Rule,
    Connection,
    Window,
}

/// How an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ending {
    /// The reply reached the client whole.
    Completed,
    /// The proxy reset both connections (a fault or a partition).
    Reset,
    /// A blackholed exchange ended because the client gave up (closed or reset).
    ClientGaveUp,
    /// A blackholed exchange ended because the coordinator closed, reset or answered.
    UpstreamGaveUp,
    /// The blackhole window ended first; the proxy reset the connection (bytes were lost).
    WindowEnded,
    /// The client closed or reset the connection mid-exchange.
    ClientClosed,
    /// The coordinator closed or reset the connection mid-exchange.
    UpstreamClosed,
    /// The proxy could not frame the messages.
    ProtocolError,
}

/// One exchange (a request and its reply) on one proxied connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    /// Milliseconds since the Unix epoch when the request head arrived (comparable with the
    /// coordinator's event times on the same host).
    pub t_ms: u64,
    pub end_ms: u64,
    /// The agent behind this proxy.
    pub agent: String,
    /// Connection number on this proxy, and exchange number on the connection.
    pub conn: u64,
    pub seq: u64,
    pub method: String,
    pub route: Route,
    pub path: String,
    pub build: Option<u64>,
    /// From the query (uploads, log) or the JSON body (start, result).
    pub attempt: Option<u32>,
    /// `offset=` of an upload.
    pub offset: Option<u64>,
    /// The coordinator's status, when its reply head arrived.
    pub status: Option<u16>,
    /// `error.code` of an error reply.
    pub code: Option<String>,
    /// `duplicate` of a result acknowledgement.
    pub duplicate: Option<bool>,
    /// (build, attempt) of each assignment in a work reply.
    pub assigned: Vec<(u64, u32)>,
    /// Declared request body length, when known.
    pub request_len: Option<u64>,
    /// Request body bytes forwarded to the coordinator.
    pub request_forwarded: u64,
    /// Reply body bytes forwarded to the client.
    pub reply_forwarded: u64,
    pub fault: Option<FaultDone>,
    pub ending: Ending,
}

impl Exchange {
    /// The reply reached the agent whole with a 2xx status.
    pub fn delivered_ok(&self) -> bool {
        self.ending == Ending::Completed && self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// The coordinator answered 2xx, whether or not the agent got the answer.
    pub fn accepted(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// Connection-level events that are not exchanges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnCounts {
    pub connections: u64,
    /// Connections accepted and reset at once during a partition.
    pub refused: u64,
    /// Live connections reset when a partition started.
    pub partition_resets: u64,
    /// Connections whose upstream connection could not be opened (coordinator down), TLS
    /// handshake included.
    pub upstream_unreachable: u64,
    /// TLS only: handshakes with the agent that completed, and how many of them resumed an
    /// earlier session (a ticket or the session cache) instead of a full handshake.
    pub tls_handshakes: u64,
    pub tls_resumed: u64,
    /// TLS handshakes with the agent that failed or did not finish within 10 s.
    pub tls_failures: u64,
    /// TLS only: handshakes with the coordinator, and how many resumed.
    pub upstream_tls_handshakes: u64,
    pub upstream_tls_resumed: u64,
}
