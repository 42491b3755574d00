//! The coordinator's configuration: one TOML file, every key documented in
//! `docs/configuration.md`. Command-line flags override the file; every key has a default, so
//! an empty file (or none) gives a working coordinator.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Agents, substitutes and `/metrics`.
    pub listen: String,
    /// Client API, events and the activity page.
    pub client_listen: String,
    /// Where sled and the NAR cache live.
    pub state_dir: PathBuf,
    /// The store directory of the derivations this coordinator builds. When unset: the
    /// `KILN_STORE_DIR` environment variable, else the store dir of the first accepted
    /// submission (which must be `/gnu/store` or `/nix/store`), recorded in the state dir.
    pub store_dir: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub store: StoreConfig,
    pub limits: Limits,
    pub supervision: SupervisionConfig,
    pub scheduling: SchedulingConfig,
    /// Quarantine of failing agents and expiry of agents never seen again.
    pub agents: AgentsConfig,
    /// Hooks, each run on the events it names.
    pub hooks: Vec<HookConfig>,
    /// Optional narinfo signing key file (Nix's `name:base64` secret key format, as written
    /// by `kiln key generate` or `nix-store --generate-binary-cache-key`).
    pub signing_key_file: Option<PathBuf>,
    /// Also sign narinfos the way Guix does (a `Signature:` line), with the same key.
    /// Experimental: written as Guix's source describes it, checked against signatures from
    /// Guix's build farms, but not against a running Guix.
    pub guix_signatures: bool,
    /// Registration tokens with which agents may register themselves (besides those made
    /// with `kiln agent registration-token new`).
    pub registration_tokens: Vec<RegistrationTokenConfig>,
    /// The client listener's browser-safety settings.
    pub client_api: ClientApiConfig,
    /// TLS on the listeners (off unless `cert_file` is set).
    pub tls: TlsConfig,
}

/// A registration token from the config file. The token itself stays in its own file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationTokenConfig {
    /// The file holding the token (surrounding whitespace is ignored); readable by the
    /// coordinator's user only (a looser mode is warned about at start).
    pub token_file: PathBuf,
    /// The systems agents registered with it may claim; absent: whatever each claims.
    #[serde(default)]
    pub systems: Option<Vec<String>>,
    /// The tags (`"key=value"`) they may offer; absent: any.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

impl RegistrationTokenConfig {
    /// The tags as (key, value) pairs.
    pub fn tag_pairs(&self) -> anyhow::Result<Option<Vec<(String, String)>>> {
        let Some(tags) = &self.tags else {
            return Ok(None);
        };
        tags.iter()
            .map(|t| match t.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => anyhow::bail!(
                    "registration_tokens: tag {t:?} (token file {}) is not \"key=value\"",
                    self.token_file.display()
                ),
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Some)
    }

    /// Read the token from its file, warning when others may read it.
    pub fn read_token(&self) -> anyhow::Result<String> {
        use anyhow::Context as _;
        let f = &self.token_file;
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("failed to read registration token file {}", f.display()))?;
        let token = text.trim().to_string();
        anyhow::ensure!(
            token.len() >= 32,
            "registration token file {} holds {} characters; a token needs at least 32 (make one with `kiln agent registration-token new --save-to FILE`, or `head -c 32 /dev/urandom | xxd -p -c 64`)",
            f.display(),
            token.len()
        );
        warn_if_others_can_read(f, "registration token");
        Ok(token)
    }
}

/// Secrets in files (signing keys, tokens) should be readable by their owner only: say so
/// when the group or others may read one. A warning, not a refusal: the operator may have a
/// reason (a group that runs the coordinator).
pub fn warn_if_others_can_read(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{mode:o}"),
                "the {what} file can be read by its group or others: run chmod 600 on it"
            );
        }
    }
}

/// `[tls]`: certificates of the listeners. Files are PEM; SIGHUP re-reads them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificate chain of both listeners (unless the client listener has its own); setting
    /// it turns TLS on.
    pub cert_file: Option<PathBuf>,
    /// Private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The client listener's own certificate chain and key, if it should not use `cert_file`.
    pub client_listener_cert_file: Option<PathBuf>,
    pub client_listener_key_file: Option<PathBuf>,
    /// Mutual TLS on the agent listener: every connection must present a client certificate
    /// signed by one of these CA certificates (substitute clients too).
    pub agent_client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether the listeners speak TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

