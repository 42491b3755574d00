//! Runs real `/bin/sh` builders through the native executor's API (no coordinator): outputs
//! and their NAR hashes against `nix-hash`, failures, byte-exact environment values, cancel
//! killing the whole process group, and timeouts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln::derivation::{Derivation, DerivationOutput};
use kiln::protocol::{Assignment, Bytes64, OutputSpec};
use kiln_agent::executor::{BuildResult, Limits, NativeExecutor, StopReason};
use kiln_agent::state::{BuildDir, StateDir};
use tokio::sync::watch;

const OUT_HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

struct Fixture {
    _tmp: tempfile::TempDir,
    store: PathBuf,
    state: StateDir,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let state = StateDir::open(&tmp.path().join("state")).unwrap();
    Fixture {
        _tmp: tmp,
        store,
        state,
    }
}

fn executor(store: &Path, limits: Limits) -> NativeExecutor {
    NativeExecutor::new(
        store.to_owned(),
        Limits {
            kill_grace: Duration::from_secs(1),
            ..limits
        },
    )
}

/// An assignment whose builder is `/bin/sh -c script`, with `env` added to the derivation's.
fn assignment(store: &Path, script: &str, env: &[(&[u8], &[u8])]) -> Assignment {
    let out = format!("{}/{OUT_HASH}-test", store.display());
    // Nix sets PATH=/path-not-set; these builders use the host's tools.
    let mut drv_env: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"out".to_vec(), out.clone().into_bytes()),
        (b"PATH".to_vec(), b"/usr/bin:/bin".to_vec()),
    ];
    drv_env.extend(env.iter().map(|(n, v)| (n.to_vec(), v.to_vec())));
    let drv = Derivation {
        outputs: vec![(
            b"out".to_vec(),
            DerivationOutput {
                path: out.clone().into_bytes(),
                ..Default::default()
            },
        )],
        platform: b"x86_64-linux".to_vec(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), script.as_bytes().to_vec()],
        env: drv_env,
        ..Derivation::default()
    };
    Assignment {
        build_id: 1,
        attempt: 1,
        drv_path: format!(
            "{}/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-test.drv",
            store.display()
        ),
        drv: Bytes64(drv.print()),
        system: "x86_64-linux".into(),
        outputs: vec![OutputSpec {
            name: "out".into(),
            path: out,
        }],
        inputs: vec![],
        priority: 0,
    }
}

async fn build_dir(f: &Fixture) -> BuildDir {
    let dir = f.state.build_dir(1, 1);
    dir.create().await.unwrap();
    dir
}

