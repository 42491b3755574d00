//! What the proxy understands of a request: which route of the coordinator it is, and the
//! build, attempt and upload offset it names. The route decides which fault rules apply and
//! how an exchange is counted in the report.

use serde::{Deserialize, Serialize};

/// A route of the coordinator's agent listener, as the proxy tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// `POST /api/agent/v1/session`
    Session,
    /// `POST /api/agent/v1/heartbeat`
    Heartbeat,
    /// `POST /api/agent/v1/work`
    Work,
    /// `POST /api/agent/v1/builds/{id}/start`
    Start,
    /// `GET /api/agent/v1/builds/{id}/outputs/{name}`
    UploadStatus,
    /// `PUT /api/agent/v1/builds/{id}/outputs/{name}`
    Upload,
    /// `PUT /api/agent/v1/builds/{id}/log`
    Log,
    /// `POST /api/agent/v1/builds/{id}/result`
    Result,
    /// `GET`/`HEAD /nar/...`: input downloads.
    Nar,
    /// `GET`/`HEAD /<hash>.narinfo`
    Narinfo,
    /// Anything else.
    Other,
}

/// A route selector in a fault rule: one route, or any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteSel {
    Any,
    Session,
    Heartbeat,
    Work,
    Start,
    UploadStatus,
    Upload,
    Log,
    Result,
    Nar,
    Narinfo,
    Other,
}

impl RouteSel {
    pub fn matches(self, r: Route) -> bool {
        let want = match self {
            RouteSel::Any => return true,
            RouteSel::Session => Route::Session,
            RouteSel::Heartbeat => Route::Heartbeat,
            RouteSel::Work => Route::Work,
            RouteSel::Start => Route::Start,
            RouteSel::UploadStatus => Route::UploadStatus,
            RouteSel::Upload => Route::Upload,
            RouteSel::Log => Route::Log,
            RouteSel::Result => Route::Result,
            RouteSel::Nar => Route::Nar,
            RouteSel::Narinfo => Route::Narinfo,
            RouteSel::Other => Route::Other,
        };
        want == r
    }
}

impl Route {
    /// Routes whose bodies are small JSON: the proxy reads them whole before forwarding, so it
    /// can log what they say (attempts, assignments) and cut them where a rule says.
    pub fn is_json(self) -> bool {
        matches!(
            self,
            Route::Session | Route::Heartbeat | Route::Work | Route::Start | Route::Result
        )
    }
}

/// What a request target says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub route: Route,
    /// The path without the query.
    pub path: String,
    pub build: Option<u64>,
    /// `attempt=` of the query (uploads, upload status, log).
    pub attempt: Option<u32>,
    /// `offset=` of the query (uploads).
    pub offset: Option<u64>,
}

/// Classify `method` and `target` (path and query, as in the request line).
pub fn classify(method: &str, target: &str) -> Target {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let query_value = |key: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    };
    let mut build = None;
    let route = if let Some(rest) = path.strip_prefix("/api/agent/v1/") {
        let parts: Vec<&str> = rest.split('/').collect();
        match (method, parts.as_slice()) {
            ("POST", ["session"]) => Route::Session,
            ("POST", ["heartbeat"]) => Route::Heartbeat,
            ("POST", ["work"]) => Route::Work,
            (m, ["builds", id, tail @ ..]) => {
                build = id.parse().ok();
                match (m, tail) {
                    ("POST", ["start"]) => Route::Start,
                    ("GET", ["outputs", _]) => Route::UploadStatus,
                    ("PUT", ["outputs", _]) => Route::Upload,
                    ("PUT", ["log"]) => Route::Log,
                    ("POST", ["result"]) => Route::Result,
                    _ => Route::Other,
                }
            }
            _ => Route::Other,
        }
    } else if path.starts_with("/nar/") && (method == "GET" || method == "HEAD") {
        Route::Nar
    } else if path.ends_with(".narinfo") && (method == "GET" || method == "HEAD") {
        Route::Narinfo
    } else {
        Route::Other
    };
    Target {
        route,
        path: path.to_string(),
        build,
        attempt: query_value("attempt").and_then(|v| v.parse().ok()),
        offset: query_value("offset").and_then(|v| v.parse().ok()),
    }
}

