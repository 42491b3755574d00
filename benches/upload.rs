//! Benchmark: one output NAR of 1 GiB (64 MiB with `KILN_BENCH_QUICK=1`) uploaded to a real
//! `kiln coordinator` over loopback in one `PUT`, from the first byte sent to the answer
//! `verified: true`. The time includes everything the coordinator does before it answers:
//! writing the partial file, FileHash, zstd decompression, NAR validation and NarHash (all
//! while the bytes arrive), the fsync, the rename and the commit of the `nar_files` record.
//! The data is random (zstd cannot shrink it), so the compressed file is as large as the NAR.
//! Prints one JSON object.
//!
//! Reproduce: `cargo bench --bench upload` (figures in docs/performance.md).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write as _;
use std::time::Instant;

use common::transfer::{held_build, upload_target};
use rand::RngCore as _;

fn main() {
    let quick = std::env::var_os("KILN_BENCH_QUICK").is_some();
    let size: usize = if quick { 64 << 20 } else { 1 << 30 };
    let h = held_build("");
    let dir = h.tmp.path().join("bench");
    std::fs::create_dir_all(dir.join("tree")).unwrap();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("tree/data")).unwrap());
        let mut rng = rand::thread_rng();
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..size >> 20 {
            rng.fill_bytes(&mut buf);
            f.write_all(&buf).unwrap();
        }
        f.flush().unwrap();
    }
    let spool = dir.join("out.nar.zst");
    let file = kiln::nar::HashingWriter::new(std::fs::File::create(&spool).unwrap());
    let enc = zstd::stream::write::Encoder::new(file, 1).unwrap();
    let mut nar = kiln::nar::HashingWriter::new(enc);
    kiln::nar::dump(&dir.join("tree"), &mut nar).unwrap();
    let (enc, nar_hash, nar_size) = nar.finish();
    let (file, file_hash, file_size) = enc.finish().unwrap().finish();
    file.sync_all().unwrap();
    drop(file);
    std::fs::remove_file(dir.join("tree/data")).unwrap();

    let fh = file_hash.to_nix_string();
    let url = h.c.agent(&upload_target(h.build, "out", &fh, file_size, 0));
    let body = std::fs::File::open(&spool).unwrap();
    let t = Instant::now();
    let resp = ureq::put(&url)
        .set("x-kiln-session", &h.token)
        .set("content-length", &file_size.to_string())
        .send(body)
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let st: serde_json::Value = resp.into_json().unwrap();
    assert_eq!(st["verified"], true, "{st}");
    assert_eq!(
        st["nar_hash"].as_str(),
        Some(nar_hash.to_nix_string().as_str())
    );
    assert_eq!(st["nar_size"].as_u64(), Some(nar_size));
    println!(
        "{}",
        serde_json::json!({
            "bench": "upload",
            "file_bytes": file_size,
            "nar_bytes": nar_size,
            "seconds": (secs * 1000.0).round() / 1000.0,
            "mb_per_s": (file_size as f64 / secs / 1e6).round(),
        })
    );
}
