//! The index of the agent's input cache: the store paths it fetched (or found) for builds, with
//! their sizes, when they were last used and how many held builds need them. Fetched inputs
//! stay in the private store for later builds; once their total size is above the cap
//! (`--input-cache-mb`), the least recently used ones that no held build needs are evicted.
//!
//! A build pins its inputs from its assignment until it is built ([`InputCache::pin`]); a
//! pinned path is never chosen. This module only keeps the books; removing an evicted path
//! from the disk (under its per-path lock, after checking no build pinned it again meanwhile)
//! is [`super::inputs::evict_over_cap`]'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
struct Entry {
    /// The NAR size of the path: its size on disk, near enough.
    size: u64,
    /// The value of the use clock when a build last pinned it.
    last_used: u64,
    pins: u32,
    /// In the store (fetched, or found there); an absent path takes no room.
    present: bool,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<PathBuf, Entry>,
    clock: u64,
    /// Total size of the present entries.
    total: u64,
}

/// The input cache's index, shared by every build of the agent.
#[derive(Debug)]
pub struct InputCache {
    inner: Mutex<Inner>,
    /// Bytes; the present entries' total is brought back under it after every fetch.
    cap: u64,
}

impl InputCache {
    pub fn new(cap: u64) -> Arc<InputCache> {
        Arc::new(InputCache {
            inner: Mutex::new(Inner::default()),
            cap,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins `paths` (local path, NAR size) for one build and marks them used now; they are
    /// unpinned when the returned guard drops.
    pub fn pin(self: &Arc<Self>, paths: impl IntoIterator<Item = (PathBuf, u64)>) -> Pins {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let mut pinned = Vec::new();
        for (path, size) in paths {
            let e = inner.entries.entry(path.clone()).or_insert(Entry {
                size,
                last_used: now,
                pins: 0,
                present: false,
            });
            e.pins += 1;
            e.last_used = now;
            pinned.push(path);
        }
        Pins {
            cache: self.clone(),
            paths: pinned,
        }
    }

    /// Records that `path` is in the store (just fetched, or found there).
    pub fn present(&self, path: &Path) {
        let mut inner = self.lock();
        let Some(e) = inner.entries.get_mut(path) else {
            return;
        };
        if !e.present {
            e.present = true;
            let size = e.size;
            inner.total += size;
        }
    }

    /// Takes the least recently used present, unpinned entries out of the index until the
    /// total is at most the cap, and returns them (oldest first) for removal from the disk.
    pub fn take_over_cap(&self) -> Vec<PathBuf> {
        let mut inner = self.lock();
        if inner.total <= self.cap {
            return Vec::new();
        }
        let mut candidates: Vec<(u64, PathBuf, u64)> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.present && e.pins == 0)
            .map(|(p, e)| (e.last_used, p.clone(), e.size))
            .collect();
        candidates.sort();
        let mut victims = Vec::new();
        for (_, path, size) in candidates {
            if inner.total <= self.cap {
                break;
            }
            inner.entries.remove(&path);
            inner.total -= size;
            victims.push(path);
        }
        victims
    }

    /// True when a build registered `path` again since it was taken out (then it must stay).
    pub fn is_known(&self, path: &Path) -> bool {
        self.lock().entries.contains_key(path)
    }

    /// The total size of the present entries.
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }
}

/// One build's pins; dropping it unpins (the paths stay cached, evictable).
#[derive(Debug)]
pub struct Pins {
    cache: Arc<InputCache>,
    paths: Vec<PathBuf>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut inner = self.cache.lock();
        for p in &self.paths {
            if let Some(e) = inner.entries.get_mut(p) {
                e.pins = e.pins.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> PathBuf {
        PathBuf::from(format!("/s/{name}"))
    }

    fn use_once(c: &Arc<InputCache>, name: &str, size: u64) {
        let pins = c.pin([(p(name), size)]);
        c.present(&p(name));
        drop(pins);
    }

    #[test]
    fn evicts_the_least_recently_used_until_under_the_cap() {
        let c = InputCache::new(3_000);
        use_once(&c, "a", 1_000);
        use_once(&c, "b", 1_000);
        use_once(&c, "c", 1_000);
        assert_eq!(c.take_over_cap(), Vec::<PathBuf>::new(), "at the cap");
        // `a` is used again: `b` is now the least recently used.
        use_once(&c, "a", 1_000);
        use_once(&c, "d", 1_500);
        let victims = c.take_over_cap();
        assert_eq!(victims, vec![p("b"), p("c")]);
        assert_eq!(c.total(), 2_500);
        assert!(c.total() <= c.cap());
        assert!(!c.is_known(&p("b")) && c.is_known(&p("a")));
    }

    #[test]
    fn pinned_and_absent_paths_are_never_evicted() {
        let c = InputCache::new(1_000);
        let held = c.pin([(p("old"), 800)]);
        c.present(&p("old"));
        // Pinned but not yet fetched: takes no room.
        let _waiting = c.pin([(p("later"), 5_000)]);
        use_once(&c, "new", 800);
        assert_eq!(c.total(), 1_600);
        // `old` is the least recently used, but a build holds it.
        assert_eq!(c.take_over_cap(), vec![p("new")]);
        assert_eq!(c.total(), 800);
        drop(held);
        use_once(&c, "x", 600);
        assert_eq!(c.take_over_cap(), vec![p("old")]);
        assert!(c.is_known(&p("later")));
        // Two builds pinning one path: it stays pinned until both let go.
        let c = InputCache::new(0);
        let one = c.pin([(p("shared"), 10)]);
        let two = c.pin([(p("shared"), 10)]);
        c.present(&p("shared"));
        drop(one);
        assert!(c.take_over_cap().is_empty());
        drop(two);
        assert_eq!(c.take_over_cap(), vec![p("shared")]);
    }
}
