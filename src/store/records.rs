//! The records Kiln keeps in sled, one struct per tree, each with its version byte (see
//! [`super::codec`]). Changing a field means a new version and a decoder for the old one; the
//! golden-bytes tests at the bottom fail when an encoding changes by accident.

use serde::{Deserialize, Serialize};

use super::codec::{decode_body, Record};
use super::StoreError;
use crate::protocol::BuildState;

/// A build: the state machine's record. Key: build id (big-endian u64).
///
/// Version 2 added `request`; version 1 records decode with `request` empty (see
/// [`v1::BuildRecordV1`]). Version 3 added `retries`, `builder_retries` and `defer_until_ms`;
/// version 2 records decode with them 0 (see [`v2::BuildRecordV2`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: u64,
    pub drv_path: String,
    pub system: String,
    pub priority: i32,
    pub tags: Vec<(String, String)>,
    #[serde(with = "state_code")]
    pub state: BuildState,
    /// The fencing token: raised each time the build is allocated; 0 = never allocated.
    pub attempt: u32,
    /// The agent holding the lease while the build is leased; once a lease is released (the
    /// build is `runnable` again, same attempt) the agent that last held it, which alone may
    /// re-adopt it at that attempt. 0 = never leased. A lease grant is persisted; heartbeats
    /// are not.
    pub agent_id: u64,
    /// Output name -> full store path.
    pub outputs: Vec<(String, String)>,
    /// Full store paths that must be available before the build can run.
    pub needs: Vec<String>,
    pub created_ms: u64,
    /// When the current attempt was allocated (0 = never).
    pub allocated_ms: u64,
    pub started_ms: u64,
    pub finished_ms: u64,
    /// Why it failed or was canceled ("" = none).
    pub reason: String,
    /// The attempt whose log is stored (0 = no log).
    pub log_attempt: u32,
    /// The id of the agent's work request that leased the current attempt ("" = none, or an
    /// agent that sends no request ids). A retry of that request by that agent is answered
    /// with the same assignments, also after a coordinator restart. (v2)
    pub request: String,
    /// Infrastructure failures so far (agent lost or disconnected, setup or upload failure),
    /// each of which put the build back in the queue; the retry cap counts these. (v3)
    pub retries: u32,
    /// Builder failures so far that put the build back in the queue (only with
    /// `scheduling.retries.builder` above 0). (v3)
    pub builder_retries: u32,
    /// Not offered to agents before this time (ms since the epoch; 0 = no deferral): the
    /// submission's `defer_until`, or the end of a retry's backoff. (v3)
    pub defer_until_ms: u64,
}

impl Record for BuildRecord {
    const VERSION: u8 = 3;
    const NAME: &'static str = "build";

    fn decode_older(version: u8, body: &[u8]) -> Option<Result<Self, StoreError>> {
        match version {
            1 => Some(decode_body::<v1::BuildRecordV1>(Self::NAME, body).map(Into::into)),
            2 => Some(decode_body::<v2::BuildRecordV2>(Self::NAME, body).map(Into::into)),
            _ => None,
        }
    }
}

/// The layout of version 2 of [`BuildRecord`], kept to read state dirs written before its
/// version 3.
pub mod v2 {
    use serde::{Deserialize, Serialize};

    use super::{state_code, BuildRecord};
    use crate::protocol::BuildState;

