//! Output uploads over real sockets to a real coordinator, with the agent played by hand so a
//! test can cut, stall or fake a body: an upload cut half way resumes from the bytes received
//! (none re-sent); a body that goes silent is dropped after `timeouts.transfer_stall_ms` with
//! its bytes kept; a resumed `PUT` takes over at once from a silent one; partial uploads nobody
//! resumes are removed after `timeouts.partial_upload_expiry_ms`, and at start by age; an
//! undeclared output or a build not held is refused before any byte of the body is sent.

mod common;

use std::time::{Duration, SystemTime};

use common::transfer::*;
use common::*;

const MIB: usize = 1 << 20;

#[test]
fn an_upload_cut_half_way_resumes_from_the_bytes_received() {
    let h = held_build("");
    let (zst, fh, nar_hash, nar_size) = compressed_nar(h.tmp.path(), 4 * MIB);
    let (size, half) = (zst.len() as u64, zst.len() / 2);
    let target = upload_target(h.build, "out", &fh, size, 0);
    let s = send_partial(
        &h.c.agent_url,
        "PUT",
        &target,
        &[("x-kiln-session", &h.token)],
        size,
        &zst[..half],
    );
    // The link breaks half way.
    drop(s);
    wait_for(
        "the coordinator to keep the half that arrived",
        Duration::from_secs(60),
        || (upload_status(&h, &fh, size)["received"].as_u64() == Some(half as u64)).then_some(()),
    );
    let (code, st) = put_rest(&h, &fh, size, half as u64, &zst[half..]);
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["verified"], true, "{st}");
    assert_eq!(st["nar_hash"].as_str(), Some(nar_hash.as_str()));
    assert_eq!(st["nar_size"].as_u64(), Some(nar_size));
    let (code, r) = h.succeed(&fh, size, &nar_hash, nar_size);
    assert_eq!(code, 200, "{r}");
    // The NAR served is the file uploaded in two halves.
    let served = {
        let mut v = Vec::new();
        let url = h.c.agent(&format!(
            "/nar/{}.nar.zst",
            fh.trim_start_matches("sha256:")
        ));
        std::io::Read::read_to_end(&mut ureq::get(&url).call().unwrap().into_reader(), &mut v)
            .unwrap();
        v
    };
    assert!(served == zst, "the stored NAR is the uploaded file");
    assert!(
        h.parts().is_empty(),
        "no partial file is left: {:?}",
        h.parts()
    );
}

#[test]
fn a_stalled_upload_is_dropped_after_the_stall_timeout_with_its_bytes_kept() {
    let h = held_build("[timeouts]\ntransfer_stall_ms = 1500\n");
    let (zst, fh, _, _) = compressed_nar(h.tmp.path(), 2 * MIB);
    let (size, half) = (zst.len() as u64, zst.len() / 2);
    let mut s = send_partial(
        &h.c.agent_url,
        "PUT",
        &upload_target(h.build, "out", &fh, size, 0),
        &[("x-kiln-session", &h.token)],
        size,
        &zst[..half],
    );
    // Half the body, then silence on a live connection: only a stall timeout can end it.
    let r = read_response(&mut s, false);
    assert_eq!(r.status, 408, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "transfer_stalled");
    assert!(metric(&h.c, "kiln_transfer_stalls_total") >= 1.0);
    let st = upload_status(&h, &fh, size);
    assert_eq!(
        st["received"].as_u64(),
        Some(half as u64),
        "the bytes that arrived are kept for resumption"
    );
    let (code, st) = put_rest(&h, &fh, size, half as u64, &zst[half..]);
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["verified"], true, "{st}");
    drop(s);
}

#[test]
fn a_resumed_put_takes_over_from_a_silent_one() {
    // The default stall timeout (60 s): the resumed request must not wait for it.
    let h = held_build("");
    let (zst, fh, _, _) = compressed_nar(h.tmp.path(), 2 * MIB);
    let (size, half) = (zst.len() as u64, zst.len() / 2);
    let mut silent = send_partial(
        &h.c.agent_url,
        "PUT",
        &upload_target(h.build, "out", &fh, size, 0),
        &[("x-kiln-session", &h.token)],
        size,
        &zst[..half],
    );
    wait_for("the first half to arrive", Duration::from_secs(60), || {
        (upload_status(&h, &fh, size)["received"].as_u64() == Some(half as u64)).then_some(())
    });
    let (code, st) = put_rest(&h, &fh, size, half as u64, &zst[half..]);
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["verified"], true, "{st}");
    let r = read_response(&mut silent, false);
    assert_eq!(r.status, 409, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "upload_superseded");
}

#[test]
fn a_stream_that_is_not_a_zstd_nar_is_refused_before_its_end() {
    let h = held_build("");
    // 64 MiB declared, garbage sent: the verifier refuses it long before the last byte.
    let size = 64 * MIB as u64;
    let garbage = vec![b'g'; 2 * MIB];
    let fh = sha256(b"whatever");
    let mut s = send_partial(
        &h.c.agent_url,
        "PUT",
        &upload_target(h.build, "out", &fh, size, 0),
        &[("x-kiln-session", &h.token)],
        size,
        &garbage,
    );
    let r = read_response(&mut s, false);
    assert_eq!(r.status, 422, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "hash_mismatch");
    assert!(
        h.parts().is_empty(),
        "the refused file is gone: {:?}",
        h.parts()
    );
}

