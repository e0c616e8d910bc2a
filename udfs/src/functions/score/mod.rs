//! `score`: personalized recommendations — for each event, the top-k content by the score of
//! the user's feature vector against every content vector.
//!
//! ```yaml
//! - name: recommend
//!   type: function
//!   function: score
//!   params:
//!     model: pipelines/models/recs/model.json   # or .parquet
//!     user: user_id                # the per-user cache's key
//!     features: profile_features   # the user's feature vector (list of numbers), e.g. from `enrich`
//!     k: 10
//!     cache: { max_entries: 100000, ttl: 5m }
//!     output: recommendations      # → recommendations, recommendations_scores, recommendations_source
//! ```
//!
//! The model is `score(user, title) = Σ_f weight[f] · user[f] · title[f]`. It is loaded once
//! and laid out feature-major with the weights folded in, so that scoring one user against
//! every title is `F` passes of `scores += user[f] · row[f]` over contiguous memory — a loop
//! the compiler turns into SIMD (AVX2 with FMA when the CPU has it, chosen at run time) —
//! followed by a top-k selection in place. Nothing is allocated per row: scores, the top-k
//! and the per-user cache live in buffers made once per worker.
//!
//! Each row says where its list came from in `<output>_source`, as a recommender's logs do:
//! `generated` (scored now), `cache` (scored for this user within `ttl`), or `fallback` (the
//! user has no feature vector: the most popular titles).
//!
//! Model files: JSON `{"weights": [F numbers], "content": [{"id": 7, "vector": [F numbers],
//! "popularity": 0.3}, …]}`; or Parquet with columns `id` (integer), `vector` (list of
//! numbers), `popularity` (optional number) and the weights as JSON in the file's key-value
//! metadata under `weights`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Int64Array, ListArray, RecordBatch, StringArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Float32Type, SchemaRef};
use async_trait::async_trait;
use serde::Deserialize;
use sluice_engine::config::{Duration, Location, Node, Problems};
use sluice_engine::plan_err;
use sluice_engine::stage::{RowFailure, Stage, StageContext, StageFactory, StageOutput};
use sluice_engine::stats::RunStats;
use sluice_engine::{Error, ErrorClass, Result};

use super::{FunctionSpec, Params, assemble, extend_schema};

mod model;

pub use model::Model;
use model::*;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Score {
    /// The model file (.json or .parquet).
    model: PathBuf,
    /// The user id column (integer or text): the per-user cache's key.
    user: String,
    /// The user's feature vector: a list of numbers, null when the user has no profile.
    features: String,
    /// How many titles to recommend.
    #[serde(default = "default_k")]
    k: usize,
    #[serde(default)]
    cache: CacheConfig,
    /// The name of the recommendations column; `<output>_scores` and `<output>_source`
    /// come with it.
    #[serde(default = "default_output")]
    output: String,
}

fn default_k() -> usize {
    10
}

fn default_output() -> String {
    "recommendations".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheConfig {
    /// Users held per worker; 0 turns the cache off.
    #[serde(default = "default_max_entries")]
    max_entries: usize,
    #[serde(default = "default_ttl")]
    ttl: Duration,
}

fn default_max_entries() -> usize {
    100_000
}

fn default_ttl() -> Duration {
    Duration(std::time::Duration::from_secs(300))
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: default_max_entries(),
            ttl: default_ttl(),
        }
    }
}

impl Params for Score {
    fn validate(&self, node: &Node, path: &Location, problems: &mut Problems) {
        if self.k == 0 {
            problems.at_key(node, path, "k", "must be at least 1");
        }
    }
}

impl FunctionSpec for Score {
    fn plan(&self, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        let user = input.field_with_name(&self.user).map_err(|_| {
            Error::Plan(format!(
                "the user column `{}` is not in the input",
                self.user
            ))
        })?;
        if !(user.data_type().is_integer()
            || matches!(user.data_type(), DataType::Utf8 | DataType::LargeUtf8))
        {
            return plan_err!(
                "the user column `{}` is {}; it must be text or an integer",
                self.user,
                user.data_type()
            );
        }
        let features = input.field_with_name(&self.features).map_err(|_| {
            Error::Plan(format!(
                "the features column `{}` is not in the input",
                self.features
            ))
        })?;
        let numeric_list = match features.data_type() {
            DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
                f.data_type().is_numeric()
            }
            _ => false,
        };
        if !numeric_list {
            return plan_err!(
                "the features column `{}` is {}; it must be a list of numbers",
                self.features,
                features.data_type()
            );
        }
        let model = Model::load(&self.model, self.k)?;
        let output = extend_schema(
            input,
            &[
                (self.output.as_str(), list_of(DataType::Int64)),
                (
                    &format!("{}_scores", self.output),
                    list_of(DataType::Float32),
                ),
                (&format!("{}_source", self.output), DataType::Utf8),
            ],
        )?;
        Ok(Arc::new(ScoreFactory {
            model: Arc::new(model),
            user: self.user.clone(),
            features: self.features.clone(),
            cache: self.cache.clone(),
            output,
        }))
    }
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(item, true)))
}

