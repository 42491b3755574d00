//! `kiln state dump`: every record of every tree as one line of text, in tree then key order,
//! for tests (compare before/after) and debugging. Offline: it opens the database itself, so
//! the coordinator must be stopped.

use std::io::Write;

use super::codec::decode;
use super::keys::{parse_hook_work_key, parse_u64_key};
use super::records::*;
use super::{Store, StoreError, TreeId};

/// Write the dump.
pub fn dump(store: &Store, out: &mut dyn Write) -> anyhow::Result<()> {
    for t in TreeId::ALL {
        for kv in store.tree(t).iter() {
            let (k, v) = kv.map_err(StoreError::from)?;
            let (key, value) = render(t, &k, &v)?;
            writeln!(out, "{} {} {}", t.name(), key, value)?;
        }
    }
    Ok(())
}

fn json<T: serde::Serialize>(r: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string(r)?)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn render(t: TreeId, k: &[u8], v: &[u8]) -> anyhow::Result<(String, String)> {
    let id = || {
        parse_u64_key(k)
            .map(|n| n.to_string())
            .unwrap_or_else(|| text(k))
    };
    Ok(match t {
        TreeId::Derivations => {
            let r: DrvRecord = decode(v)?;
            let digest = crate::derivation::Hash::sha256(&r.contents);
            (
                text(k),
                format!(
                    "{{\"size\":{},\"sha256\":\"{}\"}}",
                    r.contents.len(),
                    digest.to_base32()
                ),
            )
        }
        TreeId::Builds => (id(), json(&decode::<BuildRecord>(v)?)?),
        TreeId::Outputs => (text(k), json(&decode::<OutputRecord>(v)?)?),
        TreeId::NarFiles => (text(k), json(&decode::<NarFileRecord>(v)?)?),
        TreeId::Agents => (id(), agent_json(&decode::<AgentRecord>(v)?)?),
        TreeId::RegistrationTokens => (text(k), json(&decode::<RegistrationTokenRecord>(v)?)?),
        TreeId::AgentNames | TreeId::OutputBuilds => (text(k), id_value(v)),
        TreeId::Events => (id(), json(&decode::<EventRecord>(v)?)?),
        TreeId::HookWork | TreeId::HookDead => {
            let key = parse_hook_work_key(k)
                .map(|(h, s)| format!("{h}/{s}"))
                .unwrap_or_else(|| text(k));
            (key, json(&decode::<HookWorkRecord>(v)?)?)
        }
        TreeId::Meta => (text(k), id_value(v)),
        // The key is the token's SHA-256, shown in hex; the token itself is not stored.
        TreeId::AgentControls => (id(), json(&decode::<AgentControlRecord>(v)?)?),
        TreeId::ClientTokens => (
            k.iter().map(|b| format!("{b:02x}")).collect(),
            json(&decode::<ClientTokenRecord>(v)?)?,
        ),
    })
}

/// An agent record without its salt and hash (secrets' neighbours): the algorithm and its
/// parameters only.
fn agent_json(r: &AgentRecord) -> anyhow::Result<String> {
    Ok(serde_json::json!({
        "id": r.id,
        "name": r.name,
        "secret": r.secret.algorithm(),
        "systems": r.systems,
        "created_ms": r.created_ms,
        "tags": r.tags,
        "registered_by": r.registered_by,
        "secret_set_ms": r.secret_set_ms,
    })
    .to_string())
}

fn id_value(v: &[u8]) -> String {
    parse_u64_key(v)
        .map(|n| n.to_string())
        .unwrap_or_else(|| format!("{:?}", text(v)))
}
