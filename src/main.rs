//! The `kiln` command: the coordinator, the client subcommands and the format tools.
//!
//! Format commands (`drv`, `nar`, `narinfo`) run synchronously: no async runtime, no thread
//! pool. Only `kiln coordinator` and `kiln demo` start an actix system.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: a build coordinator for Guix and Nix derivations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator.
    Coordinator(kiln::coordinator::CoordinatorArgs),
    /// Inspect the state dir (offline: stop the coordinator first).
    #[command(subcommand)]
    State(StateCommand),
    /// Work with .drv files.
    #[command(subcommand)]
    Drv(DrvCommand),
    /// Work with NAR archives.
    #[command(subcommand)]
    Nar(NarCommand),
    /// Work with narinfo files.
    #[command(subcommand)]
    Narinfo(NarinfoCommand),
    /// Narinfo signing keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Make TLS certificates for self-hosting.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Run a demo farm: a coordinator, two agents and a graph of derivations.
    Demo(kiln::client::demo::DemoArgs),
    #[command(flatten)]
    Client(kiln::client::cli::ClientCommand),
}

#[derive(Subcommand)]
enum StateCommand {
    /// Print every record of every tree, one per line.
    Dump {
        #[arg(long, default_value = "./kiln-state")]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Write a CA (ca.pem, ca-key.pem), a server certificate (server.pem, server-key.pem) for
    /// the given names, and an agent client certificate (agent.pem, agent-key.pem) into DIR;
    /// keys get mode 0600.
    Init {
        dir: PathBuf,
        /// A DNS name or IP address the coordinator is reached by (repeatable).
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DrvCommand {
    /// Print derivations as JSON, as `nix show-derivation` does.
    Show {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The store directory (else KILN_STORE_DIR, else /gnu/store or /nix/store).
        #[arg(long, env = "KILN_STORE_DIR")]
        store_dir: Option<PathBuf>,
    },
    /// Check that each file's name and output paths match its contents.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long, env = "KILN_STORE_DIR")]
        store_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NarCommand {
    /// Write the NAR serialisation of PATH to standard output.
    Dump { path: PathBuf },
    /// Restore a NAR read from standard input at DIR (which must not exist).
    Restore { dir: PathBuf },
    /// Print the NAR hash of PATH as sha256:<base32>.
    Hash { path: PathBuf },
}

#[derive(Subcommand)]
enum NarinfoCommand {
    /// Parse a narinfo file and print its fields.
    Show {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Verify a narinfo's signature with a public key (name:base64, or a file holding Nix
    /// keys or a Guix key), and with --check-nar that its NAR is the one it describes.
    Verify {
        /// A narinfo file, or its http(s):// URL on a binary cache.
        file: String,
        #[arg(long)]
        key: String,
        #[arg(long, env = "KILN_STORE_DIR")]
        store_dir: Option<PathBuf>,
        /// Also fetch the NAR its URL names (relative to the narinfo) and check its NarHash
        /// and NarSize, as a Nix client does when it imports it.
        #[arg(long)]
        check_nar: bool,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a signing key: NAME:base64 secret and public key files, as
    /// `nix-store --generate-binary-cache-key NAME SECRET_FILE PUBLIC_FILE` does.
    Generate {
        /// The key's name, e.g. cache.example.org-1 (signatures carry it).
        name: String,
        /// Where to write the secret key (mode 0600; never replaced without --force).
        secret_file: PathBuf,
        /// Where to write the public key (for Nix's trusted-public-keys).
        public_file: PathBuf,
        /// Also write the public key in Guix's form (for `guix archive --authorize`;
        /// experimental).
        #[arg(long)]
        guix_public_file: Option<PathBuf>,
        /// Replace an existing secret key file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of a secret key file.
    Public {
        secret_file: PathBuf,
        /// In Guix's form (an S-expression for `guix archive --authorize`; experimental).
        #[arg(long)]
        guix: bool,
    },
}

fn state_dump(state_dir: &std::path::Path, out: &mut dyn Write) -> anyhow::Result<i32> {
    anyhow::ensure!(
        state_dir.join("db").exists(),
        "{} holds no kiln state (no db/ inside): pass --state-dir",
        state_dir.display()
    );
    let store = kiln::store::Store::open(state_dir, &kiln::store::StoreOptions::default())?;
    kiln::store::dump::dump(&store, out)?;
    Ok(0)
}

fn tls_init(dir: &std::path::Path, names: &[String], out: &mut dyn Write) -> anyhow::Result<i32> {
    let f = kiln::http::tls::init(dir, names)?;
    writeln!(out, "CA certificate:     {}", f.ca.display())?;
    writeln!(
        out,
        "server certificate: {} (key {})",
        f.server_cert.display(),
        f.server_key.display()
    )?;
    writeln!(
        out,
        "agent certificate:  {} (key {})",
        f.agent_cert.display(),
        f.agent_key.display()
    )?;
    writeln!(
        out,
        "set [tls] cert_file and key_file to the server pair; give agents and clients --ca-file {}",
        f.ca.display()
    )?;
    Ok(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = match cli.command {
        Command::Coordinator(args) => kiln::coordinator::run(args),
        Command::State(StateCommand::Dump { state_dir }) => state_dump(&state_dir, &mut out),
        Command::Drv(DrvCommand::Show { files, store_dir }) => {
            kiln::derivation::cli::show(&files, store_dir.as_deref(), &mut out)
        }
        Command::Drv(DrvCommand::Check { files, store_dir }) => {
            kiln::derivation::cli::check(&files, store_dir.as_deref(), &mut out)
        }
        Command::Nar(NarCommand::Dump { path }) => kiln::nar::cli::dump(&path, &mut out),
        Command::Nar(NarCommand::Restore { dir }) => {
            kiln::nar::cli::restore(&dir, &mut std::io::stdin().lock())
        }
        Command::Nar(NarCommand::Hash { path }) => kiln::nar::cli::hash(&path, &mut out),
        Command::Narinfo(NarinfoCommand::Show { file, json }) => {
            kiln::nar::cli::narinfo_show(&file, json, &mut out)
        }
        Command::Narinfo(NarinfoCommand::Verify {
            file,
            key,
            store_dir,
            check_nar,
        }) => {
            kiln::nar::cli::narinfo_verify(&file, &key, store_dir.as_deref(), check_nar, &mut out)
        }
        Command::Key(KeyCommand::Generate {
            name,
            secret_file,
            public_file,
            guix_public_file,
            force,
        }) => kiln::nar::cli::key_generate(
            &name,
            &secret_file,
            &public_file,
            guix_public_file.as_deref(),
            force,
            &mut out,
        ),
        Command::Key(KeyCommand::Public { secret_file, guix }) => {
            kiln::nar::cli::key_public(&secret_file, guix, &mut out)
        }
        Command::Tls(TlsCommand::Init { dir, names }) => tls_init(&dir, &names, &mut out),
        Command::Demo(args) => kiln::client::demo::run(args),
        Command::Client(cmd) => kiln::client::cli::run(cmd),
    };
    let _ = out.flush();
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every subcommand's arguments are consistent (unique names, valid defaults): clap checks
    /// a subcommand only when it is used, so a clash (two `--token-file`s) would otherwise
    /// show only to the user who runs that command.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
