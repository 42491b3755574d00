//! Client subcommands (`kiln submit`, `kiln builds`, `kiln build show|log|cancel|priority`,
//! `kiln agent new|rotate-secret|registration-token`, `kiln agents`): clap definitions and
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
    NewToken, Scope, TokenCreated,
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
    /// Create client-API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a client token; prints it (shown only once) or writes it to --save-to.
    New(TokenNewArgs),
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
    /// coordinator lacks is built too.
    #[arg(long)]
    pub only_targets: bool,
    #[command(flatten)]
    pub opts: ClientOpts,
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
        ClientCommand::Agents(a) => agents_cmd(a, &mut out)?,
        ClientCommand::Token(TokenCommand::New(a)) => token_new_cmd(a, &mut out)?,
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
    let mut created = create_agent(&client, &a.name, &a.systems)?;
    if let Some(file) = &a.secret_file {
        write_secret(file, &created.secret)?;
        // The point of --secret-file is to keep the secret off the terminal and out of logs.
        created.secret = String::new();
        if a.opts.json {
            print_json(out, &created)?;
        } else {
            writeln!(
                out,
                "agent {} ({}) created; secret written to {}",
                created.id,
                created.name,
                file.display()
            )?;
        }
    } else if a.opts.json {
        print_json(out, &created)?;
    } else {
        writeln!(out, "id: {}", created.id)?;
        writeln!(out, "name: {}", created.name)?;
        writeln!(out, "secret: {}", created.secret)?;
        writeln!(
            out,
            "(the secret is shown only once: store it for kiln-agent --secret-file)"
        )?;
    }
    Ok(0)
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
            "token {:?} ({}) created; written to {}",
            created.name,
            created.scope.as_str(),
            file.display()
        )?;
    } else if a.opts.json {
        print_json(out, &created)?;
    } else {
        writeln!(out, "{}", created.token)?;
    }
    Ok(0)
}

/// Store a new token's hash straight into a stopped coordinator's state dir.
pub fn create_token_offline(dir: &Path, name: &str, scope: Scope) -> anyhow::Result<TokenCreated> {
    use crate::store::{Committer, Store, StoreOptions};
    let store = Store::open(dir, &StoreOptions::default())
        .with_context(|| format!("failed to open the state dir {} (stop the coordinator first, or leave out --state-dir to ask it)", dir.display()))?;
    let (token, batch) = crate::http::auth::mint_token(name, scope)?;
    let committer = Committer::start(store, Default::default(), Box::new(|_| {}))?;
    let result = committer.commit_blocking(batch);
    committer.shutdown_blocking();
    result.with_context(|| format!("failed to store the token in {}", dir.display()))?;
    Ok(TokenCreated {
        name: name.to_string(),
        scope,
        token,
    })
}

fn agents_cmd(a: AgentsArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    let agents: Vec<AgentInfo> = client.get_json("agents", &[])?;
    if a.opts.json {
        print_json(out, &agents)?;
    } else {
        render::agents_table(out, &agents)?;
    }
    Ok(0)
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
