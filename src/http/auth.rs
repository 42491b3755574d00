//! The client listener's gate, run before every client route: the `Host` must be an allowed
//! name (DNS rebinding), an `Origin` must be the listener's own, a state-changing request must
//! carry a non-simple content type (so no cross-origin "simple request" from a web page
//! reaches it), and the caller must hold a token whose scope covers the route — or, while no
//! client token exists at all, be connected from a loopback address (the TCP peer, never a
//! forwarding header).
//!
//! Tokens are random 256-bit values shown once; sled keeps only their SHA-256
//! ([`ClientTokenRecord`], keyed by the hash), so a per-request check is one hash and one read.
//! Nothing caches a token's record: revoking one (deleting its record) takes effect on the
//! next request. When a token was last used is kept in memory only ([`Gate::last_used`]), so a
//! request costs no write.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, ResponseError as _};
use rand::RngCore as _;
use sha2::Digest as _;

use super::error::ApiError;
use super::AppState;
use crate::protocol::{Scope, TokenInfo, CLIENT_API, CLIENT_TOKEN_PREFIX};
use crate::store::records::ClientTokenRecord;
use crate::store::{Batch, Store, StoreError, TreeId};

/// Content types a state-changing client request may carry: neither is one of the three a
/// browser sends cross-origin without a CORS preflight.
pub const STATE_CHANGING_TYPES: [&str; 2] = ["application/json", "application/x-nix-archive"];

/// A new token: its text (shown once), and the batch that stores its hash.
pub fn mint_token(name: &str, scope: Scope) -> Result<(String, Batch), StoreError> {
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let token = format!("{CLIENT_TOKEN_PREFIX}{hex}");
    let mut batch = Batch::new();
    batch.put(
        TreeId::ClientTokens,
        &token_key(&token),
        &ClientTokenRecord {
            name: name.to_string(),
            scope: scope.as_str().to_string(),
            created_ms: crate::store::now_ms(),
        },
    )?;
    batch.event(
        "client-token-created",
        0,
        0,
        serde_json::json!({"id": token_id(&token_key(&token)), "name": name,
            "scope": scope.as_str()}),
    );
    Ok((token, batch))
}