#[test]
fn an_abandoned_partial_upload_is_removed_after_the_expiry() {
    let h = held_build("[timeouts]\npartial_upload_expiry_ms = 3000\n");
    let (zst, fh, _, _) = compressed_nar(h.tmp.path(), MIB);
    let (size, half) = (zst.len() as u64, zst.len() / 2);
    drop(send_partial(
        &h.c.agent_url,
        "PUT",
        &upload_target(h.build, "out", &fh, size, 0),
        &[("x-kiln-session", &h.token)],
        size,
        &zst[..half],
    ));
    wait_for("the partial file", Duration::from_secs(60), || {
        (h.parts().len() == 1).then_some(())
    });
    wait_for(
        "the partial upload and its lock to be removed",
        Duration::from_secs(60),
        || {
            let gone = h.parts().is_empty()
                && upload_status(&h, &fh, size)["received"].as_u64() == Some(0)
                && metric(&h.c, "kiln_upload_slots") == 0.0;
            gone.then_some(())
        },
    );
    assert!(h
        .c
        .log()
        .contains("removed a partial upload nobody resumed"));
}

#[test]
fn at_start_old_partial_uploads_are_removed_and_young_ones_resume() {
    let mut h = held_build("[timeouts]\npartial_upload_expiry_ms = 3600000\n");
    let (zst, fh, nar_hash, nar_size) = compressed_nar(h.tmp.path(), MIB);
    let (size, half) = (zst.len() as u64, zst.len() / 2);
    drop(send_partial(
        &h.c.agent_url,
        "PUT",
        &upload_target(h.build, "out", &fh, size, 0),
        &[("x-kiln-session", &h.token)],
        size,
        &zst[..half],
    ));
    wait_for("the first half", Duration::from_secs(60), || {
        (upload_status(&h, &fh, size)["received"].as_u64() == Some(half as u64)).then_some(())
    });
    h.c.kill9();
    // What a crash long ago left: a partial upload two hours old, and a source temporary.
    let uploads = h.c.state_dir.join("uploads");
    let old = uploads.join(format!("99-1-out-{}.part", "0".repeat(52)));
    std::fs::write(&old, vec![0u8; 1000]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(2 * 3600))
        .unwrap();
    let src_tmp = uploads.join("src-0123456789abcdef.nar");
    std::fs::write(&src_tmp, b"half a source").unwrap();
    h.c.spawn();
    // Swept before the listeners were bound (the ready file is written after).
    assert!(
        !old.exists(),
        "the partial upload older than the expiry is gone"
    );
    assert!(
        !src_tmp.exists(),
        "the temporary file of a cut source upload is gone"
    );
    assert_eq!(h.parts().len(), 1, "the young partial upload is kept");
    h.reopen();
    let st = upload_status(&h, &fh, size);
    assert_eq!(st["received"].as_u64(), Some(half as u64), "{st}");
    let (code, st) = put_rest(&h, &fh, size, half as u64, &zst[half..]);
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["verified"], true, "{st}");
    assert_eq!(st["nar_hash"].as_str(), Some(nar_hash.as_str()));
    let (code, r) = h.succeed(&fh, size, &nar_hash, nar_size);
    assert_eq!(code, 200, "{r}");
}

#[test]
fn an_undeclared_output_or_a_build_not_held_is_refused_before_the_body() {
    let h = held_build("");
    let fh = sha256(b"never sent");
    // 10 GiB announced, not one byte sent: the refusal must come without the body.
    let size: u64 = 10 << 30;
    let refuse = |target: String| {
        let mut s = send_partial(
            &h.c.agent_url,
            "PUT",
            &target,
            &[("x-kiln-session", &h.token)],
            size,
            &[],
        );
        read_response(&mut s, false)
    };
    let r = refuse(upload_target(h.build, "doc", &fh, size, 0));
    assert_eq!(r.status, 404, "{:?}", String::from_utf8_lossy(&r.body));
    let e = r.json();
    assert_eq!(e["error"]["code"], "no_such_output", "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("\"doc\"") && msg.contains("out"), "{msg}");

    let stale = format!(
        "/api/agent/v1/builds/{}/outputs/out?attempt=2&file_hash={fh}&file_size={size}&offset=0",
        h.build
    );
    let r = refuse(stale);
    assert_eq!(r.status, 409, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "stale_attempt");

    let r = refuse(upload_target(h.build + 1000, "out", &fh, size, 0));
    assert_eq!(r.status, 404, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "no_such_build");

    assert!(h.parts().is_empty(), "nothing was spooled: {:?}", h.parts());
    // The build is still held and uploadable.
    let (_, st) = response(ureq::get(&h.c.url(&format!("/api/v1/builds/{}", h.build))).call());
    assert_eq!(st["summary"]["state"], "building", "{st}");
}
