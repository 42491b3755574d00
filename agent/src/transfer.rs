//! Transfers that never hang: a progress watchdog for uploads and downloads.
//!
//! A whole-request timeout cannot tell a stalled transfer from a slow one (a 1 GiB NAR over a
//! 64 KiB/s link takes hours and must still get through), and a read timeout alone does not
//! see an upload whose server stopped reading (the sender just blocks on a full socket). So a
//! transfer carries a [`Progress`] that every byte moved touches (a body chunk handed to the
//! socket, a chunk of a download received), and [`watch`] aborts the transfer once it has not
//! moved for the stall timeout (`--transfer-stall-timeout`). The abort is a transient error:
//! the caller asks how far it got and resumes (uploads: the upload status; downloads: `Range`).

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::time::Instant;

use crate::client::local_error;
use crate::metrics;
use crate::retry::CallError;

/// Default stall timeout: no byte moved for this long aborts a transfer.
pub const DEFAULT_STALL: Duration = Duration::from_secs(60);

/// When a transfer last moved a byte. Cheap to clone; shared by the body and the watchdog.
#[derive(Debug, Clone)]
pub struct Progress {
    origin: Instant,
    /// Milliseconds after `origin` of the last progress.
    last_ms: Arc<AtomicU64>,
}

impl Default for Progress {
    fn default() -> Progress {
        Progress::new()
    }
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            origin: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records that bytes moved now.
    pub fn tick(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since bytes last moved.
    pub fn idle(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Runs `transfer` until it ends, or aborts it (dropping it, which closes its connection) once
/// `progress` has not moved for `stall`: then a transient [`CallError`] naming `what`.
pub async fn watch<T>(
    what: &str,
    stall: Duration,
    progress: &Progress,
    transfer: impl Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    tokio::pin!(transfer);
    let check_every = (stall / 4).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    progress.tick();
    loop {
        tokio::select! {
            r = &mut transfer => return r,
            _ = tick.tick() => {
                let idle = progress.idle();
                if idle >= stall {
                    metrics::TRANSFER_STALLS.inc();
                    tracing::warn!(transfer = what, idle_ms = idle.as_millis() as u64, "transfer stalled; aborting it to resume");
                    return Err(CallError::transient(format!(
                        "{what}: no byte moved for {} ms (the stall timeout): aborted, resuming",
                        idle.as_millis()
                    )));
                }
            }
        }
    }
}

/// A request body streaming `path` from `offset` to its end in 64 KiB chunks; each chunk the
/// HTTP client takes (to write it to the socket) ticks `progress` and the upload counter.
pub async fn file_body(
    path: &Path,
    offset: u64,
    progress: Progress,
) -> Result<reqwest::Body, CallError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| local_error(path, e))?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(|e| local_error(path, e))?;
    let stream = futures_util::stream::unfold(file, move |mut file| {
        let progress = progress.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    progress.tick();
                    metrics::UPLOAD_BYTES.add(n as u64);
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), file))
                }
                Err(e) => Some((Err(e), file)),
            }
        }
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    #[tokio::test(start_paused = true)]
    async fn a_transfer_that_keeps_moving_is_never_aborted() {
        // 40 "chunks" 100 ms apart: 4 s in all, far over the 1 s stall, never idle for 1 s.
        let p = Progress::new();
        let work = async {
            for _ in 0..40 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                p.tick();
            }
            Ok::<_, CallError>(40)
        };
        let got = watch("test", Duration::from_secs(1), &p, work).await;
        assert_eq!(got.ok(), Some(40));
    }

    #[tokio::test(start_paused = true)]
    async fn a_transfer_that_stops_moving_is_aborted_as_transient() {
        let p = Progress::new();
        let work = async {
            p.tick();
            std::future::pending::<()>().await;
            Ok::<_, CallError>(())
        };
        let got = watch("test upload", Duration::from_secs(2), &p, work).await;
        match got {
            Err(CallError::Transient { message, .. }) => {
                assert!(message.contains("test upload"), "{message}")
            }
            other => panic!("expected a transient stall error, got {other:?}"),
        }
    }

    /// The watchdog against a real local TCP server that reads the request head and a little
    /// of the body, then stops reading while keeping the connection open: the PUT blocks on a
    /// full socket and would wait forever; the watchdog aborts it.
    #[tokio::test]
    async fn an_upload_to_a_server_that_stops_reading_is_aborted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<u64>();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0u64;
            while got < 256 * 1024 {
                let n = sock.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed before sending 256 KiB");
                got += n as u64;
            }
            let _ = stopped_tx.send(got);
            // Keep the socket open, never read again, never answer.
            std::future::pending::<()>().await;
            drop(sock);
        });
        let tmp = tempfile::tempdir().unwrap();
        let spool = tmp.path().join("big.nar.zst");
        // 256 MiB: far more than loopback socket buffers can hold, so the client blocks.
        {
            let mut f = tokio::fs::File::create(&spool).await.unwrap();
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..256 {
                f.write_all(&chunk).await.unwrap();
            }
            f.flush().await.unwrap();
        }
        let client = reqwest::Client::new();
        let progress = Progress::new();
        let body = file_body(&spool, 0, progress.clone()).await.unwrap();
        let put = client
            .put(format!("http://{addr}/upload"))
            .header(reqwest::header::CONTENT_LENGTH, 256u64 << 20)
            .body(body)
            .send();
        let stall = Duration::from_millis(1500);
        let outcome = tokio::time::timeout(
            Duration::from_secs(120),
            watch("upload", stall, &progress, async {
                put.await
                    .map(|_| ())
                    .map_err(|e| crate::retry::classify_transport(&e))
            }),
        )
        .await
        .expect("the watchdog must end the upload well within 120 s");
        let server_got = stopped_rx.await.unwrap();
        assert!(server_got >= 256 * 1024);
        match outcome {
            Err(CallError::Transient { message, .. }) => assert!(
                message.contains("no byte moved"),
                "aborted by the watchdog, not by another error: {message}"
            ),
            other => panic!("expected the stall abort, got {other:?}"),
        }
        server.abort();
    }
}