    /// `BuildRecord` version 2: everything up to `request`, no retry counts or deferral.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct BuildRecordV2 {
        pub id: u64,
        pub drv_path: String,
        pub system: String,
        pub priority: i32,
        pub tags: Vec<(String, String)>,
        #[serde(with = "state_code")]
        pub state: BuildState,
        pub attempt: u32,
        pub agent_id: u64,
        pub outputs: Vec<(String, String)>,
        pub needs: Vec<String>,
        pub created_ms: u64,
        pub allocated_ms: u64,
        pub started_ms: u64,
        pub finished_ms: u64,
        pub reason: String,
        pub log_attempt: u32,
        pub request: String,
    }

    impl From<BuildRecordV2> for BuildRecord {
        fn from(r: BuildRecordV2) -> BuildRecord {
            BuildRecord {
                id: r.id,
                drv_path: r.drv_path,
                system: r.system,
                priority: r.priority,
                tags: r.tags,
                state: r.state,
                attempt: r.attempt,
                agent_id: r.agent_id,
                outputs: r.outputs,
                needs: r.needs,
                created_ms: r.created_ms,
                allocated_ms: r.allocated_ms,
                started_ms: r.started_ms,
                finished_ms: r.finished_ms,
                reason: r.reason,
                log_attempt: r.log_attempt,
                request: r.request,
                retries: 0,
                builder_retries: 0,
                defer_until_ms: 0,
            }
        }
    }
}

/// The layouts of version 1 of [`BuildRecord`] and [`AgentRecord`], kept to read state dirs
/// written before their version 2.
pub mod v1 {
    use serde::{Deserialize, Serialize};

    use super::{state_code, BuildRecord};
    use crate::protocol::BuildState;

    /// `BuildRecord` version 1: everything up to `log_attempt`, no `request`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct BuildRecordV1 {
        pub id: u64,
        pub drv_path: String,
        pub system: String,
        pub priority: i32,
        pub tags: Vec<(String, String)>,
        #[serde(with = "state_code")]
        pub state: BuildState,
        pub attempt: u32,
        pub agent_id: u64,
        pub outputs: Vec<(String, String)>,
        pub needs: Vec<String>,
        pub created_ms: u64,
        pub allocated_ms: u64,
        pub started_ms: u64,
        pub finished_ms: u64,
        pub reason: String,
        pub log_attempt: u32,
    }

    /// `AgentRecord` version 1: the secret as a salted SHA-256.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct AgentRecordV1 {
        pub id: u64,
        pub name: String,
        pub salt: Vec<u8>,
        pub secret_hash: Vec<u8>,
        pub systems: Vec<String>,
        pub created_ms: u64,
    }

    impl From<AgentRecordV1> for super::AgentRecord {
        fn from(r: AgentRecordV1) -> super::AgentRecord {
            super::AgentRecord {
                id: r.id,
                name: r.name,
                secret: super::SecretHash::SaltedSha256 {
                    salt: r.salt,
                    hash: r.secret_hash,
                },
                systems: r.systems,
                created_ms: r.created_ms,
                tags: None,
                registered_by: String::new(),
                secret_set_ms: r.created_ms,
            }
        }
    }

    impl From<BuildRecordV1> for BuildRecord {
        fn from(r: BuildRecordV1) -> BuildRecord {
            BuildRecord {
                id: r.id,
                drv_path: r.drv_path,
                system: r.system,
                priority: r.priority,
                tags: r.tags,
                state: r.state,
                attempt: r.attempt,
                agent_id: r.agent_id,
                outputs: r.outputs,
                needs: r.needs,
                created_ms: r.created_ms,
                allocated_ms: r.allocated_ms,
                started_ms: r.started_ms,
                finished_ms: r.finished_ms,
                reason: r.reason,
                log_attempt: r.log_attempt,
                request: String::new(),
                retries: 0,
                builder_retries: 0,
                defer_until_ms: 0,
            }
        }
    }
}

/// A [`BuildRecord`] read without copying its strings: the same layout (so the same bytes
/// decode to it), every string borrowed. Only for reading (the start-up scan).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BuildView<'a> {
    pub id: u64,
    pub drv_path: &'a str,
    pub system: &'a str,
    pub priority: i32,
    #[serde(borrow)]
    pub tags: Vec<(&'a str, &'a str)>,
    #[serde(with = "state_code")]
    pub state: BuildState,
    pub attempt: u32,
    pub agent_id: u64,
    #[serde(borrow)]
    pub outputs: Vec<(&'a str, &'a str)>,
    #[serde(borrow)]
    pub needs: Vec<&'a str>,
    pub created_ms: u64,
    pub allocated_ms: u64,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub reason: &'a str,
    pub log_attempt: u32,
    pub request: &'a str,
    pub retries: u32,
    pub builder_retries: u32,
    pub defer_until_ms: u64,
}