/// The key a token is stored under: its SHA-256.
pub fn token_key(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// A token's id: the first 12 hex digits of its key (48 bits of a hash: names it, reveals
/// nothing of it).
pub fn token_id(key: &[u8]) -> String {
    key.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Why a token could not be revoked (or found).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no client token has id or name {0:?}: see `kiln token list`")]
    NotFound(String),
    #[error("{count} client tokens are named {name:?} (ids {ids}): revoke one by its id")]
    Ambiguous {
        name: String,
        count: usize,
        ids: String,
    },
    #[error("token {id} ({name:?}) is the last admin token: revoking it would leave no one able to manage tokens and agents over the API. Make another first (`kiln token new --scope admin`), or stop the coordinator and revoke it offline (`kiln token revoke --state-dir DIR`)")]
    LastAdmin { id: String, name: String },
    #[error("reading client tokens failed: {0}")]
    Store(#[from] StoreError),
}

/// Every client token, in key order, without the tokens themselves; `last_used` says when
/// one was last used (by its key).
pub fn list_tokens(
    store: &Store,
    last_used: impl Fn(&[u8]) -> Option<u64>,
) -> Result<Vec<TokenInfo>, StoreError> {
    let mut out = Vec::new();
    for r in store.scan::<ClientTokenRecord>(TreeId::ClientTokens) {
        let (k, rec) = r?;
        out.push(info(k.as_bytes(), &rec, last_used(k.as_bytes())));
    }
    Ok(out)
}

fn info(key: &[u8], rec: &ClientTokenRecord, last_used_ms: Option<u64>) -> TokenInfo {
    TokenInfo {
        id: token_id(key),
        name: rec.name.clone(),
        // Only `mint_token` writes records, from a `Scope`; an unreadable one grants least.
        scope: Scope::parse(&rec.scope).unwrap_or(Scope::Read),
        created_ms: rec.created_ms,
        last_used_ms,
    }
}

/// The batch that revokes the token whose id (else, if unique, whose name) is `which`, and
/// what it was. With `keep_an_admin`, the last admin token is not revoked ([`TokenError::LastAdmin`]):
/// over the API, that would leave the client listener with tokens but no one able to make
/// more. (Offline, with the state dir in hand, the operator can always make another.)
pub fn revoke_token(
    store: &Store,
    which: &str,
    keep_an_admin: bool,
) -> Result<Revocation, TokenError> {
    let mut by_id = None;
    let mut by_name = Vec::new();
    let mut admins = 0usize;
    for r in store.scan::<ClientTokenRecord>(TreeId::ClientTokens) {
        let (k, rec) = r?;
        if Scope::parse(&rec.scope) == Some(Scope::Admin) {
            admins += 1;
        }
        let key = k.as_bytes().to_vec();
        if token_id(&key) == which {
            by_id = Some((key, rec));
        } else if rec.name == which {
            by_name.push((key, rec));
        }
    }
    let (key, rec) = match (by_id, by_name.len()) {
        (Some(found), _) => found,
        (None, 1) => by_name.remove(0),
        (None, 0) => return Err(TokenError::NotFound(which.to_string())),
        (None, count) => {
            return Err(TokenError::Ambiguous {
                name: which.to_string(),
                count,
                ids: by_name
                    .iter()
                    .map(|(k, _)| token_id(k))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    let gone = info(&key, &rec, None);
    if keep_an_admin && gone.scope == Scope::Admin && admins <= 1 {
        return Err(TokenError::LastAdmin {
            id: gone.id,
            name: gone.name,
        });
    }
    let mut batch = Batch::new();
    batch.delete(TreeId::ClientTokens, &key);
    batch.event(
        "client-token-revoked",
        0,
        0,
        serde_json::json!({"id": gone.id, "name": gone.name, "scope": gone.scope.as_str()}),
    );
    Ok(Revocation {
        batch,
        key,
        info: gone,
    })
}

/// What [`revoke_token`] decided: the batch to commit, the token's key, and what it was.
#[derive(Debug)]
pub struct Revocation {
    pub batch: Batch,
    pub key: Vec<u8>,
    pub info: TokenInfo,
}

/// Whether any client token exists (else the listener is loopback-only).
pub fn tokens_exist(store: &Store) -> bool {
    !store.is_empty(TreeId::ClientTokens)
}

/// The scope a client route needs. Unknown paths need `read`, so a 404 is only told to a
/// caller who may read.
pub fn required_scope(method: &Method, path: &str) -> Scope {
    let rest = path.strip_prefix(CLIENT_API).unwrap_or(path);
    let reading = matches!(*method, Method::GET | Method::HEAD);
    // Agents (creation, secret rotation), registration tokens, client tokens and fault points
    // are the operator's: admin, except reading the agent list.
    let admin_area = rest == "/agents"
        || rest.starts_with("/agents/")
        || rest.starts_with("/registration-tokens")
        || rest.starts_with("/tokens")
        || rest.starts_with("/faults");
    if admin_area {
        return if reading && rest == "/agents" {
            Scope::Read
        } else {
            Scope::Admin
        };
    }
    if reading {
        Scope::Read
    } else {
        Scope::Submit
    }
}

/// The names a `Host` (or an `Origin`'s host) may have: the listener's configured host,
/// `localhost`, `127.0.0.1`, `::1`, and `client_api.allowed_hosts`.
#[derive(Debug, Clone)]
pub struct AllowedHosts(Vec<String>);

impl AllowedHosts {
    pub fn new(client_listen: &str, extra: &[String]) -> AllowedHosts {
        let mut v: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(h) = host_of(client_listen) {
            if h != "0.0.0.0" && h != "::" {
                v.push(h);
            }
        }
        v.extend(extra.iter().map(|h| h.to_ascii_lowercase()));
        AllowedHosts(v)
    }

    pub fn allows(&self, authority: &str) -> bool {
        host_of(authority).is_some_and(|h| self.0.contains(&h))
    }
}

/// The host of `host[:port]` (IPv6 in brackets), lower-cased, without brackets.
fn host_of(authority: &str) -> Option<String> {
    let a = authority.trim();
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split_once(']')?.0
    } else {
        match a.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => a,
        }
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

fn refuse(status: StatusCode, code: &'static str, message: String) -> ApiError {
    ApiError::new(status, code, message)
}

/// The checks, in order: Host, Origin, content type, credentials. `Ok` = let it through.
fn check(req: &ServiceRequest, state: &AppState, gate: &Gate) -> Result<(), ApiError> {
    let (hosts, tls) = (&gate.hosts, gate.tls);
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let Some(host) = host else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "host_missing",
            "the request has no Host header: send one naming the coordinator".into(),
        ));
    };
    if !hosts.allows(&host) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            format!(
                "Host {host:?} is not a name of this coordinator: add it to client_api.allowed_hosts if it is"
            ),
        ));
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let scheme = if tls { "https://" } else { "http://" };
        let same = origin
            .strip_prefix(scheme)
            .is_some_and(|rest| rest.eq_ignore_ascii_case(&host));
        if !same {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!("requests from origin {origin:?} are refused: only {scheme}{host} may call this API"),
            ));
        }
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !STATE_CHANGING_TYPES.contains(&essence.as_str()) {
            return Err(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content_type_required",
                format!(
                    "{} {} needs Content-Type application/json (or application/x-nix-archive for NARs), not {ct:?}",
                    req.method(),
                    req.path()
                ),
            ));
        }
    }
    let internal = |e: StoreError| {
        refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("reading client tokens failed: {e}"),
        )
    };
    if !tokens_exist(&state.store) {
        let peer = req.peer_addr().map(|a| a.ip());
        return match peer {
            Some(ip) if is_loopback(ip) => Ok(()),
            _ => Err(refuse(
                StatusCode::FORBIDDEN,
                "loopback_only",
                format!(
                    "no client token exists, so only loopback connections are served (this one is from {}): create one with `kiln token new`",
                    peer.map(|p| p.to_string()).unwrap_or_else(|| "an unknown address".into())
                ),
            )),
        };
    }
    let needed = required_scope(req.method(), req.path());
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = bearer else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!(
                "{} {} needs a client token with scope {}: set KILN_TOKEN or --token-file",
                req.method(),
                req.path(),
                needed.as_str()
            ),
        ));
    };
    let key = token_key(token);
    let record: Option<ClientTokenRecord> = state
        .store
        .get(TreeId::ClientTokens, &key)
        .map_err(internal)?;
    let Some(record) = record else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the client token is not known to this coordinator (it was revoked, or never made here): check KILN_TOKEN or --token-file, or ask an admin for a token (`kiln token new`)"
                .into(),
        ));
    };
    let held = Scope::parse(&record.scope).unwrap_or(Scope::Read);
    if !held.allows(needed) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} has scope {} but {} {} needs {}",
                record.name,
                held.as_str(),
                req.method(),
                req.path(),
                needed.as_str()
            ),
        ));
    }
    gate.used(&key);
    Ok(())
}

