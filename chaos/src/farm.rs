//! The real processes of one run: a `kiln coordinator` on a state dir of the run, and N
//! `kiln-agent` processes, each talking to the coordinator through its own proxy. Every
//! process can be SIGKILLed and started again on the same state (the coordinator on the same
//! ports, so the proxies and the client keep their addresses). With [`Farm::enable_tls`]
//! both of the coordinator's listeners serve TLS with certificates `kiln tls init` made, and
//! everything the run sends them trusts that CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kiln::client::demo::Binaries;
use kiln::client::http::Client;

use crate::procs::{log_tail, Child};
use crate::scenario::{AgentsSpec, CoordinatorSpec};

/// How long a coordinator may take to write its ready file.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// Event kinds the recording hook runs on (every kind the coordinator writes; a kind an older
/// coordinator does not write never fires).
pub const HOOKED_KINDS: [&str; 11] = [
    "build-submitted",
    "build-allocated",
    "build-started",
    "build-succeeded",
    "build-failed",
    "build-canceled",
    "lease-expired",
    "lease-readopted",
    "agent-lost",
    "agent-created",
    "source-added",
];

/// One agent: its identity, its state dir (kept across restarts) and its current process.
pub struct Agent {
    /// `agent-3` for the third.
    pub name: String,
    pub id: u64,
    pub systems: Vec<String>,
    pub secret: PathBuf,
    pub state: PathBuf,
    /// Where it talks to the coordinator: its proxy.
    pub coordinator_url: String,
    pub metrics_addr: SocketAddr,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// Processes started so far.
    pub incarnations: u32,
}

/// The coordinator and the agents of a run.
pub struct Farm {
    bins: Binaries,
    dir: PathBuf,
    pub store: PathBuf,
    pub state: PathBuf,
    config: PathBuf,
    ready: PathBuf,
    pub log: PathBuf,
    coordinator: Option<Child>,
    /// Ports picked by the first start, reused by every restart.
    pub agent_addr: Option<SocketAddr>,
    pub client_addr: Option<SocketAddr>,
    pub agents: Vec<Agent>,
    pub coordinator_starts: u32,
    /// The admin client token, made offline before the first start: the run goes through
    /// client authentication as a real deployment does.
    pub token: String,
    /// Set by [`Farm::enable_tls`].
    pub tls: Option<FarmTls>,
}

/// The certificate set of a TLS run (`kiln tls init`, in `<run dir>/tls/`).
#[derive(Clone)]
pub struct FarmTls {
    /// The CA everything trusts (`ca.pem`).
    pub ca: PathBuf,
    /// The server certificate and key (for `localhost` and `127.0.0.1`): the coordinator's
    /// listeners serve it, and so do the proxies (agents dial them on 127.0.0.1).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A client config trusting only `ca`, for the harness's own HTTPS calls.
    pub client_config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
}

/// What a coordinator writes to its ready file.
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

impl Farm {
    /// Write the coordinator's config; nothing is started yet.
    pub fn new(
        bins: Binaries,
        dir: &Path,
        store: &Path,
        spec: &CoordinatorSpec,
        hook_file: &Path,
        signing_key: &Path,
    ) -> anyhow::Result<Farm> {
        let config = dir.join("coordinator.toml");
        let state = dir.join("state");
        let hook_cmd = format!(
            "echo \"$KILN_EVENT_ID $KILN_EVENT\" >> '{}'",
            hook_file.display()
        );
        let kinds: Vec<String> = HOOKED_KINDS.iter().map(|k| format!("{k:?}")).collect();
        let text = format!(
            "# Written by kiln-chaos; keys in docs/configuration.md.\n\
             state_dir = {state}\nstore_dir = {store}\nsigning_key_file = {key}\n\n\
             [timeouts]\nheartbeat_interval_ms = {hb}\nagent_timeout_ms = {to}\n{extra_timeouts}\n\n\
             [store]\n# Off, so that a missing flush shows up as lost data after a SIGKILL.\n\
             background_flush_ms = 0\n\n\
             [[hooks]]\nname = \"chaos-record\"\nevents = [{kinds}]\nexec = [\"/bin/sh\", \"-c\", {cmd}]\n\
             parallelism = 4\nmax_attempts = 20\ntimeout_ms = 30000\n\n{extra}\n",
            state = toml_str(&state)?,
            store = toml_str(store)?,
            key = toml_str(signing_key)?,
            hb = spec.heartbeat_ms,
            to = spec.agent_timeout_ms,
            extra_timeouts = spec.extra_timeouts,
            kinds = kinds.join(", "),
            cmd = toml::Value::String(hook_cmd),
            extra = spec.extra_config,
        );
        std::fs::write(&config, text)
            .with_context(|| format!("failed to write {}", config.display()))?;
        let token =
            kiln::client::cli::create_token_offline(&state, "chaos", kiln::protocol::Scope::Admin)?
                .token;
        Ok(Farm {
            bins,
            dir: dir.to_path_buf(),
            store: store.to_path_buf(),
            state,
            config,
            ready: dir.join("ready.json"),
            log: dir.join("logs").join("coordinator.log"),
            coordinator: None,
            agent_addr: None,
            client_addr: None,
            agents: Vec::new(),
            coordinator_starts: 0,
            token,
            tls: None,
        })
    }

