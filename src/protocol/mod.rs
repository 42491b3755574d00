//! Wire types shared by the coordinator, the agent and the client: JSON request and response
//! bodies of the agent API (`/api/agent/v1`) and the client API (`/api/v1`), the error body,
//! build states, and the protocol version. Every endpoint is documented in `docs/protocol.md`.
//!
//! Derivation contents are bytes, not UTF-8, so they travel base64-encoded ([`Bytes64`]).

use serde::{Deserialize, Serialize};

mod bytes64;
pub use bytes64::Bytes64;

/// Version of the agent protocol. An agent sends it when it opens a session; the coordinator
/// refuses versions it does not speak with `unsupported_protocol`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Prefix of the agent API.
pub const AGENT_API: &str = "/api/agent/v1";
/// Prefix of the client API.
pub const CLIENT_API: &str = "/api/v1";
/// Header that carries an agent's session token (`Authorization: Bearer <token>` also works).
pub const SESSION_HEADER: &str = "x-kiln-session";

/// Build ids are sequential integers, unique for the life of a state dir.
pub type BuildId = u64;
/// Agent ids are sequential integers, unique for the life of a state dir.
pub type AgentId = u64;

/// The states of a build. `Blocked` waits for inputs; `Allocated` means an agent holds a lease;
/// the last three are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuildState {
    Blocked,
    Runnable,
    Allocated,
    Building,
    Uploading,
    Succeeded,
    Failed,
    Canceled,
}