/// Loopback, including IPv4-mapped IPv6 (`::ffff:127.0.0.1`).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// What the gate middleware needs besides the app state, and the client tokens' in-memory
/// state. One per client listener (shared by its workers).
#[derive(Debug)]
pub struct Gate {
    pub hosts: AllowedHosts,
    pub tls: bool,
    /// When each token (by key) last passed the gate, in ms since the epoch; memory only.
    /// Holds only tokens that existed when used, and loses revoked ones.
    pub last_used: Mutex<HashMap<[u8; 32], u64>>,
    /// Held while a revocation checks and commits, so two revocations cannot each leave the
    /// other's token as "another admin".
    pub revoking: tokio::sync::Mutex<()>,
}

impl Gate {
    pub fn new(hosts: AllowedHosts, tls: bool) -> Gate {
        Gate {
            hosts,
            tls,
            last_used: Mutex::new(HashMap::new()),
            revoking: tokio::sync::Mutex::new(()),
        }
    }

    fn used(&self, key: &[u8; 32]) {
        // A poisoned map only loses "last used" times: keep going.
        let mut m = self.last_used.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(*key, crate::store::now_ms());
    }

    /// When the token stored under `key` last passed the gate.
    pub fn last_used(&self, key: &[u8]) -> Option<u64> {
        let m = self.last_used.lock().unwrap_or_else(|p| p.into_inner());
        <&[u8; 32]>::try_from(key)
            .ok()
            .and_then(|k| m.get(k).copied())
    }

