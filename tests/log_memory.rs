//! A build log is checked on upload and served by streaming, with bounded memory whatever its
//! compression ratio: a ~10 MB zstd log that expands to 10 GiB goes through the agent API's
//! log upload (checked against `limits.log_decompressed_mb`) and out of
//! `GET /api/v1/builds/{id}/log`, byte for byte, while the coordinator's peak resident memory
//! (VmHWM, from /proc) grows by less than 200 MB. This is a memory bound, not a timing. A log
//! over the decompressed cap is refused with 413 and a message naming the setting.

mod common;

use std::io::Write;

use common::transfer::*;
use common::*;

/// 4 KiB of log lines; the log repeats it, so the whole stream has period 4096.
fn block() -> Vec<u8> {
    let mut b = Vec::with_capacity(4096);
    let mut i = 0;
    while b.len() < 4096 {
        b.extend_from_slice(
            format!("[{i:05}] compiling module {} \u{2713}\n", i * 7919 % 1000).as_bytes(),
        );
        i += 1;
    }
    b.truncate(4096);
    b
}

/// Checks that everything written is the block repeated, and counts it.
struct Periodic {
    block: Vec<u8>,
    pos: usize,
    total: u64,
}

impl Write for Periodic {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let n = rest.len().min(self.block.len() - self.pos);
            if rest[..n] != self.block[self.pos..self.pos + n] {
                return Err(std::io::Error::other(format!(
                    "the served log differs from the uploaded one near byte {}",
                    self.total
                )));
            }
            self.pos = (self.pos + n) % self.block.len();
            self.total += n as u64;
            rest = &rest[n..];
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_log_that_expands_to_10_gib_is_checked_and_served_in_bounded_memory() {
    const FRAME: usize = 64 << 20;
    const FRAMES: usize = 160; // 160 × 64 MiB = 10 GiB
    let h = held_build("[limits]\nlog_decompressed_mb = 10240\n");
    let b = block();
    let plain: Vec<u8> = b.iter().copied().cycle().take(FRAME).collect();
    let frame = zstd::encode_all(plain.as_slice(), 3).unwrap();
    drop(plain);
    // zstd reads concatenated frames as one stream.
    let log: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * FRAMES)
        .collect();
    assert!(
        log.len() < 64 << 20,
        "the compressed log ({} bytes) fits limits.log_mb",
        log.len()
    );
    let pid = h.c.pid();
    let (_, hwm_before) = memory_kib(pid);

    let (code, r) = response(
        ureq::put(&h.c.agent(&format!("/api/agent/v1/builds/{}/log?attempt=1", h.build)))
            .set("x-kiln-session", &h.token)
            .send_bytes(&log),
    );
    assert_eq!(code, 200, "{r}");
    let (code, r) = response(
        ureq::post(&h.c.agent(&format!("/api/agent/v1/builds/{}/result", h.build)))
            .set("x-kiln-session", &h.token)
            .send_json(serde_json::json!({"attempt": 1, "outcome": {"result": "failed", "reason": "a long log"}})),
    );
    assert_eq!(code, 200, "{r}");

    let resp = ureq::get(&h.c.url(&format!("/api/v1/builds/{}/log", h.build)))
        .call()
        .unwrap();
    let mut check = Periodic {
        block: b,
        pos: 0,
        total: 0,
    };
    std::io::copy(&mut resp.into_reader(), &mut check).unwrap();
    assert_eq!(
        check.total,
        (FRAME * FRAMES) as u64,
        "the whole 10 GiB log was served"
    );

    let (rss_after, hwm_after) = memory_kib(pid);
    let growth_mb = (hwm_after.saturating_sub(hwm_before)) / 1024;
    eprintln!(
        "coordinator VmHWM {} MB -> {} MB (growth {growth_mb} MB), VmRSS after {} MB",
        hwm_before / 1024,
        hwm_after / 1024,
        rss_after / 1024
    );
    assert!(
        growth_mb < 200,
        "checking and serving a 10 GiB log raised the coordinator's peak memory by {growth_mb} MB"
    );
}

#[test]
fn a_log_over_the_decompressed_cap_is_refused_with_a_clear_error() {
    let h = held_build("[limits]\nlog_decompressed_mb = 1\n");
    let log = zstd::encode_all(vec![b'x'; 2 << 20].as_slice(), 3).unwrap();
    let (code, r) = response(
        ureq::put(&h.c.agent(&format!("/api/agent/v1/builds/{}/log?attempt=1", h.build)))
            .set("x-kiln-session", &h.token)
            .send_bytes(&log),
    );
    assert_eq!(code, 413, "{r}");
    assert_eq!(r["error"]["code"], "too_large");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("limits.log_decompressed_mb"), "{msg}");
    // A body that is not zstd is refused too, and nothing is stored.
    let (code, r) = response(
        ureq::put(&h.c.agent(&format!("/api/agent/v1/builds/{}/log?attempt=1", h.build)))
            .set("x-kiln-session", &h.token)
            .send_bytes(b"plain text"),
    );
    assert_eq!(code, 400, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("zstd"),
        "{r}"
    );
    let logs: Vec<_> = std::fs::read_dir(h.c.state_dir.join("logs"))
        .unwrap()
        .collect();
    assert!(logs.is_empty(), "no log (or temporary) was kept: {logs:?}");
}