impl BuildState {
    /// Every state, in lifecycle order.
    pub const ALL: [BuildState; 8] = [
        BuildState::Blocked,
        BuildState::Runnable,
        BuildState::Allocated,
        BuildState::Building,
        BuildState::Uploading,
        BuildState::Succeeded,
        BuildState::Failed,
        BuildState::Canceled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BuildState::Succeeded | BuildState::Failed | BuildState::Canceled
        )
    }

    /// Held by an agent (leased).
    pub fn is_leased(self) -> bool {
        matches!(
            self,
            BuildState::Allocated | BuildState::Building | BuildState::Uploading
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Blocked => "blocked",
            BuildState::Runnable => "runnable",
            BuildState::Allocated => "allocated",
            BuildState::Building => "building",
            BuildState::Uploading => "uploading",
            BuildState::Succeeded => "succeeded",
            BuildState::Failed => "failed",
            BuildState::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<BuildState> {
        BuildState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for BuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every error response has this body, with a stable machine-readable `code` and a message that
/// says what was wrong and what to do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Agent API
// ---------------------------------------------------------------------------------------------

/// What an agent says about a build it holds (on session open and on every heartbeat).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeldPhase {
    /// Fetching inputs or running the builder.
    Building,
    /// The builder finished; outputs or the result are being sent.
    Uploading,
    /// The result is ready and waits to be acknowledged.
    Reporting,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBuild {
    pub build_id: BuildId,
    pub attempt: u32,
    pub phase: HeldPhase,
}

/// `POST /api/agent/v1/session`: authenticate and open a session.
#[derive(Clone, Serialize, Deserialize)]
pub struct OpenSession {
    pub name: String,
    /// The agent's secret. With `registration_token`, an agent not registered yet chooses it
    /// (at least 32 characters; `kiln-agent` writes 256 random bits to its secret file first,
    /// so a retried registration sends the same one).
    pub secret: String,
    pub protocol_version: u32,
    pub systems: Vec<String>,
    pub max_parallel_builds: u32,
    /// Builds the agent still holds (after a reconnect or an agent restart).
    #[serde(default)]
    pub builds: Vec<HeldBuild>,
    /// A registration token: when no agent of this name exists yet, the coordinator creates
    /// it (with the systems and tags the token allows) and opens its session. Ignored for an
    /// agent that exists: then only its secret counts.
    #[serde(default)]
    pub registration_token: Option<String>,
    /// Tags this agent offers (`big-memory=yes`): builds whose matched tags
    /// (`scheduling.matched_tags`) it offers may go to it. Each must be allowed by its
    /// registration when that limits tags.
    #[serde(default)]
    pub offers: Vec<(String, String)>,
    /// Tags a build must carry for this agent to take it (an agent kept for big builds).
    #[serde(default)]
    pub requires: Vec<(String, String)>,
}

impl std::fmt::Debug for OpenSession {
    /// Secrets and tokens never reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenSession")
            .field("name", &self.name)
            .field("secret", &"<redacted>")
            .field("protocol_version", &self.protocol_version)
            .field("systems", &self.systems)
            .field("max_parallel_builds", &self.max_parallel_builds)
            .field("builds", &self.builds)
            .field(
                "registration_token",
                &self.registration_token.as_ref().map(|_| "<redacted>"),
            )
            .field("offers", &self.offers)
            .field("requires", &self.requires)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionOpened {
    pub agent_id: AgentId,
    /// Send as `x-kiln-session` on every later request; lost when the coordinator restarts
    /// (the agent then gets 401 `session_unknown` and opens a new session).
    pub session_token: String,
    pub heartbeat_interval_ms: u64,
    pub agent_timeout_ms: u64,
    #[serde(default, deserialize_with = "known_commands")]
    pub commands: Vec<AgentCommand>,
}

/// Commands from the coordinator ride on heartbeat and work responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum AgentCommand {
    /// Stop the build (kill its builder's process group) and report it canceled.
    Cancel { build_id: BuildId, attempt: u32 },
    /// Stop the build and drop its reports: it belongs to someone else now.
    Abandon { build_id: BuildId, attempt: u32 },
    /// Finish what you hold, take no new work.
    Drain,
    /// New heartbeat interval.
    SetHeartbeat { interval_ms: u64 },
    /// Take no new work until `resume`; builds held go on (`kiln agent pause`). Agents before
    /// this command fail to decode a reply carrying it: send it only to agents that know it.
    Pause,
    /// Take work again after `pause` (`kiln agent resume`).
    Resume,
}

/// Decodes a list of commands, leaving out those this version does not know (or cannot
/// decode), so that a newer coordinator may add commands without breaking this agent.
pub fn known_commands<'de, D>(d: D) -> Result<Vec<AgentCommand>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let raw: Vec<serde_json::Value> = Vec::deserialize(d)?;
    Ok(raw
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect())
}

/// `POST /api/agent/v1/heartbeat`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Every build the agent holds, in any phase. A lease not listed ends once it was handed
    /// to the agent longer ago than the coordinator's unheld bound; a listed build that is not
    /// the agent's any more is answered with `abandon`.
    #[serde(default)]
    pub builds: Vec<HeldBuild>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatReply {
    #[serde(default, deserialize_with = "known_commands")]
    pub commands: Vec<AgentCommand>,
}

/// `POST /api/agent/v1/work`: ask for up to `max_builds` builds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkRequest {
    pub max_builds: u32,
    /// Names one logical request: the agent sends a fresh id per request and the same id on
    /// every retry of it, and a retry is answered with the same assignments (same builds, same
    /// attempts), so a reply lost on the wire strands no lease. 1 to 128 letters, digits, `.`,
    /// `_` or `-`. `null` (or absent, as older agents send it): every request allocates anew.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Long poll: when no build is runnable for this agent, wait up to this many ms for one
    /// (the coordinator caps it at `timeouts.work_wait_max_ms`). 0 (or absent, as older
    /// agents send it): answer at once. The agent's HTTP timeout must exceed it.
    #[serde(default)]
    pub wait_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkReply {
    pub builds: Vec<Assignment>,
    #[serde(default, deserialize_with = "known_commands")]
    pub commands: Vec<AgentCommand>,
}

/// One build handed to an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub build_id: BuildId,
    /// The fencing token: every report on this build names it.
    pub attempt: u32,
    pub drv_path: String,
    /// The `.drv` file's bytes (ATerm).
    pub drv: Bytes64,
    pub system: String,
    /// Output name -> store path the builder must create.
    pub outputs: Vec<OutputSpec>,
    /// Every store path the builder needs (input sources, outputs of input derivations, and
    /// their references, closed), each fetchable as a substitute.
    pub inputs: Vec<PathInfo>,
    /// The build's priority (higher first), as submitted: the agent sends the results of
    /// higher-priority builds first. Absent (an older coordinator): 0.
    #[serde(default)]
    pub priority: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSpec {
    pub name: String,
    pub path: String,
}

/// An available store path, as the agent needs it to fetch the NAR (a narinfo in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathInfo {
    /// Full store path.
    pub path: String,
    /// `sha256:<base32>` of the uncompressed NAR.
    pub nar_hash: String,
    pub nar_size: u64,
    /// `sha256:<base32>` of the compressed file.
    pub file_hash: String,
    pub file_size: u64,
    /// `zstd`.
    pub compression: String,
    /// Relative URL of the NAR on the agent listener, e.g. `nar/<base32>.nar.zst`.
    pub url: String,
    /// Full store paths.
    pub references: Vec<String>,
}

/// `POST /api/agent/v1/builds/{id}/start`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartReport {
    pub attempt: u32,
}

