//! The [`AgentRegistry`]'s enrollment handlers, for the operator: rotate an agent's secret,
//! and make, list and revoke registration tokens (with which agents register themselves at
//! their first session; see [`super::registry::Open`]).
//!
//! A rotation hashes the new secret on the blocking pool, commits the record, and only then
//! ends the agent's session: its token stops working, and the agent, which still holds the
//! old secret, is refused when it tries to open a new one. While a rotation is in flight the
//! agent is in `record_writes`, so a session opening checked against the old secret is not
//! completed meanwhile, and a second rotation waits (503).

use actix::prelude::*;

use super::credentials::{self, token_digest};
use super::guard::{guard_future, guard_map, unavailable};
use super::registry::{valid_agent_name, AgentRegistry};
use super::{guarded, ActorError};
use crate::protocol::{AgentCreated, NewRegistrationToken, RegistrationTokenCreated};
use crate::store::keys::u64_key;
use crate::store::records::RegistrationTokenRecord;
use crate::store::{now_ms, Batch, TreeId};

const NAME: &str = "agent registry";

/// `kiln agent rotate-secret NAME` (`POST /api/v1/agents/{name}/rotate-secret`): a new
/// secret for the agent, shown once; the old one stops working and its open session ends.
#[derive(Message)]
#[rtype(result = "Result<AgentCreated, ActorError>")]
pub struct RotateSecret(pub String);

impl Handler<RotateSecret> for AgentRegistry {
    type Result = ResponseActFuture<Self, Result<AgentCreated, ActorError>>;

    fn handle(&mut self, msg: RotateSecret, ctx: &mut Context<Self>) -> Self::Result {
        let name = msg.0;
        let found = guarded::<Self, _>(NAME, ctx, |_| {
            let rec = self.agent_by_name(&name)?;
            let id = rec.id;
            if !self.record_writes.insert(id) {
                return Err(ActorError::Unavailable(format!(
                    "agent {name:?}'s record is being changed; retry"
                )));
            }
            Ok(rec)
        });
        let mut rec = match found {
            Ok(r) => r,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let id = rec.id;
        let (gate, committer) = (self.credentials.gate.clone(), self.committer.clone());
        let fut = async move {
            let secret = credentials::random_hex(32);
            let s2 = secret.clone();
            rec.secret = gate.run(move || credentials::hash_secret(&s2)).await?;
            rec.secret_set_ms = now_ms();
            let mut b = Batch::new();
            b.put(TreeId::Agents, &u64_key(rec.id), &rec)?;
            b.event(
                "agent-secret-rotated",
                0,
                rec.id,
                serde_json::json!({"agent_id": rec.id, "name": rec.name}),
            );
            committer.commit(b).await?;
            Ok(AgentCreated {
                id: rec.id,
                name: rec.name,
                secret,
            })
        };
        Box::pin(guard_future::<Self, _, _>(NAME, fut).map(guard_map(
            NAME,
            || Err(unavailable(NAME)),
            move |r: Result<AgentCreated, ActorError>, act: &mut Self, _ctx| {
                act.record_writes.remove(&id);
                if let Ok(created) = &r {
                    // Only now that the new hash is durable: the old session ends.
                    act.sessions.end(id);
                    tracing::info!(agent = %created.name, agent_id = id, "agent secret rotated; its session ended");
                }
                r
            },
        )))
    }
}

fn check_systems_and_tags(req: &NewRegistrationToken) -> Result<(), ActorError> {
    if let Some(systems) = &req.systems {
        if systems.is_empty() || systems.iter().any(|s| s.is_empty()) {
            return Err(ActorError::BadRequest(
                "a registration token's systems must be a non-empty list of system names \
                 (e.g. --system x86_64-linux), or absent to allow any"
                    .into(),
            ));
        }
    }
    if let Some(tags) = &req.tags {
        if tags.iter().any(|(k, _)| k.is_empty()) {
            return Err(ActorError::BadRequest(
                "a tag needs a key: give tags as KEY=VALUE".into(),
            ));
        }
    }
    Ok(())
}

/// `kiln agent registration-token new` (`POST /api/v1/registration-tokens`).
#[derive(Message)]
#[rtype(result = "Result<RegistrationTokenCreated, ActorError>")]
pub struct CreateRegistrationToken(pub NewRegistrationToken);

impl Handler<CreateRegistrationToken> for AgentRegistry {
    type Result = ResponseActFuture<Self, Result<RegistrationTokenCreated, ActorError>>;

