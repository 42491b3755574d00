//! The substitute routes as real clients use them: `HEAD` answers equal `GET` answers minus the
//! body (status, headers, `Content-Length`) on `/nix-cache-info`, `/<hash>.narinfo` and
//! `/nar/<file>`, found or not; `/nar/<file>` answers `Range` with 206 and `Content-Range`; and
//! a real Nix 2.8 (Debian's nix-bin, offline, private `NIX_CONF_DIR`) substitutes an output
//! that a real `kiln-agent` built, from a signed narinfo: `nix copy --from` into a fresh store,
//! `nix-store --realise` with Kiln as its only substituter, then `nix store verify`. A missing
//! Nix is a failure, never a skip.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::transfer::*;
use common::*;
use kiln::derivation::store_path::StoreDir;

/// A coordinator with one available path (a source upload, under the path `nix-store --add`
/// gives it); returns it, the path and its compressed NAR's URL.
fn with_a_source(extra: &str) -> (Coordinator, tempfile::TempDir, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, extra);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("data"), data).unwrap();
    let mut nar = Vec::new();
    kiln::nar::dump(&src, &mut nar).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let nar_hash = kiln::derivation::Hash::sha256(&nar);
    let own = kiln::nar::ca::candidates(&sd, "source", &nar_hash, None, &[], None)
        .unwrap()
        .remove(0)
        .path;
    let path = sd.full_path(&own);
    let (code, r) = response(
        ureq::put(&c.url("/api/v1/sources"))
            .set("Content-Type", "application/x-nix-archive")
            .query("path", &path)
            .query("nar_hash", &sha256(&nar))
            .query("references", "")
            .send_bytes(&nar),
    );
    assert_eq!(code, 200, "{r}");
    let (code, ni) = get(&c.agent(&format!("/{}.narinfo", own.hash_part())));
    assert_eq!(code, 200, "{ni}");
    let url = ni
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    (c, tmp, path, url)
}

/// Sends `HEAD target`, reads its answer, then sends `GET /nix-cache-info` on the same
/// connection. Returns the HEAD answer; panics unless the very next bytes are the second
/// answer (so the HEAD answer carried no body, whatever its Content-Length says). (Not
/// pipelined: actix-http 3 encodes the answer to a pipelined HEAD with the flags of the request
/// decoded after it, and would send a streamed body; Nix's curl does not pipeline.)
fn head(base: &str, target: &str) -> RawResponse {
    let mut s = TcpStream::connect(addr(base)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let host = addr(base);
    write!(s, "HEAD {target} HTTP/1.1\r\nhost: {host}\r\n\r\n").unwrap();
    let h = read_response(&mut s, true);
    write!(
        s,
        "GET /nix-cache-info HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let probe = read_response(&mut s, false);
    assert_eq!(
        probe.status, 200,
        "the answer after HEAD {target} is the probe's"
    );
    assert!(
        probe.body.starts_with(b"StoreDir: "),
        "HEAD {target} sent a body: the next bytes were not the probe's answer"
    );
    h
}

fn get_raw(base: &str, target: &str, extra: &str) -> RawResponse {
    let mut s = TcpStream::connect(addr(base)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nhost: {}\r\n{extra}\r\n",
        addr(base)
    )
    .unwrap();
    read_response(&mut s, false)
}

fn without_date(h: &[(String, String)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = h.iter().filter(|(k, _)| k != "date").cloned().collect();
    v.sort();
    v
}

#[test]
fn head_answers_equal_get_answers_without_the_body() {
    let (c, _tmp, path, url) = with_a_source("");
    let own = &path.rsplit('/').next().unwrap()[..32];
    let targets = [
        "/nix-cache-info".to_string(),
        format!("/{own}.narinfo"),
        format!("/{}.narinfo", "2".repeat(32)),
        "/short.narinfo".to_string(),
        format!("/{url}"),
        format!("/nar/{}.nar.zst", "3".repeat(52)),
        "/nar/not-a-nar".to_string(),
    ];
    for t in &targets {
        let g = get_raw(&c.agent_url, t, "");
        let h = head(&c.agent_url, t);
        assert_eq!(h.status, g.status, "HEAD {t}: status");
        assert_eq!(
            without_date(&h.headers),
            without_date(&g.headers),
            "HEAD {t}: headers"
        );
        assert_eq!(
            h.header("content-length"),
            Some(g.body.len().to_string().as_str()),
            "HEAD {t}: Content-Length is the GET body's length"
        );
    }
    // The found ones were found: the test compares real answers, not two 404s.
    assert_eq!(get_raw(&c.agent_url, &targets[1], "").status, 200);
    assert_eq!(get_raw(&c.agent_url, &targets[4], "").status, 200);
    assert_eq!(get_raw(&c.agent_url, &targets[2], "").status, 404);
}

#[test]
fn nar_files_answer_range_requests() {
    let (c, _tmp, _path, url) = with_a_source("");
    let whole = get_raw(&c.agent_url, &format!("/{url}"), "");
    assert_eq!(whole.status, 200);
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    let len = whole.body.len();
    assert!(len > 1000, "a NAR of {len} bytes");
    let r = get_raw(&c.agent_url, &format!("/{url}"), "range: bytes=1000-\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 1000-{}/{len}", len - 1).as_str())
    );
    assert!(r.body == whole.body[1000..], "the tail from byte 1000");
    let r = get_raw(&c.agent_url, &format!("/{url}"), "range: bytes=10-19\r\n");
    assert_eq!(r.status, 206);
    assert!(r.body == whole.body[10..20]);
    let r = get_raw(&c.agent_url, &format!("/{url}"), "range: bytes=-16\r\n");
    assert_eq!(r.status, 206);
    assert!(r.body == whole.body[len - 16..]);
    let r = get_raw(
        &c.agent_url,
        &format!("/{url}"),
        &format!("range: bytes={len}-\r\n"),
    );
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{len}").as_str())
    );
}