/// Query of `PUT`/`GET /api/agent/v1/builds/{id}/outputs/{name}`: an upload is keyed by
/// (build, attempt, output, file hash). `PUT` bodies are the zstd-compressed NAR from `offset`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadQuery {
    pub attempt: u32,
    /// `sha256:<base32>` of the whole compressed file.
    pub file_hash: String,
    pub file_size: u64,
    /// Where this body starts in the file (`PUT` only; 0 when absent).
    #[serde(default)]
    pub offset: u64,
}

/// How much of an upload arrived; `verified` once the whole file was checked and stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadStatus {
    pub received: u64,
    pub verified: bool,
    /// Set when verified: what the coordinator computed.
    #[serde(default)]
    pub nar_hash: Option<String>,
    #[serde(default)]
    pub nar_size: Option<u64>,
}

/// Query of `PUT /api/agent/v1/builds/{id}/log` (body: the zstd-compressed log).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogQuery {
    pub attempt: u32,
}

/// `POST /api/agent/v1/builds/{id}/result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultReport {
    pub attempt: u32,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    /// Every output was uploaded and verified first.
    Succeeded { outputs: Vec<BuiltOutput> },
    /// The build failed: the builder (non-zero exit, timeout, missing output, ...), or, as
    /// `kind` says, the agent's setup or an upload.
    Failed {
        reason: String,
        /// What failed; absent = `builder` (agents before retries did not send it).
        #[serde(default)]
        kind: FailureKind,
        /// With `kind: setup`: inputs the coordinator answered 404 for when the agent fetched
        /// them. The coordinator checks each; one it indeed lost is built again and this build
        /// waits for it (no retry counted). Absent = none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        missing_inputs: Vec<String>,
    },
}

/// What failed in a failure report. Setup and upload failures are infrastructure failures:
/// the coordinator retries them (`scheduling.retries.infrastructure`); builder failures are
/// final unless `scheduling.retries.builder` says otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The builder ran and failed (or the build was canceled).
    #[default]
    Builder,
    /// The agent could not prepare the build (fetching inputs, its build directory, starting
    /// the builder).
    Setup,
    /// The build succeeded but an output could not be uploaded.
    Upload,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Builder => "builder",
            FailureKind::Setup => "setup",
            FailureKind::Upload => "upload",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltOutput {
    pub name: String,
    pub path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    pub file_hash: String,
    pub file_size: u64,
    /// Full store paths found in the output.
    pub references: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultAck {
    /// True when this exact result had already been accepted (the report is idempotent). Never
    /// answered before the first acceptance is durable.
    pub duplicate: bool,
}

// ---------------------------------------------------------------------------------------------
// Client API
// ---------------------------------------------------------------------------------------------

/// Every client token starts with this (so secret scanners and people can tell one); the
/// client sends it as `Authorization: Bearer <token>`.
pub const CLIENT_TOKEN_PREFIX: &str = "kiln-";

/// What a client token may do. Each scope includes the ones before it: `read` (list, show,
/// logs, events, agents), `submit` (also submit, upload sources, cancel), `admin` (also create
/// agents and tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Submit,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Submit, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Whether a token of this scope may do what `needed` allows.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

/// `POST /api/v1/tokens` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewToken {
    pub name: String,
    pub scope: Scope,
}

/// The token is shown once; the coordinator keeps only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token's id (see [`TokenInfo::id`]): what `kiln token revoke` takes.
    #[serde(default)]
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub token: String,
}

/// One client token as `GET /api/v1/tokens` lists it (admin): never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The first 12 hex digits of the token's SHA-256 (the key it is stored under): names
    /// the token without revealing it.
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub created_ms: u64,
    /// When a request last passed the gate with it, since this coordinator process started
    /// (kept in memory only, so a request costs no write); `None` = not since the start.
    pub last_used_ms: Option<u64>,
}