/// `[client_api]`: which names the client listener answers to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientApiConfig {
    /// Host names (or IPs) a request's `Host` may carry besides `localhost`, `127.0.0.1`,
    /// `::1` and the host of `client_listen`; any other `Host` is refused (DNS rebinding).
    pub allowed_hosts: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8745".into(),
            client_listen: "127.0.0.1:8746".into(),
            state_dir: PathBuf::from("./kiln-state"),
            store_dir: None,
            timeouts: Timeouts::default(),
            store: StoreConfig::default(),
            limits: Limits::default(),
            supervision: SupervisionConfig::default(),
            scheduling: SchedulingConfig::default(),
            agents: AgentsConfig::default(),
            hooks: Vec::new(),
            signing_key_file: None,
            guix_signatures: false,
            registration_tokens: Vec::new(),
            client_api: ClientApiConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// How often agents heartbeat.
    pub heartbeat_interval_ms: u64,
    /// An agent silent this long is lost and its leases expire.
    pub agent_timeout_ms: u64,
    /// A lease its agent's heartbeats do not list ends once it was handed to the agent longer
    /// ago than this (the work reply that carried it was lost, or the agent dropped it).
    /// Unset: [`Timeouts::unheld_lease`] picks it.
    pub unheld_lease_ms: Option<u64>,
    /// Longest a work request waits for a build (long poll) when the agent asks it to wait
    /// (`wait_ms`); the agent's own `wait_ms` can only shorten it.
    pub work_wait_max_ms: u64,
    /// A request body (output, log or source upload) from which no byte arrives for this long
    /// is dropped; the bytes of an output upload received so far are kept for resumption.
    pub transfer_stall_ms: u64,
    /// A partial output upload nobody resumed for this long is removed, with its lock (also
    /// at start, judged by the partial file's modification time).
    pub partial_upload_expiry_ms: u64,
    /// A connection must deliver a complete request head (line and headers) within this long
    /// of opening (or of its last request), else it is closed (both listeners).
    pub request_header_ms: u64,
}

impl Timeouts {
    /// The unheld-lease bound in effect: as set, else two heartbeat intervals but never under
    /// 30 s, the agent's request timeout (how long a work reply can still be on its way).
    pub fn unheld_lease(&self) -> u64 {
        self.unheld_lease_ms
            .unwrap_or((2 * self.heartbeat_interval_ms).max(30_000))
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            heartbeat_interval_ms: 10_000,
            agent_timeout_ms: 60_000,
            unheld_lease_ms: None,
            work_wait_max_ms: 20_000,
            transfer_stall_ms: 60_000,
            partial_upload_expiry_ms: 24 * 3600 * 1000,
            request_header_ms: 10_000,
        }
    }
}

/// `[agents]`: quarantine after consecutive infrastructure failures, and expiry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// Consecutive infrastructure failures (lost leases, setup or upload failures) after which
    /// an agent is quarantined; 0 turns quarantine off.
    pub quarantine_after: u32,
    /// The first quarantine's length; each further one without a success in between doubles.
    pub quarantine_ms: u64,
    /// The longest quarantine.
    pub quarantine_max_ms: u64,
    /// Agents not seen for this long are removed (credentials revoked); 0 = never.
    pub expire_after_ms: u64,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            quarantine_after: 3,
            quarantine_ms: 60_000,
            quarantine_max_ms: 3_600_000,
            expire_after_ms: 30 * 24 * 3600 * 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// sled's periodic background flush, in ms; 0 turns it off (every acknowledged write is
    /// flushed by the committer anyway; tests run with 0 so a missing flush shows).
    pub background_flush_ms: u64,
    /// `fdatasync` the database after each group commit, for power-loss durability. Off by
    /// default: sled's flush survives a process crash (SIGKILL), not a power cut.
    pub fsync: bool,
    /// sled's page cache, in MiB (not an RSS limit).
    pub cache_capacity_mb: u64,
    /// Most writes folded into one group commit.
    pub max_batch: usize,
    /// Most writes waiting for the committer; a write beyond it is refused at once with 503
    /// and `Retry-After`.
    pub max_queued: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            background_flush_ms: 1000,
            fsync: false,
            cache_capacity_mb: 64,
            max_batch: 1024,
            max_queued: 8192,
        }
    }
}

