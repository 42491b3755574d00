//! The client listener's gate, run before every client route: the `Host` must be an allowed
//! name (DNS rebinding), an `Origin` must be the listener's own, a state-changing request must
//! carry a non-simple content type (so no cross-origin "simple request" from a web page
//! reaches it), and the caller must hold a token whose scope covers the route — or, while no
//! client token exists at all, be connected from a loopback address (the TCP peer, never a
//! forwarding header).
//!
//! Tokens are random 256-bit values shown once; sled keeps only their SHA-256
//! ([`ClientTokenRecord`], keyed by the hash), so a per-request check is one hash and one read.

use std::net::IpAddr;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, ResponseError as _};
use rand::RngCore as _;
use sha2::Digest as _;

use super::error::ApiError;
use super::AppState;
use crate::protocol::{Scope, CLIENT_API, CLIENT_TOKEN_PREFIX};
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
    Ok((token, batch))
}

/// The key a token is stored under: its SHA-256.
pub fn token_key(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
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
fn check(
    req: &ServiceRequest,
    state: &AppState,
    hosts: &AllowedHosts,
    tls: bool,
) -> Result<(), ApiError> {
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
    let record: Option<ClientTokenRecord> = state
        .store
        .get(TreeId::ClientTokens, &token_key(token))
        .map_err(internal)?;
    let Some(record) = record else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the client token is not known to this coordinator: check KILN_TOKEN or --token-file"
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

/// What the gate middleware needs besides the app state.
#[derive(Debug, Clone)]
pub struct Gate {
    pub hosts: AllowedHosts,
    pub tls: bool,
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
        (Some(state), Some(g)) => check(&req, state, &g.hosts, g.tls),
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
    }
}