/// `POST /api/v1/agents`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewAgent {
    pub name: String,
    pub systems: Vec<String>,
}

/// The secret is shown once; the coordinator keeps only a salted hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentCreated {
    pub id: AgentId,
    pub name: String,
    pub secret: String,
}

/// `POST /api/v1/registration-tokens`: a token with which agents register themselves.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NewRegistrationToken {
    /// The systems agents registered with it may claim; `null`: whatever each claims when it
    /// registers.
    #[serde(default)]
    pub systems: Option<Vec<String>>,
    /// The tags (`[key, value]`) they may offer; `null`: any.
    #[serde(default)]
    pub tags: Option<Vec<(String, String)>>,
}

/// The token is shown once; the coordinator keeps only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationTokenCreated {
    /// A short public name of the token (the first 12 hex characters of its SHA-256).
    pub id: String,
    pub token: String,
    pub systems: Option<Vec<String>>,
    pub tags: Option<Vec<(String, String)>>,
}

/// `GET /api/v1/agents`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    pub id: AgentId,
    pub name: String,
    pub systems: Vec<String>,
    /// `connected`, `lost` or `never-seen`.
    pub status: String,
    /// Milliseconds since the last heartbeat, when connected this run.
    pub last_seen_ms_ago: Option<u64>,
    pub builds: Vec<BuildId>,
    /// What the operator set: `active`, `paused`, `draining`, or `drained` (draining and
    /// holding no builds). Absent from coordinators before agent controls.
    #[serde(default = "active")]
    pub control: String,
    /// When the agent's quarantine ends (ms since the epoch), while it is quarantined.
    #[serde(default)]
    pub quarantined_until_ms: Option<u64>,
}

fn active() -> String {
    "active".into()
}

/// `POST /api/v1/sources/missing`: which of these store paths the coordinator lacks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathsQuery {
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingPaths {
    pub missing: Vec<String>,
}

/// Query of `PUT /api/v1/sources` (body: the uncompressed NAR of `path`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceQuery {
    pub path: String,
    /// `sha256:<base32>` the client computed; the upload is refused if the body differs.
    pub nar_hash: String,
    /// Comma-separated full store paths this source references (may be empty).
    #[serde(default)]
    pub references: String,
}

/// `POST /api/v1/builds`: the derivations (targets and their whole `.drv` closure, minus any
/// the coordinator already has) and which of them to build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitBuilds {
    pub derivations: Vec<SubmittedDrv>,
    /// `.drv` paths to build.
    pub builds: Vec<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub tags: Vec<(String, String)>,
    /// Do not offer the new builds to agents before this time (ms since the Unix epoch, UTC;
    /// 0 or a past time = at once). Builds already queued keep theirs.
    #[serde(default)]
    pub defer_until_ms: u64,
    /// Also build every derivation of the targets' closure with an output the coordinator
    /// does not have and no live build of its own (the Guix Build Coordinator's "ensure all
    /// related derivation outputs have successful builds"), inputs first. Default false.
    #[serde(default)]
    pub related: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmittedDrv {
    pub path: String,
    pub contents: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submitted {
    pub builds: Vec<BuildSummary>,
}

/// One line of `kiln builds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSummary {
    pub id: BuildId,
    pub drv_path: String,
    pub system: String,
    pub state: BuildState,
    pub priority: i32,
    /// True when the submission found an unfinished build of this derivation and returned it.
    #[serde(default)]
    pub existing: bool,
}

/// `POST /api/v1/builds/{id}/cancel`: the canceled build's summary (its fields at the top
/// level, as before dependents could be canceled), how many builds the request canceled, and
/// the dependents canceled with it (`?dependents=true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReply {
    #[serde(flatten)]
    pub build: BuildSummary,
    /// Builds this request canceled: the build and its dependents.
    pub canceled: usize,
    /// The dependents canceled with it, by id (empty without `?dependents=true`).
    #[serde(default)]
    pub dependents: Vec<BuildSummary>,
    /// True when an agent held the build: it was told to stop its builder.
    #[serde(default)]
    pub was_running: bool,
}

