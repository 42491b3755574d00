//! TLS against a real coordinator process over 127.0.0.1, with certificates from the real
//! `kiln tls init`: the CLI trusts the right CA and refuses a wrong one with a clear error;
//! the agent listener with mutual TLS refuses a client without a certificate; a certificate
//! replaced on disk is served to new connections after SIGHUP, without a restart.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{wait_for, Coordinator};

const LIMIT: Duration = Duration::from_secs(90);

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env_remove("KILN_COORDINATOR")
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_TOKEN_FILE")
        .env_remove("KILN_CA_FILE");
    cmd
}

fn tls_init(dir: &Path) {
    let out = kiln()
        .args(["tls", "init"])
        .arg(dir)
        .args(["--name", "localhost", "--name", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A GET over TLS trusting `ca` (and presenting `identity`): the HTTP status, or the
/// transport error's text.
fn get_tls(url: &str, ca: &Path, identity: Option<(&Path, &Path)>) -> Result<u16, String> {
    kiln::http::tls::install_default_provider();
    let config = kiln::http::tls::client_config(ca, identity).unwrap();
    let agent = ureq::AgentBuilder::new()
        .tls_config(Arc::new(config))
        .timeout(LIMIT)
        .build();
    match agent.get(url).call() {
        Ok(r) => Ok(r.status()),
        Err(ureq::Error::Status(s, _)) => Ok(s),
        Err(e) => Err(format!("{e:#}")),
    }
}

#[test]
fn tls_trusts_only_its_ca_requires_agent_certificates_and_reloads_on_sighup() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = t.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let (good, wrong, next) = (t.join("pki"), t.join("other"), t.join("next"));
    for d in [&good, &wrong, &next] {
        tls_init(d);
    }
    // The coordinator serves copies, so the test can replace them under it.
    let (cert, key) = (t.join("served.pem"), t.join("served-key.pem"));
    std::fs::copy(good.join("server.pem"), &cert).unwrap();
    std::fs::copy(good.join("server-key.pem"), &key).unwrap();
    let mut c = Coordinator::start(
        t,
        &store,
        &format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\nagent_client_ca_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string(),
            good.join("ca.pem").display().to_string()
        ),
    );
    let client = c.client_url.replacen("http://", "https://", 1);
    let agent = c.agent_url.replacen("http://", "https://", 1);
    let ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("ready.json")).unwrap()).unwrap();
    assert_eq!(ready["tls"], true);

    // The CLI with the right CA works; with a wrong one, or none, it fails and says why.
    let ok = kiln()
        .args(["builds", "--coordinator", &client, "--ca-file"])
        .arg(good.join("ca.pem"))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    for ca in [Some(wrong.join("ca.pem")), None] {
        let mut cmd = kiln();
        cmd.args(["builds", "--coordinator", &client]);
        if let Some(ca) = &ca {
            cmd.arg("--ca-file").arg(ca);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{ca:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("did not prove who it is") && err.contains("--ca-file"),
            "{ca:?}: {err}"
        );
    }
    // Plain HTTP on the TLS port gets no API answer.
    let plain = ureq::get(&c.url("/api/v1/builds")).timeout(LIMIT).call();
    assert!(plain.is_err(), "plain HTTP was answered on a TLS listener");

    // Mutual TLS on the agent listener: no client certificate, no connection.
    let cache_info = format!("{agent}/nix-cache-info");
    let ca = good.join("ca.pem");
    let refused = get_tls(&cache_info, &ca, None);
    assert!(
        refused.is_err(),
        "served without a client certificate: {refused:?}"
    );
    // A client certificate from another CA is refused too.
    let foreign = get_tls(
        &cache_info,
        &ca,
        Some((&wrong.join("agent.pem"), &wrong.join("agent-key.pem"))),
    );
    assert!(
        foreign.is_err(),
        "served a foreign client certificate: {foreign:?}"
    );
    let with_cert = get_tls(
        &cache_info,
        &ca,
        Some((&good.join("agent.pem"), &good.join("agent-key.pem"))),
    );
    assert_eq!(with_cert, Ok(200));

    // Real agents: with the wrong CA it fails with the rustls error and the hint; without a
    // client certificate the handshake fails; with the right CA and certificate it connects.
    let http = {
        let cfg = kiln::http::tls::client_config(&ca, None).unwrap();
        ureq::AgentBuilder::new()
            .tls_config(Arc::new(cfg))
            .timeout(LIMIT)
            .build()
    };
    let created: serde_json::Value = http
        .post(&format!("{client}/api/v1/agents"))
        .send_json(serde_json::json!({"name": "a1", "systems": ["x86_64-linux"]}))
        .unwrap()
        .into_json()
        .unwrap();
    let secret = t.join("a1.secret");
    std::fs::write(&secret, created["secret"].as_str().unwrap()).unwrap();
    let agent_bin = common::kiln_bin().with_file_name("kiln-agent");
    assert!(
        agent_bin.exists(),
        "build the workspace: {} is missing",
        agent_bin.display()
    );
    let run_agent = |tag: &str, ca_file: &Path, cert: bool| {
        let mut cmd = Command::new(&agent_bin);
        cmd.arg("--coordinator")
            .arg(&agent)
            .args(["--name", "a1", "--system", "x86_64-linux"])
            .arg("--secret-file")
            .arg(&secret)
            .arg("--store-dir")
            .arg(&store)
            .arg("--state-dir")
            .arg(t.join(format!("agent-{tag}")))
            .arg("--ca-file")
            .arg(ca_file);
        if cert {
            cmd.arg("--client-cert")
                .arg(good.join("agent.pem"))
                .arg("--client-key")
                .arg(good.join("agent-key.pem"));
        }
        let log = t.join(format!("agent-{tag}.log"));
        let mut p = kiln::client::procs::Processes::default();
        p.spawn(tag, cmd, &log).unwrap();
        (p, log)
    };
    let read = |log: &Path| std::fs::read_to_string(log).unwrap_or_default();
    let (mut p, log) = run_agent("wrong-ca", &wrong.join("ca.pem"), true);
    wait_for("the wrong-CA agent's error", LIMIT, || {
        let l = read(&log);
        (l.contains("certificate") && l.contains("check --ca-file")).then_some(())
    });
    p.kill_all();
    let (mut p, log) = run_agent("no-cert", &ca, false);
    wait_for("the certificate-less agent's error", LIMIT, || {
        let l = read(&log);
        l.contains("call failed, retrying").then_some(())
    });
    p.kill_all();
    let agents_status = || -> Option<String> {
        let v: serde_json::Value = http
            .get(&format!("{client}/api/v1/agents"))
            .call()
            .ok()?
            .into_json()
            .ok()?;
        Some(v[0]["status"].as_str()?.to_string())
    };
    assert_eq!(agents_status().as_deref(), Some("never-seen"));
    let (mut p, _) = run_agent("good", &ca, true);
    wait_for(
        "the agent with the right CA and certificate to connect",
        LIMIT,
        || (agents_status().as_deref() == Some("connected")).then_some(()),
    );
    p.kill_all();

    // Reload: the next CA's certificate is not served yet; after replacing the files and
    // SIGHUP it is, to new connections, and the old CA is no longer enough.
    let builds = format!("{client}/api/v1/builds");
    let next_ca = next.join("ca.pem");
    assert!(get_tls(&builds, &next_ca, None).is_err());
    assert_eq!(get_tls(&builds, &ca, None), Ok(200));
    std::fs::copy(next.join("server.pem"), &cert).unwrap();
    std::fs::copy(next.join("server-key.pem"), &key).unwrap();
    unsafe { libc::kill(c.pid(), libc::SIGHUP) };
    wait_for("the reloaded certificate", LIMIT, || {
        get_tls(&builds, &next_ca, None).ok()
    });
    assert_eq!(get_tls(&builds, &next_ca, None), Ok(200));
    assert!(get_tls(&builds, &ca, None).is_err());
    assert!(
        c.log().contains("reloaded the TLS certificate"),
        "{}",
        c.log()
    );
    // A broken file on the next SIGHUP keeps the current certificate in service.
    std::fs::write(&cert, "not a certificate").unwrap();
    unsafe { libc::kill(c.pid(), libc::SIGHUP) };
    wait_for("the reload failure in the log", LIMIT, || {
        c.log()
            .contains("failed to reload the TLS certificate")
            .then_some(())
    });
    assert_eq!(get_tls(&builds, &next_ca, None), Ok(200));
    c.stop();
}