/// `attempt` of a start or result report body.
pub fn body_attempt(body: &[u8]) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("attempt")?
        .as_u64()
        .and_then(|a| u32::try_from(a).ok())
}

/// What the proxy learns from a reply body: the error code, the `duplicate` flag of a result
/// acknowledgement, and the (build, attempt) pairs of a work reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyFacts {
    pub code: Option<String>,
    pub duplicate: Option<bool>,
    pub assigned: Vec<(u64, u32)>,
}

pub fn reply_facts(route: Route, status: u16, body: &[u8]) -> ReplyFacts {
    let mut f = ReplyFacts::default();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return f;
    };
    if !(200..300).contains(&status) {
        f.code = v
            .pointer("/error/code")
            .and_then(|c| c.as_str())
            .map(str::to_string);
        return f;
    }
    match route {
        Route::Result => f.duplicate = v.get("duplicate").and_then(|d| d.as_bool()),
        Route::Work => {
            if let Some(builds) = v.get("builds").and_then(|b| b.as_array()) {
                for b in builds {
                    let id = b.get("build_id").and_then(|x| x.as_u64());
                    let at = b.get("attempt").and_then(|x| x.as_u64());
                    if let (Some(id), Some(at)) = (id, at) {
                        f.assigned.push((id, at as u32));
                    }
                }
            }
        }
        _ => {}
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_told_apart() {
        let t = classify(
            "PUT",
            "/api/agent/v1/builds/17/outputs/out?attempt=2&file_hash=sha256%3Aabc&file_size=9&offset=4096",
        );
        assert_eq!(t.route, Route::Upload);
        assert_eq!(
            (t.build, t.attempt, t.offset),
            (Some(17), Some(2), Some(4096))
        );
        assert_eq!(t.path, "/api/agent/v1/builds/17/outputs/out");
        let t = classify("GET", "/api/agent/v1/builds/17/outputs/out?attempt=2");
        assert_eq!(t.route, Route::UploadStatus);
        assert_eq!(classify("POST", "/api/agent/v1/work").route, Route::Work);
        assert_eq!(
            classify("POST", "/api/agent/v1/builds/3/result").route,
            Route::Result
        );
        assert_eq!(
            classify("POST", "/api/agent/v1/builds/3/start").build,
            Some(3)
        );
        assert_eq!(
            classify("PUT", "/api/agent/v1/builds/3/log?attempt=1").route,
            Route::Log
        );
        assert_eq!(classify("GET", "/nar/abc.nar.zst").route, Route::Nar);
        assert_eq!(classify("HEAD", "/abc.narinfo").route, Route::Narinfo);
        assert_eq!(classify("GET", "/metrics").route, Route::Other);
        assert!(RouteSel::Any.matches(Route::Log));
        assert!(!RouteSel::Upload.matches(Route::UploadStatus));
    }

    #[test]
    fn reply_facts_read_work_replies_errors_and_acks() {
        let body = br#"{"builds":[{"build_id":7,"attempt":2,"drv":"x"},{"build_id":9,"attempt":1}],"commands":[]}"#;
        let f = reply_facts(Route::Work, 200, body);
        assert_eq!(f.assigned, vec![(7, 2), (9, 1)]);
        let f = reply_facts(
            Route::Result,
            409,
            br#"{"error":{"code":"stale_attempt","message":"m"}}"#,
        );
        assert_eq!(f.code.as_deref(), Some("stale_attempt"));
        let f = reply_facts(Route::Result, 200, br#"{"duplicate":true}"#);
        assert_eq!(f.duplicate, Some(true));
        assert_eq!(body_attempt(br#"{"attempt":3,"outcome":{}}"#), Some(3));
        assert_eq!(body_attempt(b"not json"), None);
    }
}
