//! Shared support for the integration tests: a real `kiln coordinator` process on loopback
//! (`:0` ports, ready file), deadline pollers, `kiln state dump`, and derivations with
//! correct store paths; [`transfer`]: builds held by a hand-played agent and raw HTTP.

#![allow(dead_code)]

pub mod transfer;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::derivation::store_path::StoreDir;
use kiln::derivation::{Derivation, DerivationOutput, PathComputer, StorePath};

pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// Poll `f` until it returns `Some`, or panic after `limit` naming `what`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real coordinator process; killed when dropped.
pub struct Coordinator {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    /// Agent listener base URL.
    pub agent_url: String,
    /// Client listener base URL.
    pub client_url: String,
}

impl Coordinator {
    /// Start with the test defaults (sled's background flush OFF) plus `extra` TOML.
    pub fn start(dir: &Path, store_dir: &Path, extra: &str) -> Coordinator {
        let config = dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "store_dir = {:?}\n{extra}\n[store]\nbackground_flush_ms = 0\n",
                store_dir.display().to_string()
            ),
        )
        .unwrap();
        let mut c = Coordinator {
            child: None,
            dir: dir.to_path_buf(),
            state_dir: dir.join("state"),
            config,
            agent_url: String::new(),
            client_url: String::new(),
        };
        c.spawn();
        c
    }

    pub fn spawn(&mut self) {
        let ready = self.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("coordinator.log"))
            .unwrap();
        let child = Command::new(kiln_bin())
            .args([
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--client-listen",
                "127.0.0.1:0",
            ])
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--ready-file")
            .arg(&ready)
            .env("KILN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kiln coordinator");
        self.child = Some(child);
        let v: serde_json::Value = wait_for(
            "the coordinator's ready file",
            Duration::from_secs(30),
            || {
                if let Some(st) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!(
                        "coordinator exited early with {st}: see {}",
                        self.dir.join("coordinator.log").display()
                    );
                }
                let text = std::fs::read_to_string(&ready).ok()?;
                serde_json::from_str(&text).ok()
            },
        );
        self.agent_url = format!("http://{}", v["listen"].as_str().unwrap());
        self.client_url = format!("http://{}", v["client_listen"].as_str().unwrap());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait().unwrap();
            assert!(
                st.success(),
                "coordinator did not exit cleanly on SIGTERM: {st}"
            );
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.client_url)
    }

    pub fn agent(&self, path: &str) -> String {
        format!("{}{path}", self.agent_url)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `kiln state dump` of a stopped coordinator's state dir.
pub fn state_dump(state_dir: &Path) -> String {
    let out = Command::new(kiln_bin())
        .args(["state", "dump", "--state-dir"])
        .arg(state_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "state dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// POST JSON; returns (status, body).
pub fn post(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    response(ureq::post(url).send_json(body.clone()))
}

pub fn get(url: &str) -> (u16, serde_json::Value) {
    response(ureq::get(url).call())
}

pub fn response(r: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
    match r {
        Ok(resp) => {
            let code = resp.status();
            let text = resp.into_string().unwrap_or_default();
            (
                code,
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
            )
        }
        Err(ureq::Error::Status(code, resp)) => {
            let text = resp.into_string().unwrap_or_default();
            (
                code,
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
            )
        }
        Err(e) => panic!("request failed: {e}"),
    }
}

/// A derivation with no inputs whose paths are what Nix computes; returns its `.drv` path and
/// bytes.
pub fn simple_drv(store_dir: &StoreDir, name: &str, script: &str) -> (String, Vec<u8>) {
    system_drv(store_dir, name, "x86_64-linux", script)
}

/// [`simple_drv`] for another system (`aarch64-linux`, `i586-gnu`, `builtin`, ...).
pub fn system_drv(
    store_dir: &StoreDir,
    name: &str,
    system: &str,
    script: &str,
) -> (String, Vec<u8>) {
    let mut drv = Derivation {
        outputs: vec![(b"out".to_vec(), DerivationOutput::default())],
        input_drvs: vec![],
        input_srcs: vec![],
        platform: system.as_bytes().to_vec(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), script.as_bytes().to_vec()],
        env: vec![
            (b"builder".to_vec(), b"/bin/sh".to_vec()),
            (b"name".to_vec(), name.as_bytes().to_vec()),
            (b"out".to_vec(), Vec::new()),
            (b"system".to_vec(), system.as_bytes().to_vec()),
        ],
    };
    let mut loader =
        |p: &StorePath| -> anyhow::Result<Derivation> { anyhow::bail!("no inputs: {p}") };
    let mut pc = PathComputer::new(store_dir.clone(), &mut loader);
    let paths = pc.output_paths(&drv).unwrap();
    let out = store_dir.full_path(paths[0].1.as_ref().unwrap());
    drv.outputs[0].1.path = out.clone().into_bytes();
    drv.env[2].1 = out.into_bytes();
    let path = store_dir.full_path(&kiln::derivation::paths::drv_path(store_dir, &drv).unwrap());
    (path, drv.print())
}

/// Base64 as the protocol sends bytes.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
