use serde::Deserialize;
use sluice_engine::config::{Location, Node, Problems};

/// The events of the Nexmark benchmark (people, auctions and bids of an online auction
/// house), as its reference generators make them, deterministic by seed.
///
/// ```yaml
/// source:
///   type: nexmark
///   partitions: 2
///   count: 10000000
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NexmarkConfig {
    /// Number of partitions; event `n` belongs to partition `n % partitions`, so every
    /// partition's event time advances at the same pace (default 1).
    #[serde(default = "one")]
    pub partitions: u32,
    /// Events to generate across all partitions; omit for an endless stream.
    pub count: Option<u64>,
    /// Events per second across all partitions, in wall-clock time; omit to generate as
    /// fast as possible.
    pub rate: Option<f64>,
    /// Events per second of event time: event `n` happens at `start_time + n / event_rate`
    /// (default: `rate`, or 10,000,000 as in the Nexmark benchmark's configuration).
    pub event_rate: Option<f64>,
    /// Seed of the random sequence: the same seed gives the same events (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Event time of the first event, RFC 3339 (default 2026-01-01T00:00:00Z).
    pub start_time: Option<String>,
    /// People bids and auctions are drawn from: the most recent ones (default 1000).
    #[serde(default = "default_active_people")]
    pub active_people: u64,
    /// Auctions open at once: bids go to the most recent ones (default 100).
    #[serde(default = "default_in_flight_auctions")]
    pub in_flight_auctions: u64,
}

fn one() -> u32 {
    1
}
fn default_active_people() -> u64 {
    1000
}
fn default_in_flight_auctions() -> u64 {
    100
}

mod spec {
    use super::*;

    use crate::nexmark::{NexmarkSource, record_schema};

    impl sluice_engine::connector::SourceSpec for NexmarkConfig {
        /// Pure checks, every problem collected.
        fn check(&self, node: &Node, path: &Location, problems: &mut Problems) {
            let mut bad = |key: &str, msg: String| problems.at_key(node, path, key, msg);
            if self.partitions == 0 {
                bad("partitions", "must be at least 1".into());
            }
            for (key, value) in [("rate", self.rate), ("event_rate", self.event_rate)] {
                if let Some(r) = value
                    && !(r > 0.0 && r.is_finite())
                {
                    bad(
                        key,
                        format!("must be a positive number of events per second, found {r}"),
                    );
                }
            }
            if self.active_people == 0 {
                bad("active_people", "must be at least 1".into());
            }
            if self.in_flight_auctions == 0 {
                bad("in_flight_auctions", "must be at least 1".into());
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
            Ok(Box::new(NexmarkSource::new(self.clone())?))
        }
    }
}
