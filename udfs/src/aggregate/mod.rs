//! The `aggregate` stage: keyed windows in event time, emitted when the watermark passes
//! their end.
//!
//! ```yaml
//! - name: views_per_title
//!   type: aggregate
//!   group_by: [title_id]
//!   event_time: _timestamp          # a timestamp column, or Int64 milliseconds
//!   window: { tumbling: 1m }        # or { sliding: { size: 5m, slide: 1m } }, { session: { gap: 30s } }
//!   allowed_lateness: 5s            # watermark = largest event time seen − this
//!   idle_timeout: 30s               # a partition without data this long holds nothing back
//!   max_event_time_skew: 1d         # rows further ahead of the clock are dead letters
//!   aggregates:
//!     views: count()
//!     watch_seconds: sum(watch_seconds)
//!     viewers: approx_count_distinct(user_id)
//!     longest_by: max_by(user_id, watch_seconds)   # the user of the row with the most
//!   top: { by: views, n: 10 }       # optional: per window, the rows ranked 1..10 by views
//!   state: { memory: 256MiB }       # beyond this, state lives in RocksDB
//! ```
//!
//! Output: one row per key and window when the window closes — the `group_by` columns,
//! `window_start`, `window_end` (timestamps, UTC) and one column per aggregate, in the
//! order written. Rows whose windows have all closed are late: they go to the dead-letter
//! sink with the reason, or, without one, are counted and dropped with a warning. How
//! state is kept, checkpointed and merged across partitions: [`state`].
//!
//! Windowing in SQL (`GROUP BY tumble(...)`) is not offered: a SQL stage sees one batch
//! at a time and DataFusion has no notion of watermarks or state across batches.
//!
//! # Where things are
//! `config.rs`: the stage as written and its plan. `stage.rs`: the stage on a worker (rows
//! in, windows out, the `top` ranking). `acc/`: the aggregate functions. `state/`: keyed
//! windows per partition, memory and RocksDB, emission.

mod acc;
mod config;
mod stage;
mod state;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::array::{ArrayRef, AsArray, RecordBatch, TimestampMillisecondArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::row::{RowConverter, SortField};
use async_trait::async_trait;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use sluice_engine::batch::{PartitionInfo, timestamp_type};
use sluice_engine::config::types::{ByteSize, Duration};
use sluice_engine::config::{Location, Node, Problems};
use sluice_engine::connector::StageSpec;
use sluice_engine::stage::{RowFailure, Stage, StageContext, StageFactory, StageOutput};
use sluice_engine::state::StageState;
use sluice_engine::{Error, ErrorClass, Result, plan_err};

use acc::{AggDef, Func, Kind};
pub use state::WindowKind;
use state::{AggregateState, Closing, OutRow, Plan};

pub use config::{AggregateConfig, parse_stage};
pub use stage::AggregateFactory;

#[cfg(test)]
mod tests;
