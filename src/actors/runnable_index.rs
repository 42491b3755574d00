//! The allocator's index of runnable builds, as plain data (tested and benchmarked without
//! actix). Builds are grouped by `(system, tag set)`; each group is ordered by
//! (effective priority descending, builds waiting on it descending, id ascending — the id is
//! the build's age). An agent matches a set of groups (its systems plus `builtin`, and tags it
//! accepts), so a pick looks at the first build of each matching group and takes the best:
//! O(groups + log n), with a handful of groups in a real farm.
//!
//! Re-keying (a build's effective priority or its number of waiting builds changed) moves the
//! entry within its group; the queue decides those numbers, the index only orders by them.
//!
//! Tag matching (docs/runtime-semantics.md, "Scheduling"): an agent `requires` tags (it takes
//! only builds carrying all of them) and `offers` tags; a build tag whose key is one of the
//! configured `scheduling.matched_tags` keys must be offered (or required) by the agent with
//! the same value. Other build tags are information only and never keep a build from an agent.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::symbols::{Symbols, SystemId, TagSet, TagSetId, BUILTIN_SYSTEM};
use crate::protocol::BuildId;

/// A group of builds that the same agents can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Group {
    pub system: SystemId,
    pub tags: TagSetId,
}

/// A runnable build as the index orders it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnableEntry {
    pub id: BuildId,
    pub group: Group,
    /// The priority the scheduler orders by (the build's own, or higher when a build that
    /// needs it has a higher one).
    pub effective: i32,
    /// How many builds wait on this one (tie-break after the effective priority).
    pub rdeps: u32,
}

/// What an agent can take: its systems and its tags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentMatch {
    pub systems: Vec<String>,
    /// Tags this agent offers (`big-memory=yes`).
    pub offers: Vec<(String, String)>,
    /// Tags a build must carry for this agent to take it.
    pub requires: Vec<(String, String)>,
}

impl AgentMatch {
    /// Can this agent build a build of `system` with `tags`?
    pub fn accepts(
        &self,
        system: &str,
        tags: &[(String, String)],
        matched_keys: &[String],
    ) -> bool {
        let system_ok = system == BUILTIN_SYSTEM || self.systems.iter().any(|s| s == system);
        system_ok
            && self.requires.iter().all(|r| tags.contains(r))
            && tags
                .iter()
                .filter(|(k, _)| matched_keys.iter().any(|m| m == k))
                .all(|t| self.offers.contains(t) || self.requires.contains(t))
    }
}

type Key = (Reverse<i32>, Reverse<u32>, BuildId);

struct GroupSet {
    group: Group,
    system: Arc<str>,
    tags: TagSet,
    set: BTreeSet<Key>,
}

/// Where an indexed build sits (its group index and its key's numbers).
#[derive(Debug, Clone, Copy)]
struct Slot {
    group: u32,
    effective: i32,
    rdeps: u32,
}

/// The index (see the module doc).
pub struct RunnableIndex {
    symbols: Arc<Symbols>,
    matched_keys: Arc<[String]>,
    groups: Vec<GroupSet>,
    group_ids: HashMap<Group, u32>,
    entries: HashMap<BuildId, Slot>,
}

impl RunnableIndex {
    pub fn new(symbols: Arc<Symbols>, matched_keys: Arc<[String]>) -> RunnableIndex {
        RunnableIndex {
            symbols,
            matched_keys,
            groups: Vec::new(),
            group_ids: HashMap::new(),
            entries: HashMap::new(),
        }
    }

    fn group_index(&mut self, g: Group) -> u32 {
        if let Some(i) = self.group_ids.get(&g) {
            return *i;
        }
        let i = self.groups.len() as u32;
        self.groups.push(GroupSet {
            group: g,
            system: self.symbols.system_name(g.system),
            tags: self.symbols.tags(g.tags),
            set: BTreeSet::new(),
        });
        self.group_ids.insert(g, i);
        i
    }