/// How builds are matched to agents (docs/configuration.md, `[scheduling]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulingConfig {
    /// Tag keys that constrain agents: a build tag with one of these keys goes only to an
    /// agent that offers (or requires) that tag with the same value. Other tags are
    /// information only.
    pub matched_tags: Vec<String>,
    /// Rules that set or raise a build's own priority at submission, applied in order.
    pub priority_rules: Vec<PriorityRule>,
    /// Automatic retries of failed attempts (`[scheduling.retries]`).
    pub retries: RetryConfig,
}

/// `[scheduling.retries]`: how often a build is put back in the queue after a failed attempt,
/// and how long it waits before it is offered again (docs/runtime-semantics.md, "Retries").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries after infrastructure failures (agent lost or disconnected, lease not held,
    /// setup or upload failure reported by the agent). The next failure fails the build.
    pub infrastructure: u32,
    /// Retries after builder failures (the agent reported the build itself failed).
    pub builder: u32,
    /// The wait before the second retry; the first retry is offered at once, each later one
    /// waits twice as long as the one before, up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    /// The longest wait between retries.
    pub backoff_max_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> RetryConfig {
        RetryConfig {
            infrastructure: 3,
            builder: 0,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 60_000,
        }
    }
}

impl RetryConfig {
    /// How long the build waits before retry number `retry` (1 = the first): none for the
    /// first, then `backoff_initial_ms` doubled per retry, capped by `backoff_max_ms`.
    pub fn backoff_ms(&self, retry: u32) -> u64 {
        if retry <= 1 {
            return 0;
        }
        let doublings = (retry - 2).min(32);
        self.backoff_initial_ms
            .saturating_mul(1u64 << doublings)
            .min(self.backoff_max_ms)
    }
}

/// `[[scheduling.priority_rules]]`: when every matcher given matches a submitted build, set
/// its priority (`priority`) or add to it (`add`). At least one matcher, exactly one action.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PriorityRule {
    /// The build's system, exactly (`i586-gnu`).
    pub system: Option<String>,
    /// A tag the build carries, `key=value`.
    pub tag: Option<String>,
    /// A glob (`*`, `?`) on the derivation's name: its file name without the hash and
    /// `.drv` (`linux-libre-*`).
    pub name: Option<String>,
    /// Set the priority to this.
    pub priority: Option<i32>,
    /// Add this to the priority (saturating).
    pub add: Option<i32>,
}

impl PriorityRule {
    /// Does the rule match a build of `system` with `tags` and `.drv` path `drv_path`?
    pub fn matches(&self, system: &str, tags: &[(String, String)], drv_path: &str) -> bool {
        if self.system.as_deref().is_some_and(|s| s != system) {
            return false;
        }
        if let Some(t) = &self.tag {
            let Some((k, v)) = t.split_once('=') else {
                return false;
            };
            if !tags.iter().any(|(tk, tv)| tk == k && tv == v) {
                return false;
            }
        }
        if let Some(g) = &self.name {
            if !glob_matches(g, drv_name(drv_path)) {
                return false;
            }
        }
        true
    }

    fn check(&self, i: usize) -> anyhow::Result<()> {
        let at = format!("scheduling.priority_rules[{i}]");
        anyhow::ensure!(
            self.system.is_some() || self.tag.is_some() || self.name.is_some(),
            "{at} matches nothing: give at least one of system, tag or name"
        );
        anyhow::ensure!(
            self.priority.is_some() != self.add.is_some(),
            "{at} must have exactly one of priority (set) or add (raise by), not {}",
            if self.priority.is_some() {
                "both"
            } else {
                "neither"
            }
        );
        if let Some(t) = &self.tag {
            anyhow::ensure!(
                t.split_once('=').is_some_and(|(k, _)| !k.is_empty()),
                "{at}: tag {t:?} is not key=value (e.g. tag = \"origin=ci\")"
            );
        }
        if let Some(s) = &self.system {
            anyhow::ensure!(!s.is_empty(), "{at}: system is empty");
        }
        if let Some(n) = &self.name {
            anyhow::ensure!(
                !n.is_empty() && !n.contains('/'),
                "{at}: name {n:?} must be a non-empty glob on the derivation name, without '/' (e.g. \"linux-libre-*\")"
            );
        }
        Ok(())
    }
}