/// `GET /api/v1/builds/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildDetail {
    pub summary: BuildSummary,
    pub attempt: u32,
    pub agent: Option<String>,
    pub outputs: Vec<OutputSpec>,
    pub tags: Vec<(String, String)>,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Why it failed or was canceled.
    pub reason: Option<String>,
    /// For a blocked build: each missing input, and what stands in its way.
    pub waiting_for: Vec<MissingInput>,
    pub has_log: bool,
    /// Infrastructure failures so far (each put the build back in the queue, up to the cap).
    #[serde(default)]
    pub retries: u32,
    /// Builder failures so far that were retried (`scheduling.retries.builder`).
    #[serde(default)]
    pub builder_retries: u32,
    /// Not offered to agents before this time (ms since the epoch): its `defer_until` or a
    /// retry's backoff. Absent when never deferred.
    #[serde(default)]
    pub defer_until_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingInput {
    pub path: String,
    /// The build that would produce it, if any, and its state.
    pub build: Option<BuildId>,
    pub build_state: Option<BuildState>,
    /// Human explanation, e.g. `input build 7 failed: builder exited with status 1`.
    pub note: String,
}

/// `GET /api/v1/builds?state=S&limit=N&cursor=C`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BuildsQuery {
    pub state: Option<String>,
    /// Most builds in the answer (default [`DEFAULT_LIST_LIMIT`]); 0 = no limit.
    pub limit: Option<usize>,
    /// Answer builds with ids above this one (the `next_cursor` of the previous page).
    pub cursor: Option<u64>,
}

/// The page size of `GET /api/v1/builds` when no `limit` is given.
pub const DEFAULT_LIST_LIMIT: usize = 1000;

/// The header of a `GET /api/v1/builds` answer that was cut at its limit: the cursor of the
/// next page (the last id answered). Absent on the last page.
pub const NEXT_CURSOR_HEADER: &str = "x-kiln-next-cursor";

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent from before request ids (no `request_id` field) still parses, and the field
    /// travels as `null` when unset.
    #[test]
    fn work_request_id_is_optional_on_the_wire() {
        let old: WorkRequest = serde_json::from_str(r#"{"max_builds": 2}"#).unwrap();
        assert_eq!(old.max_builds, 2);
        assert_eq!(old.request_id, None);
        let new: WorkRequest =
            serde_json::from_str(r#"{"max_builds": 1, "request_id": "r-1"}"#).unwrap();
        assert_eq!(new.request_id.as_deref(), Some("r-1"));
        assert_eq!(old.wait_ms, 0, "an older agent never long-polls");
        let none = serde_json::to_value(WorkRequest {
            max_builds: 1,
            request_id: None,
            wait_ms: 0,
        })
        .unwrap();
        assert_eq!(
            none,
            serde_json::json!({"max_builds": 1, "request_id": null, "wait_ms": 0})
        );
    }

    /// An assignment from a coordinator before priorities (no `priority` field) parses with
    /// priority 0, and the field travels when set.
    #[test]
    fn assignment_priority_is_optional_on_the_wire() {
        let old = serde_json::json!({
            "build_id": 3, "attempt": 1, "drv_path": "/gnu/store/x.drv", "drv": "",
            "system": "x86_64-linux", "outputs": [], "inputs": []
        });
        let a: Assignment = serde_json::from_value(old).unwrap();
        assert_eq!(a.priority, 0);
        let a = Assignment { priority: -7, ..a };
        let back: Assignment = serde_json::from_value(serde_json::to_value(&a).unwrap()).unwrap();
        assert_eq!(back.priority, -7);
    }

    /// Commands this version does not know are left out of a reply, not a decoding error;
    /// `pause` and `resume` travel as kebab-case tags.
    #[test]
    fn unknown_commands_are_left_out() {
        let reply: HeartbeatReply = serde_json::from_str(
            r#"{"commands": [{"command": "drain"}, {"command": "from-the-future", "x": 1},
                {"command": "cancel"}, {"command": "pause"}, {"command": "resume"}]}"#,
        )
        .unwrap();
        assert_eq!(
            reply.commands,
            vec![
                AgentCommand::Drain,
                AgentCommand::Pause,
                AgentCommand::Resume
            ]
        );
        assert_eq!(
            serde_json::to_value(AgentCommand::Pause).unwrap(),
            serde_json::json!({"command": "pause"})
        );
        let w: WorkReply = serde_json::from_str(r#"{"builds": []}"#).unwrap();
        assert!(w.commands.is_empty());
    }
}
