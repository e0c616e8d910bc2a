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
    /// By schema id; `None`: ids past [`MAX_IDS`].
    ids: Mutex<BTreeMap<Option<u32>, IdCounts>>,
}

/// Schema ids counted apart at most. Ids come from the messages: a producer writing a new
/// id in each would otherwise add a metrics series (and an entry here) per message. Ids
/// beyond count together, as `other`.
const MAX_IDS: usize = 256;

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
    /// Records per schema id, by id (`None`: the ids past the first [`MAX_IDS`]).
    pub fn by_id(&self) -> Vec<(Option<u32>, IdCounts)> {
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
            let counts = entry(&mut ids, id);
            counts.decoded += c.decoded;
            counts.refused += c.refused;
        }
    }

    /// `rows` written by a sink with schema `id`.
    pub(crate) fn written(&self, id: u32, rows: u64) {
        let mut ids = self.ids.lock().expect("schema stats lock");
        entry(&mut ids, id).encoded += rows;
    }
}

/// The counts of `id`, or of `other` once [`MAX_IDS`] ids are counted.
fn entry(ids: &mut BTreeMap<Option<u32>, IdCounts>, id: u32) -> &mut IdCounts {
    let key = if ids.contains_key(&Some(id)) || ids.len() < MAX_IDS {
        Some(id)
    } else {
        None
    };
    ids.entry(key).or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_past_the_limit_count_together() {
        let stats = SchemaStats::default();
        let framed: Vec<[u8; 6]> = (0..(MAX_IDS as u32 + 1000))
            .map(|id| {
                let b = id.to_be_bytes();
                [0, b[0], b[1], b[2], b[3], 0]
            })
            .collect();
        let payloads: Vec<&[u8]> = framed.iter().map(|f| &f[..]).collect();
        stats.read(&payloads, &[]);
        stats.written(3, 5);
        stats.written(u32::MAX, 1);
        let by_id = stats.by_id();
        assert_eq!(by_id.len(), MAX_IDS + 1);
        let other = by_id.iter().find(|(id, _)| id.is_none()).unwrap().1;
        assert_eq!((other.decoded, other.encoded), (1000, 1));
        let three = by_id.iter().find(|(id, _)| *id == Some(3)).unwrap().1;
        assert_eq!((three.decoded, three.encoded), (1, 5));
    }
}
