use serde::Deserialize;
use sluice_engine::config::{Duration, Location, Node, Problems};

/// Synthetic view events of a streaming service, deterministic by seed.
///
/// ```yaml
/// source:
///   type: generator
///   partitions: 4
///   count: 1000000
///   seed: 42
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Number of partitions; each user belongs to exactly one (default 1).
    #[serde(default = "one")]
    pub partitions: u32,
    /// Records to generate across all partitions; omit for an endless stream.
    pub count: Option<u64>,
    /// Records per second across all partitions; omit to generate as fast as possible.
    pub rate: Option<f64>,
    /// Distinct users: the cardinality of the `user_id` key (default 100000).
    #[serde(default = "default_users")]
    pub users: u64,
    /// Distinct titles; popular titles get most views (default 10000).
    #[serde(default = "default_titles")]
    pub titles: u64,
    /// Seed of the random sequence: the same seed gives the same records (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Event time of each partition's first record, RFC 3339 (default 2026-01-01T00:00:00Z).
    pub start_time: Option<String>,
    /// Event time between consecutive records of a partition (default: 1s divided by the
    /// partition's rate, or 1ms without a rate).
    pub interval: Option<Duration>,
    /// Records arrive up to this much later than their event time says, out of order
    /// (default 0: event time increases).
    pub disorder: Option<Duration>,
}

fn one() -> u32 {
    1
}
fn default_users() -> u64 {
    100_000
}
fn default_titles() -> u64 {
    10_000
}

mod spec {
    use super::*;

    use crate::generator::{GeneratorSource, record_schema};

    impl sluice_engine::connector::SourceSpec for GeneratorConfig {
        /// Pure checks, every problem collected.
        fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
            let mut bad = |key: &str, msg: String| problems.at_key(node, path, key, msg);
            if self.partitions == 0 {
                bad("partitions", "must be at least 1".into());
            }
            if self.users < u64::from(self.partitions) {
                bad(
                    "users",
                    format!(
                        "{} users cannot fill {} partitions: every partition needs at least one user",
                        self.users, self.partitions
                    ),
                );
            }
            if self.titles == 0 {
                bad("titles", "must be at least 1".into());
            }
            if let Some(rate) = self.rate
                && !(rate > 0.0 && rate.is_finite())
            {
                bad(
                    "rate",
                    format!("must be a positive number of records per second, found {rate}"),
                );
            }
            if let Some(why) = crate::made::start_time_problem(self.start_time.as_deref()) {
                bad("start_time", why);
            }
        }

        fn declared_schema(&self) -> Option<arrow::datatypes::SchemaRef> {
            sluice_engine::batch::with_metadata(&record_schema()).ok()
        }

        fn open(
            &self,
            _batch_size: usize,
            _dead_letters: bool,
        ) -> sluice_engine::Result<Box<dyn sluice_engine::source::Source>> {
            Ok(Box::new(GeneratorSource::new(self.clone())?))
        }
    }
}
