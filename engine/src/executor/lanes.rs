//! Lanes: a partition split by key over several workers (`parallelization_factor`), and
//! the ledger that commits a split partition's offset only up to its first batch with a
//! part still out.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::batch::Envelope;
use crate::{Error, Result};

/// Splits a partition's batches into lanes by key (`parallelization_factor`): records of
/// one key always take the same lane, and a lane is processed in order, so each key's
/// records stay in order while the lanes run at once. Records without a key have no order
/// to keep and are spread by offset.
pub(crate) struct Splitter {
    lanes: usize,
    key: Arc<str>,
}

/// One batch split into lanes: done once every part is in the sink.
pub(super) struct Split {
    parts: std::sync::atomic::AtomicUsize,
    end: i64,
}

/// A split partition's batches in read order, not yet all in the sink: its offset is
/// committed only up to the first of them.
#[derive(Default)]
pub(super) struct Ledger(std::sync::Mutex<std::collections::VecDeque<Arc<Split>>>);

/// What the sink needs to count a part of a split batch.
pub(super) struct Ticket {
    split: Arc<Split>,
    ledger: Arc<Ledger>,
}

impl Ticket {
    /// Counts this part as written; the partition's new end of done records, if the
    /// earliest unfinished batch finished.
    pub(super) fn done(&self) -> Option<i64> {
        if self.split.parts.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        let mut pending = self.ledger.0.lock().expect("ledger lock");
        let mut end = None;
        while pending
            .front()
            .is_some_and(|s| s.parts.load(Ordering::Acquire) == 0)
        {
            end = pending.pop_front().map(|s| s.end);
        }
        end
    }
}

impl Splitter {
    pub(crate) fn new(lanes: usize, key: Arc<str>) -> Self {
        Splitter { lanes, key }
    }

    /// The batch's parts by lane (lanes without records get none; the batch's failed
    /// records ride with the first part), registered in `ledger`.
    pub(super) fn split(
        &self,
        env: Envelope,
        ledger: &Arc<Ledger>,
    ) -> Result<Vec<(usize, Envelope, Option<Ticket>)>> {
        let Envelope {
            partition,
            offsets,
            batch,
            mut dead,
        } = env;
        let column = batch.column_by_name(&self.key).ok_or_else(|| {
            Error::Internal(format!(
                "parallelization_factor splits records by `{}`, which the source's records do not have",
                self.key
            ))
        })?;
        let mut by_lane: Vec<Vec<u32>> = vec![Vec::new(); self.lanes];
        if batch.num_rows() > 0 {
            let converter = arrow::row::RowConverter::new(vec![arrow::row::SortField::new(
                column.data_type().clone(),
            )])
            .map_err(|e| Error::arrow("hashing the keys of a batch", e))?;
            let rows = converter
                .convert_columns(std::slice::from_ref(column))
                .map_err(|e| Error::arrow("hashing the keys of a batch", e))?;
            for i in 0..batch.num_rows() {
                let lane = if column.is_null(i) {
                    (offsets.start as usize).wrapping_add(i) % self.lanes
                } else {
                    (xxhash_rust::xxh3::xxh3_64(rows.row(i).as_ref()) % self.lanes as u64) as usize
                };
                by_lane[lane].push(i as u32);
            }
        }
        let mut parts = Vec::new();
        for (lane, rows) in by_lane.into_iter().enumerate() {
            if rows.is_empty() && !(parts.is_empty() && lane + 1 == self.lanes) {
                continue;
            }
            let part = if rows.len() == batch.num_rows() {
                batch.clone()
            } else {
                let indices = arrow::array::UInt32Array::from(rows);
                arrow::compute::take_record_batch(&batch, &indices)
                    .map_err(|e| Error::arrow("splitting a batch into lanes", e))?
            };
            parts.push((lane, part));
        }
        let split = Arc::new(Split {
            parts: std::sync::atomic::AtomicUsize::new(parts.len()),
            end: offsets.end,
        });
        ledger
            .0
            .lock()
            .expect("ledger lock")
            .push_back(split.clone());
        Ok(parts
            .into_iter()
            .map(|(lane, part)| {
                let env = Envelope {
                    partition: partition.clone(),
                    offsets: offsets.clone(),
                    batch: part,
                    dead: std::mem::take(&mut dead),
                };
                let ticket = Ticket {
                    split: split.clone(),
                    ledger: ledger.clone(),
                };
                (lane, env, Some(ticket))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(ledger: &Arc<Ledger>, parts: usize, end: i64) -> Vec<Ticket> {
        let split = Arc::new(Split {
            parts: std::sync::atomic::AtomicUsize::new(parts),
            end,
        });
        ledger.0.lock().unwrap().push_back(split.clone());
        (0..parts)
            .map(|_| Ticket {
                split: split.clone(),
                ledger: ledger.clone(),
            })
            .collect()
    }

    #[test]
    fn a_split_partition_is_done_up_to_its_first_unfinished_batch() {
        let ledger = Arc::new(Ledger::default());
        let a = split(&ledger, 2, 100);
        let b = split(&ledger, 1, 200);
        let c = split(&ledger, 3, 300);
        // Later batches finishing first commit nothing.
        assert_eq!(b[0].done(), None);
        assert_eq!(c[2].done(), None);
        assert_eq!(a[0].done(), None);
        // The first batch's last part: done through the second, which finished before.
        assert_eq!(a[1].done(), Some(200));
        assert_eq!(c[0].done(), None);
        assert_eq!(c[1].done(), Some(300));
        assert!(ledger.0.lock().unwrap().is_empty());
    }
}
