//! Where a shard resumes. Sequence numbers are decimal numbers of up to 128 bits and more
//! (kinesalite's have 56 digits), so the engine's offsets cannot hold them: the engine
//! counts a shard's records with offsets of its own (0, 1, 2, … from the first record
//! read), and each checkpoint commits, with a shard's next offset, the sequence number to
//! resume after ([`sluice_engine::source::PositionBook`]).
//!
//! A position reads `NEXT SEQUENCE` or, inside a record the Kinesis Producer Library
//! aggregated, `NEXT SEQUENCE SUB` (the user records of `SEQUENCE` up to sub-sequence `SUB`
//! are done). `NEXT` is the offset the next record gets.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use sluice_engine::source::PositionBook;

/// The last record of what was read: its sequence number and, for a user record of a KPL
/// aggregate, its sub-sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub sequence: Arc<str>,
    pub sub: Option<u64>,
}

/// A parsed position: the next offset and what to resume after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub next: i64,
    pub after: Resume,
}

impl Position {
    pub fn encode(&self) -> String {
        match self.after.sub {
            Some(sub) => format!("{} {} {sub}", self.next, self.after.sequence),
            None => format!("{} {}", self.next, self.after.sequence),
        }
    }

    pub fn parse(text: &str) -> Option<Position> {
        let mut words = text.split(' ');
        let next = words.next()?.parse().ok()?;
        let sequence = words.next().filter(|s| is_sequence(s))?;
        let sub = match words.next() {
            Some(sub) => Some(sub.parse().ok()?),
            None => None,
        };
        if words.next().is_some() {
            return None;
        }
        Some(Position {
            next,
            after: Resume {
                sequence: sequence.into(),
                sub,
            },
        })
    }
}

fn is_sequence(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// What each shard's reader has read, by the offset after each batch: what a checkpoint at
/// that offset commits. Entries before a committed offset are forgotten at the commit.
#[derive(Default)]
pub struct Book {
    shards: Mutex<HashMap<Arc<str>, BatchEnds>>,
}

/// A shard's batches read and not yet passed by a checkpoint: (offset after, last record).
type BatchEnds = VecDeque<(i64, Resume)>;

impl Book {
    /// A batch of `partition` ending before offset `next` was read, its last record `last`.
    pub fn read(&self, partition: &Arc<str>, next: i64, last: Resume) {
        let mut shards = self.shards.lock().expect("book lock");
        shards
            .entry(partition.clone())
            .or_default()
            .push_back((next, last));
    }

    /// The shard is no longer read here (revoked, or its reader ended).
    pub fn forget(&self, partition: &str) {
        self.shards.lock().expect("book lock").remove(partition);
    }
}

impl PositionBook for Book {
    fn position(&self, partition: &str, next: i64) -> Option<String> {
        let mut shards = self.shards.lock().expect("book lock");
        let read = shards.get_mut(partition)?;
        // Checkpoints commit offsets in increasing order: what is before `next` is done.
        while read.front().is_some_and(|(end, _)| *end < next) {
            read.pop_front();
        }
        let (end, after) = read.front()?;
        (*end == next).then(|| {
            Position {
                next,
                after: after.clone(),
            }
            .encode()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(sequence: &str, sub: Option<u64>) -> Resume {
        Resume {
            sequence: sequence.into(),
            sub,
        }
    }

    #[test]
    fn positions_read_back_as_written() {
        let long = "49680881052733960418828190433924339201212981736313454594";
        for p in [
            Position {
                next: 7,
                after: resume(long, None),
            },
            Position {
                next: 1 << 40,
                after: resume(long, Some(12)),
            },
        ] {
            assert_eq!(Position::parse(&p.encode()), Some(p));
        }
        for bad in ["", "7", "x 1", "7 1x", "7 1 2 3", "7  1", "7 1 -2"] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_book_answers_for_batch_ends_and_forgets_what_a_commit_passed() {
        let book = Book::default();
        let p: Arc<str> = "s/shardId-000000000001".into();
        book.read(&p, 10, resume("100", None));
        book.read(&p, 20, resume("200", Some(3)));
        book.read(&p, 30, resume("300", None));
        // Not an end of a batch read: no position (the last committed one stays).
        assert_eq!(book.position(&p, 15), None);
        assert_eq!(book.position(&p, 20).as_deref(), Some("20 200 3"));
        // 10 was passed by the commit at 20.
        assert_eq!(book.position(&p, 10), None);
        assert_eq!(book.position(&p, 30).as_deref(), Some("30 300"));
        assert_eq!(book.position("other", 30), None);
        book.forget(&p);
        assert_eq!(book.position(&p, 30), None);
    }
}
