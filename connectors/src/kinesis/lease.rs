//! Leases: how worker processes (`sluice worker`, `sluice run --processes N`) share a
//! stream's shards. Kinesis has no consumer groups; as the KCL does, each shard has a lease
//! saying which member reads it, and members take, renew, hand over and end leases.
//!
//! The lease table is a folder in the checkpoint directory the members share already
//! (`DIR/leases/STREAM/SHARD.json`, one JSON file per shard), read and written under an
//! exclusive lock on `DIR/leases/STREAM/.lock`, each file replaced whole by a rename. A
//! lease holds what the KCL's does:
//!
//! - `owner` and `counter`: the member reading the shard, and a number it increments at
//!   every renewal. A member takes a lease as expired when its counter has not changed for
//!   `lease_duration` *as that member observed it* (its own clock only, as the KCL: clocks
//!   of different machines are never compared);
//! - `checkpoint`: the offset and sequence number the owner's last committed checkpoint
//!   holds, so the next owner resumes there (stage state comes from the owner's checkpoint
//!   store, as for Kafka partitions);
//! - `parents` and `ended`: a shard read to its end and checkpointed is ended; a shard is
//!   taken only once all its parents have ended, so a key's records stay in order across a
//!   split or merge, whichever members read the parents and the children;
//! - `wanted_by`: how a member with fewer shards than its share asks for one of a member
//!   with more. The owner drains the shard, checkpoints it and then hands the lease over
//!   (`owner = wanted_by`): the next owner starts exactly where the checkpoint is, with the
//!   state. (The KCL 1.x steals the lease outright and the old owner finds out later.)
//!
//! Every member's share is `ceil(shards to read / members)`, members being the owners of
//! unexpired leases and itself; a member takes expired or free leases up to its share and
//! asks for one lease at a time from the member with the most.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sluice_engine::source::ResumeAt;

use super::shards::ShardDesc;

/// One shard's lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub counter: u64,
    #[serde(default)]
    pub parents: Vec<String>,
    #[serde(default)]
    pub ended: bool,
    /// Ended without being read: a closed shard a new table at `latest` passed over. Its
    /// children start at `start_from` like the other shards, not at their first record.
    #[serde(default)]
    pub skipped: bool,
    #[serde(default)]
    pub wanted_by: Option<String>,
    /// Where the owner's last committed checkpoint left the shard (the engine's offset
    /// and the position `NEXT SEQUENCE [SUB]` committed with it).
    #[serde(default)]
    pub checkpoint: Option<ResumeAt>,
    /// How far behind the stream's tip the owner's reader was at its last renewal
    /// (`MillisBehindLatest`): what `--processes auto` sizes the worker processes by.
    #[serde(default)]
    pub lag_ms: Option<u64>,
}

/// The lease table: shard id → lease.
pub type Table = BTreeMap<String, Lease>;

/// What a member saw of each lease, and since when (its own clock).
pub type Observed = HashMap<String, (Option<String>, u64, Instant)>;

/// What one pass over the table asks the member to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Leases it holds now and did not before: read them from their checkpoint, a child
    /// (whose parents are in the table) from its first record.
    pub taken: Vec<Taken>,
    /// Leases it held and another member took (it was thought gone): stop reading at once.
    pub lost: Vec<String>,
    /// Leases another member asked for: drain, checkpoint, then hand them over.
    pub asked: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub shard: String,
    pub checkpoint: Option<ResumeAt>,
    pub child: bool,
}

/// What a member brings to a pass over the table.
pub struct Pass<'a> {
    pub me: &'a str,
    /// Shards it reads (also those it is handing over).
    pub held: &'a BTreeSet<String>,
    /// Shards whose hand-over it has drained and checkpointed: give them to who asked.
    pub hand_over: &'a [String],
    /// Shards it read to their end and checkpointed.
    pub ended: &'a [String],
    /// Its readers' lag in time, by shard, written into their leases.
    pub lags: &'a BTreeMap<String, u64>,
    /// The stream's shards as last listed (and whether each is closed), when listed since
    /// the last pass: leases are made for new ones.
    pub listing: Option<&'a [(ShardDesc, bool)]>,
    /// A table made by this listing for a pipeline starting at `latest` with nothing
    /// checkpointed ends the closed shards at once (they hold only records older than now).
    pub skip_closed_when_new: bool,
    pub duration: Duration,
    pub now: Instant,
}

