//! Delivering a decided build: upload every spooled output until the coordinator verified it,
//! then the compressed log, then the result.
//!
//! An upload asks how much arrived (`GET`) and sends only the rest (`PUT` from `received`), so a
//! retry after a broken link sends just the missing tail; 409 `upload_offset` and
//! `upload_superseded` mean the same. A `PUT` whose bytes stop moving for the stall timeout is
//! aborted by the progress watchdog ([`crate::transfer`]) and resumed the same way.
//! 422 `hash_mismatch` (the coordinator discarded the file) is retried from 0 once, after
//! re-hashing the spool file; a second one fails the build with that reason. A 409
//! `stale_attempt` anywhere means the build is no longer ours.

use kiln::protocol::{
    BuiltOutput, FailureKind, HeldPhase, LogQuery, Outcome, ResultAck, ResultReport, UploadStatus,
    SESSION_HEADER,
};

use crate::client::{decode, local_error, send, Coordinator};
use crate::metrics;
use crate::retry::CallError;
use crate::state::{BuildDir, StoredReport};
use crate::transfer::{self, Progress};

/// How a delivery ended.
#[derive(Debug)]
pub enum Delivered {
    /// The coordinator acknowledged the result (`duplicate` if it already had it).
    Acknowledged { duplicate: bool },
    /// 409 `stale_attempt`: the build belongs to someone else; drop everything.
    Stale,
}

