//! Substitute routes on the agent listener: `/nix-cache-info`, `/<hash>.narinfo`,
//! `/nar/<file>`, as a Nix or Guix client expects them; and `/metrics`.
//!
//! Each substitute route answers `HEAD` exactly as `GET` (same status, same headers,
//! `Content-Length` included) without the body: Nix probes `/<hash>.narinfo` with `HEAD` before
//! it substitutes. One handler serves both methods; actix-web drops the body of a `HEAD`
//! answer and keeps its headers. `/nar/<file>` answers a single `Range: bytes=…` with 206 and
//! `Content-Range` (an agent resumes an input download from where it broke off).

use std::io::SeekFrom;

use actix_web::http::header;
use actix_web::{get, route, web, HttpRequest, HttpResponse};
use futures_util::stream;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::error::ApiError;
use super::AppState;
use crate::store::nar_cache::cache_info;

#[route("/nix-cache-info", method = "GET", method = "HEAD")]
async fn nix_cache_info(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let dir = state
        .store_dir()
        .map_err(ApiError::bad_request)?
        .map(|d| d.as_str().to_string())
        .unwrap_or_else(|| "/gnu/store".into());
    Ok(HttpResponse::Ok()
        .content_type("text/x-nix-cache-info")
        .body(cache_info(&dir)))
}

#[route("/{hash}.narinfo", method = "GET", method = "HEAD")]
async fn narinfo(
    state: web::Data<AppState>,
    hash: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let hash = hash.into_inner();
    if hash.len() != 32 {
        return Err(ApiError::not_found("no such narinfo"));
    }
    let rec = state.output(&hash)?;
    let Some(o) = rec else {
        return Err(ApiError::not_found(format!("no narinfo for {hash}")));
    };
    let ni = state.nars.narinfo(&o)?;
    Ok(HttpResponse::Ok()
        .content_type("text/x-nix-narinfo")
        .body(ni.to_string()))
}

/// A byte range of a file of `len` bytes: `start..end` (end exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No usable range (none, several, or not `bytes`): the whole file, 200.
    Whole,
    /// One satisfiable range: 206.
    Part(ByteRange),
    /// A range that starts past the end: 416.
    Unsatisfiable,
}

/// Parses one `bytes=a-b`, `bytes=a-` or `bytes=-n` range (RFC 9110 §14.1.2). Several ranges
/// or another unit are ignored (the whole file is sent, which the RFC allows).
pub fn parse_range(value: Option<&str>, len: u64) -> RangeAsk {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        // The last n bytes.
        let Ok(n) = b.parse::<u64>() else {
            return RangeAsk::Whole;
        };
        if n == 0 {
            return RangeAsk::Unsatisfiable;
        }
        ByteRange {
            start: len.saturating_sub(n),
            end: len,
        }
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return RangeAsk::Whole;
        };
        let end = if b.is_empty() {
            len
        } else {
            match b.parse::<u64>() {
                Ok(last) if last >= start => last.saturating_add(1).min(len),
                _ => return RangeAsk::Whole,
            }
        };
        ByteRange { start, end }
    };
    if range.start >= len {
        return RangeAsk::Unsatisfiable;
    }
    RangeAsk::Part(range)
}

#[route("/nar/{file}", method = "GET", method = "HEAD")]
async fn nar(
    state: web::Data<AppState>,
    req: HttpRequest,
    file: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let path = state
        .nars
        .nar_file(&file)
        .ok_or_else(|| ApiError::not_found("no such NAR"))?;
    let mut f = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::not_found("no such NAR"))?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let ask = parse_range(
        req.headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok()),
        len,
    );
    let (mut resp, range) = match ask {
        RangeAsk::Whole => (HttpResponse::Ok(), ByteRange { start: 0, end: len }),
        RangeAsk::Part(r) => {
            let mut resp = HttpResponse::PartialContent();
            resp.insert_header((
                header::CONTENT_RANGE,
                format!("bytes {}-{}/{len}", r.start, r.end - 1),
            ));
            (resp, r)
        }
        RangeAsk::Unsatisfiable => {
            return Ok(HttpResponse::RangeNotSatisfiable()
                .insert_header((header::CONTENT_RANGE, format!("bytes */{len}")))
                .insert_header((header::ACCEPT_RANGES, "bytes"))
                .finish());
        }
    };
    if range.start > 0 {
        f.seek(SeekFrom::Start(range.start)).await.map_err(|e| {
            ApiError::new(
                actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot seek in {}: {e}", path.display()),
            )
        })?;
    }
    let count = range.end - range.start;
    let body = stream::unfold((f, count), |(mut f, left)| async move {
        if left == 0 {
            return None;
        }
        let mut buf = vec![0u8; (1usize << 16).min(left as usize)];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((
                    Ok::<_, std::io::Error>(web::Bytes::from(buf)),
                    (f, left - n as u64),
                ))
            }
            Err(e) => Some((Err(e), (f, 0))),
        }
    });
    Ok(resp
        .content_type("application/x-nix-nar")
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .no_chunking(count)
        .streaming(body))
}

#[get("/metrics")]
async fn metrics_route(state: web::Data<AppState>) -> HttpResponse {
    metrics::gauge!("kiln_state_db_bytes").set(state.store.size_on_disk() as f64);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.prometheus.render())
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(nix_cache_info)
        .service(metrics_route)
        .service(nar)
        .service(narinfo);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(start: u64, end: u64) -> RangeAsk {
        RangeAsk::Part(ByteRange { start, end })
    }

    #[test]
    fn ranges_parse_as_rfc_9110_says() {
        assert_eq!(parse_range(None, 100), RangeAsk::Whole);
        assert_eq!(parse_range(Some("bytes=10-"), 100), part(10, 100));
        assert_eq!(parse_range(Some("bytes=10-19"), 100), part(10, 20));
        assert_eq!(parse_range(Some("bytes=10-1000"), 100), part(10, 100));
        assert_eq!(parse_range(Some("bytes=-30"), 100), part(70, 100));
        assert_eq!(parse_range(Some("bytes=-300"), 100), part(0, 100));
        assert_eq!(parse_range(Some("bytes=0-0"), 100), part(0, 1));
        assert_eq!(
            parse_range(Some("bytes=100-"), 100),
            RangeAsk::Unsatisfiable
        );
        assert_eq!(parse_range(Some("bytes=-0"), 100), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), RangeAsk::Whole);
        assert_eq!(parse_range(Some("items=0-1"), 100), RangeAsk::Whole);
        assert_eq!(parse_range(Some("bytes=5-2"), 100), RangeAsk::Whole);
        assert_eq!(parse_range(Some("bytes=x-"), 100), RangeAsk::Whole);
    }
}