/// One pass: renews what the member holds, ends and hands over what it finished, makes
/// leases for new shards, and takes or asks for its share. Changes `table` in place.
pub fn pass(table: &mut Table, observed: &mut Observed, p: &Pass<'_>) -> Decisions {
    let mut decisions = Decisions::default();
    if let Some(listing) = p.listing {
        let new_table = table.is_empty();
        for (desc, closed) in listing {
            let skipped = new_table && p.skip_closed_when_new && *closed;
            table.entry(desc.id.to_string()).or_insert_with(|| Lease {
                parents: desc.parents.iter().map(|s| s.to_string()).collect(),
                ended: skipped,
                skipped,
                ..Lease::default()
            });
        }
    }
    // What changed since the last pass starts its expiry clock again.
    observed.retain(|shard, _| table.contains_key(shard));
    for (shard, lease) in table.iter() {
        let seen = (lease.owner.clone(), lease.counter);
        match observed.get(shard) {
            Some((owner, counter, _)) if (owner, counter) == (&seen.0, &seen.1) => {}
            _ => {
                observed.insert(shard.clone(), (seen.0, seen.1, p.now));
            }
        }
    }
    for shard in p.ended {
        if let Some(lease) = table.get_mut(shard)
            && lease.owner.as_deref() == Some(p.me)
        {
            lease.ended = true;
            lease.owner = None;
            lease.wanted_by = None;
            lease.lag_ms = None;
            lease.counter += 1;
        }
    }
    for shard in p.hand_over {
        if let Some(lease) = table.get_mut(shard)
            && lease.owner.as_deref() == Some(p.me)
        {
            lease.owner = lease.wanted_by.take();
            lease.lag_ms = None;
            lease.counter += 1;
        }
    }
    let finished: BTreeSet<&String> = p.ended.iter().chain(p.hand_over).collect();
    // Renew what it reads; what another member took is lost.
    for shard in p.held.iter().filter(|s| !finished.contains(s)) {
        match table.get_mut(shard) {
            Some(lease) if lease.owner.as_deref() == Some(p.me) && !lease.ended => {
                lease.counter += 1;
                lease.lag_ms = p.lags.get(shard).copied();
                if lease.wanted_by.as_deref().is_some_and(|w| w != p.me) {
                    decisions.asked.push(shard.clone());
                }
            }
            _ => decisions.lost.push(shard.clone()),
        }
    }
    let expired = |shard: &str, lease: &Lease| match &lease.owner {
        None => true,
        Some(owner) if owner == p.me => false,
        Some(_) => observed
            .get(shard)
            .is_some_and(|(_, _, since)| p.now.duration_since(*since) >= p.duration),
    };
    let to_read: Vec<String> = table
        .iter()
        .filter(|(_, l)| readable(l, table))
        .map(|(s, _)| s.clone())
        .collect();
    let mut members: BTreeSet<&str> = table
        .iter()
        .filter(|(s, l)| readable(l, table) && !expired(s, l))
        .filter_map(|(_, l)| l.owner.as_deref())
        .collect();
    members.insert(p.me);
    let share = to_read.len().div_ceil(members.len());
    let mut mine: Vec<String> = Vec::new();
    let mut free: Vec<String> = Vec::new();
    for shard in &to_read {
        let lease = &table[shard];
        if lease.owner.as_deref() == Some(p.me) {
            mine.push(shard.clone());
        } else if expired(shard, lease) {
            free.push(shard.clone());
        }
    }
    // Its own leases it does not read: handed to it, or held before it restarted.
    let handed: Vec<String> = mine
        .iter()
        .filter(|s| !p.held.contains(*s) || finished.contains(s))
        .cloned()
        .collect();
    for shard in handed {
        let child = table_has_parent(&shard, table);
        let lease = table.get_mut(&shard).expect("listed above");
        lease.counter += 1;
        if lease.wanted_by.as_deref() == Some(p.me) {
            lease.wanted_by = None;
        }
        decisions.taken.push(taken(&shard, lease, child));
    }
    let mut count = mine.len();
    for shard in free {
        if count >= share {
            break;
        }
        let child = table_has_parent(&shard, table);
        let lease = table.get_mut(&shard).expect("listed above");
        lease.owner = Some(p.me.to_string());
        lease.wanted_by = None;
        lease.lag_ms = None;
        lease.counter += 1;
        decisions.taken.push(taken(&shard, lease, child));
        count += 1;
    }
    let asking = to_read
        .iter()
        .any(|s| table[s].wanted_by.as_deref() == Some(p.me));
    if count < share && !asking {
        // One lease of the member holding the most, when it holds more than the share.
        let mut load: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
        for shard in &to_read {
            if let Some(owner) = table[shard].owner.as_deref()
                && owner != p.me
                && table[shard].wanted_by.is_none()
            {
                load.entry(owner).or_default().push(shard);
            }
        }
        let busiest = load
            .into_iter()
            .filter(|(owner, shards)| {
                let held = to_read
                    .iter()
                    .filter(|s| table[*s].owner.as_deref() == Some(*owner))
                    .count();
                held > share && !shards.is_empty()
            })
            .max_by_key(|(_, shards)| shards.len());
        if let Some((_, shards)) = busiest {
            let shard = shards[shards.len() - 1].clone();
            table.get_mut(&shard).expect("listed above").wanted_by = Some(p.me.to_string());
        }
    }
    decisions
}

