//! A real `kiln coordinator` for load runs: its own state dir and store dir in a work
//! directory, both listeners on `127.0.0.1:0` (the ports come from its ready file), a
//! registration token for the simulated agents, production defaults otherwise (sled's
//! background flush on, no fsync) plus whatever TOML the caller adds. Started as a
//! [`Child`](crate::procs::Child): its own process group, killed with the harness.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::procs::{log_tail, Child};

/// How long a coordinator may take to write its ready file.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// A running coordinator.
pub struct LoadCoordinator {
    child: Child,
    pub pid: i32,
    pub agent_url: String,
    pub client_url: String,
    pub store_dir: PathBuf,
    pub state_dir: PathBuf,
    /// The token simulated agents register with.
    pub registration_token: String,
    pub log: PathBuf,
}

#[derive(serde::Deserialize)]
struct Ready {
    listen: String,
    client_listen: String,
}

fn toml_str(p: &Path) -> anyhow::Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))?;
    Ok(toml::Value::String(s.to_string()).to_string())
}

impl LoadCoordinator {
    /// Write the config into `dir` and start `kiln` on it; `extra` is appended to the config.
    pub fn start(kiln: &Path, dir: &Path, extra: &str) -> anyhow::Result<LoadCoordinator> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let store_dir = dir.join("store");
        std::fs::create_dir_all(&store_dir)
            .with_context(|| format!("failed to create {}", store_dir.display()))?;
        let token_file = dir.join("agents.token");
        let registration_token = kiln::derivation::Hash::sha256(
            format!("kiln-chaos load {} {:?}", dir.display(), Instant::now()).as_bytes(),
        )
        .to_base16();
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&token_file)
                .with_context(|| format!("failed to write {}", token_file.display()))?;
            f.write_all(registration_token.as_bytes())
                .with_context(|| format!("failed to write {}", token_file.display()))?;
        }
        let config = dir.join("coordinator.toml");
        let text = format!(
            "# Written by kiln-chaos load; keys in docs/configuration.md.\n\
             store_dir = {store}\n\n\
             [[registration_tokens]]\ntoken_file = {token}\n\n{extra}\n",
            store = toml_str(&store_dir)?,
            token = toml_str(&token_file)?,
        );
        std::fs::write(&config, text)
            .with_context(|| format!("failed to write {}", config.display()))?;
        LoadCoordinator::launch(kiln, dir, &config, store_dir, registration_token, false)
    }

    /// Start `kiln coordinator` on a config the caller wrote (the `farm` benchmark writes its
    /// own: an older coordinator refuses keys it does not know) with the state dir
    /// `<dir>/state`, and wait for its ready file. `https`: the listeners serve TLS, so the
    /// URLs say `https://`.
    pub fn launch(
        kiln: &Path,
        dir: &Path,
        config: &Path,
        store_dir: PathBuf,
        registration_token: String,
        https: bool,
    ) -> anyhow::Result<LoadCoordinator> {
        let state_dir = dir.join("state");
        let ready = dir.join("ready.json");
        let log = dir.join("coordinator.log");
        let mut cmd = Command::new(kiln);
        cmd.arg("coordinator")
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--listen", "127.0.0.1:0", "--client-listen", "127.0.0.1:0"])
            .arg("--ready-file")
            .arg(&ready)
            .env("KILN_LOG", "warn");
        let mut child = Child::spawn("coordinator", cmd, &log)?;
        let scheme = if https { "https" } else { "http" };
        let deadline = Instant::now() + READY_DEADLINE;
        // Bounded by READY_DEADLINE.
        let r = loop {
            if let Ok(bytes) = std::fs::read(&ready) {
                if let Ok(r) = serde_json::from_slice::<Ready>(&bytes) {
                    break r;
                }
            }
            if let Some(st) = child.exited() {
                anyhow::bail!(
                    "the coordinator exited ({st}) before it was ready; the end of {}:\n{}",
                    log.display(),
                    log_tail(&log, 30)
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the coordinator did not write {} within {} s; see {}",
                ready.display(),
                READY_DEADLINE.as_secs(),
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(LoadCoordinator {
            pid: child.pid(),
            child,
            agent_url: format!("{scheme}://{}", r.listen),
            client_url: format!("{scheme}://{}", r.client_listen),
            store_dir,
            state_dir,
            registration_token,
            log,
        })
    }

    /// SIGTERM, wait up to `grace` (then SIGKILL); true on a clean exit.
    pub fn stop(mut self, grace: Duration) -> bool {
        self.child.stop(grace).is_some_and(|st| st.success())
    }

    /// Resident memory now, from `/proc/PID/status` (`VmRSS`), in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}
