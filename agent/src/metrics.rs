//! The agent's few Prometheus metrics and the tiny responder that serves them.
//!
//! The agent must stay light (ARM boards, Hurd VMs), so there is no metrics registry and no
//! HTTP server crate: a handful of process-wide atomics, rendered as Prometheus text (every
//! metric with its `# HELP` and `# TYPE`), served by a hand-written tokio TCP loop that answers
//! `GET /metrics` and nothing else.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A monotonic counter or a gauge, process-wide.
pub struct Metric(AtomicU64);

impl Metric {
    const fn new() -> Metric {
        Metric(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub static RUNNING_BUILDS: Metric = Metric::new();
pub static BUILDS_SUCCEEDED: Metric = Metric::new();
pub static BUILDS_FAILED: Metric = Metric::new();
pub static BUILDS_CANCELED: Metric = Metric::new();
pub static BUILDS_ABANDONED: Metric = Metric::new();
pub static UPLOAD_BYTES: Metric = Metric::new();
pub static RETRIES: Metric = Metric::new();
pub static RECONNECTS: Metric = Metric::new();
pub static TRANSFER_STALLS: Metric = Metric::new();
pub static RESUMED_DOWNLOADS: Metric = Metric::new();
pub static RESUMED_UPLOADS: Metric = Metric::new();

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut out = String::new();
    let simple: [(&str, &str, &str, &Metric); 7] = [
        (
            "kiln_agent_running_builds",
            "gauge",
            "Builds whose builder is running or whose inputs are being fetched.",
            &RUNNING_BUILDS,
        ),
        (
            "kiln_agent_upload_bytes_total",
            "counter",
            "Compressed NAR bytes sent to the coordinator.",
            &UPLOAD_BYTES,
        ),
        (
            "kiln_agent_retries_total",
            "counter",
            "Network calls retried after a transient failure.",
            &RETRIES,
        ),
        (
            "kiln_agent_reconnects_total",
            "counter",
            "Sessions reopened after the coordinator forgot the session.",
            &RECONNECTS,
        ),
        (
            "kiln_agent_transfer_stalls_total",
            "counter",
            "Uploads and downloads aborted because their bytes stopped for the stall timeout.",
            &TRANSFER_STALLS,
        ),
        (
            "kiln_agent_resumed_downloads_total",
            "counter",
            "Input downloads continued with a Range request after they broke off.",
            &RESUMED_DOWNLOADS,
        ),
        (
            "kiln_agent_resumed_uploads_total",
            "counter",
            "Output uploads continued from the bytes the coordinator already had.",
            &RESUMED_UPLOADS,
        ),
    ];
    for (name, kind, help, m) in simple {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            m.get()
        );
    }
    let name = "kiln_agent_builds_done_total";
    let _ = writeln!(
        out,
        "# HELP {name} Builds this agent finished, by result.\n# TYPE {name} counter"
    );
    for (result, m) in [
        ("succeeded", &BUILDS_SUCCEEDED),
        ("failed", &BUILDS_FAILED),
        ("canceled", &BUILDS_CANCELED),
        ("abandoned", &BUILDS_ABANDONED),
    ] {
        let _ = writeln!(out, "{name}{{result=\"{result}\"}} {}", m.get());
    }
    out
}

/// Binds `addr` and serves `/metrics` until the task is dropped.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to bind the metrics address {addr}"))?;
    tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "serving metrics");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "failed to accept a metrics connection");
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = answer(stream).await {
                tracing::debug!(peer = %peer, error = %e, "metrics connection failed");
            }
        });
    }
}

/// Reads one request head (at most 8 KiB, 5 s) and answers it; the connection is then closed.
async fn answer(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), read_head)
        .await
        .context("failed to read the request in time")?
        .context("failed to read the request")?;
    let wanted = head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?");
    let (status, ctype, body) = if wanted {
        ("200 OK", "text/plain; version=0.0.4", render())
    } else {
        (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".to_owned(),
        )
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(reply.as_bytes())
        .await
        .context("failed to write the reply")?;
    stream.shutdown().await.ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_described() {
        let text = render();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
        }
    }

    #[tokio::test]
    async fn serves_metrics_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let server = tokio::spawn(serve(addr));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut stream = loop {
            match TcpStream::connect(addr).await {
                Ok(s) => break s,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(e) => panic!("metrics server never came up: {e}"),
            }
        };
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.contains("kiln_agent_running_builds"));
        server.abort();
    }
}
