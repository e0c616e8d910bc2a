//! `enrich`: a lookup join of each batch against a table keyed by one column.
//!
//! ```yaml
//! - name: profile
//!   type: function
//!   function: enrich
//!   params:
//!     key: user_id                 # the input column to look up
//!     file: { path: data/profiles.parquet, reload_every: 60s }   # or:
//!     # redis: { url: "redis://127.0.0.1:6379", key_prefix: "profile:", format: hash }
//!     # postgres: { url: "postgres://app@127.0.0.1/app", table: profiles, key: user_id }
//!     columns:                     # the looked-up columns (file: optional, default all)
//!       - { name: plan, type: utf8 }
//!       - { name: country, type: utf8 }
//!     prefix: profile_             # output columns are `profile_plan`, `profile_country`
//!     cache: { max_entries: 100000, ttl: 60s }   # redis and postgres
//!     on_missing: default          # null (default) | default | fail
//!     defaults: { plan: free }
//! ```
//!
//! A **file** table (Parquet, CSV or JSON lines, by extension) is loaded once, shared by all
//! workers, and loaded again when its modification time changes (checked every
//! `reload_every`); each batch is then one hash probe per row and one `take` per column.
//! **Redis** and **PostgreSQL** are asked once per batch for the keys the cache does not
//! hold — one pipelined round trip of `HGETALL`s (or of `GET`s of JSON values), or one
//! `SELECT … WHERE key = ANY($1)` on a pooled connection. Answers, found or not, are cached
//! for `ttl` in a cache shared by the stage's workers; hits and misses are counted in the
//! run summary and on `/metrics`. A server that fails or restarts makes the batch fail with
//! a transient error, which the stage's retry policy waits out. A key whose value cannot be
//! read (a Redis key of another type, a value that does not fit the columns) fails its own
//! rows, as permanent. A server that refuses the stage itself (a wrong or missing password,
//! a missing permission) stops the run: at start-up when the stage connects, or after the
//! batch that found out, whose rows go to the dead letters (when the pipeline has them)
//! for a replay once it is fixed.

mod remote;
mod table;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, new_null_array};
use arrow::compute::{cast, interleave};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use serde::Deserialize;
use sluice_engine::config::schema::SchemaSpec;
use sluice_engine::config::{Duration, Location, Node, Problems};
use sluice_engine::plan_err;
use sluice_engine::stage::{RowFailure, Stage, StageContext, StageFactory, StageOutput};
use sluice_engine::stats::RunStats;
use sluice_engine::{Error, ErrorClass, Result};

use super::{FunctionSpec, Params, assemble, extend_schema};
use remote::{PostgresLookup, RedisLookup, Remote};
use table::{FileLookup, FileTable};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrich {
    /// The input column whose value is looked up (text or integer).
    key: String,
    file: Option<FileLookup>,
    redis: Option<RedisLookup>,
    postgres: Option<PostgresLookup>,
    /// The looked-up columns and their types; for a file, a subset of its columns.
    columns: Option<SchemaSpec>,
    /// Put before each looked-up column's name in the output.
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    cache: CacheConfig,
    #[serde(default)]
    on_missing: OnMissing,
    /// Values (as text, cast to the column's type) for `on_missing: default`.
    #[serde(default)]
    defaults: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheConfig {
    /// Keys held at most (found or not); 0 turns the cache off.
    #[serde(default = "default_max_entries")]
    max_entries: u64,
    /// How long an answer is trusted.
    #[serde(default = "default_ttl")]
    ttl: Duration,
}

fn default_max_entries() -> u64 {
    100_000
}

fn default_ttl() -> Duration {
    Duration(std::time::Duration::from_secs(60))
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: default_max_entries(),
            ttl: default_ttl(),
        }
    }
}

/// What a row whose key is not in the table gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OnMissing {
    /// Nulls in the looked-up columns.
    #[default]
    Null,
    /// The `defaults` values.
    Default,
    /// The row fails (to the dead-letter sink when there is one).
    Fail,
}

