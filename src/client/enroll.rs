//! `kiln agent rotate-secret` and `kiln agent registration-token new|list|revoke`: enrolling
//! agents from the operator's side. Secrets and tokens are shown once; `--secret-file` and
//! `--save-to` keep them off the terminal (written with mode 0600).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;

use super::cli::{print_agent_secret, print_json, write_secret, ClientOpts};
use crate::protocol::{AgentCreated, NewRegistrationToken, RegistrationTokenCreated};
use crate::store::records::RegistrationTokenRecord;

#[derive(clap::Args, Debug)]
pub struct RotateArgs {
    /// The agent whose secret to replace.
    pub name: String,
    /// Write the new secret to this file (mode 0600) instead of printing it.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a registration token: an agent started with it (`kiln-agent
    /// --registration-token-file`) registers itself at its first session.
    New(NewTokenArgs),
    /// List the registration tokens (their ids, systems and tags; never the tokens).
    List(TokenListArgs),
    /// Revoke a registration token: no agent can register with it any more.
    Revoke(RevokeArgs),
}

#[derive(clap::Args, Debug)]
pub struct NewTokenArgs {
    /// Limit the agents registered with it to these systems (repeatable); default: whatever
    /// each claims when it registers.
    #[arg(long = "system", value_name = "SYSTEM")]
    pub systems: Vec<String>,
    /// Limit the tags they may offer to these (repeatable); default: any.
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Write the token to this file (mode 0600) instead of printing it. (Not `--token-file`:
    /// that is the client token every client command may be given.)
    #[arg(long = "save-to", value_name = "FILE")]
    pub save_to: Option<PathBuf>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct TokenListArgs {
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct RevokeArgs {
    /// The token's id (see `kiln agent registration-token list`).
    pub id: String,
    #[command(flatten)]
    pub opts: ClientOpts,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!(
            "tag {s:?} is not KEY=VALUE (e.g. --tag big-memory=yes)"
        )),
    }
}

/// `kiln agent rotate-secret NAME`.
pub fn rotate(a: RotateArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let client = a.opts.client()?;
    let rotated: AgentCreated = client.post_empty(&format!("agents/{}/rotate-secret", a.name))?;
    print_agent_secret(
        out,
        rotated,
        a.secret_file.as_deref(),
        a.opts.json,
        &|f| {
            format!(
                "new secret written to {}; the old secret no longer works",
                f.display()
            )
        },
        "the old secret no longer works and the agent's session has ended: give this one to kiln-agent --secret-file",
    )?;
    Ok(0)
}

/// `kiln agent registration-token ...`.
pub fn token(cmd: TokenCommand, out: &mut dyn Write) -> anyhow::Result<i32> {
    match cmd {
        TokenCommand::New(a) => new_token(a, out),
        TokenCommand::List(a) => {
            let tokens: Vec<RegistrationTokenRecord> =
                a.opts.client()?.get_json("registration-tokens", &[])?;
            if a.opts.json {
                print_json(out, &tokens)?;
            } else {
                writeln!(out, "{:<12}  {:<30}  TAGS", "ID", "SYSTEMS")?;
                for t in &tokens {
                    writeln!(
                        out,
                        "{:<12}  {:<30}  {}",
                        t.id,
                        t.systems
                            .as_ref()
                            .map_or("(any)".to_string(), |s| s.join(",")),
                        t.tags.as_ref().map_or("(any)".to_string(), |t| t
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","))
                    )?;
                }
            }
            Ok(0)
        }
        TokenCommand::Revoke(a) => {
            let revoked: RegistrationTokenRecord = a
                .opts
                .client()?
                .post_empty(&format!("registration-tokens/{}/revoke", a.id))?;
            if a.opts.json {
                print_json(out, &revoked)?;
            } else {
                writeln!(out, "registration token {} revoked", revoked.id)?;
            }
            Ok(0)
        }
    }
}

fn new_token(a: NewTokenArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let body = NewRegistrationToken {
        systems: (!a.systems.is_empty()).then_some(a.systems),
        tags: (!a.tags.is_empty()).then_some(a.tags),
    };
    let mut created: RegistrationTokenCreated =
        a.opts.client()?.post_json("registration-tokens", &body)?;
    if let Some(file) = &a.save_to {
        write_secret(file, &created.token)
            .with_context(|| format!("the token {} was made but not saved", created.id))?;
        created.token = String::new();
        if a.opts.json {
            print_json(out, &created)?;
        } else {
            writeln!(
                out,
                "registration token {} written to {}",
                created.id,
                file.display()
            )?;
        }
    } else if a.opts.json {
        print_json(out, &created)?;
    } else {
        writeln!(out, "id: {}", created.id)?;
        writeln!(out, "token: {}", created.token)?;
        writeln!(
            out,
            "(shown only once: give it to kiln-agent --registration-token-file on the machines that may register)"
        )?;
    }
    Ok(0)
}
