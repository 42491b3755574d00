//! Helpers shared by the NAR integration tests (included with `#[path]`): an in-memory model of
//! a file tree, a proptest strategy for it, writing it to and reading it from disk, and running
//! the real Nix 2.8 offline with a private configuration.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use proptest::prelude::*;

/// A file tree as a NAR sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// Contents and the full permission bits to create it with (only the owner's execute bit
    /// survives into a NAR).
    File {
        contents: Vec<u8>,
        mode: u32,
    },
    Symlink(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, Node>),
}

/// Entry names: any bytes but `/` and NUL, never `.` or `..`.
pub fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-zA-Z0-9._-]{1,12}".prop_map(|s| s.into_bytes()),
        2 => proptest::collection::vec(1u8..=255, 1..20),
        1 => proptest::collection::vec(1u8..=255, 200..=255),
    ]
    .prop_map(|mut v| {
        v.retain(|&b| b != b'/');
        if v.is_empty() || v == b"." || v == b".." {
            v.push(b'x');
        }
        v
    })
}

fn contents() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => Just(Vec::new()),
        // Larger than the writer's and reader's 128 KiB buffers, with a pattern from a seed
        // (generating 300 KB byte by byte would make shrinking crawl).
        1 => (100_000usize..400_000, any::<u8>()).prop_map(|(len, seed)| {
            (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
        }),
    ]
}

fn mode() -> impl Strategy<Value = u32> {
    prop::sample::select(vec![
        0o644, 0o755, 0o700, 0o600, 0o744, 0o655, 0o611, 0o400, 0o500,
    ])
}

fn leaf() -> impl Strategy<Value = Node> {
    prop_oneof![
        3 => (contents(), mode()).prop_map(|(contents, mode)| Node::File { contents, mode }),
        1 => proptest::collection::vec(1u8..=255, 1..120).prop_map(Node::Symlink),
    ]
}

/// Random trees: up to 6 levels, up to 8 entries per directory, empty directories included.
pub fn tree() -> impl Strategy<Value = Node> {
    let empty_dir = Just(Node::Dir(BTreeMap::new()));
    prop_oneof![leaf(), empty_dir].prop_recursive(6, 64, 8, |inner| {
        proptest::collection::btree_map(name(), inner, 0..8).prop_map(Node::Dir)
    })
}

pub fn write_tree(path: &Path, node: &Node) {
    match node {
        Node::File { contents, mode } => {
            std::fs::write(path, contents).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        Node::Symlink(target) => {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), path).unwrap()
        }
        Node::Dir(entries) => {
            std::fs::create_dir(path).unwrap();
            for (name, child) in entries {
                write_tree(&path.join(OsStr::from_bytes(name)), child);
            }
        }
    }
}

/// Read a tree back, keeping only what a NAR keeps: files get mode 0o755 if the owner may
/// execute them, else 0o644.
pub fn read_tree(path: &Path) -> Node {
    let meta = std::fs::symlink_metadata(path).unwrap();
    if meta.file_type().is_symlink() {
        Node::Symlink(
            std::fs::read_link(path)
                .unwrap()
                .into_os_string()
                .into_vec(),
        )
    } else if meta.is_dir() {
        let mut entries = BTreeMap::new();
        for e in std::fs::read_dir(path).unwrap() {
            let e = e.unwrap();
            entries.insert(e.file_name().as_bytes().to_vec(), read_tree(&e.path()));
        }
        Node::Dir(entries)
    } else {
        let exec = meta.permissions().mode() & 0o100 != 0;
        Node::File {
            contents: std::fs::read(path).unwrap(),
            mode: if exec { 0o755 } else { 0o644 },
        }
    }
}

/// The message every golden test fails with when Nix is missing: they never skip.
pub const NIX_MISSING: &str = "nix-store not found: run scripts/test, which installs nix-bin";

/// A private Nix configuration for running Nix 2.8 offline as root, made once per test binary.
pub fn nix_conf_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kiln-nar-nixconf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("nix.conf"),
            "build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command\n",
        )
        .unwrap();
        dir
    })
}

/// A Nix command (`nix-store`, `nix`, `nix-hash`, ...) with the private configuration. Panics
/// with [`NIX_MISSING`] if Nix is not installed.
pub fn nix(program: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("nix-store").is_file()))
        .unwrap_or(false);
    assert!(found, "{NIX_MISSING}");
    let mut cmd = Command::new(program);
    cmd.env("NIX_CONF_DIR", nix_conf_dir());
    cmd
}

/// Run a command; panic with its stderr unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A static file server on loopback, for serving a binary cache directory to Nix over HTTP
/// (`GET` and `HEAD`, one request per connection). Stops when dropped; serves at most 10,000
/// connections.
pub struct StaticServer {
    pub url: String,
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StaticServer {
    pub fn start(root: &Path) -> StaticServer {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (root, flag) = (root.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming().take(10_000) {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = conn {
                    let _ = serve_one(s, &root);
                }
            }
        });
        StaticServer {
            url: format!("http://{addr}"),
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

fn serve_one(mut s: std::net::TcpStream, root: &Path) -> std::io::Result<()> {
    use std::io::{Read as _, Write as _};
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let rel = target
        .split('?')
        .next()
        .unwrap_or("")
        .trim_start_matches('/');
    let file = root.join(rel);
    let body = if rel.split('/').any(|c| c == "..") || rel.is_empty() {
        None
    } else {
        std::fs::read(&file).ok()
    };
    match body {
        Some(b) => {
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                b.len()
            )?;
            if method != "HEAD" {
                s.write_all(&b)?;
            }
        }
        None => write!(
            s,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?,
    }
    s.flush()
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
