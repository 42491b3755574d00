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
    /// File holding the agent's secret (surrounding whitespace is ignored). With
    /// --registration-token-file it may be absent: the agent then writes a fresh random secret
    /// there (mode 0600) before it registers; default `<state-dir>/secret`.
    #[arg(long, required_unless_present = "registration_token_file")]
    pub secret_file: Option<PathBuf>,
    /// File holding a registration token (`kiln agent registration-token new`): when the
    /// coordinator has no agent of this --name yet, it registers this one with the secret in
    /// --secret-file, limited to the systems and tags the token allows.
    #[arg(long)]
    pub registration_token_file: Option<PathBuf>,
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
    /// Builds held before they are built (running, or assigned and waiting for a build slot);
    /// default and minimum: --max-parallel-builds.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_allocated_builds: Option<u32>,
    /// Ask for no work while the 1-minute load average is above this (default: no limit).
    #[arg(long)]
    pub max_load: Option<f64>,
    /// Ask for no work while the store dir or the state dir has less free space than this
    /// many MiB (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub min_free_disk_mb: u64,
    /// Ask for no work while more finished builds than this wait for an upload slot
    /// (default: --max-parallel-builds).
    #[arg(long)]
    pub max_waiting_uploads: Option<u32>,
    /// Fetched inputs kept in the agent's store for later builds, in MiB; above it the least
    /// recently used ones no held build needs are removed.
    #[arg(long, default_value_t = 10_240)]
    pub input_cache_mb: u64,
    /// Long poll: how long each work request may wait at the coordinator for a build, in ms
    /// (0 = answer at once, then ask again about a second later). At most 50000.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(0..=50_000))]
    pub work_wait_ms: u64,
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
    /// Seconds between the SIGTERM and the SIGKILL sent to a builder's process group when its
    /// build is canceled, abandoned, timed out or the agent shuts down.
    #[arg(long, default_value_t = 5)]
    pub kill_grace: u64,
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
    /// `--max-allocated-builds`, never below `--max-parallel-builds`.
    pub fn max_allocated_builds(&self) -> u32 {
        self.max_allocated_builds
            .unwrap_or(self.max_parallel_builds)
            .max(self.max_parallel_builds)
    }

    /// `--max-waiting-uploads`, by default `--max-parallel-builds`.
    pub fn max_waiting_uploads(&self) -> u32 {
        self.max_waiting_uploads.unwrap_or(self.max_parallel_builds)
    }

    /// Where the secret is (or, when registering, will be) kept.
    pub fn secret_path(&self) -> PathBuf {
        self.secret_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("secret"))
    }

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
            "--work-wait-ms",
            "0",
            "--max-allocated-builds",
            "5",
            "--max-load",
            "3.5",
            "--min-free-disk-mb",
            "1024",
            "--max-waiting-uploads",
            "7",
            "--input-cache-mb",
            "64",
            "--kill-grace",
            "2",
        ])
        .unwrap();
        assert_eq!(a.transfer_stall_timeout, 5);
        assert_eq!(a.work_wait_ms, 0);
        assert_eq!(a.max_allocated_builds(), 5);
        assert_eq!(a.max_load, Some(3.5));
        assert_eq!(a.min_free_disk_mb, 1024);
        assert_eq!(a.max_waiting_uploads(), 7);
        assert_eq!(a.input_cache_mb, 64);
        assert_eq!(a.kill_grace, 2);
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
        assert_eq!(a.work_wait_ms, 20_000);
        assert_eq!(a.max_allocated_builds(), 1);
        assert_eq!(a.max_load, None);
        assert_eq!(a.min_free_disk_mb, 0);
        assert_eq!(a.max_waiting_uploads(), 1);
        assert_eq!(a.input_cache_mb, 10_240);
        assert_eq!(a.kill_grace, 5);
        assert_eq!(a.systems(), vec![native_system()]);
        assert_eq!(a.secret_path(), PathBuf::from("/s"));
    }

    /// A secret file is needed unless the agent registers itself, which keeps its secret in
    /// the state dir by default.
    #[test]
    fn registration_token_makes_the_secret_file_optional() {
        let base = [
            "kiln-agent",
            "--coordinator",
            "http://c",
            "--name",
            "a",
            "--state-dir",
            "/st",
        ];
        let err = Args::try_parse_from(base).unwrap_err().to_string();
        assert!(err.contains("--secret-file"), "{err}");
        let mut with_token = base.to_vec();
        with_token.extend(["--registration-token-file", "/t"]);
        let a = Args::try_parse_from(with_token).unwrap();
        assert_eq!(a.secret_path(), PathBuf::from("/st/secret"));
        assert_eq!(a.registration_token_file, Some(PathBuf::from("/t")));
    }
}
