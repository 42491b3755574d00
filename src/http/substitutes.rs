//! Substitute routes on the agent listener: `/nix-cache-info`, `/<hash>.narinfo`,
//! `/nar/<file>`, as a Nix or Guix client expects them; and `/metrics`.

use actix_web::{get, web, HttpResponse};
use futures_util::stream;
use tokio::io::AsyncReadExt as _;

use super::error::ApiError;
use super::AppState;
use crate::store::nar_cache::cache_info;

#[get("/nix-cache-info")]
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

#[get("/{hash}.narinfo")]
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

#[get("/nar/{file}")]
async fn nar(
    state: web::Data<AppState>,
    file: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let path = state
        .nars
        .nar_file(&file)
        .ok_or_else(|| ApiError::not_found("no such NAR"))?;
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::not_found("no such NAR"))?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = stream::unfold(f, |mut f| async move {
        let mut buf = vec![0u8; 1 << 16];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(web::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("application/x-nix-nar")
        .no_chunking(len)
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
