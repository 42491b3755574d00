//! Client subcommands (`kiln submit`, `kiln builds`, `kiln build show|log|cancel|priority`,
//! `kiln agent new|rotate-secret|registration-token`, `kiln agents`, `kiln token
//! new|list|revoke`): clap definitions and
//! what each command prints (the enrollment commands are in [`super::enroll`]).
//!
//! Every command takes [`ClientOpts`] (`--coordinator`, `--json`). Human output is the default;
//! `--json` prints the protocol type the coordinator answered with, as JSON, one document per
//! command. Errors go to stderr through `main` and exit with status 1.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::http::{Client, DEFAULT_COORDINATOR};
use super::render;
use super::submit::{self, SubmitOptions};
use crate::protocol::{
    AgentCreated, AgentInfo, BuildDetail, BuildId, BuildState, BuildSummary, CancelReply, NewAgent,
    NewToken, Scope, TokenCreated, TokenInfo,
};

/// Options every client command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientOpts {
    /// The coordinator's client API.
    #[arg(long, env = "KILN_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// A file holding the client token (from `kiln token new`), sent as a bearer token.
    /// Without it, the `KILN_TOKEN` environment variable is sent when set.
    #[arg(long, env = "KILN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// For an https:// coordinator: trust only this CA certificate (PEM), e.g. the ca.pem of
    /// `kiln tls init`. Without it the built-in web roots are trusted.
    #[arg(long, env = "KILN_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print the coordinator's answer as JSON instead of human text.
    #[arg(long)]
    pub json: bool,
}

impl ClientOpts {
    /// The HTTP client these options describe.
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::with_ca(&self.coordinator, self.token()?, self.ca_file.as_deref())
    }

    /// The token: `--token-file` (trimmed), else `KILN_TOKEN`, else none.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        match &self.token_file {
            Some(f) => {
                let text = std::fs::read_to_string(f).with_context(|| {
                    format!("failed to read the client token file {}", f.display())
                })?;
                let t = text.trim();
                anyhow::ensure!(
                    !t.is_empty(),
                    "the client token file {} is empty: write the token from `kiln token new` into it",
                    f.display()
                );
                Ok(Some(t.to_string()))
            }
            None => Ok(std::env::var("KILN_TOKEN").ok().filter(|t| !t.is_empty())),
        }
    }
}

/// The client subcommands, flattened into `kiln`'s top-level commands.
#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {
    /// Submit derivations (and their `.drv` closure and input sources) for building.
    Submit(SubmitArgs),
    /// List builds.
    Builds(BuildsArgs),
    /// Show, read the log of, cancel or reprioritise one build.
    #[command(subcommand)]
    Build(BuildCommand),
    /// Register agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// List the registered agents.
    Agents(AgentsArgs),
    /// Create, list and revoke client-API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a client token; prints it (shown only once) or writes it to --save-to.
    New(TokenNewArgs),
    /// List the client tokens: id, name, scope, created, last used (never the tokens).
    List(TokenListArgs),
    /// Revoke a client token (by id, or by name if only one token has it): refused from the
    /// next request on. The last admin token is kept unless revoked offline (--state-dir).
    Revoke(TokenRevokeArgs),
}