    /// Turn TLS on, before the first start: `kiln tls init <dir>/tls` (the real command) makes
    /// a CA and a server certificate for `localhost` and `127.0.0.1`, the coordinator's config
    /// gets a `[tls]` table serving it on both listeners, agents get `--ca-file`, and the
    /// harness's own calls trust that CA.
    pub fn enable_tls(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.join("tls");
        let out = Command::new(&self.bins.kiln)
            .args(["tls", "init"])
            .arg(&dir)
            .args(["--name", "localhost", "--name", "127.0.0.1"])
            .output()
            .with_context(|| format!("failed to run {} tls init", self.bins.kiln.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "kiln tls init {} failed ({}): {}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let (ca, cert, key) = (
            dir.join("ca.pem"),
            dir.join("server.pem"),
            dir.join("server-key.pem"),
        );
        let table = format!(
            "\n# Added by kiln-chaos for a TLS run (docs/chaos.md, \"TLS\").\n[tls]\ncert_file = {}\nkey_file = {}\n",
            toml_str(&cert)?,
            toml_str(&key)?
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)
            .with_context(|| format!("failed to open {}", self.config.display()))?;
        std::io::Write::write_all(&mut f, table.as_bytes())
            .with_context(|| format!("failed to append [tls] to {}", self.config.display()))?;
        let client_config = std::sync::Arc::new(kiln::http::tls::client_config(&ca, None)?);
        self.tls = Some(FarmTls {
            ca,
            cert,
            key,
            client_config,
        });
        Ok(())
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn client_url(&self) -> String {
        self.client_addr
            .map(|a| format!("{}://{a}", self.scheme()))
            .unwrap_or_default()
    }

    pub fn agent_url(&self) -> String {
        self.agent_addr
            .map(|a| format!("{}://{a}", self.scheme()))
            .unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        let url = self.client_url();
        let token = Some(self.token.clone());
        match &self.tls {
            // The CA was read once already (enable_tls); a failure now is a file removed
            // under the run, and the calls then fail saying the certificate is not trusted.
            Some(t) => Client::with_ca(&url, token.clone(), Some(&t.ca))
                .unwrap_or_else(|_| Client::new(&url, token)),
            None => Client::new(&url, token),
        }
    }

    /// A ureq agent for the run's own calls (plain HTTP, and HTTPS trusting the run's CA).
    pub fn http(&self, connect: Duration, timeout: Duration) -> ureq::Agent {
        let b = ureq::AgentBuilder::new()
            .timeout_connect(connect)
            .timeout(timeout);
        match &self.tls {
            Some(t) => b.tls_config(t.client_config.clone()),
            None => b,
        }
        .build()
    }

    /// Start the coordinator (on the ports of its first start, after that) and wait for its
    /// ready file.
    pub fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.ready);
        let (listen, client) = match (self.agent_addr, self.client_addr) {
            (Some(a), Some(c)) => (a.to_string(), c.to_string()),
            _ => ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()),
        };
        let mut cmd = Command::new(&self.bins.kiln);
        cmd.arg("coordinator")
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--listen", &listen, "--client-listen", &client])
            .arg("--ready-file")
            .arg(&self.ready)
            .env("KILN_LOG", "info");
        self.coordinator_starts += 1;
        let mut child = Child::spawn("coordinator", cmd, &self.log)?;
        let deadline = Instant::now() + READY_DEADLINE;
        let ready = loop {
            if let Ok(bytes) = std::fs::read(&self.ready) {
                if let Ok(r) = serde_json::from_slice::<Ready>(&bytes) {
                    break r;
                }
            }
            if let Some(st) = child.exited() {
                anyhow::bail!(
                    "the coordinator exited ({st}) before it was ready; the end of {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log, 30)
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the coordinator did not write {} within {} s",
                self.ready.display(),
                READY_DEADLINE.as_secs()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let parse = |s: &str| -> anyhow::Result<SocketAddr> {
            s.parse()
                .with_context(|| format!("the ready file names {s:?}, not an address"))
        };
        self.agent_addr = Some(parse(&ready.listen)?);
        self.client_addr = Some(parse(&ready.client_listen)?);
        self.coordinator = Some(child);
        Ok(())
    }

    /// SIGKILL the coordinator.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.kill();
        }
    }