struct ScoreFactory {
    model: Arc<Model>,
    user: String,
    features: String,
    cache: CacheConfig,
    output: SchemaRef,
}

impl StageFactory for ScoreFactory {
    fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    fn create(&self) -> Result<Box<dyn Stage>> {
        let model = &self.model;
        Ok(Box::new(ScoreStage {
            model: model.clone(),
            user: self.user.clone(),
            features: self.features.clone(),
            scores: vec![0.0; model.padded()],
            top: vec![0; model.k],
            top_scores: vec![0.0; model.k],
            cache: UserCache::new(self.cache.max_entries, model.k, self.cache.ttl.get()),
            output: self.output.clone(),
        }))
    }
}

struct ScoreStage {
    model: Arc<Model>,
    user: String,
    features: String,
    /// Scratch: every title's score for the current user, and the top-k.
    scores: Vec<f32>,
    top: Vec<u32>,
    top_scores: Vec<f32>,
    cache: UserCache,
    output: SchemaRef,
}

/// Where a row's list comes from.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// Scored now: the list is in the stage's `top` / `top_scores`.
    Generated,
    /// From the user cache's slot.
    Cache(usize),
    Fallback,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Generated => "generated",
            Source::Cache(_) => "cache",
            Source::Fallback => "fallback",
        }
    }
}

impl ScoreStage {
    /// The list for a user with feature `vector` (`None`: no profile; `has_null`: a value
    /// of it is null), from the cache or
    /// scored now (and cached); `Err` with the reason when the row fails. Counts cache
    /// `hits` and `misses`.
    fn recommend(
        &mut self,
        vector: Option<&[f32]>,
        has_null: bool,
        key: Option<u64>,
        now: Instant,
        (hits, misses): (&mut u64, &mut u64),
    ) -> std::result::Result<Source, String> {
        let Some(vector) = vector else {
            return Ok(Source::Fallback);
        };
        let f = self.model.features;
        if vector.len() != f {
            return Err(format!(
                "`{}` has {} values; the model has {f} features",
                self.features,
                vector.len()
            ));
        }
        if has_null || vector.iter().any(|v| !v.is_finite()) {
            return Err(format!(
                "`{}` holds a null or non-finite value",
                self.features
            ));
        }
        if let Some(slot) = key.and_then(|key| self.cache.get(key, now)) {
            *hits += 1;
            return Ok(Source::Cache(slot));
        }
        *misses += 1;
        self.model.score_all(vector, &mut self.scores);
        let titles = self.model.titles();
        if top_k(&self.scores[..titles], &mut self.top, &mut self.top_scores) < self.model.k {
            // Scores overflowed to NaN: no list is better than a wrong one.
            return Err(format!(
                "`{}` gives scores that are not numbers (values too large?)",
                self.features
            ));
        }
        if let Some(key) = key {
            self.cache.insert(key, now, &self.top, &self.top_scores);
        }
        Ok(Source::Generated)
    }
}