impl Params for Enrich {
    fn validate(&self, node: &Node, path: &Location, problems: &mut Problems) {
        let sources = [
            self.file.is_some(),
            self.redis.is_some(),
            self.postgres.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            1 => {}
            0 => problems.at(
                path,
                node,
                "say where to look up: one of `file`, `redis` or `postgres`",
            ),
            _ => problems.at(
                path,
                node,
                "only one of `file`, `redis` and `postgres` can be given",
            ),
        }
        if self.file.is_none() && self.columns.as_ref().is_none_or(|c| c.0.is_empty()) {
            problems.at(
                path,
                node,
                "`columns` is required for redis and postgres lookups: name and type each column to add",
            );
        }
        if self.on_missing == OnMissing::Default && self.defaults.is_empty() {
            problems.at_key(
                node,
                path,
                "on_missing",
                "`on_missing: default` needs `defaults` (column: value)",
            );
        }
        if self.on_missing != OnMissing::Default && !self.defaults.is_empty() {
            problems.at_key(
                node,
                path,
                "defaults",
                "`defaults` are used only with `on_missing: default`",
            );
        }
    }
}

impl FunctionSpec for Enrich {
    fn plan(&self, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        let key_field = input.field_with_name(&self.key).map_err(|_| {
            Error::Plan(format!("the key column `{}` is not in the input", self.key))
        })?;
        let key_type = key_field.data_type().clone();
        if !is_key_type(&key_type) {
            return plan_err!(
                "the key column `{}` is {key_type}; a lookup key must be text or an integer",
                self.key
            );
        }
        let (lookup, values) = match (&self.file, &self.redis, &self.postgres) {
            (Some(file), _, _) => {
                let table = FileTable::load(file, &self.key, self.columns.as_ref())?;
                let values = table.values_schema();
                (Lookup::File(Arc::new(table)), values)
            }
            (_, Some(redis), _) => {
                let values = self
                    .columns
                    .as_ref()
                    .map(|c| c.to_arrow())
                    .unwrap_or_else(|| Arc::new(Schema::empty()));
                (Lookup::Remote(Arc::new(redis.plan(&values)?)), values)
            }
            (_, _, Some(pg)) => {
                let values = self
                    .columns
                    .as_ref()
                    .map(|c| c.to_arrow())
                    .unwrap_or_else(|| Arc::new(Schema::empty()));
                (
                    Lookup::Remote(Arc::new(pg.plan(&values, &self.key)?)),
                    values,
                )
            }
            _ => return plan_err!("say where to look up: `file`, `redis` or `postgres`"),
        };
        let missing = self.missing_row(&values)?;
        let new: Vec<(String, DataType)> = values
            .fields()
            .iter()
            .map(|f| {
                (
                    format!("{}{}", self.prefix, f.name()),
                    f.data_type().clone(),
                )
            })
            .collect();
        let new: Vec<(&str, DataType)> = new.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let output = extend_schema(input, &new)?;
        let cache = (self.cache.max_entries > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(self.cache.max_entries)
                .time_to_live(self.cache.ttl.get())
                .build()
        });
        Ok(Arc::new(EnrichFactory {
            shared: Arc::new(Enrichment {
                key: self.key.clone(),
                lookup_name: match &lookup {
                    Lookup::File(t) => t.describe(),
                    Lookup::Remote(r) => r.describe(),
                },
                lookup,
                missing: Arc::new(missing),
                fail_missing: self.on_missing == OnMissing::Fail,
                cache,
                output,
            }),
        }))
    }
}