    /// SIGTERM the coordinator and wait for it (SIGKILL after `grace`); true on a clean exit.
    pub fn stop_coordinator(&mut self, grace: Duration) -> bool {
        match self.coordinator.take() {
            Some(mut c) => c.stop(grace).is_some_and(|st| st.success()),
            None => true,
        }
    }

    /// The coordinator exited without being asked: how, and the end of its log.
    pub fn coordinator_crashed(&mut self) -> Option<String> {
        let c = self.coordinator.as_mut()?;
        let st = c.exited()?;
        self.coordinator = None;
        Some(format!(
            "the coordinator exited by itself ({st}); the end of its log:\n{}",
            log_tail(&self.log, 30)
        ))
    }

    pub fn coordinator_running(&self) -> bool {
        self.coordinator.is_some()
    }

    /// Register `spec.count` agents with the coordinator; `urls[i]` is where agent i talks to
    /// it (its proxy).
    pub fn create_agents(
        &mut self,
        spec: &AgentsSpec,
        system: &str,
        urls: &[String],
    ) -> anyhow::Result<()> {
        let client = self.client();
        for i in 1..=spec.count {
            let name = format!("agent-{i}");
            let alt = crate::graph::ALT_SYSTEM.to_string();
            let systems = if spec.alt_only_agents.contains(&i) {
                vec![alt]
            } else if spec.alt_agents.contains(&i) {
                vec![system.to_string(), alt]
            } else {
                vec![system.to_string()]
            };
            let created = kiln::client::cli::create_agent(&client, &name, &systems)
                .with_context(|| format!("failed to create {name}"))?;
            let secret = self.dir.join(format!("{name}.secret"));
            kiln::client::cli::write_secret(&secret, &created.secret)?;
            let state = self.dir.join("agents").join(&name);
            std::fs::create_dir_all(&state)
                .with_context(|| format!("failed to create {}", state.display()))?;
            let metrics_addr = free_port()?;
            self.agents.push(Agent {
                log: self.dir.join("logs").join(format!("{name}.log")),
                name,
                id: created.id,
                systems,
                secret,
                state,
                coordinator_url: urls
                    .get(i - 1)
                    .cloned()
                    .with_context(|| format!("no proxy for agent {i}"))?,
                metrics_addr,
                child: None,
                incarnations: 0,
            });
        }
        Ok(())
    }

    /// Start agent `i` (0-based) with `spec`'s parallelism.
    pub fn start_agent(&mut self, i: usize, spec: &AgentsSpec) -> anyhow::Result<()> {
        let store = self.store.clone();
        let bin = self
            .bins
            .agent
            .clone()
            .context("kiln-agent was not found next to kiln-chaos or in KILN_BIN_DIR")?;
        let ca = self.tls.as_ref().map(|t| t.ca.clone());
        let a = &mut self.agents[i];
        let mut cmd = Command::new(bin);
        cmd.arg("--coordinator")
            .arg(&a.coordinator_url)
            .args(["--name", &a.name])
            .arg("--secret-file")
            .arg(&a.secret);
        for s in &a.systems {
            cmd.args(["--system", s]);
        }
        cmd.arg("--store-dir")
            .arg(&store)
            .arg("--state-dir")
            .arg(&a.state)
            .args(["--executor", "native"])
            .args([
                "--max-parallel-builds",
                &spec.max_parallel_builds.to_string(),
            ])
            .args([
                "--max-parallel-uploads",
                &spec.max_parallel_uploads.to_string(),
            ])
            .args(["--metrics-addr", &a.metrics_addr.to_string()])
            .env("RUST_LOG", "info");
        if let Some(ca) = ca {
            cmd.arg("--ca-file").arg(ca);
        }
        a.incarnations += 1;
        a.child = Some(Child::spawn(&a.name, cmd, &a.log)?);
        Ok(())
    }

    /// SIGKILL agent `i` (its builders die with it: parent-death signal).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].child.take() {
            c.kill();
        }
    }

    /// SIGTERM every agent, SIGKILL after `grace`.
    pub fn stop_agents(&mut self, grace: Duration) {
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                c.stop(grace);
            }
        }
    }

    /// Agents that exited without being asked: (index, how, the end of the log). They are
    /// forgotten, so the caller may start them again.
    pub fn crashed_agents(&mut self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (i, a) in self.agents.iter_mut().enumerate() {
            let Some(c) = a.child.as_mut() else { continue };
            if let Some(st) = c.exited() {
                a.child = None;
                out.push((
                    i,
                    format!(
                        "{} exited by itself ({st}); the end of its log:\n{}",
                        a.name,
                        log_tail(&a.log, 20)
                    ),
                ));
            }
        }
        out
    }

    /// Kill everything still running.
    pub fn kill_all(&mut self) {
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                c.kill();
            }
        }
        self.kill_coordinator();
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A loopback port free right now (the agent binds it a moment later).
fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("failed to find a free port")?;
    l.local_addr().context("failed to read a bound address")
}