/// Sends everything of `report`; rewrites `report.json` if an output turns out undeliverable.
pub async fn deliver(
    c: &Coordinator,
    dir: &BuildDir,
    mut report: StoredReport,
) -> Result<Delivered, CallError> {
    let id = report.build_id;
    if let Outcome::Succeeded { outputs } = &report.outcome {
        for out in outputs.clone() {
            match upload_checked(c, dir, id, report.attempt, &out).await {
                Ok(()) => {}
                Err(e) if is_stale(&e) => return Ok(Delivered::Stale),
                Err(CallError::Rejected(e))
                    if e.code == "hash_mismatch" || e.code == "local_io" =>
                {
                    let reason = format!(
                        "upload of output {} failed: {}: {}",
                        out.name, e.code, e.message
                    );
                    tracing::error!(build_id = id, output = %out.name, reason = %reason, "failing the build");
                    report.outcome = Outcome::Failed {
                        reason,
                        kind: FailureKind::Upload,
                        missing_inputs: Vec::new(),
                    };
                    dir.write_report(&report)
                        .await
                        .map_err(|e| CallError::transient(format!("{e:#}")))?;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
    if report.has_log {
        match upload_log(c, dir, id, report.attempt).await {
            Ok(()) => {}
            Err(e) if is_stale(&e) => return Ok(Delivered::Stale),
            Err(e) => {
                tracing::warn!(build_id = id, error = %e, "failed to upload the log; reporting the result anyway")
            }
        }
    }
    c.held().set(id, report.attempt, HeldPhase::Reporting);
    let body = ResultReport {
        attempt: report.attempt,
        outcome: report.outcome.clone(),
    };
    match c
        .post::<_, ResultAck>("report result", &format!("builds/{id}/result"), &body)
        .await
    {
        Ok(ack) => Ok(Delivered::Acknowledged {
            duplicate: ack.duplicate,
        }),
        Err(e) if is_stale(&e) => Ok(Delivered::Stale),
        Err(e) => Err(e),
    }
}

pub fn is_stale(e: &CallError) -> bool {
    e.code() == Some("stale_attempt")
}

/// Uploads one output; after a first `hash_mismatch`, checks the spool file and sends it again.
async fn upload_checked(
    c: &Coordinator,
    dir: &BuildDir,
    id: u64,
    attempt: u32,
    out: &BuiltOutput,
) -> Result<(), CallError> {
    let spool = dir.spool(&out.name);
    match upload_output(c, &spool, id, attempt, out).await {
        Err(CallError::Rejected(e)) if e.code == "hash_mismatch" => {
            tracing::warn!(build_id = id, output = %out.name, message = %e.message, "coordinator refused the upload's hash, sending it again");
            let path = spool.clone();
            let (hash, size) = tokio::task::spawn_blocking(move || hash_file(&path))
                .await
                .map_err(|e| CallError::transient(e.to_string()))?
                .map_err(|e| local_error(&spool, e))?;
            if hash != out.file_hash || size != out.file_size {
                return Err(local_error(
                    &spool,
                    std::io::Error::other(format!(
                        "spool file changed on disk: now {hash} ({size} bytes)"
                    )),
                ));
            }
            upload_output(c, &spool, id, attempt, out).await
        }
        other => other,
    }
}

fn hash_file(path: &std::path::Path) -> std::io::Result<(String, u64)> {
    let mut r = crate::nario::HashReader::new(std::fs::File::open(path)?);
    std::io::copy(&mut r, &mut std::io::sink())?;
    Ok(r.finish())
}

/// GET the status, PUT the missing tail; repeated (with backoff) until verified.
async fn upload_output(
    c: &Coordinator,
    spool: &std::path::Path,
    id: u64,
    attempt: u32,
    out: &BuiltOutput,
) -> Result<(), CallError> {
    let url = c.agent_url(&format!("builds/{id}/outputs/{}", out.name));
    let query = [
        ("attempt", attempt.to_string()),
        ("file_hash", out.file_hash.clone()),
        ("file_size", out.file_size.to_string()),
    ];
    c.call("upload output", |token| {
        let (url, query) = (&url, &query);
        async move {
            let get = c
                .http()
                .get(url)
                .query(query)
                .header(SESSION_HEADER, &token);
            let status: UploadStatus = decode(send(get).await?)?;
            if status.verified {
                return Ok(());
            }
            let offset = status.received.min(out.file_size);
            if offset > 0 {
                metrics::RESUMED_UPLOADS.inc();
                tracing::info!(build_id = id, output = %out.name, offset, "resuming an upload");
            } else {
                tracing::debug!(build_id = id, output = %out.name, "uploading output");
            }
            let progress = Progress::new();
            let put = c
                .http()
                .put(url)
                .query(query)
                .query(&[("offset", offset)])
                .header(SESSION_HEADER, &token)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, out.file_size - offset)
                .body(transfer::file_body(spool, offset, progress.clone()).await?);
            let sent = transfer::watch("upload output", c.transfer_stall(), &progress, send(put));
            let status: UploadStatus = match sent.await {
                Ok(body) => decode(body)?,
                Err(e) if matches!(e.code(), Some("upload_offset" | "upload_superseded")) => {
                    return Err(CallError::transient(
                        "upload offset out of step, asking again",
                    ))
                }
                Err(e) => return Err(e),
            };
            if status.verified {
                Ok(())
            } else {
                Err(CallError::transient(format!(
                    "upload not verified yet ({} bytes received)",
                    status.received
                )))
            }
        }
    })
    .await
}

/// Compresses the log once (`log.zst`), then PUTs it whole.
async fn upload_log(
    c: &Coordinator,
    dir: &BuildDir,
    id: u64,
    attempt: u32,
) -> Result<(), CallError> {
    let (log, zst) = (dir.log(), dir.compressed_log());
    if !zst.exists() {
        let (l, z) = (log.clone(), zst.clone());
        tokio::task::spawn_blocking(move || compress(&l, &z))
            .await
            .map_err(|e| CallError::transient(e.to_string()))?
            .map_err(|e| local_error(&log, e))?;
    }
    let url = c.agent_url(&format!("builds/{id}/log"));
    c.call("upload log", |token| {
        let (url, zst) = (&url, &zst);
        async move {
            let progress = Progress::new();
            let put = c
                .http()
                .put(url)
                .query(&LogQuery { attempt })
                .header(SESSION_HEADER, token)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(transfer::file_body(zst, 0, progress.clone()).await?);
            transfer::watch("upload log", c.transfer_stall(), &progress, send(put))
                .await
                .map(|_| ())
        }
    })
    .await
}

/// Blocking: zstd-compresses `log` (missing = empty) into `dest` via a temporary file.
fn compress(log: &std::path::Path, dest: &std::path::Path) -> std::io::Result<()> {
    let tmp = dest.with_extension("tmp");
    let out = std::fs::File::create(&tmp)?;
    let mut enc = zstd::Encoder::new(out, 3)?;
    match std::fs::File::open(log) {
        Ok(mut f) => {
            std::io::copy(&mut f, &mut enc)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    enc.finish()?.sync_all()?;
    std::fs::rename(tmp, dest)
}
