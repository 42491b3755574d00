//! Agent credentials, as the [`AgentRegistry`](super::registry::AgentRegistry) checks them:
//! secrets kept as Argon2id hashes (checked only at session open, on the blocking pool, behind
//! a [`HashGate`] so a storm of openings cannot take every core or all memory), registration
//! tokens kept as their SHA-256, and the systems and tags a registration allows.
//!
//! Why two kinds of hash: a secret is checked once per session, so it can afford a slow,
//! memory-hard hash that makes a stolen state dir useless for guessing secrets; a session
//! token and a registration token are 256 random bits (no guessing possible), so their SHA-256
//! is enough and the per-request check stays cheap. The Argon2id parameters are stored with
//! every hash; a record hashed with other parameters (or with v1's salted SHA-256) is rehashed
//! at its next successful session open.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use super::ActorError;
use crate::store::records::{RegistrationTokenRecord, SecretHash};

/// Argon2id memory, in KiB (19 MiB: the minimum OWASP recommends for Argon2id).
pub const ARGON2_M_KIB: u32 = 19 * 1024;
/// Argon2id passes.
pub const ARGON2_T: u32 = 2;
/// Argon2id lanes.
pub const ARGON2_P: u32 = 1;
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;

/// Shortest secret an agent may choose when it registers itself (`kiln-agent` generates 64
/// hex characters, 256 bits).
pub const MIN_REGISTERED_SECRET_LEN: usize = 32;
/// Longest secret accepted at all: hashing is bounded work.
pub const MAX_SECRET_LEN: usize = 1024;

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    hex(&b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The key of a registration token in the `registration_tokens` tree: its SHA-256, in hex.
pub fn token_digest(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Equal bytes, in time that depends only on the lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn argon2(m_kib: u32, t: u32, p: u32, salt: &[u8], secret: &str) -> Result<Vec<u8>, String> {
    let params = argon2::Params::new(m_kib, t, p, Some(HASH_LEN))
        .map_err(|e| format!("argon2 parameters m={m_kib} t={t} p={p}: {e}"))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = vec![0u8; HASH_LEN];
    a.hash_password_into(secret.as_bytes(), salt, &mut out)
        .map_err(|e| format!("argon2: {e}"))?;
    Ok(out)
}

/// Hash a secret with a fresh salt and the current parameters. Slow on purpose: call it on a
/// blocking thread (through [`HashGate::run`]).
pub fn hash_secret(secret: &str) -> Result<SecretHash, ActorError> {
    let mut salt = vec![0u8; SALT_LEN];
    rand::thread_rng().fill_bytes(&mut salt);
    let hash = argon2(ARGON2_M_KIB, ARGON2_T, ARGON2_P, &salt, secret)
        .map_err(|e| ActorError::Internal(format!("cannot hash an agent secret: {e}")))?;
    Ok(SecretHash::Argon2id {
        m_kib: ARGON2_M_KIB,
        t: ARGON2_T,
        p: ARGON2_P,
        salt,
        hash,
    })
}

/// What checking a secret found.
#[derive(Debug)]
pub enum Verdict {
    /// The secret is right; `rehash` is its hash with the current parameters when the stored
    /// one is outdated (salted SHA-256, or other Argon2id parameters).
    Valid {
        rehash: Option<SecretHash>,
    },
    Invalid,
}

/// Check `secret` against a stored hash (slow: on a blocking thread).
pub fn verify_secret(stored: &SecretHash, secret: &str) -> Result<Verdict, ActorError> {
    let (ok, outdated) = match stored {
        SecretHash::SaltedSha256 { salt, hash } => {
            let mut h = Sha256::new();
            h.update(salt);
            h.update(secret.as_bytes());
            (ct_eq(&h.finalize(), hash), true)
        }
        SecretHash::Argon2id {
            m_kib,
            t,
            p,
            salt,
            hash,
        } => {
            let given = argon2(*m_kib, *t, *p, salt, secret)
                .map_err(|e| ActorError::Internal(format!("cannot check an agent secret: {e}")))?;
            let current = (*m_kib, *t, *p) == (ARGON2_M_KIB, ARGON2_T, ARGON2_P);
            (ct_eq(&given, hash), !current)
        }
    };
    if !ok {
        return Ok(Verdict::Invalid);
    }
    let rehash = if outdated {
        Some(hash_secret(secret)?)
    } else {
        None
    };
    Ok(Verdict::Valid { rehash })
}

/// Spend the time of one verification, for a name that has no record: a refusal then takes as
/// long whether or not the agent exists.
pub fn waste_a_verification(secret: &str) {
    let _ = argon2(ARGON2_M_KIB, ARGON2_T, ARGON2_P, &[0u8; SALT_LEN], secret);
}

/// Bounds the slow hashing the registry hands to the blocking pool: at most `permits` hashes
/// run at once (each holds [`ARGON2_M_KIB`] of memory), and at most `max_waiting` wait for a
/// turn; beyond that a session opening is refused at once with 503 (the agent retries after
/// `Retry-After`), so a flood of openings costs bounded CPU and memory.
pub struct HashGate {
    permits: tokio::sync::Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// One place in the [`HashGate`], given back when the hash is done or its caller went away.
struct Place<'a>(&'a AtomicUsize);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HashGate {
    pub fn new(permits: usize, max_waiting: usize) -> HashGate {
        HashGate {
            permits: tokio::sync::Semaphore::new(permits.max(1)),
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// Run `f` (a slow hash) on the blocking pool when a permit is free.
    pub async fn run<T, F>(self: Arc<Self>, f: F) -> Result<T, ActorError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, ActorError> + Send + 'static,
    {
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ActorError::Unavailable(
                "too many agent sessions are being opened at once; retry after Retry-After".into(),
            ));
        }
        let _place = Place(&self.waiting);
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ActorError::Unavailable("the coordinator is shutting down".into()))?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ActorError::Internal(format!("a secret hash did not finish: {e}")))?
    }
}