fn nix_hash(path: &Path) -> String {
    let out = std::process::Command::new("nix-hash")
        .args(["--type", "sha256", "--base32"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("failed to run nix-hash ({e}): install nix (apt-get install nix-bin) to run this test"));
    assert!(
        out.status.success(),
        "nix-hash failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn wait_for<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn builds_an_output_whose_nar_hash_matches_nix_hash() {
    let f = fixture();
    let weird: &[u8] = &[b'a', 0xff, 0xfe, b'\n', 0x80, b'z'];
    let script = r#"
        set -e
        echo "building in $PWD"
        mkdir -p $out/sub
        printf 'hello\n' > $out/sub/file
        ln -s sub/file $out/link
        printf '%s' "$weird" > $out/weird
        printf '%s\n' "$out" > $out/self
        echo "log line"
    "#;
    let a = assignment(&f.store, script, &[(b"weird", weird)]);
    let dir = build_dir(&f).await;
    let (_tx, mut rx) = watch::channel(None);
    let result = executor(&f.store, Limits::default())
        .run(&a, &dir, &mut rx)
        .await
        .unwrap();
    let BuildResult::Built(outputs) = result else {
        panic!("build failed: {result:?}")
    };
    let out = &outputs[0];
    let path = PathBuf::from(&out.path);
    assert_eq!(
        std::fs::read(path.join("weird")).unwrap(),
        weird,
        "env value must reach the builder byte-exact"
    );
    assert_eq!(
        std::fs::read_link(path.join("link")).unwrap(),
        Path::new("sub/file")
    );
    assert_eq!(out.nar_hash, format!("sha256:{}", nix_hash(&path)));
    assert_eq!(
        out.references,
        vec![out.path.clone()],
        "the output refers to itself"
    );
    let spooled = std::fs::metadata(dir.spool("out")).unwrap();
    assert_eq!(spooled.len(), out.file_size);
    let log = std::fs::read(dir.log()).unwrap();
    assert!(log.windows(8).any(|w| w == b"log line"));
    assert!(
        !dir.build_top().exists(),
        "the build dir is removed after the builder"
    );
}

#[tokio::test]
async fn a_non_zero_exit_fails_with_the_status() {
    let f = fixture();
    let a = assignment(&f.store, "echo failing >&2; exit 3", &[]);
    let dir = build_dir(&f).await;
    let (_tx, mut rx) = watch::channel(None);
    let result = executor(&f.store, Limits::default())
        .run(&a, &dir, &mut rx)
        .await
        .unwrap();
    assert_eq!(
        result,
        BuildResult::Failed("builder exited with status 3".into())
    );
    assert!(std::fs::read(dir.log()).unwrap().starts_with(b"failing"));
}

#[tokio::test]
async fn a_missing_output_fails_the_build() {
    let f = fixture();
    let a = assignment(&f.store, "true", &[]);
    let dir = build_dir(&f).await;
    let (_tx, mut rx) = watch::channel(None);
    let result = executor(&f.store, Limits::default())
        .run(&a, &dir, &mut rx)
        .await
        .unwrap();
    let BuildResult::Failed(reason) = result else {
        panic!("{result:?}")
    };
    assert!(
        reason.starts_with("builder did not create output out"),
        "{reason}"
    );
}

fn group_exists(pgid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(-pgid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Pins down that cancel kills the builder's whole process group, background children too.
#[tokio::test]
async fn cancel_kills_the_whole_process_group() {
    let f = fixture();
    let pid_file = f.state.root().join("builder.pid");
    let pid_env = pid_file.to_str().unwrap().as_bytes().to_vec();
    let script = "sleep 1000 & echo $$ > \"$pidfile.tmp\"; mv \"$pidfile.tmp\" \"$pidfile\"; wait";
    let a = assignment(&f.store, script, &[(b"pidfile", &pid_env)]);
    let dir = build_dir(&f).await;
    let (tx, mut rx) = watch::channel(None);
    let exec = executor(&f.store, Limits::default());
    let canceler = async {
        let pgid: i32 = wait_for("the builder's pid", Duration::from_secs(20), || {
            std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
        })
        .await;
        tx.send_replace(Some(StopReason::Cancel));
        pgid
    };
    let (result, pgid) = tokio::join!(exec.run(&a, &dir, &mut rx), canceler);
    assert_eq!(result.unwrap(), BuildResult::Stopped(StopReason::Cancel));
    wait_for(
        "the process group to disappear",
        Duration::from_secs(20),
        || (!group_exists(pgid)).then_some(()),
    )
    .await;
}

#[tokio::test]
async fn max_silent_time_fails_the_build() {
    let f = fixture();
    let a = assignment(&f.store, "echo start; sleep 1000", &[]);
    let dir = build_dir(&f).await;
    let (_tx, mut rx) = watch::channel(None);
    let limits = Limits {
        max_silent: Duration::from_secs(1),
        ..Limits::default()
    };
    let result = executor(&f.store, limits)
        .run(&a, &dir, &mut rx)
        .await
        .unwrap();
    assert_eq!(
        result,
        BuildResult::Failed("no output for 1 seconds".into())
    );
}

/// A `builtin:fetchurl` assignment of `url` whose `out` is fixed by `algo`/`hash` (hex).
fn fetchurl_assignment(
    store: &Path,
    url: &str,
    algo: &str,
    hash: &str,
    env: &[(&str, &str)],
) -> Assignment {
    let out = format!("{}/{OUT_HASH}-fetched", store.display());
    let mut drv_env: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"builder".to_vec(), b"builtin:fetchurl".to_vec()),
        (b"out".to_vec(), out.clone().into_bytes()),
        (b"url".to_vec(), url.as_bytes().to_vec()),
        (
            b"outputHashAlgo".to_vec(),
            algo.trim_start_matches("r:").as_bytes().to_vec(),
        ),
        (b"outputHash".to_vec(), hash.as_bytes().to_vec()),
    ];
    drv_env.extend(
        env.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())),
    );
    let drv = Derivation {
        outputs: vec![(
            b"out".to_vec(),
            DerivationOutput {
                path: out.clone().into_bytes(),
                hash_algo: algo.as_bytes().to_vec(),
                hash: hash.as_bytes().to_vec(),
            },
        )],
        platform: b"builtin".to_vec(),
        builder: b"builtin:fetchurl".to_vec(),
        env: drv_env,
        ..Derivation::default()
    };
    Assignment {
        build_id: 1,
        attempt: 1,
        drv_path: format!(
            "{}/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-fetched.drv",
            store.display()
        ),
        drv: Bytes64(drv.print()),
        system: "builtin".into(),
        outputs: vec![OutputSpec {
            name: "out".into(),
            path: out,
        }],
        inputs: vec![],
        priority: 0,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    kiln_agent::executor::builtin::hex(&sha2::Sha256::digest(bytes))
}

/// Serves `body` at every GET on 127.0.0.1 (one request per connection); the URL prefix.
async fn serve_once_per_connection(body: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let status = if head.starts_with(b"GET /missing") {
                    "404 Not Found"
                } else {
                    "200 OK"
                };
                let body = if status == "200 OK" { body } else { vec![] };
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    url
}

/// Pins down `builtin:fetchurl` over real HTTP on loopback: the file lands at `out`, executable
/// when asked, its flat hash checked, and its NAR hash reported as nix-hash computes it.
#[tokio::test]
async fn builtin_fetchurl_downloads_over_http_and_checks_the_hash() {
    let f = fixture();
    let body = b"#!/bin/sh\necho fetched\n".to_vec();
    let url = serve_once_per_connection(body.clone()).await;
    let a = fetchurl_assignment(
        &f.store,
        &format!("{url}/tool.sh"),
        "sha256",
        &sha256_hex(&body),
        &[("executable", "1")],
    );
    let dir = build_dir(&f).await;
    let (_tx, mut rx) = watch::channel(None);
    let result = executor(&f.store, Limits::default())
        .run(&a, &dir, &mut rx)
        .await
        .unwrap();
    let BuildResult::Built(outputs) = result else {
        panic!("build failed: {result:?}")
    };
    let path = PathBuf::from(&outputs[0].path);
    assert_eq!(std::fs::read(&path).unwrap(), body);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o111,
        0o111
    );
    assert_eq!(outputs[0].nar_hash, format!("sha256:{}", nix_hash(&path)));
    let log = std::fs::read_to_string(dir.log()).unwrap();
    assert!(log.contains("downloading"), "{log}");

    // The same URL with another expected hash: the build fails naming both hashes, and no
    // output is left behind.
    let wrong = sha256_hex(b"something else");
    let a = fetchurl_assignment(&f.store, &format!("{url}/tool.sh"), "sha256", &wrong, &[]);
    let (_tx, mut rx) = watch::channel(None);
    let result = executor(&f.store, Limits::default())
        .run(&a, &dir, &mut rx)
        .await
        .unwrap();
    let BuildResult::Failed(reason) = result else {
        panic!("a wrong hash must fail the build: {result:?}")
    };
    assert!(
        reason.contains("hash mismatch")
            && reason.contains(&wrong)
            && reason.contains(&sha256_hex(&body)),
        "{reason}"
    );
    assert!(!path.exists(), "a wrong fixed output is removed");

    // An HTTP error fails the build with the status.
    let a = fetchurl_assignment(&f.store, &format!("{url}/missing"), "sha256", &wrong, &[]);
    let (_tx, mut rx) = watch::channel(None);
    let result = executor(&f.store, Limits::default())
        .run(&a, &dir, &mut rx)
        .await
        .unwrap();
    assert!(
        matches!(&result, BuildResult::Failed(r) if r.contains("404")),
        "{result:?}"
    );
}