/// The priority of a build submitted with `base`, after every matching rule, in order.
pub fn apply_priority_rules(
    rules: &[PriorityRule],
    base: i32,
    system: &str,
    tags: &[(String, String)],
    drv_path: &str,
) -> i32 {
    rules
        .iter()
        .filter(|r| r.matches(system, tags, drv_path))
        .fold(base, |p, r| match (r.priority, r.add) {
            (Some(set), _) => set,
            (None, Some(add)) => p.saturating_add(add),
            (None, None) => p,
        })
}

/// The derivation name of a `.drv` path: `/gnu/store/<hash>-hello-2.12.drv` -> `hello-2.12`.
pub fn drv_name(drv_path: &str) -> &str {
    let file = drv_path.rsplit('/').next().unwrap_or(drv_path);
    let file = file.strip_suffix(".drv").unwrap_or(file);
    file.split_once('-').map_or(file, |(_, name)| name)
}

/// A glob with `*` (any run of characters) and `?` (one character), matched in full.
/// Iterative with one backtrack point: O(pattern × text) at worst.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The restart intensity: past `max_restarts` restarts of one actor within `window_s`, the
/// coordinator shuts down with a non-zero exit instead of restarting it again.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    pub max_restarts: u32,
    pub window_s: u64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            max_restarts: 5,
            window_s: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest `POST /api/v1/builds` body, in MiB.
    pub submit_body_mb: u64,
    /// Largest source NAR (`PUT /api/v1/sources`), in MiB.
    pub source_nar_mb: u64,
    /// Largest compressed output NAR, in MiB.
    pub output_nar_mb: u64,
    /// Largest compressed build log, in MiB.
    pub log_mb: u64,
    /// Largest build log once decompressed, in MiB (checked by streaming at upload).
    pub log_decompressed_mb: u64,
    /// Largest JSON body on the other routes, in KiB.
    pub json_body_kb: u64,
    /// Largest single `.drv` in a submission, in bytes: a submission carrying a bigger one is
    /// refused whole (HTTP 413), before anything of it is stored.
    pub max_drv_bytes: u64,
    /// A request body (any route, both listeners) that averages fewer bytes per second than
    /// this over `min_body_rate_window_ms` is cut (HTTP 408).
    pub min_body_rate_bytes_per_s: u64,
    pub min_body_rate_window_ms: u64,
    /// Output and log uploads one agent may have in progress at once (429 over it).
    pub max_uploads_per_agent: usize,
    /// Output and log uploads in progress at once, in all (503 over it).
    pub max_uploads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            submit_body_mb: 64,
            source_nar_mb: 1024,
            output_nar_mb: 16 * 1024,
            log_mb: 64,
            log_decompressed_mb: 1024,
            json_body_kb: 256,
            max_drv_bytes: 1 << 20,
            min_body_rate_bytes_per_s: 1024,
            min_body_rate_window_ms: 30_000,
            max_uploads_per_agent: 8,
            max_uploads: 256,
        }
    }
}

/// One hook: a command run for each event it names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Unique name; keys its durable queue.
    pub name: String,
    /// Event kinds (`build-submitted`, `build-started`, `build-succeeded`, `build-failed`,
    /// `build-canceled`, `agent-lost`, ...).
    pub events: Vec<String>,
    /// Program and arguments. The event is on stdin as JSON; `KILN_EVENT`, `KILN_EVENT_ID`,
    /// `KILN_BUILD_ID` are in the environment. Exit 0 = done.
    pub exec: Vec<String>,
    /// Runs of this hook at once.
    #[serde(default = "one")]
    pub parallelism: usize,
    /// Attempts before the event goes to the dead-letter list.
    #[serde(default = "five")]
    pub max_attempts: u32,
    /// A run over this is killed and counts as a failed attempt.
    #[serde(default = "five_minutes")]
    pub timeout_ms: u64,
}

fn one() -> usize {
    1
}
fn five() -> u32 {
    5
}
fn five_minutes() -> u64 {
    300_000
}

