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
