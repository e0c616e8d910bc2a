//! Taps: the rows leaving a stage (or arriving at an output, or going to the dead letters)
//! of a running pipeline, copied to whoever listens (`sluice tap`).
//!
//! A tap never slows the pipeline or grows its memory: a worker offers each batch to a
//! point's listeners with a non-blocking send into a queue of [`QUEUE`] batches (the
//! batch's arrays are shared, not copied); when a listener's queue is full, the batch is
//! skipped for it and its rows counted. With nobody listening, offering is one atomic load.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use tokio::sync::mpsc;

/// Batches a listener may have waiting before the next are skipped for it.
pub const QUEUE: usize = 16;
/// Listeners a point takes at once: each costs every worker a batch clone per batch.
pub const MAX_LISTENERS: usize = 8;

/// What a listener receives.
pub enum Tapped {
    Rows(RecordBatch),
    /// Rows skipped since the last message: the listener's queue was full.
    Skipped(u64),
}

struct Listener {
    tx: mpsc::Sender<Tapped>,
    /// Rows skipped and not told yet.
    owed: u64,
}

/// One place rows can be tapped at.
#[derive(Default)]
pub struct TapPoint {
    pub name: Arc<str>,
    listening: AtomicUsize,
    /// The pipeline has ended: nothing more comes, new listeners hear so at once.
    closed: std::sync::atomic::AtomicBool,
    listeners: Mutex<Vec<Listener>>,
    /// Rows copied to listeners, and rows skipped because a listener was behind.
    pub rows: AtomicU64,
    pub skipped: AtomicU64,
}

impl TapPoint {
    /// Copies `batch` to every listener that keeps up; counts it skipped for the others.
    pub fn offer(&self, batch: &RecordBatch) {
        if self.listening.load(Ordering::Relaxed) == 0 || batch.num_rows() == 0 {
            return;
        }
        let rows = batch.num_rows() as u64;
        let mut listeners = self.listeners.lock().expect("tap lock");
        listeners.retain_mut(|l| {
            if l.owed > 0 && l.tx.try_send(Tapped::Skipped(l.owed)).is_ok() {
                l.owed = 0;
            }
            match l.tx.try_send(Tapped::Rows(batch.clone())) {
                Ok(()) => {
                    self.rows.fetch_add(rows, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    l.owed += rows;
                    self.skipped.fetch_add(rows, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        self.listening.store(listeners.len(), Ordering::Relaxed);
    }

    /// Whether anyone listens (offering costs nothing otherwise).
    pub fn active(&self) -> bool {
        self.listening.load(Ordering::Relaxed) > 0
    }

    /// A new listener: what it receives, until it drops the receiver or the pipeline
    /// ends (the receiver then ends too). `None` when [`MAX_LISTENERS`] listen already.
    pub fn listen(&self) -> Option<mpsc::Receiver<Tapped>> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut listeners = self.listeners.lock().expect("tap lock");
        listeners.retain(|l| !l.tx.is_closed());
        if listeners.len() >= MAX_LISTENERS {
            return None;
        }
        if !self.closed.load(Ordering::Relaxed) {
            listeners.push(Listener { tx, owed: 0 });
        }
        self.listening.store(listeners.len(), Ordering::Relaxed);
        Some(rx)
    }

    /// The pipeline has ended: every listener's stream ends.
    fn close(&self) {
        let mut listeners = self.listeners.lock().expect("tap lock");
        self.closed.store(true, Ordering::Relaxed);
        listeners.clear();
        self.listening.store(0, Ordering::Relaxed);
    }
}

/// Every tap point of a pipeline: one per stage, one per output, one for dead letters.
#[derive(Default)]
pub struct Taps {
    pub stages: Vec<TapPoint>,
    pub outputs: Vec<TapPoint>,
    pub dead_letters: TapPoint,
}

impl std::fmt::Debug for Taps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Taps {
    pub fn new(stages: &[Arc<str>], outputs: &[Arc<str>]) -> Arc<Taps> {
        let point = |name: &Arc<str>| TapPoint {
            name: name.clone(),
            ..Default::default()
        };
        Arc::new(Taps {
            stages: stages.iter().map(point).collect(),
            outputs: outputs.iter().map(point).collect(),
            dead_letters: TapPoint {
                name: "dead_letters".into(),
                ..Default::default()
            },
        })
    }

    /// The point named `name`: a stage, `sink` (or an output's name), `dead_letters`.
    pub fn point(&self, name: &str) -> Option<&TapPoint> {
        self.points().find(|p| &*p.name == name)
    }

    /// Every point, stages first.
    pub fn points(&self) -> impl Iterator<Item = &TapPoint> {
        self.stages
            .iter()
            .chain(&self.outputs)
            .chain(std::iter::once(&self.dead_letters))
    }

    /// Ends every listener's stream: the pipeline has ended.
    pub fn close(&self) {
        self.points().for_each(TapPoint::close);
    }

    /// Every point's name, for an error naming what can be tapped.
    pub fn names(&self) -> Vec<&str> {
        self.points().map(|p| &*p.name).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))]).unwrap()
    }

    #[test]
    fn a_listener_that_does_not_read_is_skipped_and_told_how_much() {
        let point = TapPoint::default();
        point.offer(&batch(3)); // nobody listening: nothing kept
        let mut rx = point.listen().unwrap();
        for _ in 0..QUEUE + 5 {
            point.offer(&batch(10));
        }
        assert_eq!(point.rows.load(Ordering::Relaxed), QUEUE as u64 * 10);
        assert_eq!(point.skipped.load(Ordering::Relaxed), 50);
        // Once it reads again, it hears what it missed before the next rows.
        for _ in 0..QUEUE {
            assert!(matches!(rx.try_recv(), Ok(Tapped::Rows(_))));
        }
        point.offer(&batch(1));
        assert!(matches!(rx.try_recv(), Ok(Tapped::Skipped(50))));
        assert!(matches!(rx.try_recv(), Ok(Tapped::Rows(b)) if b.num_rows() == 1));
        drop(rx);
        point.offer(&batch(1));
        assert_eq!(point.listening.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn listeners_are_capped_and_end_with_the_pipeline() {
        let point = TapPoint::default();
        let mut all: Vec<_> = (0..MAX_LISTENERS)
            .map(|_| point.listen().unwrap())
            .collect();
        assert!(point.listen().is_none(), "one more than the cap");
        drop(all.pop());
        let mut last = point.listen().expect("a place freed");
        point.close();
        assert!(matches!(
            last.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        let mut late = point.listen().unwrap();
        assert!(matches!(
            late.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }
}