/// Pins down `unpack = "1"` from a `file://` URL: the download is a NAR, restored at `out` and
/// checked recursively (`r:sha256`, the NAR's hash).
#[tokio::test]
async fn builtin_fetchurl_unpacks_a_nar_from_a_file_url() {
    let f = fixture();
    let src = f.store.parent().unwrap().join("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/data"), b"unpacked\n").unwrap();
    let mut nar = Vec::new();
    kiln::nar::dump(&src, &mut nar).unwrap();
    let nar_file = f.store.parent().unwrap().join("tree.nar");
    std::fs::write(&nar_file, &nar).unwrap();
    let a = fetchurl_assignment(
        &f.store,
        &format!("file://{}", nar_file.display()),
        "r:sha256",
        &sha256_hex(&nar),
        &[("unpack", "1")],
    );
    let dir = build_dir(&f).await;
    let (_tx, mut rx) = watch::channel(None);
    let result = executor(&f.store, Limits::default())
        .run(&a, &dir, &mut rx)
        .await
        .unwrap();
    let BuildResult::Built(outputs) = result else {
        panic!("build failed: {result:?}")
    };
    let path = PathBuf::from(&outputs[0].path);
    assert_eq!(std::fs::read(path.join("sub/data")).unwrap(), b"unpacked\n");
    assert_eq!(outputs[0].nar_size, nar.len() as u64);
}

/// Pins down the clear refusals: another builtin, and a scheme the agent cannot fetch.
#[tokio::test]
async fn other_builtins_and_schemes_fail_with_a_reason() {
    let f = fixture();
    let dir = build_dir(&f).await;
    let hash = sha256_hex(b"x");
    let a = fetchurl_assignment(&f.store, "ftp://127.0.0.1/x", "sha256", &hash, &[]);
    let (_tx, mut rx) = watch::channel(None);
    let result = executor(&f.store, Limits::default())
        .run(&a, &dir, &mut rx)
        .await
        .unwrap();
    assert!(
        matches!(&result, BuildResult::Failed(r) if r.contains("ftp://") && r.contains("only file://")),
        "{result:?}"
    );
    let mut a = fetchurl_assignment(&f.store, "file:///dev/null", "sha256", &hash, &[]);
    let mut drv = Derivation::parse(&a.drv.0).unwrap();
    drv.builder = b"builtin:buildenv".to_vec();
    a.drv = Bytes64(drv.print());
    let (_tx, mut rx) = watch::channel(None);
    let result = executor(&f.store, Limits::default())
        .run(&a, &dir, &mut rx)
        .await
        .unwrap();
    assert!(
        matches!(&result, BuildResult::Failed(r) if r.contains("builtin:buildenv") && r.contains("only builtin:fetchurl")),
        "{result:?}"
    );
}