/// A registration token the registry knows: from the config file or the
/// `registration_tokens` tree.
#[derive(Debug, Clone)]
pub struct Grant {
    pub digest: String,
    pub token: RegistrationTokenRecord,
}

/// What the registry needs besides sled to authenticate agents: the hash gate and the
/// registration tokens of the config file (the ones made with `kiln agent registration-token
/// new` are in sled). Shared by every incarnation of the registry.
pub struct Credentials {
    pub gate: Arc<HashGate>,
    pub config_tokens: Vec<Grant>,
}

impl Credentials {
    pub fn new(config_tokens: Vec<Grant>) -> Credentials {
        Credentials {
            gate: Arc::new(HashGate::new(2, 64)),
            config_tokens,
        }
    }
}

/// `claimed` systems must all be among `allowed`: a session opening that claims any other is
/// refused (`system_not_allowed`), never silently trimmed, so a misconfigured agent is seen
/// at once.
pub fn check_systems(
    agent: &str,
    claimed: &[String],
    allowed: &[String],
) -> Result<(), ActorError> {
    let extra: Vec<&String> = claimed.iter().filter(|s| !allowed.contains(s)).collect();
    if extra.is_empty() {
        return Ok(());
    }
    Err(ActorError::Forbidden {
        code: "system_not_allowed",
        message: format!(
            "agent {agent:?} claims system(s) {extra:?}, which its registration does not allow \
             (it may build {allowed:?}): drop them from --system, or register the agent for them"
        ),
    })
}