    /// Add (or move) a build.
    pub fn insert(&mut self, e: RunnableEntry) {
        self.remove(e.id);
        let group = self.group_index(e.group);
        self.groups[group as usize]
            .set
            .insert((Reverse(e.effective), Reverse(e.rdeps), e.id));
        self.entries.insert(
            e.id,
            Slot {
                group,
                effective: e.effective,
                rdeps: e.rdeps,
            },
        );
    }

    /// Take a build out; `false` when it was not in the index.
    pub fn remove(&mut self, id: BuildId) -> bool {
        let Some(s) = self.entries.remove(&id) else {
            return false;
        };
        if let Some(g) = self.groups.get_mut(s.group as usize) {
            g.set.remove(&(Reverse(s.effective), Reverse(s.rdeps), id));
        }
        true
    }

    /// New ordering numbers for a build that is in the index (a build not in it — taken,
    /// or not runnable — is left out: the queue sends its current numbers when it becomes
    /// runnable again). Returns whether it was in the index.
    pub fn rekey(&mut self, id: BuildId, effective: i32, rdeps: u32) -> bool {
        let Some(s) = self.entries.get_mut(&id) else {
            return false;
        };
        if (s.effective, s.rdeps) == (effective, rdeps) {
            return true;
        }
        let set = &mut self.groups[s.group as usize].set;
        set.remove(&(Reverse(s.effective), Reverse(s.rdeps), id));
        set.insert((Reverse(effective), Reverse(rdeps), id));
        s.effective = effective;
        s.rdeps = rdeps;
        true
    }