impl<'a> BuildView<'a> {
    /// A view of an owned record.
    pub fn of(r: &'a BuildRecord) -> BuildView<'a> {
        BuildView {
            id: r.id,
            drv_path: &r.drv_path,
            system: &r.system,
            priority: r.priority,
            tags: r
                .tags
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            state: r.state,
            attempt: r.attempt,
            agent_id: r.agent_id,
            outputs: r
                .outputs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            needs: r.needs.iter().map(String::as_str).collect(),
            created_ms: r.created_ms,
            allocated_ms: r.allocated_ms,
            started_ms: r.started_ms,
            finished_ms: r.finished_ms,
            reason: &r.reason,
            log_attempt: r.log_attempt,
            request: &r.request,
            retries: r.retries,
            builder_retries: r.builder_retries,
            defer_until_ms: r.defer_until_ms,
        }
    }
}

/// A `.drv` file's bytes. Key: the drv path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrvRecord {
    pub contents: Vec<u8>,
}

impl Record for DrvRecord {
    const VERSION: u8 = 1;
    const NAME: &'static str = "derivation";
}

/// An available store path (built, or uploaded as a source). Key: its 32-character hash part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    pub path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    /// The compressed file under `cache/nar/`, `sha256:<base32>`.
    pub file_hash: String,
    pub file_size: u64,
    /// Full store paths.
    pub references: Vec<String>,
    /// The `.drv` that produced it ("" for sources).
    pub deriver: String,
    pub system: String,
    /// The build that produced it (0 for sources).
    pub build_id: u64,
    pub created_ms: u64,
}

impl Record for OutputRecord {
    const VERSION: u8 = 1;
    const NAME: &'static str = "output";
}

/// A verified compressed NAR under `cache/nar/`. Key: file hash `sha256:<base32>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NarFileRecord {
    pub file_size: u64,
    pub nar_hash: String,
    pub nar_size: u64,
    pub created_ms: u64,
}

impl Record for NarFileRecord {
    const VERSION: u8 = 1;
    const NAME: &'static str = "nar-file";
}

/// How an agent's secret is kept: never the secret itself. bincode writes the variant's
/// index, so the order of the variants is part of the format: append only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretHash {
    /// SHA-256 of the salt followed by the secret: what version 1 records hold. Still
    /// accepted at session open, and replaced by [`SecretHash::Argon2id`] at the first
    /// successful one.
    SaltedSha256 { salt: Vec<u8>, hash: Vec<u8> },
    /// Argon2id (RFC 9106, version 0x13) of the secret with this salt and these parameters:
    /// memory in KiB, passes, lanes. The parameters are stored so that changing the defaults
    /// later leaves existing records readable (they are rehashed at the next session open).
    Argon2id {
        m_kib: u32,
        t: u32,
        p: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl SecretHash {
    /// The algorithm, for logs and `kiln state dump` (never the salt or the hash).
    pub fn algorithm(&self) -> String {
        match self {
            SecretHash::SaltedSha256 { .. } => "salted-sha256".into(),
            SecretHash::Argon2id { m_kib, t, p, .. } => {
                format!("argon2id(m={m_kib},t={t},p={p})")
            }
        }
    }
}

impl std::fmt::Debug for SecretHash {
    /// Salts and hashes are secrets' neighbours: only the algorithm is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretHash({})", self.algorithm())
    }
}