/// `offered` tags must all be among `allowed` (when the registration limits them).
pub fn check_tags(
    agent: &str,
    offered: &[(String, String)],
    allowed: Option<&[(String, String)]>,
) -> Result<(), ActorError> {
    let Some(allowed) = allowed else {
        return Ok(());
    };
    let extra: Vec<String> = offered
        .iter()
        .filter(|t| !allowed.contains(t))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if extra.is_empty() {
        return Ok(());
    }
    let allowed: Vec<String> = allowed.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Err(ActorError::Forbidden {
        code: "tag_not_allowed",
        message: format!(
            "agent {agent:?} offers tag(s) {extra:?}, which its registration does not allow \
             (it may offer {allowed:?}): drop them, or register the agent with a token that allows them"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_hashes_verify_and_refuse() {
        let h = hash_secret("s3cret").unwrap();
        match &h {
            SecretHash::Argon2id {
                m_kib,
                t,
                p,
                salt,
                hash,
            } => {
                assert_eq!((*m_kib, *t, *p), (ARGON2_M_KIB, ARGON2_T, ARGON2_P));
                assert_eq!((salt.len(), hash.len()), (SALT_LEN, HASH_LEN));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            verify_secret(&h, "s3cret").unwrap(),
            Verdict::Valid { rehash: None }
        ));
        assert!(matches!(
            verify_secret(&h, "s3cret ").unwrap(),
            Verdict::Invalid
        ));
        // Two hashes of one secret differ (fresh salt) and both verify.
        let h2 = hash_secret("s3cret").unwrap();
        assert_ne!(h, h2);
        assert!(matches!(
            verify_secret(&h2, "s3cret").unwrap(),
            Verdict::Valid { .. }
        ));
    }

    /// RFC 9106's Argon2id test vector is for the full interface (secret and associated
    /// data); this pins the plain interface Kiln uses to a value computed with the reference
    /// `argon2` command (`echo -n password | argon2 somesalt -id -t 2 -k 65536 -p 1 -l 32`).
    #[test]
    fn argon2id_matches_the_reference_implementation() {
        let out = argon2(65536, 2, 1, b"somesalt", "password").unwrap();
        assert_eq!(
            hex(&out),
            "09316115d5cf24ed5a15a31a3ba326e5cf32edc24702987c02b6566f61913cf7"
        );
    }

    #[test]
    fn salted_sha256_still_verifies_and_asks_for_a_rehash() {
        let salt = vec![1u8, 2, 3];
        let mut h = Sha256::new();
        h.update(&salt);
        h.update(b"old");
        let stored = SecretHash::SaltedSha256 {
            salt,
            hash: h.finalize().to_vec(),
        };
        match verify_secret(&stored, "old").unwrap() {
            Verdict::Valid { rehash: Some(new) } => {
                assert!(matches!(new, SecretHash::Argon2id { .. }));
                assert!(matches!(
                    verify_secret(&new, "old").unwrap(),
                    Verdict::Valid { rehash: None }
                ));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            verify_secret(&stored, "new").unwrap(),
            Verdict::Invalid
        ));
    }

    #[test]
    fn outdated_argon2_parameters_ask_for_a_rehash() {
        let salt = vec![9u8; SALT_LEN];
        let stored = SecretHash::Argon2id {
            m_kib: 1024,
            t: 1,
            p: 1,
            hash: argon2(1024, 1, 1, &salt, "x").unwrap(),
            salt,
        };
        assert!(matches!(
            verify_secret(&stored, "x").unwrap(),
            Verdict::Valid { rehash: Some(_) }
        ));
    }

    #[test]
    fn systems_and_tags_outside_the_registration_are_refused_by_name() {
        let allowed = vec!["x86_64-linux".to_string(), "i686-linux".to_string()];
        assert!(check_systems("a", &["i686-linux".into()], &allowed).is_ok());
        let e = check_systems("a", &["i586-gnu".into(), "i686-linux".into()], &allowed)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("i586-gnu") && !e.contains("[\"i686-linux\"] ,"),
            "{e}"
        );
        let tags = vec![("big".to_string(), "yes".to_string())];
        assert!(check_tags("a", &tags, None).is_ok());
        assert!(check_tags("a", &tags, Some(&tags)).is_ok());
        let e = check_tags("a", &tags, Some(&[])).unwrap_err().to_string();
        assert!(e.contains("big=yes"), "{e}");
    }

    #[tokio::test]
    async fn the_gate_refuses_beyond_its_queue() {
        let gate = Arc::new(HashGate::new(1, 1));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let g = gate.clone();
        let first = tokio::spawn(g.run(move || {
            rx.recv().ok();
            Ok(1)
        }));
        // Wait until the first run holds the only place.
        for _ in 0..1000 {
            if gate.waiting.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let second = gate.clone().run(|| Ok(2)).await;
        assert!(matches!(second, Err(ActorError::Unavailable(_))));
        tx.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(gate.waiting.load(Ordering::SeqCst), 0);
    }
}