impl Config {
    /// Read a config file; an absent path gives the defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        use anyhow::Context as _;
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read config file {}", path.display()))?;
        let config: Config = toml::from_str(&text).with_context(|| {
            format!(
                "config file {} is not valid (see docs/configuration.md)",
                path.display()
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Check what serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for h in &self.hooks {
            anyhow::ensure!(
                names.insert(&h.name),
                "hook name {:?} is used twice: hook names must be unique",
                h.name
            );
            anyhow::ensure!(!h.exec.is_empty(), "hook {:?} has an empty exec", h.name);
            anyhow::ensure!(
                h.parallelism > 0,
                "hook {:?}: parallelism must be at least 1",
                h.name
            );
            anyhow::ensure!(
                h.max_attempts > 0,
                "hook {:?}: max_attempts must be at least 1",
                h.name
            );
        }
        for (i, r) in self.scheduling.priority_rules.iter().enumerate() {
            r.check(i)?;
        }
        let r = &self.scheduling.retries;
        anyhow::ensure!(
            r.backoff_initial_ms <= r.backoff_max_ms,
            "scheduling.retries.backoff_initial_ms is {} but backoff_max_ms is {}: the first wait cannot exceed the longest; raise backoff_max_ms",
            r.backoff_initial_ms,
            r.backoff_max_ms
        );
        let t = &self.timeouts;
        anyhow::ensure!(
            t.agent_timeout_ms >= 1000,
            "timeouts.agent_timeout_ms is {} but must be at least 1000 (1 s): raise it",
            t.agent_timeout_ms
        );
        anyhow::ensure!(
            t.heartbeat_interval_ms > 0 && t.heartbeat_interval_ms < t.agent_timeout_ms,
            "timeouts.heartbeat_interval_ms is {} but must be above 0 and below agent_timeout_ms ({}): an agent would be declared lost between two heartbeats",
            t.heartbeat_interval_ms,
            t.agent_timeout_ms
        );
        if let Some(unheld) = t.unheld_lease_ms {
            anyhow::ensure!(
                unheld >= 1000 && unheld >= 2 * t.heartbeat_interval_ms,
                "timeouts.unheld_lease_ms is {unheld} but must be at least 1000 and at least two heartbeat intervals ({}): a heartbeat sent before a work reply arrived would end that reply's leases",
                2 * t.heartbeat_interval_ms
            );
        }
        anyhow::ensure!(
            self.supervision.window_s > 0,
            "supervision.window_s must be at least 1 (s)"
        );
        anyhow::ensure!(
            self.store.max_queued > 0,
            "store.max_queued must be at least 1"
        );
        anyhow::ensure!(
            self.timeouts.transfer_stall_ms >= 100,
            "timeouts.transfer_stall_ms must be at least 100 (0.1 s)"
        );
        anyhow::ensure!(
            self.timeouts.request_header_ms >= 100,
            "timeouts.request_header_ms must be at least 100 (0.1 s)"
        );
        anyhow::ensure!(
            self.limits.max_drv_bytes >= 1024,
            "limits.max_drv_bytes is {}; it must be at least 1024 (1 KiB: even a trivial derivation is a few hundred bytes)",
            self.limits.max_drv_bytes
        );
        anyhow::ensure!(
            self.limits.min_body_rate_window_ms >= 1000,
            "limits.min_body_rate_window_ms must be at least 1000 (1 s)"
        );
        let tls = &self.tls;
        anyhow::ensure!(
            tls.cert_file.is_some() == tls.key_file.is_some(),
            "tls.cert_file and tls.key_file go together: set both (or neither, for no TLS)"
        );
        anyhow::ensure!(
            tls.client_listener_cert_file.is_some() == tls.client_listener_key_file.is_some(),
            "tls.client_listener_cert_file and tls.client_listener_key_file go together: set both or neither"
        );
        anyhow::ensure!(
            tls.enabled()
                || (tls.client_listener_cert_file.is_none() && tls.agent_client_ca_file.is_none()),
            "tls.client_listener_cert_file and tls.agent_client_ca_file need tls.cert_file and tls.key_file (TLS on): set them"
        );
        anyhow::ensure!(
            self.timeouts.partial_upload_expiry_ms >= 1000,
            "timeouts.partial_upload_expiry_ms must be at least 1000 (1 s)"
        );
        anyhow::ensure!(
            self.agents.quarantine_after == 0 || self.agents.quarantine_ms >= 1000,
            "agents.quarantine_ms is {} but must be at least 1000 (1 s) while quarantine is on: raise it, or set agents.quarantine_after = 0",
            self.agents.quarantine_ms
        );
        for t in &self.registration_tokens {
            t.tag_pairs()?;
            if let Some(s) = &t.systems {
                anyhow::ensure!(
                    !s.is_empty(),
                    "registration_tokens: token file {} has an empty systems list: list systems, or leave systems out to allow any",
                    t.token_file.display()
                );
            }
        }
        anyhow::ensure!(
            !self.guix_signatures || self.signing_key_file.is_some(),
            "guix_signatures = true needs a signing_key_file to sign with"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults_and_unknown_keys_are_refused() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.listen, "0.0.0.0:8745");
        assert_eq!(c.client_listen, "127.0.0.1:8746");
        let err = toml::from_str::<Config>("lissen = 'x'").unwrap_err();
        assert!(err.to_string().contains("lissen"), "{err}");
    }

    /// `[scheduling.retries]`: defaults, keys read, the backoff bound checked.
    #[test]
    fn retries_parse_with_defaults_and_are_validated() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.scheduling.retries, RetryConfig::default());
        assert_eq!(c.scheduling.retries.infrastructure, 3);
        assert_eq!(c.scheduling.retries.builder, 0);
        let c: Config = toml::from_str(
            "[scheduling.retries]\ninfrastructure = 5\nbuilder = 1\nbackoff_initial_ms = 10\nbackoff_max_ms = 30\n",
        )
        .unwrap();
        c.validate().unwrap();
        let r = c.scheduling.retries;
        assert_eq!((r.infrastructure, r.builder), (5, 1));
        assert_eq!(
            (1..=4).map(|n| r.backoff_ms(n)).collect::<Vec<_>>(),
            vec![0, 10, 20, 30]
        );
        let c: Config = toml::from_str(
            "[scheduling.retries]\nbackoff_initial_ms = 5000\nbackoff_max_ms = 1000\n",
        )
        .unwrap();
        let err = format!("{:#}", c.validate().unwrap_err());
        assert!(err.contains("backoff_initial_ms is 5000"), "{err}");
        assert!(toml::from_str::<Config>("[scheduling.retries]\ninfra = 1\n").is_err());
    }

