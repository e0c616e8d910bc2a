//! What the process did with schemas: registry requests, and records per schema id. Read
//! by the binary's metrics (`sluice_schema_*`), counted here once a chunk, not per record.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::schema_id;

/// Registry requests by outcome, and messages whose writer schema was already known.
#[derive(Default)]
pub struct SchemaStats {
    /// Requests the registry answered (a schema by id, a registration).
    pub fetched: AtomicU64,
    /// Requests the registry refused (an unknown id, an incompatible schema).
    pub refused: AtomicU64,
    /// Tries that got no answer (the registry down, slow, or 5xx), waited out.
    pub unanswered: AtomicU64,
    /// Messages read whose writer schema was in the process's cache.
    pub cache_hits: AtomicU64,
    ids: Mutex<BTreeMap<u32, IdCounts>>,
}

/// Records of one schema id.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdCounts {
    /// Read and decoded.
    pub decoded: u64,
    /// Read and refused (its writer schema does not resolve, or the value does not decode).
    pub refused: u64,
    /// Written by a sink.
    pub encoded: u64,
}

/// The process's counts.
pub fn stats() -> &'static SchemaStats {
    static STATS: std::sync::OnceLock<SchemaStats> = std::sync::OnceLock::new();
    STATS.get_or_init(SchemaStats::default)
}

impl SchemaStats {
    /// Records per schema id, by id.
    pub fn by_id(&self) -> Vec<(u32, IdCounts)> {
        let ids = self.ids.lock().expect("schema stats lock");
        ids.iter().map(|(id, c)| (*id, *c)).collect()
    }

    pub(super) fn count(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A chunk read: each framed message decoded, or refused when its index is in
    /// `refused` (ascending).
    pub(crate) fn read(&self, payloads: &[&[u8]], refused: &[(usize, String)]) {
        let mut chunk: Vec<(u32, IdCounts)> = Vec::new();
        let mut next = refused.iter().map(|(i, _)| *i).peekable();
        for (i, payload) in payloads.iter().enumerate() {
            let bad = next.next_if_eq(&i).is_some();
            let Some(id) = schema_id(payload) else {
                continue;
            };
            let at = match chunk.iter().position(|(known, _)| *known == id) {
                Some(at) => at,
                None => {
                    chunk.push((id, IdCounts::default()));
                    chunk.len() - 1
                }
            };
            if bad {
                chunk[at].1.refused += 1;
            } else {
                chunk[at].1.decoded += 1;
            }
        }
        let mut ids = self.ids.lock().expect("schema stats lock");
        for (id, c) in chunk {
            let counts = ids.entry(id).or_default();
            counts.decoded += c.decoded;
            counts.refused += c.refused;
        }
    }

    /// `rows` written by a sink with schema `id`.
    pub(crate) fn written(&self, id: u32, rows: u64) {
        let mut ids = self.ids.lock().expect("schema stats lock");
        ids.entry(id).or_default().encoded += rows;
    }
}