/// A registered agent. Key: agent id. The secret is kept only as a salted slow hash.
///
/// Version 2 replaced `salt` and `secret_hash` (salted SHA-256) with [`SecretHash`], and added
/// `tags`, `registered_by` and `secret_set_ms`; version 1 records decode with their salted
/// SHA-256, no tag limit, registered by an operator (see [`v1::AgentRecordV1`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: u64,
    pub name: String,
    pub secret: SecretHash,
    /// The systems the agent may claim: a session claims all of them (an empty list at
    /// session open) or some; one claiming any other system is refused.
    pub systems: Vec<String>,
    pub created_ms: u64,
    /// The tags (`key=value`) the agent may offer; `None`: any. (v2)
    pub tags: Option<Vec<(String, String)>>,
    /// "" when an operator created it (`kiln agent new`); else the id of the registration
    /// token it registered itself with. (v2)
    pub registered_by: String,
    /// When the secret was set (created, rotated or rehashed). (v2)
    pub secret_set_ms: u64,
}

impl Record for AgentRecord {
    const VERSION: u8 = 2;
    const NAME: &'static str = "agent";

    fn decode_older(version: u8, body: &[u8]) -> Option<Result<Self, StoreError>> {
        match version {
            1 => Some(decode_body::<v1::AgentRecordV1>(Self::NAME, body).map(Into::into)),
            _ => None,
        }
    }
}

/// A registration token: whoever presents it may register an agent (the record is created at
/// its first session). Key: the token's SHA-256 in lowercase hex (64 characters); the token
/// itself is never stored (it holds 256 random bits, so a fast hash is enough).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationTokenRecord {
    /// A short public name for it: the first 12 hex characters of its SHA-256.
    pub id: String,
    /// The systems agents registered with it may claim; `None`: whatever each claims at
    /// registration.
    pub systems: Option<Vec<String>>,
    /// The tags they may offer; `None`: any.
    pub tags: Option<Vec<(String, String)>>,
    pub created_ms: u64,
}

impl Record for RegistrationTokenRecord {
    const VERSION: u8 = 1;
    const NAME: &'static str = "registration-token";
}

/// A client-API token. Key: the SHA-256 of the token's text (32 bytes); the token itself is
/// never stored, so a copy of the state dir grants nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTokenRecord {
    /// A label for people (`kiln token new --name`); not unique.
    pub name: String,
    /// `read`, `submit` or `admin` (see `crate::protocol::Scope`).
    pub scope: String,
    pub created_ms: u64,
}

impl Record for ClientTokenRecord {
    const VERSION: u8 = 1;
    const NAME: &'static str = "client-token";
}

/// An agent's controls (see `crate::actors::agent_controls`). Key: agent id (big-endian u64).
/// Kept apart from [`AgentRecord`] so that pausing an agent or counting its quarantine never
/// rewrites the record that holds its secret (nor races a secret rotation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentControlRecord {
    /// 0 = active, 1 = paused, 2 = draining.
    pub mode: u8,
    /// Quarantines since the last success or resume.
    pub quarantine_level: u32,
    /// When the quarantine under way ends (ms since the epoch); 0 = none.
    pub quarantined_until_ms: u64,
    /// When the agent last opened a session (ms since the epoch); 0 = not since this record.
    pub last_seen_ms: u64,
}

impl Record for AgentControlRecord {
    const VERSION: u8 = 1;
    const NAME: &'static str = "agent-control";
}

/// One entry of the durable event log. Key: sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    pub time_ms: u64,
    /// `build-submitted`, `build-succeeded`, ...
    pub kind: String,
    /// 0 = none.
    pub build_id: u64,
    /// 0 = none.
    pub agent_id: u64,
    /// The event's JSON body (what hooks get on stdin and SSE subscribers as `data`).
    pub payload: String,
}

impl Record for EventRecord {
    const VERSION: u8 = 1;
    const NAME: &'static str = "event";
}

/// A pending hook run. Key: hook name, 0, event seq (see [`super::keys::hook_work_key`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HookWorkRecord {
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub last_error: String,
}

