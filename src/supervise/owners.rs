//! Which partitions the supervisor's workers read, as each worker reports it: with a Kafka
//! source the supervisor stops no worker while a partition has no owner or a started worker
//! has none (for at most [`sluice_engine::autoscale::SETTLE_WAIT`]).
//!
//! A worker (`sluice worker --report-partitions FILE`) keeps FILE holding the names of the
//! partitions it reads, one per line, rewritten (atomically) when they change. The
//! supervisor gives each worker process it starts a file of its own in a directory of its
//! own.
//!
//! Why the workers and not the broker: a member that leaves while the rebalance its own
//! join started is still under way restarts that rebalance on any broker, and tansu 0.6
//! lost two partitions for good that way in the chaos test (its last member was never given
//! them). What the coordinator says does not tell when that is over: tansu reports the group
//! `Stable` seconds before the new member receives its assignment (cooperative rebalancing
//! assigns revoked partitions in a second round). The partitions the workers read do.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_engine::stats::RunStats;
use tokio_util::sync::CancellationToken;

/// How often a worker looks at its partitions.
const EVERY: Duration = Duration::from_millis(200);

/// Keeps `path` holding the names of the partitions this process reads, until `done`.
pub fn report(path: PathBuf, stats: Arc<RunStats>, done: CancellationToken) {
    tokio::spawn(async move {
        let mut written: Option<String> = None;
        let mut warned = false;
        loop {
            let names = {
                let partitions = stats.partitions.lock().expect("partitions lock");
                partitions.keys().fold(String::new(), |mut s, name| {
                    s.push_str(name);
                    s.push('\n');
                    s
                })
            };
            if written.as_ref() != Some(&names) {
                match write_atomically(&path, &names) {
                    Ok(()) => written = Some(names),
                    Err(e) if !warned => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot report this worker's partitions to its supervisor, which then stops no worker");
                        warned = true;
                    }
                    Err(_) => {}
                }
            }
            tokio::select! {
                () = done.cancelled() => return,
                () = tokio::time::sleep(EVERY) => {}
            }
        }
    });
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The files of a supervisor's workers: one per worker process started (a slot's next
/// worker may start while the one before drains and still writes its own).
pub struct Reports {
    /// A directory of this supervisor's own, made new under the system's temporary
    /// directory (never one found in place, which someone else could have planted),
    /// readable by this user alone, removed with it.
    dir: tempfile::TempDir,
    started: u64,
}

impl Reports {
    pub fn create() -> std::io::Result<Reports> {
        Ok(Reports {
            dir: tempfile::Builder::new()
                .prefix("sluice-supervisor-")
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .tempdir()?,
            started: 0,
        })
    }

    /// The file of a worker about to start in `slot`.
    pub fn next(&mut self, slot: usize) -> PathBuf {
        self.started += 1;
        self.dir
            .path()
            .join(format!("{}.{}", super::member_name(slot), self.started))
    }

    /// What the workers reporting to `files` read now.
    pub fn read<'a>(files: impl IntoIterator<Item = &'a Path>) -> Owners {
        let mut owners = Owners::default();
        for file in files {
            owners.workers += 1;
            // No file yet: the worker reads nothing yet.
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let mut names = text.lines().filter(|l| !l.is_empty()).peekable();
            if names.peek().is_none() {
                owners.idle += 1;
            }
            owners.partitions.extend(names.map(str::to_string));
        }
        owners
    }
}

/// The partitions a supervisor's running workers read.
#[derive(Debug, Default)]
pub struct Owners {
    /// Partitions with an owner, by name (`topic/partition`).
    pub partitions: BTreeSet<String>,
    /// Workers running.
    pub workers: usize,
    /// Workers reading no partition.
    pub idle: usize,
}

impl Owners {
    /// The group has settled on these workers: each of `partitions` (by name) has an
    /// owner, and every worker reads one when there are enough to go round (what the
    /// group's cooperative-sticky assignment gives once a rebalance is over).
    pub fn settled(&self, partitions: &[String]) -> bool {
        partitions.iter().all(|p| self.partitions.contains(p))
            && (self.idle == 0 || partitions.len() < self.workers)
    }