/// The stream's lag in time as the members last wrote it into their leases: the sum over
/// the shards being read, and how many shards there are to read (not ended, parents
/// ended). A shard nobody reads yet counts 0.
pub fn lag(table: &Table) -> (u64, usize) {
    let to_read: Vec<&Lease> = table.values().filter(|l| readable(l, table)).collect();
    let total = to_read
        .iter()
        .filter(|l| l.owner.is_some())
        .filter_map(|l| l.lag_ms)
        .sum();
    (total, to_read.len())
}

/// Whether the lease's shard is to be read now: not ended, its parents ended (or gone
/// past retention).
fn readable(lease: &Lease, table: &Table) -> bool {
    !lease.ended
        && lease
            .parents
            .iter()
            .all(|parent| table.get(parent).is_none_or(|p| p.ended))
}

/// Whether the shard continues shards read before it (its first record follows theirs).
fn table_has_parent(shard: &str, table: &Table) -> bool {
    table[shard]
        .parents
        .iter()
        .any(|p| table.get(p).is_some_and(|l| !l.skipped))
}

fn taken(shard: &str, lease: &Lease, child: bool) -> Taken {
    Taken {
        shard: shard.to_string(),
        checkpoint: lease.checkpoint.clone(),
        child,
    }
}

/// The lease table of one stream in a shared directory.
pub struct LeaseTable {
    dir: PathBuf,
}

const LOCK: &str = ".lock";

impl LeaseTable {
    /// The table of `stream` under `root` (the pipeline's checkpoint directory), made if
    /// it is not there.
    pub fn open(root: &Path, stream: &str) -> std::io::Result<LeaseTable> {
        let dir = root.join("leases").join(stream);
        std::fs::create_dir_all(&dir)?;
        Ok(LeaseTable { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `change` on the whole table under the table's lock, then writes the leases it
    /// changed. Blocking, for at most `wait` on the lock: a member frozen while it holds it
    /// (a paused container, a hung network file system) must not freeze the others; the
    /// error then is of kind `WouldBlock`.
    pub fn locked<T>(
        &self,
        wait: Duration,
        change: impl FnOnce(&mut Table) -> T,
    ) -> std::io::Result<T> {
        let lock = std::fs::File::create(self.dir.join(LOCK))?;
        let deadline = Instant::now() + wait;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        format!(
                            "the lease table {} has been locked by another member for over {wait:?}",
                            self.dir.display()
                        ),
                    ));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        }
        let before = self.read()?;
        let mut table = before.clone();
        let answer = change(&mut table);
        for (shard, lease) in &table {
            if before.get(shard) != Some(lease) {
                self.write(shard, lease)?;
            }
        }
        drop(lock);
        Ok(answer)
    }

