//! Property tests of the NAR writer and reader on real files: for generated trees (random
//! nesting, names of arbitrary bytes, empty and large files, execute bits, symlinks with
//! arbitrary targets, empty directories), `restore(dump(tree)) == tree`, `validate` agrees with
//! the bytes, and dumping the restored tree gives the same NAR.

#[path = "nar_common.rs"]
mod nar_common;

use std::io::Cursor;

use kiln::derivation::hash::Hash;
use kiln::nar;
use nar_common::{read_tree, tree, write_tree};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn restore_of_dump_is_the_same_tree(node in tree()) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        write_tree(&src, &node);
        // What the file system made of the tree (execute bits reduced to the owner's).
        let original = read_tree(&src);

        let mut nar_bytes = Vec::new();
        nar::dump(&src, &mut nar_bytes).unwrap();

        let summary = nar::validate(&mut Cursor::new(&nar_bytes)).unwrap();
        prop_assert_eq!(summary.nar_size, nar_bytes.len() as u64);
        prop_assert_eq!(&summary.nar_hash, &Hash::sha256(&nar_bytes));
        prop_assert_eq!(nar::hash_path(&src).unwrap(), summary.clone());

        let dst = tmp.path().join("dst");
        let restored = nar::restore_summary(&mut Cursor::new(&nar_bytes), &dst).unwrap();
        prop_assert_eq!(restored, summary);
        prop_assert_eq!(read_tree(&dst), original);

        let mut again = Vec::new();
        nar::dump(&dst, &mut again).unwrap();
        prop_assert!(again == nar_bytes, "dump of the restored tree differs");
    }
}

#[test]
fn restore_refuses_an_existing_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("f");
    std::fs::write(&src, b"x").unwrap();
    let mut bytes = Vec::new();
    nar::dump(&src, &mut bytes).unwrap();
    let err = nar::restore(&mut Cursor::new(&bytes), tmp.path()).unwrap_err();
    assert!(
        matches!(err, nar::NarError::DestinationExists { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn dump_refuses_a_fifo_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let err = nar::dump(tmp.path(), &mut std::io::sink()).unwrap_err();
    assert!(err.to_string().contains("is a fifo"), "{err}");
}