#[async_trait]
impl Stage for ScoreStage {
    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        ctx: &StageContext,
    ) -> Result<StageOutput> {
        let n = batch.num_rows();
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| Error::Internal(format!("column `{name}` missing")))
        };
        let users = user_keys(&column(&self.user)?)?;
        let features = cast(&column(&self.features)?, &list_of(DataType::Float32))
            .map_err(|e| Error::arrow("reading feature vectors", e))?;
        let features = features.as_list::<i32>();
        let values = features.values().as_primitive::<Float32Type>();
        let offsets = features.value_offsets();
        let (model, k) = (self.model.clone(), self.model.k);

        let mut ids: Vec<i64> = Vec::with_capacity(n * k);
        let mut scores: Vec<f32> = Vec::with_capacity(n * k);
        let mut sources: Vec<&'static str> = Vec::with_capacity(n);
        let mut failed = Vec::new();
        let (mut hits, mut misses) = (0u64, 0u64);
        let now = Instant::now();
        for row in 0..n {
            let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
            let vector =
                (!features.is_null(row) && start < end).then(|| &values.values()[start..end]);
            // A null inside the vector reads as 0.0 in `values`: told apart here.
            let has_null = values
                .nulls()
                .is_some_and(|nulls| (start..end).any(|i| nulls.is_null(i)));
            let source = self.recommend(
                vector,
                has_null,
                users.get(row),
                now,
                (&mut hits, &mut misses),
            );
            let source = source.unwrap_or_else(|reason| {
                failed.push(RowFailure {
                    row,
                    class: ErrorClass::Permanent,
                    reason,
                });
                // Any list of the right length: the row is removed from the output.
                Source::Fallback
            });
            let (list, list_scores) = match source {
                Source::Generated => (&self.top[..], &self.top_scores[..]),
                Source::Cache(slot) => self.cache.entry(slot),
                Source::Fallback => (&model.popular[..], &model.popular_scores[..]),
            };
            ids.extend(list.iter().map(|&i| model.ids[i as usize]));
            scores.extend_from_slice(list_scores);
            sources.push(source.as_str());
        }
        let stats = ctx.stage_stats();
        RunStats::add(&stats.cache_hits, hits);
        RunStats::add(&stats.cache_misses, misses);

        let offsets = OffsetBuffer::from_lengths(std::iter::repeat_n(k, n));
        let lists: Vec<ArrayRef> = vec![
            Arc::new(ListArray::new(
                Arc::new(Field::new_list_field(DataType::Int64, true)),
                offsets.clone(),
                Arc::new(Int64Array::from(ids)),
                None,
            )),
            Arc::new(ListArray::new(
                Arc::new(Field::new_list_field(DataType::Float32, true)),
                offsets,
                Arc::new(Float32Array::from(scores)),
                None,
            )),
            Arc::new(StringArray::from(sources)),
        ];
        Ok(StageOutput {
            batch: assemble(&self.output, &batch, lists, &failed)?,
            failed,
        })
    }
}

/// User ids as cache keys: integers as they are, text by its 64-bit hash.
enum UserKeys {
    Int(Int64Array),
    Text(arrow::array::StringArray),
}

impl UserKeys {
    fn get(&self, row: usize) -> Option<u64> {
        match self {
            UserKeys::Int(a) => a.is_valid(row).then(|| a.value(row) as u64),
            UserKeys::Text(a) => a
                .is_valid(row)
                .then(|| xxhash_rust::xxh3::xxh3_64(a.value(row).as_bytes())),
        }
    }
}

fn user_keys(column: &ArrayRef) -> Result<UserKeys> {
    if column.data_type().is_integer() {
        let ints =
            cast(column, &DataType::Int64).map_err(|e| Error::arrow("reading user ids", e))?;
        return Ok(UserKeys::Int(ints.as_primitive().clone()));
    }
    let text = cast(column, &DataType::Utf8).map_err(|e| Error::arrow("reading user ids", e))?;
    Ok(UserKeys::Text(text.as_string::<i32>().clone()))
}

/// A fixed-size cache of each user's top-k, made once per worker: slots in flat arrays,
/// overwritten oldest first, entries trusted for `ttl`. Inserting allocates nothing.
struct UserCache {
    slot_of: HashMap<u64, u32>,
    keys: Vec<u64>,
    born: Vec<Option<Instant>>,
    ids: Vec<u32>,
    scores: Vec<f32>,
    k: usize,
    next: usize,
    ttl: std::time::Duration,
}

impl UserCache {
    fn new(capacity: usize, k: usize, ttl: std::time::Duration) -> Self {
        UserCache {
            slot_of: HashMap::with_capacity(capacity),
            keys: vec![0; capacity],
            born: vec![None; capacity],
            ids: vec![0; capacity * k],
            scores: vec![0.0; capacity * k],
            k,
            next: 0,
            ttl,
        }
    }

    fn get(&self, key: u64, now: Instant) -> Option<usize> {
        let slot = *self.slot_of.get(&key)? as usize;
        let born = self.born[slot]?;
        (now.duration_since(born) < self.ttl).then_some(slot)
    }

    fn entry(&self, slot: usize) -> (&[u32], &[f32]) {
        let range = slot * self.k..(slot + 1) * self.k;
        (&self.ids[range.clone()], &self.scores[range])
    }

    fn insert(&mut self, key: u64, now: Instant, ids: &[u32], scores: &[f32]) {
        if self.keys.is_empty() {
            return;
        }
        let slot = match self.slot_of.get(&key) {
            Some(&slot) => slot as usize,
            None => {
                let slot = self.next;
                self.next = (self.next + 1) % self.keys.len();
                if self.born[slot].is_some() {
                    self.slot_of.remove(&self.keys[slot]);
                }
                self.slot_of.insert(key, slot as u32);
                self.keys[slot] = key;
                slot
            }
        };
        self.born[slot] = Some(now);
        let range = slot * self.k..(slot + 1) * self.k;
        self.ids[range.clone()].copy_from_slice(ids);
        self.scores[range].copy_from_slice(scores);
    }
}

#[cfg(test)]
mod tests;