/// A private Nix configuration: offline, no build users, no sandbox, Kiln's key trusted and
/// signatures required.
struct Nix {
    conf: tempfile::TempDir,
    /// `NIX_SSL_CERT_FILE`: the only CA Nix trusts for https substituters.
    ca_file: Option<PathBuf>,
}

impl Nix {
    fn new(trusted_key: &str) -> Nix {
        for tool in ["nix", "nix-store"] {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
                .unwrap_or(false);
            assert!(
                found,
                "{tool} not found: run scripts/test, which installs nix-bin"
            );
        }
        let conf = tempfile::tempdir().unwrap();
        std::fs::write(
            conf.path().join("nix.conf"),
            format!(
                "build-users-group =\nsandbox = false\nsubstituters =\n\
                 experimental-features = nix-command\nrequire-sigs = true\n\
                 trusted-public-keys = {trusted_key}\n"
            ),
        )
        .unwrap();
        Nix {
            conf,
            ca_file: None,
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("NIX_CONF_DIR", self.conf.path())
            .env_remove("NIX_PATH")
            .env_remove("NIX_SSL_CERT_FILE");
        if let Some(ca) = &self.ca_file {
            cmd.env("NIX_SSL_CERT_FILE", ca);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A fresh Nix store whose logical store dir is `store_dir` (the coordinator's) and whose
/// files live under `root`.
fn fresh_store(store_dir: &Path, root: &Path) -> String {
    let r = root.display();
    format!(
        "local?store={}&state={r}/state&log={r}/log&real={r}/real",
        store_dir.display()
    )
}

fn agent_bin() -> PathBuf {
    let p = kiln_bin().with_file_name("kiln-agent");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` (scripts/test does)",
        p.display()
    );
    p
}

#[test]
fn a_real_nix_substitutes_an_output_built_by_kiln() {
    substitute_through_kiln(false);
}

/// The same over HTTPS: Kiln's own CA (`kiln tls init`) is the only one the agent and Nix
/// trust (`--ca-file`, `NIX_SSL_CERT_FILE`).
#[test]
fn a_real_nix_substitutes_over_https_with_kilns_ca() {
    substitute_through_kiln(true);
}

fn substitute_through_kiln(tls: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let pki = tmp.path().join("pki");
    let mut tls_config = String::new();
    let mut h = ureq::AgentBuilder::new().timeout(Duration::from_secs(120));
    if tls {
        let out = Command::new(kiln_bin())
            .args(["tls", "init"])
            .arg(&pki)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        tls_config = format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            pki.join("server.pem").display().to_string(),
            pki.join("server-key.pem").display().to_string()
        );
        kiln::http::tls::install_default_provider();
        let cfg = kiln::http::tls::client_config(&pki.join("ca.pem"), None).unwrap();
        h = h.tls_config(std::sync::Arc::new(cfg));
    }
    let h = h.build();
    let scheme = |url: &str| {
        if tls {
            url.replacen("http://", "https://", 1)
        } else {
            url.to_string()
        }
    };
    let post = |url: &str, body: &serde_json::Value| response(h.post(url).send_json(body.clone()));
    let get = |url: &str| response(h.get(url).call());
    // A signing key made by Nix itself.
    let keygen = Nix::new("none:AAAA");
    let (sec, public) = (tmp.path().join("key.sec"), tmp.path().join("key.pub"));
    keygen.run(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "kiln-test-1",
            sec.to_str().unwrap(),
            public.to_str().unwrap(),
        ],
    );
    let c = Coordinator::start(
        tmp.path(),
        &store,
        &format!(
            "signing_key_file = {:?}\n{tls_config}",
            sec.display().to_string()
        ),
    );
    let (client_url, agent_url) = (scheme(&c.client_url), scheme(&c.agent_url));
    let (code, agent) = post(
        &format!("{client_url}/api/v1/agents"),
        &serde_json::json!({"name": "a1", "systems": ["x86_64-linux"]}),
    );
    assert_eq!(code, 200, "{agent}");
    let secret = tmp.path().join("a1.secret");
    std::fs::write(&secret, agent["secret"].as_str().unwrap()).unwrap();
    let script = "export PATH=/usr/bin:/bin; mkdir -p $out/bin $out/share; \
                  printf '#!/bin/sh\\necho hello from kiln\\n' > $out/bin/hello; chmod +x $out/bin/hello; \
                  printf 'bytes \\377\\n' > $out/share/data; ln -s ../bin/hello $out/share/link";
    let (drv, bytes) = simple_drv(&sd, "substituted", script);
    let (code, r) = post(
        &format!("{client_url}/api/v1/builds"),
        &serde_json::json!({"derivations": [{"path": drv, "contents": b64(&bytes)}], "builds": [drv]}),
    );
    assert_eq!(code, 200, "{r}");
    let id = r["builds"][0]["id"].as_u64().unwrap();
    let agent_state = tmp.path().join("agent-state");
    let mut agent = kiln::client::procs::Processes::default();
    let mut cmd = Command::new(agent_bin());
    cmd.arg("--coordinator")
        .arg(&agent_url)
        .args(["--name", "a1", "--system", "x86_64-linux"])
        .arg("--secret-file")
        .arg(&secret)
        .arg("--store-dir")
        .arg(&store)
        .arg("--state-dir")
        .arg(&agent_state);
    if tls {
        cmd.arg("--ca-file").arg(pki.join("ca.pem"));
    }
    agent
        .spawn("a1", cmd, &tmp.path().join("agent.log"))
        .unwrap();
    let detail = wait_for("the build to finish", Duration::from_secs(120), || {
        let (_, d) = get(&format!("{client_url}/api/v1/builds/{id}"));
        let s = d["summary"]["state"].as_str().unwrap_or("").to_string();
        (s == "succeeded" || s == "failed").then_some(d)
    });
    assert_eq!(detail["summary"]["state"], "succeeded", "{detail}");
    let out = detail["outputs"][0]["path"].as_str().unwrap().to_string();

    let mut nix = Nix::new(std::fs::read_to_string(&public).unwrap().trim());
    if tls {
        nix.ca_file = Some(pki.join("ca.pem"));
    }
    // Kiln serves a store dir other than /nix/store: Nix is told so (`?store=`), as any Nix
    // user of such a store does.
    let cache = format!("{agent_url}?store={}", store.display());
    assert_eq!(cache.starts_with("https://"), tls, "{cache}");
    // nix copy --from Kiln into a fresh store.
    let copied = tmp.path().join("copied");
    let dest = fresh_store(&store, &copied);
    nix.run("nix", &["copy", "--from", &cache, "--to", &dest, &out]);
    nix.run(
        "nix",
        &[
            "store",
            "verify",
            "--store",
            &dest,
            "--sigs-needed",
            "1",
            &out,
        ],
    );
    let base = Path::new(&out).file_name().unwrap();
    let real = copied.join("real").join(base);
    assert_eq!(
        std::fs::read(real.join("share/data")).unwrap(),
        b"bytes \xff\n",
        "the copied output has the built bytes"
    );
    assert_eq!(
        std::fs::read_link(real.join("share/link")).unwrap(),
        Path::new("../bin/hello")
    );

    // Kiln as the only substituter of a fresh store: Nix probes the narinfo with HEAD first.
    let realised = tmp.path().join("realised");
    let dest = fresh_store(&store, &realised);
    nix.run(
        "nix-store",
        &[
            "--store",
            &dest,
            "--option",
            "substituters",
            &cache,
            "--realise",
            &out,
        ],
    );
    nix.run("nix", &["store", "verify", "--store", &dest, &out]);
    let mut hello = Vec::new();
    std::fs::File::open(realised.join("real").join(base).join("bin/hello"))
        .unwrap()
        .read_to_end(&mut hello)
        .unwrap();
    assert_eq!(hello, b"#!/bin/sh\necho hello from kiln\n");
    drop(agent);
}