#[derive(clap::Args, Debug)]
pub struct TokenListArgs {
    /// Read a stopped coordinator's state dir instead of asking the coordinator (no "last
    /// used" then).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct TokenRevokeArgs {
    /// The token's id (see `kiln token list`), or its name if no other token has it.
    #[arg(value_name = "ID|NAME")]
    pub which: String,
    /// Revoke it offline in this state dir (the coordinator must be stopped); this may revoke
    /// the last admin token (the coordinator refuses to).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct TokenNewArgs {
    /// read (list, show, logs, events), submit (also submit, sources, cancel) or admin (also
    /// agents and tokens).
    #[arg(long, value_parser = parse_scope)]
    pub scope: Scope,
    /// A label for the token (shown in `kiln state dump`).
    #[arg(long, default_value = "token")]
    pub name: String,
    /// Create it offline in this state dir (the coordinator must be stopped): how the first
    /// token is made. Without it, the coordinator creates it (needs an admin token, or a
    /// loopback connection while no token exists).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Write the token to this file (mode 0600) instead of printing it.
    #[arg(long)]
    pub save_to: Option<PathBuf>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    Scope::parse(s).ok_or_else(|| format!("unknown scope {s:?}: use read, submit or admin"))
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// `.drv` files in the store directory.
    #[arg(required = true, value_name = "DRV")]
    pub drvs: Vec<PathBuf>,
    /// The store directory (else KILN_STORE_DIR, else the paths must be under /gnu/store or
    /// /nix/store).
    #[arg(long, env = "KILN_STORE_DIR")]
    pub store_dir: Option<PathBuf>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// A `key=value` tag on every submitted build (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Build only the named derivations; by default every input derivation with an output the
    /// coordinator lacks is built too (`--related`).
    #[arg(long, conflicts_with = "related")]
    pub only_targets: bool,
    /// Also build every derivation of the targets' closure with an output the coordinator
    /// lacks and no live build (the default; the Guix Build Coordinator's "ensure all related
    /// derivation outputs have successful builds"). Decided by the coordinator, atomically
    /// with the submission.
    #[arg(long)]
    pub related: bool,
    /// Do not offer the new builds to agents before TIME: RFC 3339 in UTC
    /// (`2026-12-24T18:00:00Z`) or relative to now (`+30s`, `+30m`, `+2h`, `+1d`).
    #[arg(long, value_name = "TIME", value_parser = parse_defer_until)]
    pub defer_until: Option<DeferUntil>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// `--defer-until`: a time, or a delay from the moment of the submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeferUntil {
    /// ms since the epoch.
    At(u64),
    /// ms from now.
    After(u64),
}

impl DeferUntil {
    /// ms since the epoch, relative delays counted from `now_ms`.
    pub fn at(self, now_ms: u64) -> u64 {
        match self {
            DeferUntil::At(t) => t,
            DeferUntil::After(d) => now_ms.saturating_add(d),
        }
    }
}

