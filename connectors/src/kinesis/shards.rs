//! Which shards to read: every shard, each once its parents are done.
//!
//! A split closes a shard and opens two children; a merge closes two and opens one child.
//! As the KCL does, a child is read only after its parents have been read to their end
//! and their last records checkpointed, so the records of a key (which moves from a parent
//! to a child) stay in order. A parent no longer listed has passed the stream's retention:
//! there is nothing left of it to read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A shard as ListShards tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardDesc {
    pub id: Arc<str>,
    pub parents: Vec<Arc<str>>,
}

/// The stream's shards as last listed, and what this source did with them.
#[derive(Debug, Default)]
pub struct Shards {
    listed: BTreeMap<Arc<str>, ShardDesc>,
    /// Being read here.
    reading: BTreeSet<Arc<str>>,
    /// Read to their end and checkpointed.
    done: BTreeSet<Arc<str>>,
    /// Read before (the checkpoint has a position of them): their parents were done then,
    /// so they start at once after a restart, beside the parents read again to their end.
    resumed: BTreeSet<Arc<str>>,
}

impl Shards {
    /// What the stream's shards are now.
    pub fn listed(&mut self, shards: Vec<ShardDesc>) {
        self.listed = shards.into_iter().map(|s| (s.id.clone(), s)).collect();
    }

    /// Shards to start reading: not read yet, their parents done; marked as being read.
    pub fn ready(&mut self) -> Vec<Arc<str>> {
        let ready: Vec<Arc<str>> = self
            .listed
            .values()
            .filter(|s| !self.reading.contains(&s.id) && !self.done.contains(&s.id))
            .filter(|s| {
                self.resumed.contains(&s.id)
                    || s.parents
                        .iter()
                        .all(|p| self.done.contains(p) || !self.listed.contains_key(p))
            })
            .map(|s| s.id.clone())
            .collect();
        self.reading.extend(ready.iter().cloned());
        ready
    }

    /// Read before this run (see `resumed`).
    pub fn resume(&mut self, shard: &Arc<str>) {
        self.resumed.insert(shard.clone());
    }

    /// The shard's parents, as listed.
    pub fn parents(&self, shard: &str) -> Vec<Arc<str>> {
        self.listed
            .get(shard)
            .map(|s| s.parents.clone())
            .unwrap_or_default()
    }

    /// Never to be read (a closed shard a pipeline starting at `latest` passes over).
    pub fn skip(&mut self, shard: &Arc<str>) {
        self.done.insert(shard.clone());
    }

    /// The shard was read to its end and its last records are checkpointed.
    pub fn done(&mut self, shard: &str) {
        if let Some(id) = self.reading.take(shard) {
            self.done.insert(id);
        }
    }
}

/// The number in `shardId-000000000004`, for the partition's id; names without one get
/// ids counted from 2^31 in the order they are seen.
pub fn partition_id(shard: &str, others: &mut BTreeMap<Arc<str>, u32>) -> u32 {
    if let Some(n) = shard
        .strip_prefix("shardId-")
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| *n < 1 << 31)
    {
        return n;
    }
    let next = (1 << 31) + others.len() as u32;
    *others.entry(shard.into()).or_insert(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parents: &[&str]) -> ShardDesc {
        ShardDesc {
            id: id.into(),
            parents: parents.iter().map(|p| (*p).into()).collect(),
        }
    }

    fn names(v: Vec<Arc<str>>) -> Vec<String> {
        v.into_iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn children_wait_for_every_parent() {
        let mut shards = Shards::default();
        // 0 split into 2 and 3; 1 and 2 merged into 4.
        shards.listed(vec![
            shard("0", &[]),
            shard("1", &[]),
            shard("2", &["0"]),
            shard("3", &["0"]),
            shard("4", &["1", "2"]),
        ]);
        assert_eq!(names(shards.ready()), ["0", "1"]);
        assert!(shards.ready().is_empty(), "nothing is started twice");
        shards.done("1");
        assert!(shards.ready().is_empty(), "4 waits for 2 as well");
        shards.done("0");
        assert_eq!(names(shards.ready()), ["2", "3"]);
        shards.done("2");
        assert_eq!(names(shards.ready()), ["4"]);
    }

    #[test]
    fn a_shard_read_before_a_restart_starts_with_its_parents() {
        let mut shards = Shards::default();
        shards.listed(vec![
            shard("0", &[]),
            shard("1", &["0"]),
            shard("2", &["0"]),
        ]);
        shards.resume(&Arc::from("1"));
        assert_eq!(names(shards.ready()), ["0", "1"]);
        shards.done("0");
        assert_eq!(names(shards.ready()), ["2"]);
    }

    #[test]
    fn a_parent_past_retention_holds_nothing_back() {
        let mut shards = Shards::default();
        shards.listed(vec![shard("5", &["0"]), shard("6", &["0", "1"])]);
        assert_eq!(names(shards.ready()), ["5", "6"]);
    }

    #[test]
    fn shards_found_later_are_started_once_ready() {
        let mut shards = Shards::default();
        shards.listed(vec![shard("0", &[])]);
        assert_eq!(names(shards.ready()), ["0"]);
        shards.listed(vec![
            shard("0", &[]),
            shard("1", &["0"]),
            shard("2", &["0"]),
        ]);
        assert!(shards.ready().is_empty());
        shards.done("0");
        assert_eq!(names(shards.ready()), ["1", "2"]);
    }

    #[test]
    fn partition_ids_come_from_shard_numbers() {
        let mut others = BTreeMap::new();
        assert_eq!(partition_id("shardId-000000000004", &mut others), 4);
        assert_eq!(partition_id("odd", &mut others), 1 << 31);
        assert_eq!(partition_id("odder", &mut others), (1 << 31) + 1);
        assert_eq!(partition_id("odd", &mut others), 1 << 31);
    }
}