impl Enrich {
    /// The one-row batch a missing key gets: nulls, or the `defaults` cast to each type.
    fn missing_row(&self, values: &SchemaRef) -> Result<RecordBatch> {
        for name in self.defaults.keys() {
            if values.field_with_name(name).is_err() {
                return plan_err!("`defaults` names `{name}`, which is not a looked-up column");
            }
        }
        let columns = values
            .fields()
            .iter()
            .map(|f| match self.defaults.get(f.name()) {
                None => Ok(new_null_array(f.data_type(), 1)),
                Some(text) => {
                    let text: ArrayRef =
                        Arc::new(arrow::array::StringArray::from(vec![text.as_str()]));
                    arrow::compute::cast_with_options(&text, f.data_type(), &remote::strict())
                        .map_err(|e| {
                            Error::Plan(format!(
                                "the default for `{}` is not a {}: {e}",
                                f.name(),
                                f.data_type()
                            ))
                        })
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let nullable = Arc::new(Schema::new(
            values
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<Field>>(),
        ));
        RecordBatch::try_new(nullable, columns).map_err(|e| Error::Plan(e.to_string()))
    }
}

fn is_key_type(t: &DataType) -> bool {
    t.is_integer() || matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

enum Lookup {
    File(Arc<FileTable>),
    Remote(Arc<dyn Remote>),
}

/// An answer held in the cache: the key's values as a one-row batch of their own (so an
/// entry holds only its own row's memory), or "not there".
type Cached = Option<Arc<RecordBatch>>;

struct Enrichment {
    key: String,
    lookup: Lookup,
    /// Where the lookup goes, for error messages.
    lookup_name: String,
    /// What missing keys get (nulls or defaults), one row.
    missing: Arc<RecordBatch>,
    fail_missing: bool,
    cache: Option<moka::sync::Cache<String, Cached>>,
    output: SchemaRef,
}

struct EnrichFactory {
    shared: Arc<Enrichment>,
}

impl StageFactory for EnrichFactory {
    fn output_schema(&self) -> SchemaRef {
        self.shared.output.clone()
    }

    fn create(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(EnrichStage {
            shared: self.shared.clone(),
            key_text: String::new(),
        }))
    }
}

struct EnrichStage {
    shared: Arc<Enrichment>,
    /// Reused to format integer keys as text.
    key_text: String,
}

#[async_trait]
impl Stage for EnrichStage {
    async fn open(&mut self, _ctx: &StageContext) -> Result<()> {
        if let Lookup::Remote(remote) = &self.shared.lookup {
            remote.connect().await?;
        }
        Ok(())
    }

    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        ctx: &StageContext,
    ) -> Result<StageOutput> {
        let shared = self.shared.clone();
        let keys = batch
            .column_by_name(&shared.key)
            .ok_or_else(|| Error::Internal(format!("key column `{}` missing", shared.key)))?
            .clone();
        let (columns, missing, unreadable) = match &shared.lookup {
            Lookup::File(table) => {
                let (columns, missing) = table.current().await?.lookup(&keys, &shared.missing)?;
                (columns, missing, Vec::new())
            }
            Lookup::Remote(remote) => self.lookup_remote(remote.as_ref(), &keys, ctx).await?,
        };
        let mut failed: Vec<RowFailure> = unreadable
            .into_iter()
            .map(|(row, reason)| RowFailure {
                row,
                class: ErrorClass::Permanent,
                reason,
            })
            .collect();
        if shared.fail_missing {
            failed.extend(missing.into_iter().map(|row| RowFailure {
                row,
                class: ErrorClass::Permanent,
                reason: format!(
                    "no entry for {} = {} in {}",
                    shared.key,
                    key_text(&keys, row),
                    shared.lookup_name
                ),
            }));
        }
        failed.sort_unstable_by_key(|f| f.row);
        Ok(StageOutput {
            batch: assemble(&shared.output, &batch, columns, &failed)?,
            failed,
        })
    }

    /// Stops the run once the lookup server refused the stage for good: the engine calls
    /// this after every batch, and a batch's error alone would only fail its rows.
    async fn pending(&mut self, ctx: &StageContext) -> Result<Option<RecordBatch>> {
        let refused = match &self.shared.lookup {
            Lookup::Remote(remote) => remote.refused(),
            Lookup::File(_) => None,
        };
        match refused {
            Some(e) => Err(Error::Stage {
                stage: ctx.stage.to_string(),
                origin: "a lookup".to_string(),
                class: e.class(),
                message: e.to_string(),
            }),
            None => Ok(None),
        }
    }
}

impl EnrichStage {
    /// Looks every row's key up in the cache, fetches the others in one request, and puts
    /// the output columns together with one `interleave` per column. Returns the columns,
    /// the rows whose key was not found (or null), and the rows whose stored value could
    /// not be read, with the reason.
    async fn lookup_remote(
        &mut self,
        remote: &dyn Remote,
        keys: &ArrayRef,
        ctx: &StageContext,
    ) -> Result<(Vec<ArrayRef>, Vec<usize>, Vec<(usize, String)>)> {
        let shared = self.shared.clone();
        let n = keys.len();
        // The one-row batches the output rows come from; 0 is the missing row.
        let mut sources: Vec<Arc<RecordBatch>> = vec![shared.missing.clone()];
        let mut source_of: HashMap<usize, usize> = HashMap::new();
        let mut source = |row: &Arc<RecordBatch>| -> usize {
            let id = Arc::as_ptr(row) as usize;
            let next = sources.len();
            *source_of.entry(id).or_insert_with(|| {
                sources.push(row.clone());
                next
            })
        };
        let mut picks: Vec<(usize, usize)> = vec![(0, 0); n];
        let mut missing = Vec::new();
        // Keys to fetch, each with the rows that want it.
        let mut wanted: HashMap<String, Vec<usize>> = HashMap::new();
        let (mut hits, mut misses) = (0u64, 0u64);
        let text = keys_as_text(keys)?;
        for (row, pick) in picks.iter_mut().enumerate() {
            let Some(key) = key_at(&text, row, &mut self.key_text) else {
                missing.push(row);
                continue;
            };
            match shared.cache.as_ref().and_then(|c| c.get(key)) {
                Some(Some(values)) => {
                    hits += 1;
                    *pick = (source(&values), 0);
                }
                Some(None) => {
                    hits += 1;
                    missing.push(row);
                }
                None => {
                    misses += 1;
                    match wanted.get_mut(key) {
                        Some(rows) => rows.push(row),
                        None => {
                            wanted.insert(key.to_string(), vec![row]);
                        }
                    }
                }
            }
        }
        let mut unreadable = Vec::new();
        if !wanted.is_empty() {
            let asked: Vec<String> = wanted.keys().cloned().collect();
            let fetched = remote.fetch(&asked).await?;
            let mut answered: Vec<Option<Arc<RecordBatch>>> = vec![None; asked.len()];
            for (k, values) in fetched.found {
                answered[k] = Some(Arc::new(values));
            }
            for (k, reason) in fetched.unreadable {
                // Not cached: the value may be fixed at the source.
                let rows = wanted.remove(&asked[k]).unwrap_or_default();
                unreadable.extend(rows.into_iter().map(|row| (row, reason.clone())));
            }
            for (k, key) in asked.into_iter().enumerate() {
                let Some(rows) = wanted.remove(&key) else {
                    continue;
                };
                match &answered[k] {
                    Some(values) => {
                        let at = source(values);
                        rows.iter().for_each(|&row| picks[row] = (at, 0));
                    }
                    None => missing.extend(rows),
                }
                if let Some(cache) = &shared.cache {
                    cache.insert(key, answered[k].take());
                }
            }
        }
        let stats = ctx.stage_stats();
        RunStats::add(&stats.cache_hits, hits);
        RunStats::add(&stats.cache_misses, misses);
        let columns = (0..shared.missing.num_columns())
            .map(|c| {
                let arrays: Vec<&dyn Array> =
                    sources.iter().map(|b| b.column(c).as_ref()).collect();
                interleave(&arrays, &picks)
                    .map_err(|e| Error::arrow("assembling looked-up values", e))
            })
            .collect::<Result<Vec<_>>>()?;
        missing.sort_unstable();
        Ok((columns, missing, unreadable))
    }
}

/// Keys as text: strings as they are, integers formatted on demand.
enum KeyText {
    Str(arrow::array::StringArray),
    Int(arrow::array::Int64Array),
}

fn keys_as_text(keys: &ArrayRef) -> Result<KeyText> {
    if keys.data_type().is_integer() {
        let ints = cast(keys, &DataType::Int64).map_err(|e| Error::arrow("reading keys", e))?;
        return Ok(KeyText::Int(ints.as_primitive().clone()));
    }
    let text = cast(keys, &DataType::Utf8).map_err(|e| Error::arrow("reading keys", e))?;
    Ok(KeyText::Str(text.as_string::<i32>().clone()))
}

fn key_at<'a>(text: &'a KeyText, row: usize, buf: &'a mut String) -> Option<&'a str> {
    match text {
        KeyText::Str(s) => s.is_valid(row).then(|| s.value(row)),
        KeyText::Int(ints) => ints.is_valid(row).then(|| {
            buf.clear();
            let _ = write!(buf, "{}", ints.value(row));
            buf.as_str()
        }),
    }
}

/// A row's key for an error message.
fn key_text(keys: &ArrayRef, row: usize) -> String {
    if keys.is_null(row) {
        return "null".into();
    }
    arrow::util::display::array_value_to_string(keys, row).unwrap_or_else(|_| "?".into())
}