    /// Every lease as stored (without the lock: each file is replaced whole).
    pub fn read(&self) -> std::io::Result<Table> {
        let mut table = Table::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(shard) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let text = std::fs::read(&path)?;
            let lease: Lease = serde_json::from_slice(&text).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the lease {} is unreadable: {e}", path.display()),
                )
            })?;
            table.insert(shard.to_string(), lease);
        }
        Ok(table)
    }

    fn write(&self, shard: &str, lease: &Lease) -> std::io::Result<()> {
        let path = self.dir.join(format!("{shard}.json"));
        let tmp = self.dir.join(format!(".{shard}.json.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(lease).map_err(std::io::Error::other)?)?;
        file.sync_data()?;
        std::fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn listing(shards: &[(&str, &[&str], bool)]) -> Vec<(ShardDesc, bool)> {
        shards
            .iter()
            .map(|(id, parents, closed)| {
                let desc = ShardDesc {
                    id: Arc::from(*id),
                    parents: parents.iter().map(|p| Arc::from(*p)).collect(),
                };
                (desc, *closed)
            })
            .collect()
    }

    /// A member as the tests play it: what it holds, and its observations.
    struct Member {
        name: &'static str,
        held: BTreeSet<String>,
        observed: Observed,
    }

    impl Member {
        fn new(name: &'static str) -> Member {
            Member {
                name,
                held: BTreeSet::new(),
                observed: Observed::new(),
            }
        }

        fn pass_at(&mut self, table: &mut Table, now: Instant) -> Decisions {
            self.pass_with(table, now, &[], &[])
        }

        fn pass_with(
            &mut self,
            table: &mut Table,
            now: Instant,
            hand_over: &[String],
            ended: &[String],
        ) -> Decisions {
            let d = pass(
                table,
                &mut self.observed,
                &Pass {
                    hand_over,
                    ended,
                    ..plain(self.name, &self.held, now)
                },
            );
            for s in hand_over.iter().chain(ended).chain(&d.lost) {
                self.held.remove(s);
            }
            self.held.extend(d.taken.iter().map(|t| t.shard.clone()));
            d
        }
    }

    const DURATION: Duration = Duration::from_secs(10);
    static NO_LAGS: BTreeMap<String, u64> = BTreeMap::new();
    static NOBODY: BTreeSet<String> = BTreeSet::new();

    /// A pass of `me` holding `held` at `now` that brings nothing else.
    fn plain<'a>(me: &'a str, held: &'a BTreeSet<String>, now: Instant) -> Pass<'a> {
        Pass {
            me,
            held,
            hand_over: &[],
            ended: &[],
            lags: &NO_LAGS,
            listing: None,
            skip_closed_when_new: false,
            duration: DURATION,
            now,
        }
    }

    fn four_shards() -> Table {
        let mut table = Table::new();
        pass(
            &mut table,
            &mut Observed::new(),
            &Pass {
                listing: Some(&listing(&[
                    ("s0", &[], false),
                    ("s1", &[], false),
                    ("s2", &[], false),
                    ("s3", &[], false),
                ])),
                ..plain("nobody", &NOBODY, Instant::now())
            },
        );
        for lease in table.values_mut() {
            lease.owner = None;
        }
        table
    }

    #[test]
    fn a_lone_member_takes_every_shard_and_a_second_asks_for_its_share() {
        let t0 = Instant::now();
        let mut table = four_shards();
        let mut a = Member::new("a");
        let d = a.pass_at(&mut table, t0);
        assert_eq!(d.taken.len(), 4, "{d:?}");
        let mut b = Member::new("b");
        // b sees a's leases alive: it asks for one (one at a time), takes nothing.
        let d = b.pass_at(&mut table, t0);
        assert!(d.taken.is_empty());
        let wanted: Vec<&String> = table
            .iter()
            .filter(|(_, l)| l.wanted_by.as_deref() == Some("b"))
            .map(|(s, _)| s)
            .collect();
        assert_eq!(wanted.len(), 1);
        let asked = wanted[0].clone();
        // a renews and is told to hand it over; it drains, then hands it over.
        let d = a.pass_at(&mut table, t0);
        assert_eq!(d.asked, std::slice::from_ref(&asked));
        assert!(
            b.pass_at(&mut table, t0).taken.is_empty(),
            "one ask at a time"
        );
        a.pass_with(&mut table, t0, std::slice::from_ref(&asked), &[]);
        assert_eq!(table[&asked].owner.as_deref(), Some("b"));
        let d = b.pass_at(&mut table, t0);
        assert_eq!(d.taken.len(), 1);
        assert_eq!(d.taken[0].shard, asked);
        // Then a second one: 2 and 2.
        b.pass_at(&mut table, t0);
        let d = a.pass_at(&mut table, t0);
        a.pass_with(&mut table, t0, &d.asked, &[]);
        b.pass_at(&mut table, t0);
        assert_eq!((a.held.len(), b.held.len()), (2, 2));
        // Balanced: nobody asks any more.
        b.pass_at(&mut table, t0);
        assert!(table.values().all(|l| l.wanted_by.is_none()));
    }

    #[test]
    fn a_silent_members_leases_are_taken_once_they_expire() {
        let t0 = Instant::now();
        let mut table = four_shards();
        let mut a = Member::new("a");
        a.pass_at(&mut table, t0);
        let mut b = Member::new("b");
        b.pass_at(&mut table, t0);
        // a stops renewing; b takes nothing before the lease duration has passed by its
        // own clock, everything after.
        assert!(b.pass_at(&mut table, t0 + DURATION / 2).taken.is_empty());
        let d = b.pass_at(&mut table, t0 + DURATION + Duration::from_millis(1));
        assert_eq!(d.taken.len(), 4, "{d:?}");
        // a comes back: it lost them all.
        let d = a.pass_at(&mut table, t0 + DURATION * 2);
        assert_eq!(d.lost.len(), 4);
        assert!(a.held.is_empty());
    }

    #[test]
    fn children_are_taken_once_their_parents_ended_and_start_at_their_first_record() {
        let t0 = Instant::now();
        let mut table = Table::new();
        let mut a = Member::new("a");
        let shards = listing(&[
            ("s0", &[], true),
            ("s1", &["s0"], false),
            ("s2", &["s0"], false),
        ]);
        let d = pass(
            &mut table,
            &mut a.observed,
            &Pass {
                listing: Some(&shards),
                ..plain("a", &a.held, t0)
            },
        );
        assert_eq!(d.taken.iter().map(|t| &t.shard).collect::<Vec<_>>(), ["s0"]);
        assert!(!d.taken[0].child);
        a.held.insert("s0".into());
        let d = a.pass_with(&mut table, t0, &[], &["s0".to_string()]);
        assert!(table["s0"].ended);
        let taken: Vec<_> = d
            .taken
            .iter()
            .map(|t| (t.shard.as_str(), t.child))
            .collect();
        assert_eq!(taken, [("s1", true), ("s2", true)]);
    }

    #[test]
    fn a_new_table_at_latest_ends_closed_shards() {
        let mut table = Table::new();
        let shards = listing(&[("s0", &[], true), ("s1", &["s0"], false)]);
        let d = pass(
            &mut table,
            &mut Observed::new(),
            &Pass {
                listing: Some(&shards),
                skip_closed_when_new: true,
                ..plain("a", &NOBODY, Instant::now())
            },
        );
        assert!(table["s0"].ended);
        assert_eq!(d.taken.iter().map(|t| &t.shard).collect::<Vec<_>>(), ["s1"]);
        assert!(!d.taken[0].child, "s1 starts at `latest` too");
    }

    #[test]
    fn a_restarted_member_takes_back_its_own_leases_at_once() {
        let t0 = Instant::now();
        let mut table = four_shards();
        let mut a = Member::new("a");
        a.pass_at(&mut table, t0);
        let mut again = Member::new("a");
        assert_eq!(again.pass_at(&mut table, t0).taken.len(), 4);
    }

    #[test]
    fn renewals_write_the_readers_lag_which_sums_over_the_shards_read() {
        let t0 = Instant::now();
        let mut table = four_shards();
        let mut a = Member::new("a");
        a.pass_at(&mut table, t0);
        let lags: BTreeMap<String, u64> =
            [("s0".to_string(), 4_000), ("s1".to_string(), 500)].into();
        pass(
            &mut table,
            &mut a.observed,
            &Pass {
                ended: &["s3".to_string()],
                lags: &lags,
                ..plain("a", &a.held, t0)
            },
        );
        assert_eq!(table["s0"].lag_ms, Some(4_000));
        assert_eq!(table["s2"].lag_ms, None, "not measured yet");
        assert_eq!(lag(&table), (4_500, 3), "s3 ended");
    }

    #[test]
    fn the_table_is_kept_in_files_under_a_lock() {
        let dir = tempfile::tempdir().unwrap();
        let table = LeaseTable::open(dir.path(), "plays").unwrap();
        table
            .locked(Duration::from_secs(1), |t| {
                t.insert(
                    "shardId-000000000000".into(),
                    Lease {
                        owner: Some("a".into()),
                        counter: 3,
                        checkpoint: Some(ResumeAt {
                            offset: 10,
                            position: Some("10 4959".into()),
                        }),
                        ..Lease::default()
                    },
                );
            })
            .unwrap();
        let again = LeaseTable::open(dir.path(), "plays")
            .unwrap()
            .read()
            .unwrap();
        assert_eq!(again["shardId-000000000000"].counter, 3);
        assert_eq!(
            again["shardId-000000000000"]
                .checkpoint
                .as_ref()
                .unwrap()
                .offset,
            10
        );
        std::fs::write(table.dir().join("bad.json"), b"{").unwrap();
        let e = table.read().unwrap_err().to_string();
        assert!(e.contains("bad.json"), "{e}");
        std::fs::remove_file(table.dir().join("bad.json")).unwrap();
        // A member holding the lock for long makes the others wait a bounded time.
        let held = std::fs::File::create(table.dir().join(LOCK)).unwrap();
        held.lock().unwrap();
        let e = table.locked(Duration::from_millis(50), |_| ()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        drop(held);
        table.locked(Duration::from_millis(50), |_| ()).unwrap();
    }
}