    /// Forget a revoked token's last use.
    pub fn forget(&self, key: &[u8]) {
        let mut m = self.last_used.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(k) = <[u8; 32]>::try_from(key) {
            m.remove(&k);
        }
    }
}

/// The middleware (`actix_web::middleware::from_fn`).
pub async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::EitherBody<impl MessageBody>>, actix_web::Error> {
    let verdict = match (
        req.app_data::<web::Data<AppState>>(),
        req.app_data::<web::Data<Gate>>(),
    ) {
        (Some(state), Some(g)) => check(&req, state, g),
        _ => Err(refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the client listener was built without its gate settings".into(),
        )),
    };
    match verdict {
        Ok(()) => Ok(next.call(req).await?.map_into_left_body()),
        Err(e) => {
            tracing::info!(
                method = %req.method(),
                path = req.path(),
                peer = ?req.peer_addr(),
                status = e.status.as_u16(),
                code = e.code,
                "client request refused"
            );
            let mut resp = e.error_response();
            if e.status == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"kiln\""),
                );
            }
            Ok(req.into_response(resp).map_into_right_body())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_to_scopes() {
        let p = |s: &str| format!("{CLIENT_API}{s}");
        assert_eq!(required_scope(&Method::GET, &p("/builds")), Scope::Read);
        assert_eq!(required_scope(&Method::GET, &p("/events")), Scope::Read);
        assert_eq!(required_scope(&Method::GET, &p("/agents")), Scope::Read);
        assert_eq!(required_scope(&Method::POST, &p("/builds")), Scope::Submit);
        assert_eq!(
            required_scope(&Method::POST, &p("/builds/3/cancel")),
            Scope::Submit
        );
        assert_eq!(required_scope(&Method::PUT, &p("/sources")), Scope::Submit);
        assert_eq!(required_scope(&Method::POST, &p("/agents")), Scope::Admin);
        assert_eq!(required_scope(&Method::POST, &p("/tokens")), Scope::Admin);
        assert_eq!(required_scope(&Method::GET, &p("/tokens")), Scope::Admin);
        assert_eq!(
            required_scope(&Method::POST, &p("/tokens/ci/revoke")),
            Scope::Admin
        );
        assert_eq!(
            required_scope(&Method::POST, &p("/agents/b1/rotate-secret")),
            Scope::Admin
        );
        for m in [Method::GET, Method::POST] {
            assert_eq!(required_scope(&m, &p("/registration-tokens")), Scope::Admin);
        }
        assert_eq!(
            required_scope(&Method::POST, &p("/registration-tokens/x/revoke")),
            Scope::Admin
        );
        assert_eq!(
            required_scope(&Method::POST, &p("/builds/3/priority")),
            Scope::Submit
        );
    }

    #[test]
    fn hosts_are_compared_without_ports_and_brackets() {
        let h = AllowedHosts::new("0.0.0.0:8746", &["Kiln.Example.org".into()]);
        for ok in [
            "localhost:8746",
            "127.0.0.1",
            "[::1]:8746",
            "kiln.example.org:1",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in ["evil.example:8746", "0.0.0.0:8746", "", "127.0.0.2"] {
            assert!(!h.allows(bad), "{bad}");
        }
        assert!(AllowedHosts::new("10.1.2.3:8746", &[]).allows("10.1.2.3:8746"));
    }

    #[test]
    fn loopback_includes_mapped_v4_and_excludes_others() {
        assert!(is_loopback("127.0.0.9".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1".parse().unwrap()));
        assert!(!is_loopback("::ffff:10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn tokens_are_prefixed_random_and_hashed() {
        let (a, _) = mint_token("x", Scope::Read).unwrap();
        let (b, _) = mint_token("x", Scope::Read).unwrap();
        assert!(a.starts_with(CLIENT_TOKEN_PREFIX) && a.len() == CLIENT_TOKEN_PREFIX.len() + 64);
        assert_ne!(a, b);
        assert_ne!(token_key(&a), token_key(&b));
        let id = token_id(&token_key(&a));
        assert_eq!(id.len(), 12);
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(!a.contains(&id), "an id must not be part of the token");
    }
}