    /// Priority rules: parsed, validated with the rule and the fault named, matched on
    /// system, tag and name glob (all given must match), applied in order (set, then add).
    #[test]
    fn priority_rules_are_validated_and_applied_in_order() {
        let c: Config = toml::from_str(
            r#"
[[scheduling.priority_rules]]
system = "i586-gnu"
priority = 10
[[scheduling.priority_rules]]
name = "linux-libre-*"
tag = "origin=ci"
add = 5
[[scheduling.priority_rules]]
name = "?ello"
add = -1
"#,
        )
        .unwrap();
        c.validate().unwrap();
        let rules = &c.scheduling.priority_rules;
        let ci = vec![("origin".to_string(), "ci".to_string())];
        let kernel = "/gnu/store/0123456789abcdfghijklmnpqrsvwxyz-linux-libre-6.1.drv";
        let apply = |base, system, tags: &[(String, String)], drv| {
            apply_priority_rules(rules, base, system, tags, drv)
        };
        assert_eq!(apply(0, "x86_64-linux", &ci, kernel), 5);
        assert_eq!(
            apply(0, "x86_64-linux", &[], kernel),
            0,
            "the tag must match too"
        );
        assert_eq!(apply(3, "i586-gnu", &ci, kernel), 15, "set, then add");
        assert_eq!(apply(3, "i586-gnu", &[], "/s/h-hello.drv"), 9);
        assert_eq!(apply(3, "x86_64-linux", &[], "/s/h-hello-2.drv"), 3);
        assert_eq!(apply(i32::MAX, "x86_64-linux", &ci, kernel), i32::MAX);
        assert_eq!(drv_name("/gnu/store/abc-hello-2.12.drv"), "hello-2.12");
        assert!(glob_matches("*a*b?", "xxaxxbbc"));
        assert!(!glob_matches("a*", "ba"));
        assert!(glob_matches("*", ""));

        let refused = |body: &str, needle: &str| {
            let c: Config = toml::from_str(body).unwrap();
            let err = format!("{:#}", c.validate().unwrap_err());
            assert!(err.contains(needle), "{err}");
            assert!(err.contains("scheduling.priority_rules[0]"), "{err}");
        };
        refused(
            "[[scheduling.priority_rules]]
priority = 1
",
            "matches nothing",
        );
        refused(
            "[[scheduling.priority_rules]]
system = 'x'
",
            "exactly one of priority (set) or add (raise by), not neither",
        );
        refused(
            "[[scheduling.priority_rules]]
system = 'x'
priority = 1
add = 2
",
            "not both",
        );
        refused(
            "[[scheduling.priority_rules]]
tag = 'origin'
add = 2
",
            "is not key=value",
        );
        refused(
            "[[scheduling.priority_rules]]
name = '/gnu/store/*'
add = 2
",
            "without '/'",
        );
        let err = toml::from_str::<Config>(
            "[[scheduling.priority_rules]]
sytem = 'x'
",
        )
        .unwrap_err();
        assert!(err.to_string().contains("sytem"), "{err}");
    }

