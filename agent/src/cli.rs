//! The `kiln-agent` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecutorKind {
    Native,
    Nix,
    Guix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Kiln's build agent: dials out to the coordinator, builds, uploads NARs.
#[derive(Debug, Parser)]
#[command(name = "kiln-agent", version)]
pub struct Args {
    /// Base URL of the coordinator's agent listener, e.g. http://127.0.0.1:8745.
    #[arg(long)]
    pub coordinator: String,
    /// This agent's name, as created with `kiln agent new`.
    #[arg(long)]
    pub name: String,
    /// File holding the agent's secret (surrounding whitespace is ignored).
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Systems this agent builds for (repeatable); default: this machine's.
    #[arg(long = "system")]
    pub systems: Vec<String>,
    /// The store dir builders see.
    #[arg(long, env = "KILN_STORE_DIR", default_value = "/gnu/store")]
    pub store_dir: PathBuf,
    /// Buffered reports, spooled uploads, logs (and the private store view, on Linux).
    #[arg(long)]
    pub state_dir: PathBuf,
    #[arg(long, value_enum, default_value = "native")]
    pub executor: ExecutorKind,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_parallel_builds: u32,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_parallel_uploads: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Maximum build time in seconds (0 = none).
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
    /// Maximum time in seconds without builder output (0 = none).
    #[arg(long, default_value_t = 0)]
    pub max_silent_time: u64,
    /// An upload or download that moves no byte for this many seconds is aborted and resumed
    /// from where it stopped (not a limit on the whole transfer).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub transfer_stall_timeout: u64,
    /// For an https:// coordinator: trust only this CA certificate (PEM), e.g. the ca.pem of
    /// `kiln tls init`. Without it the built-in web roots are trusted.
    #[arg(long, env = "KILN_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for a coordinator that requires mutual TLS; needs
    /// --client-key.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The key of --client-cert (PEM).
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl Args {
    /// The systems to announce: the flags, else this machine's Nix system string.
    pub fn systems(&self) -> Vec<String> {
        if self.systems.is_empty() {
            vec![native_system()]
        } else {
            self.systems.clone()
        }
    }
}

/// This machine's Nix system string (`x86_64-linux`, `aarch64-linux`, `i686-gnu`, ...).
pub fn native_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        "arm" => "armv7l",
        other => other,
    };
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        "hurd" => "gnu",
        other => other,
    };
    format!("{arch}-{os}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_flags() {
        let a = Args::try_parse_from([
            "kiln-agent",
            "--coordinator",
            "http://127.0.0.1:8745",
            "--name",
            "a1",
            "--secret-file",
            "/s",
            "--system",
            "x86_64-linux",
            "--system",
            "i686-linux",
            "--store-dir",
            "/tmp/store",
            "--state-dir",
            "/tmp/state",
            "--executor",
            "native",
            "--max-parallel-builds",
            "3",
            "--max-parallel-uploads",
            "4",
            "--metrics-addr",
            "127.0.0.1:0",
            "--transfer-stall-timeout",
            "5",
        ])
        .unwrap();
        assert_eq!(a.transfer_stall_timeout, 5);
        assert_eq!(a.systems(), vec!["x86_64-linux", "i686-linux"]);
        assert_eq!(a.max_parallel_builds, 3);
        assert_eq!(a.executor, ExecutorKind::Native);
    }

    #[test]
    fn defaults() {
        let a = Args::try_parse_from([
            "kiln-agent",
            "--coordinator",
            "http://c",
            "--name",
            "a",
            "--secret-file",
            "/s",
            "--state-dir",
            "/st",
        ])
        .unwrap();
        assert_eq!(a.max_parallel_builds, 1);
        assert_eq!(a.max_parallel_uploads, 2);
        assert_eq!(a.transfer_stall_timeout, 60);
        assert_eq!(a.systems(), vec![native_system()]);
    }
}
