//! The in-memory catalog cache of the ingest path: an agent and its allowed
//! senders by the id or name a request named, tagged with the
//! `catalog_version` they were read at (migration 0004: a counter every change
//! to agents, users or allowed senders bumps, by trigger, from any process).
//!
//! Consistency: a cached view may lag a change committed by another process,
//! never one committed through this store (each such write clears the cache).
//! Admission is exact all the same: the enqueue writer reads the counter
//! inside every commit and refuses (`StoreError::CatalogChanged`) a job whose
//! view is older, and clears the cache when the counter moved. A rejection
//! from a cached view is re-checked on a fresh read by the caller. This
//! module only remembers views; it reads and writes no table.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::AgentView;

/// Views remembered before the cache starts over (a few MB at most).
const VIEWS_MAX: usize = 20_000;

#[derive(Debug, Default)]
pub(crate) struct Catalog(Mutex<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// The counter every remembered view was read at.
    version: Option<i64>,
    /// Bumped by every clear, so a read that overlapped a clear is not kept.
    generation: u64,
    views: HashMap<String, Arc<AgentView>>,
}

impl Catalog {
    pub(crate) fn get(&self, id_or_name: &str) -> Option<Arc<AgentView>> {
        self.lock().views.get(id_or_name).cloned()
    }

    /// The generation to hand back to `remember` after a read.
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keeps a view read after `generation`, unless the cache was cleared
    /// since or holds views of a newer counter.
    pub(crate) fn remember(&self, id_or_name: &str, view: Arc<AgentView>, generation: u64) {
        let mut inner = self.lock();
        if inner.generation != generation || inner.version.is_some_and(|v| v > view.catalog_version) {
            return;
        }
        if inner.version != Some(view.catalog_version) || inner.views.len() >= VIEWS_MAX {
            inner.views.clear();
            inner.version = Some(view.catalog_version);
        }
        inner.views.insert(id_or_name.to_owned(), view);
    }

    /// After a catalog write through this store.
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        inner.views.clear();
        inner.version = None;
        inner.generation += 1;
    }

    /// The writer saw `version` inside a commit: views of another are stale.
    pub(crate) fn observe(&self, version: i64) {
        let mut inner = self.lock();
        if inner.version.is_some_and(|v| v < version) {
            inner.views.clear();
            inner.version = Some(version);
            inner.generation += 1;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The cache holds no invariant a panic could break half way.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