/// Parse `--defer-until` (see [`SubmitArgs::defer_until`]).
pub fn parse_defer_until(s: &str) -> Result<DeferUntil, String> {
    if let Some(rel) = s.strip_prefix('+') {
        let split = rel.find(|c: char| !c.is_ascii_digit()).unwrap_or(rel.len());
        let (n, unit) = rel.split_at(split);
        let n: u64 = n.parse().map_err(|_| {
            format!("{s:?} is not a relative time: write + then a number and a unit, e.g. +30m")
        })?;
        let ms = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?}; use s, m, h or d (e.g. +30m, +2h)"
                ))
            }
        };
        return n
            .checked_mul(ms)
            .map(DeferUntil::After)
            .ok_or_else(|| format!("{s:?} is too far in the future"));
    }
    parse_rfc3339_utc(s).map(DeferUntil::At).ok_or_else(|| {
        format!(
            "{s:?} is not a time: use RFC 3339 in UTC (e.g. 2026-12-24T18:00:00Z) or a relative time (e.g. +30m, +2h)"
        )
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fff](Z|+00:00)` as ms since the epoch; `None` for anything else
/// (another offset, a date before 1970, an impossible date).
fn parse_rfc3339_utc(s: &str) -> Option<u64> {
    let s = s
        .strip_suffix('Z')
        .or_else(|| s.strip_suffix('z'))
        .or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once(['T', 't', ' '])?;
    let num = |x: &str, len: usize| -> Option<u64> {
        (x.len() == len && x.bytes().all(|b| b.is_ascii_digit()))
            .then(|| x.parse().ok())
            .flatten()
    };
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    if d.next().is_some() {
        return None;
    }
    let (hms, frac) = match time.split_once('.') {
        Some((hms, f)) => (hms, Some(f)),
        None => (time, None),
    };
    let mut t = hms.split(':');
    let (hh, mm, ss) = (num(t.next()?, 2)?, num(t.next()?, 2)?, num(t.next()?, 2)?);
    if t.next().is_some() {
        return None;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if y < 1970 || !(1..=12).contains(&m) || day == 0 || day > days_in[(m - 1) as usize] {
        return None;
    }
    if hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    let ms = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            let f3: String = f.chars().chain("000".chars()).take(3).collect();
            f3.parse::<u64>().ok()?
        }
        Some(_) => return None,
    };
    // Days from the epoch to the date (Howard Hinnant's days_from_civil).
    let (y, m) = (y as i64, m as i64);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms)
}

#[derive(clap::Args, Debug)]
pub struct BuildsArgs {
    /// Only builds in this state (blocked, runnable, allocated, building, uploading,
    /// succeeded, failed, canceled).
    #[arg(long, value_parser = parse_state)]
    pub state: Option<BuildState>,
    /// At most this many builds (default: all, fetched a page at a time).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Start after this build id (the cursor a cut listing prints).
    #[arg(long)]
    pub cursor: Option<u64>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Subcommand, Debug)]
pub enum BuildCommand {
    /// Show a build: state, agent, attempt, times, outputs, why it failed or what it waits for.
    Show(BuildIdArgs),
    /// Write a build's log to stdout, byte for byte.
    Log(BuildIdArgs),
    /// Cancel a build, queued or running (its agent stops the builder); with --dependents,
    /// also every build that waits on it.
    Cancel(CancelArgs),
    /// Set a queued build's own priority (higher runs first); the builds it needs inherit it.
    Priority(PriorityArgs),
}

#[derive(clap::Args, Debug)]
pub struct PriorityArgs {
    /// The build id (see `kiln builds`).
    pub id: BuildId,
    /// The new priority.
    #[arg(allow_negative_numbers = true)]
    pub priority: i32,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct BuildIdArgs {
    /// The build id (see `kiln builds`).
    pub id: BuildId,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    /// The build id (see `kiln builds`).
    pub id: BuildId,
    /// Also cancel every live build that waits on it, transitively (each with the reason
    /// "canceled: input build N was canceled"). Without it they stay blocked.
    #[arg(long)]
    pub dependents: bool,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Subcommand, Debug)]
pub enum AgentCommand {
    /// Register an agent; prints its id and secret (the secret is shown only once).
    New(NewAgentArgs),
    /// Replace an agent's secret: prints (or writes) the new one; the old one stops working
    /// and the agent's open session ends.
    RotateSecret(super::enroll::RotateArgs),
    /// Registration tokens, with which agents register themselves.
    #[command(subcommand)]
    RegistrationToken(super::enroll::TokenCommand),
    /// Give the agent no new work; the builds it holds keep running.
    Pause(AgentNameArgs),
    /// Let the agent finish the builds it holds and give it no new work ("drained" once it
    /// holds none).
    Drain(AgentNameArgs),
    /// Undo pause or drain, and lift a quarantine.
    Resume(AgentNameArgs),
    /// Show one agent: status, control (paused, drained, quarantined and until when), builds.
    Show(AgentNameArgs),
}

#[derive(clap::Args, Debug)]
pub struct AgentNameArgs {
    /// The agent's name (see `kiln agents`).
    pub name: String,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct NewAgentArgs {
    /// The agent's name (give the same to `kiln-agent --name`).
    pub name: String,
    /// Systems the agent builds for, e.g. x86_64-linux (repeatable).
    #[arg(long = "system", required = true, value_name = "SYSTEM")]
    pub systems: Vec<String>,
    /// Write the secret to this file (mode 0600) instead of printing it.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub opts: ClientOpts,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!(
            "tag {s:?} is not KEY=VALUE (e.g. --tag branch=master)"
        )),
    }
}

fn parse_state(s: &str) -> Result<BuildState, String> {
    BuildState::parse(s).ok_or_else(|| {
        let all: Vec<&str> = BuildState::ALL.iter().map(|s| s.as_str()).collect();
        format!(
            "unknown build state {s:?}: expected one of {}",
            all.join(", ")
        )
    })
}

/// Run one client subcommand; returns the exit code.
pub fn run(cmd: ClientCommand) -> anyhow::Result<i32> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let code = match cmd {
        ClientCommand::Submit(a) => submit_cmd(a, &mut out)?,
        ClientCommand::Builds(a) => builds_cmd(a, &mut out)?,
        ClientCommand::Build(BuildCommand::Show(a)) => show_cmd(a, &mut out)?,
        ClientCommand::Build(BuildCommand::Log(a)) => log_cmd(a, &mut out)?,
        ClientCommand::Build(BuildCommand::Cancel(a)) => cancel_cmd(a, &mut out)?,
        ClientCommand::Build(BuildCommand::Priority(a)) => priority_cmd(a, &mut out)?,
        ClientCommand::Agent(AgentCommand::New(a)) => agent_new_cmd(a, &mut out)?,
        ClientCommand::Agent(AgentCommand::RotateSecret(a)) => super::enroll::rotate(a, &mut out)?,
        ClientCommand::Agent(AgentCommand::RegistrationToken(c)) => {
            super::enroll::token(c, &mut out)?
        }
        ClientCommand::Agent(AgentCommand::Pause(a)) => agent_control_cmd("pause", a, &mut out)?,
        ClientCommand::Agent(AgentCommand::Drain(a)) => agent_control_cmd("drain", a, &mut out)?,
        ClientCommand::Agent(AgentCommand::Resume(a)) => agent_control_cmd("resume", a, &mut out)?,
        ClientCommand::Agent(AgentCommand::Show(a)) => agent_show_cmd(a, &mut out)?,
        ClientCommand::Agents(a) => agents_cmd(a, &mut out)?,
        ClientCommand::Token(TokenCommand::New(a)) => token_new_cmd(a, &mut out)?,
        ClientCommand::Token(TokenCommand::List(a)) => token_list_cmd(a, &mut out)?,
        ClientCommand::Token(TokenCommand::Revoke(a)) => token_revoke_cmd(a, &mut out)?,
    };
    out.flush().context("failed to write to stdout")?;
    Ok(code)
}

pub(super) fn print_json<T: serde::Serialize>(
    out: &mut dyn Write,
    value: &T,
) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value).context("failed to write JSON to stdout")?;
    writeln!(out).context("failed to write to stdout")?;
    Ok(())
}

fn submit_cmd(a: SubmitArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    let options = SubmitOptions {
        priority: a.priority,
        tags: a.tags,
        only_targets: a.only_targets,
        defer_until_ms: a.defer_until.map_or(0, |d| d.at(crate::store::now_ms())),
    };
    let submitted = submit::submit_files(&client, a.store_dir.as_deref(), &a.drvs, &options)?;
    if a.opts.json {
        print_json(out, &submitted)?;
    } else {
        for b in &submitted.builds {
            render::summary_line(out, b)?;
        }
    }
    Ok(0)
}

fn builds_cmd(a: BuildsArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    let (builds, next) = list_page(&client, a.state, a.limit, a.cursor)?;
    if a.opts.json {
        print_json(out, &builds)?;
    } else {
        render::builds_table(out, &builds)?;
    }
    if let Some(n) = next {
        eprintln!("more builds follow: add --cursor {n} to list them");
    }
    Ok(0)
}

/// Builds per request when `kiln builds` pages through a listing.
const PAGE: usize = 1000;

/// `GET /api/v1/builds`, page after page from `cursor`, until `limit` builds (all when
/// `None`); also the cursor of what follows when `limit` cut the listing.
pub fn list_page(
    client: &Client,
    state: Option<BuildState>,
    limit: Option<usize>,
    cursor: Option<u64>,
) -> anyhow::Result<(Vec<BuildSummary>, Option<u64>)> {
    let mut out: Vec<BuildSummary> = Vec::new();
    let mut cursor = cursor.unwrap_or(0);
    loop {
        let want = limit.map_or(PAGE, |l| (l - out.len()).min(PAGE));
        let mut query = vec![("limit", want.to_string()), ("cursor", cursor.to_string())];
        if let Some(s) = state {
            query.push(("state", s.as_str().to_string()));
        }
        let (page, next): (Vec<BuildSummary>, _) =
            client.get_json_header("builds", &query, crate::protocol::NEXT_CURSOR_HEADER)?;
        out.extend(page);
        let next = next.and_then(|n| n.parse::<u64>().ok());
        match next {
            // Each page moves the cursor forward, so this ends.
            Some(n) if n > cursor && limit.is_none_or(|l| out.len() < l) => cursor = n,
            _ => return Ok((out, next)),
        }
    }
}

/// Every build (of `state`), paged (used by the demo's progress display).
pub fn list_builds(
    client: &Client,
    state: Option<BuildState>,
    limit: Option<usize>,
) -> anyhow::Result<Vec<BuildSummary>> {
    Ok(list_page(client, state, limit, None)?.0)
}

fn show_cmd(a: BuildIdArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    let detail: BuildDetail = client.get_json(&format!("builds/{}", a.id), &[])?;
    if a.opts.json {
        print_json(out, &detail)?;
    } else {
        render::build_detail(out, &detail, now_ms())?;
    }
    Ok(0)
}

/// The log is bytes (builders print anything): it is copied to stdout as is, with or without
/// `--json`.
fn log_cmd(a: BuildIdArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    client.get_to(&format!("builds/{}/log", a.id), out)?;
    Ok(0)
}

/// Prints the canceled build, then each dependent canceled with it, then the count.
fn cancel_cmd(a: CancelArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    let query = if a.dependents {
        vec![("dependents", "true".to_string())]
    } else {
        Vec::new()
    };
    let reply: CancelReply = client.post_empty_query(&format!("builds/{}/cancel", a.id), &query)?;
    if a.opts.json {
        print_json(out, &reply)?;
    } else {
        render::summary_line(out, &reply.build)?;
        for d in &reply.dependents {
            render::summary_line(out, d)?;
        }
        let running = if reply.was_running {
            " (its agent was told to stop the builder)"
        } else {
            ""
        };
        writeln!(out, "canceled {} build(s){running}", reply.canceled)?;
    }
    Ok(0)
}

fn priority_cmd(a: PriorityArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    let summary: BuildSummary = client.post_json(
        &format!("builds/{}/priority", a.id),
        &serde_json::json!({"priority": a.priority}),
    )?;
    if a.opts.json {
        print_json(out, &summary)?;
    } else {
        render::summary_line(out, &summary)?;
    }
    Ok(0)
}

fn agent_new_cmd(a: NewAgentArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    let created = create_agent(&client, &a.name, &a.systems)?;
    print_agent_secret(
        out,
        created,
        a.secret_file.as_deref(),
        a.opts.json,
        &|f| format!("created; secret written to {}", f.display()),
        "the secret is shown only once: store it for kiln-agent --secret-file",
    )?;
    Ok(0)
}

/// Show an agent's new secret (`kiln agent new`, `kiln agent rotate-secret`): written to
/// `secret_file` (mode 0600) and left out of what is printed, or printed with `note`.
/// `saved` words the line after `agent ID (NAME) ` when the secret went to a file.
pub(super) fn print_agent_secret(
    out: &mut dyn Write,
    mut created: AgentCreated,
    secret_file: Option<&Path>,
    json: bool,
    saved: &dyn Fn(&Path) -> String,
    note: &str,
) -> anyhow::Result<()> {
    if let Some(file) = secret_file {
        write_secret(file, &created.secret)?;
        // The point of --secret-file is to keep the secret off the terminal and out of logs.
        created.secret = String::new();
        if json {
            print_json(out, &created)?;
        } else {
            writeln!(
                out,
                "agent {} ({}) {}",
                created.id,
                created.name,
                saved(file)
            )?;
        }
    } else if json {
        print_json(out, &created)?;
    } else {
        writeln!(out, "id: {}", created.id)?;
        writeln!(out, "name: {}", created.name)?;
        writeln!(out, "secret: {}", created.secret)?;
        writeln!(out, "({note})")?;
    }
    Ok(())
}

/// `POST /api/v1/agents`.
pub fn create_agent(
    client: &Client,
    name: &str,
    systems: &[String],
) -> anyhow::Result<AgentCreated> {
    let body = NewAgent {
        name: name.to_string(),
        systems: systems.to_vec(),
    };
    Ok(client.post_json("agents", &body)?)
}

/// Write an agent secret to `file`, readable by its owner only.
pub fn write_secret(file: &Path, secret: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("failed to create secret file {}", file.display()))?;
    // `mode` applies only when the file is created: tighten an existing file too.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to set mode 0600 on {}", file.display()))?;
    // No trailing newline: the file holds exactly the secret, whether or not its reader trims.
    f.write_all(secret.as_bytes())
        .with_context(|| format!("failed to write secret file {}", file.display()))?;
    Ok(())
}

fn token_new_cmd(a: TokenNewArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let created = match &a.state_dir {
        Some(dir) => create_token_offline(dir, &a.name, a.scope)?,
        None => a.opts.client()?.post_json(
            "tokens",
            &NewToken {
                name: a.name.clone(),
                scope: a.scope,
            },
        )?,
    };
    if let Some(file) = &a.save_to {
        write_secret(file, &created.token)?;
        writeln!(
            out,
            "token {:?} ({}, id {}) created; written to {}",
            created.name,
            created.scope.as_str(),
            created.id,
            file.display()
        )?;
    } else if a.opts.json {
        print_json(out, &created)?;
    } else {
        writeln!(out, "{}", created.token)?;
    }
    Ok(0)
}

/// Open a stopped coordinator's state dir for the offline token commands.
fn open_offline(dir: &Path) -> anyhow::Result<crate::store::Store> {
    use crate::store::{Store, StoreOptions};
    Store::open(dir, &StoreOptions::default()).with_context(|| {
        format!(
            "failed to open the state dir {} (stop the coordinator first, or leave out --state-dir to ask it)",
            dir.display()
        )
    })
}

/// Commit `batch` to a state dir opened offline.
fn commit_offline(
    store: crate::store::Store,
    batch: crate::store::Batch,
    dir: &Path,
) -> anyhow::Result<()> {
    let committer = crate::store::Committer::start(store, Default::default(), Box::new(|_| {}))?;
    let result = committer.commit_blocking(batch);
    committer.shutdown_blocking();
    result.with_context(|| format!("failed to write the client tokens in {}", dir.display()))?;
    Ok(())
}

/// Store a new token's hash straight into a stopped coordinator's state dir.
pub fn create_token_offline(dir: &Path, name: &str, scope: Scope) -> anyhow::Result<TokenCreated> {
    let store = open_offline(dir)?;
    let (token, batch) = crate::http::auth::mint_token(name, scope)?;
    commit_offline(store, batch, dir)?;
    let id = crate::http::auth::token_id(&crate::http::auth::token_key(&token));
    Ok(TokenCreated {
        id,
        name: name.to_string(),
        scope,
        token,
    })
}

fn token_list_cmd(a: TokenListArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let tokens: Vec<TokenInfo> = match &a.state_dir {
        Some(dir) => crate::http::auth::list_tokens(&open_offline(dir)?, |_| None)
            .with_context(|| format!("failed to read the client tokens in {}", dir.display()))?,
        None => a.opts.client()?.get_json("tokens", &[])?,
    };
    if a.opts.json {
        print_json(out, &tokens)?;
    } else {
        render::tokens_table(out, &tokens, now_ms())?;
    }
    Ok(0)
}

fn token_revoke_cmd(a: TokenRevokeArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let revoked: TokenInfo = match &a.state_dir {
        Some(dir) => {
            let store = open_offline(dir)?;
            let rev = crate::http::auth::revoke_token(&store, &a.which, false)?;
            commit_offline(store, rev.batch, dir)?;
            rev.info
        }
        None => a
            .opts
            .client()?
            .post_empty(&format!("tokens/{}/revoke", path_segment(&a.which)))?,
    };
    if a.opts.json {
        print_json(out, &revoked)?;
    } else {
        writeln!(
            out,
            "token {} ({:?}, {}) revoked: it is refused from the next request on",
            revoked.id,
            revoked.name,
            revoked.scope.as_str()
        )?;
    }
    Ok(0)
}

/// `kiln agent pause|drain|resume NAME`.
fn agent_control_cmd(action: &str, a: AgentNameArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    let info: AgentInfo = client.post_empty(&format!("agents/{}/{action}", a.name))?;
    if a.opts.json {
        print_json(out, &info)?;
    } else {
        writeln!(
            out,
            "agent {} ({}): {}",
            info.id,
            info.name,
            render::control_text(&info, now_ms())
        )?;
    }
    Ok(0)
}

/// `kiln agent show NAME`: the agent's line of `kiln agents`.
fn agent_show_cmd(a: AgentNameArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    let agents: Vec<AgentInfo> = client.get_json("agents", &[])?;
    let Some(info) = agents.into_iter().find(|i| i.name == a.name) else {
        anyhow::bail!(
            "no agent named {:?}: see `kiln agents` for the registered names",
            a.name
        );
    };
    if a.opts.json {
        print_json(out, &info)?;
    } else {
        render::agents_table(out, std::slice::from_ref(&info), now_ms())?;
    }
    Ok(0)
}

fn agents_cmd(a: AgentsArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    let agents: Vec<AgentInfo> = client.get_json("agents", &[])?;
    if a.opts.json {
        print_json(out, &agents)?;
    } else {
        render::agents_table(out, &agents, now_ms())?;
    }
    Ok(0)
}

/// `s` percent-encoded as one URL path segment (a token name may hold any character).
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_states_parse_with_helpful_errors() {
        assert_eq!(parse_tag("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_tag("=x").unwrap_err().contains("KEY=VALUE"));
        assert_eq!(parse_state("failed").unwrap(), BuildState::Failed);
        assert!(parse_state("done").unwrap_err().contains("succeeded"));
    }

    /// `--defer-until`: RFC 3339 UTC and relative times parse to the right instant; other
    /// offsets, impossible dates and unknown units are refused with what to write instead.
    #[test]
    fn defer_until_parses_utc_and_relative_times() {
        assert_eq!(
            parse_defer_until("1970-01-01T00:00:01Z").unwrap(),
            DeferUntil::At(1_000)
        );
        // 2000-02-29 12:34:56.789 UTC (the date `render::utc` pins).
        assert_eq!(
            parse_defer_until("2000-02-29T12:34:56.789Z").unwrap(),
            DeferUntil::At(951_827_696_789)
        );
        assert_eq!(
            parse_defer_until("2000-02-29T12:34:56.789+00:00").unwrap(),
            DeferUntil::At(951_827_696_789)
        );
        assert_eq!(
            parse_defer_until("+30m").unwrap(),
            DeferUntil::After(1_800_000)
        );
        assert_eq!(
            parse_defer_until("+2h").unwrap(),
            DeferUntil::After(7_200_000)
        );
        assert_eq!(parse_defer_until("+2h").unwrap().at(1_000), 7_201_000);
        assert_eq!(
            parse_defer_until("+45s").unwrap(),
            DeferUntil::After(45_000)
        );
        for bad in [
            "2001-02-29T00:00:00Z",
            "2026-12-24T18:00:00+01:00",
            "2026-12-24T24:00:00Z",
            "2026-12-24",
            "tomorrow",
            "+",
        ] {
            let e = parse_defer_until(bad).unwrap_err();
            assert!(
                e.contains("RFC 3339") || e.contains("relative"),
                "{bad}: {e}"
            );
        }
        assert!(parse_defer_until("+3w")
            .unwrap_err()
            .contains("unknown unit"));
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(path_segment("0123abcd-x_y.z~"), "0123abcd-x_y.z~");
        assert_eq!(path_segment("ci bot/2"), "ci%20bot%2F2");
        assert_eq!(path_segment("é"), "%C3%A9");
    }

    #[test]
    fn secret_file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "old").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&f, "abc").unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "abc");
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