    /// Says how far from settled (for the log).
    pub fn describe(&self, partitions: &[String]) -> String {
        let unowned: Vec<&str> = partitions
            .iter()
            .filter(|p| !self.partitions.contains(*p))
            .map(String::as_str)
            .collect();
        format!(
            "{} of {} partitions read by the {} worker process(es) (without an owner: {:?}), {} of the workers reading none",
            partitions.len() - unowned.len(),
            partitions.len(),
            self.workers,
            &unowned[..unowned.len().min(5)],
            self.idle
        )
    }
}

/// Warns when the workers have not settled for a long time.
#[derive(Default)]
pub struct Unsettled {
    since: Option<Instant>,
    warned: bool,
}

impl Unsettled {
    const WARN_AFTER: Duration = Duration::from_secs(60);

    /// Takes one look; true when settled.
    pub fn observe(&mut self, owners: &Owners, partitions: &[String]) -> bool {
        if owners.settled(partitions) {
            if self.warned {
                tracing::info!("every partition has an owner among the worker processes again");
            }
            *self = Unsettled::default();
            return true;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if !self.warned && since.elapsed() >= Self::WARN_AFTER {
            tracing::warn!(
                "the group has not settled for {:?}: {}",
                Self::WARN_AFTER,
                owners.describe(partitions)
            );
            self.warned = true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(workers: &[&[&str]]) -> Owners {
        let mut o = Owners::default();
        for w in workers {
            o.workers += 1;
            o.idle += usize::from(w.is_empty());
            o.partitions.extend(w.iter().map(|s| s.to_string()));
        }
        o
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|p| format!("t/{p}")).collect()
    }

    #[test]
    fn settled_only_when_every_partition_and_every_worker_has_its_share() {
        let four = names(4);
        // A newcomer that has joined but not been given anything yet.
        assert!(!owners(&[&["t/0", "t/1", "t/2", "t/3"], &[]]).settled(&four));
        // The second round of a cooperative rebalance: two revoked, not yet reassigned.
        assert!(!owners(&[&["t/2", "t/3"], &[]]).settled(&four));
        assert!(owners(&[&["t/2", "t/3"], &["t/0", "t/1"]]).settled(&four));
        // A partition read twice (a move under way) does not stand in for a missing one,
        // nor does one the group does not have to read.
        assert!(!owners(&[&["t/0", "t/1", "t/2"], &["t/2"]]).settled(&four));
        assert!(!owners(&[&["t/0", "t/1", "t/2"], &["u/0"]]).settled(&four));
        // More workers than partitions: some read none.
        assert!(owners(&[&["t/0"], &[]]).settled(&names(1)));
        assert!(!owners(&[&[], &[]]).settled(&names(1)));
        assert!(
            owners(&[&["t/0"], &[]])
                .describe(&four)
                .contains(r#"1 of 4 partitions read by the 2 worker process(es) (without an owner: ["t/1", "t/2", "t/3"]), 1 of the workers reading none"#)
        );
    }

    #[test]
    fn each_worker_started_reports_to_a_file_of_its_own() {
        use std::os::unix::fs::PermissionsExt;
        let mut reports = Reports::create().unwrap();
        let other = Reports::create().unwrap();
        assert_ne!(reports.dir.path(), other.dir.path());
        let mode = std::fs::metadata(reports.dir.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let (a, b) = (reports.next(0), reports.next(1));
        write_atomically(&a, "t/0\nt/1\n").unwrap();
        write_atomically(&b, "t/2\n").unwrap();
        let o = Reports::read([a.as_path(), b.as_path()]);
        assert_eq!((o.partitions.len(), o.workers, o.idle), (3, 2, 0));
        // Slot 1 started again while its last worker still drains and writes.
        let b2 = reports.next(1);
        assert_ne!(b, b2);
        write_atomically(&b, "t/2\nt/3\n").unwrap();
        let o = Reports::read([a.as_path(), b2.as_path()]);
        assert_eq!((o.partitions.len(), o.workers, o.idle), (2, 2, 1));
        let dir = reports.dir.path().to_path_buf();
        drop(reports);
        assert!(!dir.exists());
    }
}