    /// Pins the liveness limits: an agent timeout under 1 s, a heartbeat interval not below
    /// the timeout, and an unheld bound under two heartbeats are refused with the value named.
    #[test]
    fn timeouts_are_validated() {
        let c: Config = toml::from_str("").unwrap();
        c.validate().unwrap();
        assert_eq!(c.timeouts.heartbeat_interval_ms, 10_000);
        assert_eq!(c.timeouts.agent_timeout_ms, 60_000);
        assert_eq!(c.timeouts.unheld_lease(), 30_000);
        let slow: Config = toml::from_str("[timeouts]\nheartbeat_interval_ms = 20000\n").unwrap();
        slow.validate().unwrap();
        assert_eq!(
            slow.timeouts.unheld_lease(),
            40_000,
            "two heartbeats when over 30 s"
        );
        let ok: Config = toml::from_str(
            "[timeouts]\nheartbeat_interval_ms = 200\nagent_timeout_ms = 1000\nunheld_lease_ms = 1000\n",
        )
        .unwrap();
        ok.validate().unwrap();
        for (toml, needle) in [
            (
                "agent_timeout_ms = 999\nheartbeat_interval_ms = 100",
                "agent_timeout_ms is 999",
            ),
            (
                "agent_timeout_ms = 5000\nheartbeat_interval_ms = 5000",
                "heartbeat_interval_ms is 5000",
            ),
            (
                "agent_timeout_ms = 5000\nheartbeat_interval_ms = 0",
                "heartbeat_interval_ms is 0",
            ),
            (
                "heartbeat_interval_ms = 1000\nunheld_lease_ms = 1999",
                "unheld_lease_ms is 1999",
            ),
            (
                "heartbeat_interval_ms = 100\nunheld_lease_ms = 999",
                "unheld_lease_ms is 999",
            ),
        ] {
            let c: Config = toml::from_str(&format!("[timeouts]\n{toml}\n")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{toml}: {err}");
        }
    }

    #[test]
    fn supervision_and_queue_limits_parse_and_are_checked() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(
            (c.supervision.max_restarts, c.supervision.window_s),
            (5, 60)
        );
        assert_eq!(c.store.max_queued, 8192);
        let c: Config = toml::from_str(
            "[supervision]\nmax_restarts = 2\nwindow_s = 10\n[store]\nmax_queued = 3\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!((c.supervision.max_restarts, c.store.max_queued), (2, 3));
        let c: Config = toml::from_str("[supervision]\nwindow_s = 0\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("supervision.window_s"), "{err}");
        let c: Config = toml::from_str("[store]\nmax_queued = 0\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("store.max_queued"), "{err}");
    }

    #[test]
    fn registration_tokens_parse_and_are_checked() {
        let c: Config = toml::from_str(
            r#"
            [[registration_tokens]]
            token_file = "/etc/kiln/farm.token"
            systems = ["x86_64-linux"]
            tags = ["big-memory=yes"]
            [[registration_tokens]]
            token_file = "/etc/kiln/any.token"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.registration_tokens[0].tag_pairs().unwrap(),
            Some(vec![("big-memory".into(), "yes".into())])
        );
        assert_eq!(c.registration_tokens[1].systems, None);
        let c: Config =
            toml::from_str("[[registration_tokens]]\ntoken_file = \"/t\"\ntags = [\"nokey\"]\n")
                .unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("nokey"));
        let c: Config = toml::from_str("guix_signatures = true\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("signing_key_file"));
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let t = RegistrationTokenConfig {
            token_file: short,
            systems: None,
            tags: None,
        };
        assert!(t
            .read_token()
            .unwrap_err()
            .to_string()
            .contains("at least 32"));
    }

    #[test]
    fn hooks_parse_with_defaults() {
        let c: Config = toml::from_str(
            r#"
            [[hooks]]
            name = "log"
            events = ["build-succeeded"]
            exec = ["/bin/true"]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.hooks[0].parallelism, 1);
        assert_eq!(c.hooks[0].max_attempts, 5);
    }
}