impl Record for HookWorkRecord {
    const VERSION: u8 = 1;
    const NAME: &'static str = "hook-work";
}

/// Build states are stored as fixed codes, independent of the order of the protocol enum.
mod state_code {
    use crate::protocol::BuildState;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn code(s: BuildState) -> u8 {
        match s {
            BuildState::Blocked => 1,
            BuildState::Runnable => 2,
            BuildState::Allocated => 3,
            BuildState::Building => 4,
            BuildState::Uploading => 5,
            BuildState::Succeeded => 6,
            BuildState::Failed => 7,
            BuildState::Canceled => 8,
        }
    }

    pub fn serialize<S: Serializer>(s: &BuildState, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_u8(code(*s))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BuildState, D::Error> {
        let c = u8::deserialize(d)?;
        BuildState::ALL
            .into_iter()
            .find(|s| code(*s) == c)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown build state code {c}")))
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::{decode, encode};
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn sample_build() -> BuildRecord {
        BuildRecord {
            id: 7,
            drv_path: "/s/a.drv".into(),
            system: "x".into(),
            priority: -1,
            tags: vec![("k".into(), "v".into())],
            state: BuildState::Runnable,
            attempt: 2,
            agent_id: 3,
            outputs: vec![("out".into(), "/s/o".into())],
            needs: vec!["/s/i".into()],
            created_ms: 1,
            allocated_ms: 2,
            started_ms: 3,
            finished_ms: 4,
            reason: "".into(),
            log_attempt: 0,
            request: "".into(),
            retries: 0,
            builder_retries: 0,
            defer_until_ms: 0,
        }
    }

    /// The v1 bytes of `sample_build` (pinned when v1 was current, in [2/8]).
    const BUILD_V1_HEX: &str = "01\
         0700000000000000\
         0800000000000000 2f732f612e647276\
         0100000000000000 78\
         ffffffff\
         0100000000000000 0100000000000000 6b 0100000000000000 76\
         02\
         02000000\
         0300000000000000\
         0100000000000000 0300000000000000 6f7574 0400000000000000 2f732f6f\
         0100000000000000 0400000000000000 2f732f69\
         0100000000000000 0200000000000000 0300000000000000 0400000000000000\
         0000000000000000\
         00000000";

    fn unhex(h: &str) -> Vec<u8> {
        let h: String = h.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A state dir written by a kiln with v1 build records still reads: the v1 bytes decode
    /// to the same build with no work request.
    #[test]
    fn build_record_v1_bytes_still_decode() {
        let bytes = unhex(BUILD_V1_HEX);
        assert_eq!(bytes[0], 1);
        assert_eq!(decode::<BuildRecord>(&bytes).unwrap(), sample_build());
        // And v1 is what the v1 layout encodes to (the old layout is kept exactly).
        let old = v1::BuildRecordV1 {
            id: 7,
            drv_path: "/s/a.drv".into(),
            system: "x".into(),
            priority: -1,
            tags: vec![("k".into(), "v".into())],
            state: BuildState::Runnable,
            attempt: 2,
            agent_id: 3,
            outputs: vec![("out".into(), "/s/o".into())],
            needs: vec!["/s/i".into()],
            created_ms: 1,
            allocated_ms: 2,
            started_ms: 3,
            finished_ms: 4,
            reason: "".into(),
            log_attempt: 0,
        };
        let mut v1_bytes = vec![1u8];
        v1_bytes.extend(bincode::serialize(&old).unwrap());
        assert_eq!(v1_bytes, bytes);
    }

    /// The v2 bytes of `sample_build` with request "r1" (pinned when v2 was current, in
    /// [3/8]).
    fn build_v2_hex() -> String {
        let v1_body = &BUILD_V1_HEX.replace(' ', "")[2..];
        format!("02{v1_body}0200000000000000 7231").replace(' ', "")
    }

    /// A state dir written by a kiln with v2 build records still reads: the v2 bytes decode
    /// to the same build with no retries and no deferral; and the v2 layout encodes to them.
    #[test]
    fn build_record_v2_bytes_still_decode() {
        let bytes = unhex(&build_v2_hex());
        let mut r = sample_build();
        r.request = "r1".into();
        assert_eq!(decode::<BuildRecord>(&bytes).unwrap(), r);
        let old = v2::BuildRecordV2 {
            id: 7,
            drv_path: "/s/a.drv".into(),
            system: "x".into(),
            priority: -1,
            tags: vec![("k".into(), "v".into())],
            state: BuildState::Runnable,
            attempt: 2,
            agent_id: 3,
            outputs: vec![("out".into(), "/s/o".into())],
            needs: vec!["/s/i".into()],
            created_ms: 1,
            allocated_ms: 2,
            started_ms: 3,
            finished_ms: 4,
            reason: "".into(),
            log_attempt: 0,
            request: "r1".into(),
        };
        let mut v2_bytes = vec![2u8];
        v2_bytes.extend(bincode::serialize(&old).unwrap());
        assert_eq!(v2_bytes, bytes);
    }

    /// Pins the v3 encoding of a build record: if this fails, the on-disk format changed and
    /// needs a new version with a decoder for this one, not an edit of this test. The v2 body,
    /// then `retries`, `builder_retries` (u32 LE) and `defer_until_ms` (u64 LE).
    #[test]
    fn build_record_v3_golden_bytes() {
        let mut r = sample_build();
        r.request = "r1".into();
        r.retries = 2;
        r.builder_retries = 1;
        r.defer_until_ms = 0x0102;
        let bytes = encode(&r).unwrap();
        let v2_body = &build_v2_hex()[2..];
        assert_eq!(
            hex(&bytes),
            format!("03{v2_body}02000000 01000000 0201000000000000").replace(' ', "")
        );
        assert_eq!(decode::<BuildRecord>(&bytes).unwrap(), r);
    }

    /// The borrowed view reads the same v3 bytes as the record (the start-up scan uses it).
    #[test]
    fn build_view_reads_the_v3_bytes() {
        let mut r = sample_build();
        r.request = "r1".into();
        r.retries = 3;
        r.defer_until_ms = 99;
        let bytes = encode(&r).unwrap();
        match super::super::codec::decode_build_view(&bytes).unwrap() {
            super::super::codec::View::Borrowed(v) => assert_eq!(v, BuildView::of(&r)),
            super::super::codec::View::Owned(_) => panic!("v3 bytes decode borrowed"),
        }
        // v1 and v2 bytes come back owned, converted.
        match super::super::codec::decode_build_view(&unhex(BUILD_V1_HEX)).unwrap() {
            super::super::codec::View::Owned(o) => assert_eq!(o, sample_build()),
            super::super::codec::View::Borrowed(_) => panic!("v1 bytes are converted"),
        }
        match super::super::codec::decode_build_view(&unhex(&build_v2_hex())).unwrap() {
            super::super::codec::View::Owned(o) => assert_eq!(o.request, "r1"),
            super::super::codec::View::Borrowed(_) => panic!("v2 bytes are converted"),
        }
    }

    #[test]
    fn event_record_v1_golden_bytes() {
        let r = EventRecord {
            seq: 1,
            time_ms: 2,
            kind: "k".into(),
            build_id: 3,
            agent_id: 0,
            payload: "{}".into(),
        };
        let bytes = encode(&r).unwrap();
        assert_eq!(
            hex(&bytes),
            "01 0100000000000000 0200000000000000 0100000000000000 6b 0300000000000000 0000000000000000 0200000000000000 7b7d"
                .replace(' ', "")
        );
    }

    /// Pins the v1 encodings of the other records (see `build_record_v1_golden_bytes`).
    #[test]
    fn other_records_v1_golden_bytes() {
        let drv = DrvRecord {
            contents: vec![0xff, 0x00],
        };
        assert_eq!(
            hex(&encode(&drv).unwrap()),
            "01 0200000000000000 ff00".replace(' ', "")
        );
        let out = OutputRecord {
            path: "/p".into(),
            nar_hash: "n".into(),
            nar_size: 1,
            file_hash: "f".into(),
            file_size: 2,
            references: vec!["/r".into()],
            deriver: "".into(),
            system: "s".into(),
            build_id: 3,
            created_ms: 4,
        };
        assert_eq!(
            hex(&encode(&out).unwrap()),
            "01 0200000000000000 2f70 0100000000000000 6e 0100000000000000 0100000000000000 66 \
             0200000000000000 0100000000000000 0200000000000000 2f72 0000000000000000 \
             0100000000000000 73 0300000000000000 0400000000000000"
                .replace([' ', '\\', '\n'], "")
        );
        let nar = NarFileRecord {
            file_size: 1,
            nar_hash: "h".into(),
            nar_size: 2,
            created_ms: 3,
        };
        assert_eq!(
            hex(&encode(&nar).unwrap()),
            "01 0100000000000000 0100000000000000 68 0200000000000000 0300000000000000"
                .replace(' ', "")
        );
        // AgentRecord's v1 bytes are pinned in `agent_record_v1_bytes_still_decode`.
        let work = HookWorkRecord {
            attempts: 1,
            next_attempt_ms: 2,
            last_error: "e".into(),
        };
        assert_eq!(
            hex(&encode(&work).unwrap()),
            "01 01000000 0200000000000000 0100000000000000 65".replace(' ', "")
        );
    }

    fn sample_agent() -> AgentRecord {
        AgentRecord {
            id: 1,
            name: "a".into(),
            secret: SecretHash::Argon2id {
                m_kib: 19456,
                t: 2,
                p: 1,
                salt: vec![7],
                hash: vec![8],
            },
            systems: vec!["x".into()],
            created_ms: 2,
            tags: Some(vec![("k".into(), "v".into())]),
            registered_by: "t".into(),
            secret_set_ms: 3,
        }
    }

    /// The v1 bytes of an agent record (pinned when v1 was current, in [2/8]).
    const AGENT_V1_HEX: &str = "01 0100000000000000 0100000000000000 61 0100000000000000 07 \
         0100000000000000 08 0100000000000000 0100000000000000 78 0200000000000000";

    /// A state dir written by a kiln with v1 agent records still reads: the salted SHA-256
    /// comes back as such (it is rehashed with Argon2id at the agent's next session).
    #[test]
    fn agent_record_v1_bytes_still_decode() {
        let bytes = unhex(AGENT_V1_HEX);
        let old = v1::AgentRecordV1 {
            id: 1,
            name: "a".into(),
            salt: vec![7],
            secret_hash: vec![8],
            systems: vec!["x".into()],
            created_ms: 2,
        };
        let mut v1_bytes = vec![1u8];
        v1_bytes.extend(bincode::serialize(&old).unwrap());
        assert_eq!(v1_bytes, bytes, "the v1 layout is kept exactly");
        let rec = decode::<AgentRecord>(&bytes).unwrap();
        assert_eq!(
            rec,
            AgentRecord {
                id: 1,
                name: "a".into(),
                secret: SecretHash::SaltedSha256 {
                    salt: vec![7],
                    hash: vec![8],
                },
                systems: vec!["x".into()],
                created_ms: 2,
                tags: None,
                registered_by: String::new(),
                secret_set_ms: 2,
            }
        );
    }

    /// Pins the v2 encoding of an agent record (see `build_record_v2_golden_bytes`): the
    /// secret's variant index (1 = Argon2id) and parameters, then the v2 fields.
    #[test]
    fn agent_record_v2_golden_bytes() {
        let a = sample_agent();
        let bytes = encode(&a).unwrap();
        assert_eq!(
            hex(&bytes),
            "02 0100000000000000 0100000000000000 61 \
             01000000 004c0000 02000000 01000000 0100000000000000 07 0100000000000000 08 \
             0100000000000000 0100000000000000 78 0200000000000000 \
             01 0100000000000000 0100000000000000 6b 0100000000000000 76 \
             0100000000000000 74 0300000000000000"
                .replace([' ', '\\', '\n'], "")
        );
        assert_eq!(decode::<AgentRecord>(&bytes).unwrap(), a);
        // The debug form never shows salt or hash.
        assert_eq!(
            format!("{:?}", a.secret),
            "SecretHash(argon2id(m=19456,t=2,p=1))"
        );
    }

    #[test]
    fn registration_token_record_v1_golden_bytes() {
        let t = RegistrationTokenRecord {
            id: "i".into(),
            systems: Some(vec!["x".into()]),
            tags: None,
            created_ms: 4,
        };
        assert_eq!(
            hex(&encode(&t).unwrap()),
            "01 0100000000000000 69 01 0100000000000000 0100000000000000 78 00 0400000000000000"
                .replace(' ', "")
        );
    }

    /// Pins the v1 encoding of a client token record (see `build_record_v1_golden_bytes`).
    #[test]
    fn client_token_record_v1_golden_bytes() {
        let t = ClientTokenRecord {
            name: "ci".into(),
            scope: "read".into(),
            created_ms: 5,
        };
        let bytes = encode(&t).unwrap();
        assert_eq!(
            hex(&bytes),
            "01 0200000000000000 6369 0400000000000000 72656164 0500000000000000".replace(' ', "")
        );
        assert_eq!(decode::<ClientTokenRecord>(&bytes).unwrap(), t);
    }

    /// Pins the v1 encoding of an agent's controls (see `build_record_v1_golden_bytes`).
    #[test]
    fn agent_control_record_v1_golden_bytes() {
        let c = AgentControlRecord {
            mode: 2,
            quarantine_level: 3,
            quarantined_until_ms: 4,
            last_seen_ms: 5,
        };
        let bytes = encode(&c).unwrap();
        assert_eq!(
            hex(&bytes),
            "01 02 03000000 0400000000000000 0500000000000000".replace(' ', "")
        );
        assert_eq!(decode::<AgentControlRecord>(&bytes).unwrap(), c);
    }

    #[test]
    fn unknown_version_is_a_clear_error() {
        let mut bytes = encode(&HookWorkRecord::default()).unwrap();
        bytes[0] = 9;
        let err = decode::<HookWorkRecord>(&bytes).unwrap_err().to_string();
        assert!(err.contains("version 9"), "{err}");
    }

    #[test]
    fn other_records_roundtrip() {
        let o = OutputRecord {
            path: "/s/p".into(),
            nar_hash: "sha256:x".into(),
            nar_size: 1,
            file_hash: "sha256:y".into(),
            file_size: 2,
            references: vec!["/s/q".into()],
            deriver: "/s/d.drv".into(),
            system: "x".into(),
            build_id: 4,
            created_ms: 5,
        };
        assert_eq!(decode::<OutputRecord>(&encode(&o).unwrap()).unwrap(), o);
        let a = sample_agent();
        assert_eq!(decode::<AgentRecord>(&encode(&a).unwrap()).unwrap(), a);
        let t = RegistrationTokenRecord {
            id: "0123456789ab".into(),
            systems: None,
            tags: Some(vec![("k".into(), "v".into())]),
            created_ms: 9,
        };
        assert_eq!(
            decode::<RegistrationTokenRecord>(&encode(&t).unwrap()).unwrap(),
            t
        );
        let d = DrvRecord {
            contents: vec![0xff, 0],
        };
        assert_eq!(decode::<DrvRecord>(&encode(&d).unwrap()).unwrap(), d);
    }
}