    fn handle(&mut self, msg: CreateRegistrationToken, _ctx: &mut Context<Self>) -> Self::Result {
        let req = msg.0;
        let committer = self.committer.clone();
        let fut = async move {
            check_systems_and_tags(&req)?;
            let token = credentials::random_hex(32);
            let digest = token_digest(&token);
            let rec = RegistrationTokenRecord {
                id: digest[..12].to_string(),
                systems: req.systems,
                tags: req.tags,
                created_ms: now_ms(),
            };
            let mut b = Batch::new();
            b.put(TreeId::RegistrationTokens, digest.as_bytes(), &rec)?;
            b.event(
                "registration-token-created",
                0,
                0,
                serde_json::json!({"id": rec.id, "systems": rec.systems, "tags": rec.tags}),
            );
            committer.commit(b).await?;
            tracing::info!(registration_token = %rec.id, "registration token created");
            Ok(RegistrationTokenCreated {
                id: rec.id,
                token,
                systems: rec.systems,
                tags: rec.tags,
            })
        };
        Box::pin(guard_future::<Self, _, _>(NAME, fut))
    }
}

/// `kiln agent registration-token list`: the tokens in sled and in the config (never the
/// tokens themselves).
#[derive(Message)]
#[rtype(result = "Result<Vec<RegistrationTokenRecord>, ActorError>")]
pub struct ListRegistrationTokens;

impl Handler<ListRegistrationTokens> for AgentRegistry {
    type Result = Result<Vec<RegistrationTokenRecord>, ActorError>;

    fn handle(&mut self, _msg: ListRegistrationTokens, ctx: &mut Context<Self>) -> Self::Result {
        guarded::<Self, _>(NAME, ctx, |_| {
            let mut out: Vec<RegistrationTokenRecord> = self
                .credentials
                .config_tokens
                .iter()
                .map(|g| g.token.clone())
                .collect();
            for r in self
                .store
                .scan::<RegistrationTokenRecord>(TreeId::RegistrationTokens)
            {
                out.push(r?.1);
            }
            Ok(out)
        })
    }
}

/// `kiln agent registration-token revoke ID`: no agent can register with it any more (the
/// agents it registered keep their own secrets). Tokens from the config file are revoked by
/// editing the config.
#[derive(Message)]
#[rtype(result = "Result<RegistrationTokenRecord, ActorError>")]
pub struct RevokeRegistrationToken(pub String);

impl Handler<RevokeRegistrationToken> for AgentRegistry {
    type Result = ResponseActFuture<Self, Result<RegistrationTokenRecord, ActorError>>;

    fn handle(&mut self, msg: RevokeRegistrationToken, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.0;
        let found = guarded::<Self, _>(NAME, ctx, |_| {
            if self
                .credentials
                .config_tokens
                .iter()
                .any(|g| g.token.id == id)
            {
                return Err(ActorError::Conflict(format!(
                    "registration token {id} comes from the config file \
                     (registration_tokens): remove it there and restart the coordinator"
                )));
            }
            for r in self
                .store
                .scan::<RegistrationTokenRecord>(TreeId::RegistrationTokens)
            {
                let (k, rec) = r?;
                if rec.id == id {
                    return Ok((k.as_bytes().to_vec(), rec));
                }
            }
            Err(ActorError::NotFound(format!(
                "no registration token with id {id:?}: see `kiln agent registration-token list`"
            )))
        });
        let (key, rec) = match found {
            Ok(r) => r,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let committer = self.committer.clone();
        Box::pin(guard_future::<Self, _, _>(NAME, async move {
            let mut b = Batch::new();
            b.delete(TreeId::RegistrationTokens, &key);
            b.event(
                "registration-token-revoked",
                0,
                0,
                serde_json::json!({"id": rec.id}),
            );
            committer.commit(b).await?;
            Ok(rec)
        }))
    }
}

/// A registration token from the config file: its file is read at start.
pub fn config_grant(
    token: &str,
    systems: Option<Vec<String>>,
    tags: Option<Vec<(String, String)>>,
) -> credentials::Grant {
    let digest = token_digest(token);
    credentials::Grant {
        token: RegistrationTokenRecord {
            id: digest[..12].to_string(),
            systems,
            tags,
            created_ms: 0,
        },
        digest,
    }
}

/// Names are checked where agents are registered; re-exported for the HTTP layer's path
/// parameters.
pub fn valid_name(n: &str) -> bool {
    valid_agent_name(n)
}