    /// The groups an agent may take builds from.
    pub fn matching(&self, agent: &AgentMatch) -> Vec<u32> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(_, g)| agent.accepts(&g.system, &g.tags, &self.matched_keys))
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Does any of `groups` hold a build?
    pub fn has_any(&self, groups: &[u32]) -> bool {
        groups.iter().any(|g| {
            self.groups
                .get(*g as usize)
                .is_some_and(|g| !g.set.is_empty())
        })
    }

    /// Remove and return up to `max` builds of `groups`, best first.
    pub fn take(&mut self, groups: &[u32], max: usize) -> Vec<RunnableEntry> {
        let mut out = Vec::new();
        while out.len() < max {
            let best = groups
                .iter()
                .filter_map(|g| {
                    let set = &self.groups.get(*g as usize)?.set;
                    set.first().map(|k| (*k, *g))
                })
                .min();
            let Some(((Reverse(effective), Reverse(rdeps), id), g)) = best else {
                break;
            };
            self.groups[g as usize]
                .set
                .remove(&(Reverse(effective), Reverse(rdeps), id));
            self.entries.remove(&id);
            let group = self.groups[g as usize].group;
            out.push(RunnableEntry {
                id,
                group,
                effective,
                rdeps,
            });
        }
        out
    }

    /// Take for an agent: [`RunnableIndex::matching`] then [`RunnableIndex::take`].
    pub fn take_for(&mut self, agent: &AgentMatch, max: usize) -> Vec<RunnableEntry> {
        let groups = self.matching(agent);
        self.take(&groups, max)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, id: BuildId) -> bool {
        self.entries.contains_key(&id)
    }

    /// Every indexed build, sorted by id (tests compare it with sled).
    pub fn ids(&self) -> Vec<BuildId> {
        let mut ids: Vec<BuildId> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ix() -> (RunnableIndex, Arc<Symbols>) {
        let s = Arc::new(Symbols::default());
        (
            RunnableIndex::new(s.clone(), Arc::from(vec!["big-memory".to_string()])),
            s,
        )
    }

    fn e(
        s: &Symbols,
        id: u64,
        system: &str,
        tags: &[(&str, &str)],
        p: i32,
        rdeps: u32,
    ) -> RunnableEntry {
        let tags: Vec<(String, String)> = tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RunnableEntry {
            id,
            group: Group {
                system: s.system(system),
                tags: s.tag_set(&tags),
            },
            effective: p,
            rdeps,
        }
    }

    fn agent(systems: &[&str]) -> AgentMatch {
        AgentMatch {
            systems: systems.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn ids(v: Vec<RunnableEntry>) -> Vec<u64> {
        v.into_iter().map(|e| e.id).collect()
    }

    /// Order: effective priority first, then the number of builds waiting, then age (id).
    #[test]
    fn orders_by_priority_then_rdeps_then_age() {
        let (mut ix, s) = ix();
        ix.insert(e(&s, 1, "x86_64-linux", &[], 0, 0));
        ix.insert(e(&s, 2, "x86_64-linux", &[], 0, 5));
        ix.insert(e(&s, 3, "x86_64-linux", &[], 7, 0));
        ix.insert(e(&s, 4, "x86_64-linux", &[], 0, 5));
        ix.insert(e(&s, 5, "x86_64-linux", &[], -1, 99));
        let got = ids(ix.take_for(&agent(&["x86_64-linux"]), 10));
        assert_eq!(got, vec![3, 2, 4, 1, 5]);
        assert!(ix.is_empty());
    }

    /// An i586-gnu build never reaches an aarch64-linux agent; across an agent's systems the
    /// best build wins.
    #[test]
    fn systems_match_and_builtin_goes_to_any_agent() {
        let (mut ix, s) = ix();
        ix.insert(e(&s, 1, "i586-gnu", &[], 9, 0));
        ix.insert(e(&s, 2, "aarch64-linux", &[], 1, 0));
        ix.insert(e(&s, 3, "builtin", &[], 5, 0));
        ix.insert(e(&s, 4, "x86_64-linux", &[], 3, 0));
        let arm = agent(&["aarch64-linux"]);
        assert_eq!(ids(ix.take_for(&arm, 10)), vec![3, 2]);
        assert!(ix.contains(1) && ix.contains(4));
        assert_eq!(ids(ix.take_for(&arm, 10)), Vec::<u64>::new());
        assert_eq!(
            ids(ix.take_for(&agent(&["x86_64-linux", "i586-gnu"]), 10)),
            vec![1, 4]
        );
    }

    #[test]
    fn tags_match_required_and_offered() {
        let (mut ix, s) = ix();
        let x = "x86_64-linux";
        ix.insert(e(&s, 1, x, &[("big-memory", "yes")], 0, 0));
        ix.insert(e(&s, 2, x, &[("origin", "ci")], 0, 0));
        ix.insert(e(&s, 3, x, &[], 0, 0));
        ix.insert(e(
            &s,
            4,
            x,
            &[("big-memory", "yes"), ("origin", "ci")],
            0,
            0,
        ));
        // A plain agent: information tags do not matter, matched keys must be offered.
        let plain = agent(&[x]);
        let groups = ix.matching(&plain);
        let mut got = ids(ix.take(&groups, 10));
        got.sort();
        assert_eq!(got, vec![2, 3]);
        // A big agent that keeps itself for big builds.
        let big = AgentMatch {
            systems: vec![x.into()],
            offers: vec![],
            requires: vec![("big-memory".into(), "yes".into())],
        };
        ix.insert(e(&s, 5, x, &[], 0, 0));
        assert_eq!(ids(ix.take_for(&big, 10)), vec![1, 4]);
        // An agent offering big memory takes anything.
        let offers = AgentMatch {
            systems: vec![x.into()],
            offers: vec![("big-memory".into(), "yes".into())],
            requires: vec![],
        };
        ix.insert(e(&s, 6, x, &[("big-memory", "yes")], 0, 0));
        assert_eq!(ids(ix.take_for(&offers, 10)), vec![5, 6]);
    }

    #[test]
    fn rekey_moves_an_entry_and_ignores_absent_ones() {
        let (mut ix, s) = ix();
        let x = "x86_64-linux";
        ix.insert(e(&s, 1, x, &[], 0, 0));
        ix.insert(e(&s, 2, x, &[], 0, 0));
        assert!(ix.rekey(2, 0, 3));
        assert!(!ix.rekey(9, 100, 0));
        assert!(!ix.contains(9));
        assert_eq!(ids(ix.take_for(&agent(&[x]), 1)), vec![2]);
        ix.insert(e(&s, 2, x, &[], 0, 0));
        assert!(ix.rekey(1, -5, 0));
        assert_eq!(ids(ix.take_for(&agent(&[x]), 2)), vec![2, 1]);
    }
}
