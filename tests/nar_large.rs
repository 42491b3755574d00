//! A NAR of a file larger than 4 GiB, through the writer and the reader: on a 32-bit board
//! (armv7, where `usize` has 32 bits) every length and offset must stay a `u64`, or a file past
//! 4 GiB comes out truncated or mis-hashed. The file is sparse (4 KiB on disk) with a marker
//! past the 4 GiB boundary; the expected NarHash and NarSize come from real Nix 2.8
//! (`nix-store --dump FILE | sha256sum`, `wc -c`).
//!
//! Ignored by default (it reads 4 GiB twice: about 10 s natively, minutes under emulation):
//! `scripts/cross` runs it for armv7 under qemu-user, and
//! `cargo test -p kiln --no-default-features --test nar_large -- --ignored` runs it here.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::io::FromRawFd as _;

use kiln::derivation::hash::{Hash, HashAlgo};
use kiln::nar;

/// 4 GiB + 4 KiB + 3: past `u32::MAX`, and not a multiple of 8, so the padding is exercised.
const LEN: u64 = (1 << 32) + 4096 + 3;
const MARKER_AT: u64 = (1 << 32) + 100;
const MARKER: &[u8] = b"kiln: past 4 GiB";
/// `nix-store --dump` of that file, measured with Nix 2.8.
const NAR_SIZE: u64 = 4_294_971_512;
const NAR_SHA256: &str = "ef3657d8536e1f4c1975df9197e413e52c87044b7da81d949ed3b0103478885f";

fn big_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("big");
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .unwrap();
    f.set_len(LEN).unwrap();
    f.seek(SeekFrom::Start(MARKER_AT)).unwrap();
    f.write_all(MARKER).unwrap();
    f.sync_all().unwrap();
    path
}

#[test]
#[ignore = "reads a 4 GiB sparse file twice; scripts/cross runs it on armv7 under qemu-user"]
fn a_file_over_4_gib_dumps_and_validates_with_nix_hashes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = big_file(tmp.path());
    let want = Hash::parse_digest(HashAlgo::Sha256, NAR_SHA256).unwrap();
    // A NAR's fixed parts: magic, "(", "type", "regular", "contents", the length, the data
    // padded to 8, ")". The size must match this formula and what Nix wrote.
    let framing = 24 + 16 + 16 + 16 + 16 + 8 + 16;
    assert_eq!(framing + LEN + (8 - LEN % 8) % 8, NAR_SIZE);

    // The writer side (what an agent's spool records as NarHash / NarSize).
    let written = nar::hash_path(&path).unwrap();
    assert_eq!(written.nar_size, NAR_SIZE);
    assert_eq!(
        written.nar_hash, want,
        "NarHash of the dump differs from Nix's"
    );

    // The reader side (what the coordinator's upload check computes): the dump streamed
    // through a pipe into `validate`, so no 4 GiB buffer exists anywhere.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just opened by pipe and are owned by nothing else.
    let (mut r, mut w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let dumper = std::thread::spawn(move || nar::dump(&path, &mut w));
    let read = nar::validate(&mut r).unwrap();
    dumper.join().unwrap().unwrap();
    assert_eq!(read.nar_size, NAR_SIZE);
    assert_eq!(
        read.nar_hash, want,
        "NarHash seen by the reader differs from Nix's"
    );
}
