//! `ab_bucket`: assigns each row to an experiment variant by a stable hash of a key.
//!
//! The bucket is `xxh3(key, seed = xxh3(experiment)) mod 10000`, and variants own ranges of
//! buckets in proportion to their weights. The same key always gets the same variant in an
//! experiment, on every machine and in every run; different experiments split users
//! independently. Integer keys hash their 8-byte little-endian value, text keys their bytes.
//! A row whose key is null fails on its own (it cannot be assigned).

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringBuilder, UInt16Builder};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use async_trait::async_trait;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use sluice_engine::config::{Location, Node, Problems};
use sluice_engine::plan_err;
use sluice_engine::stage::{RowFailure, Stage, StageContext, StageFactory, StageOutput};
use sluice_engine::{Error, ErrorClass, Result};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::{FunctionSpec, Params, assemble, extend_schema};

const BUCKETS: u64 = 10_000;

/// ```yaml
/// params:
///   key: user_id
///   experiment: home-row-order
///   variants: { control: 50, treatment: 50 }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbBucket {
    /// The column whose value decides the variant (integer or text), e.g. `user_id`.
    key: String,
    /// The experiment's name. It seeds the hash, so experiments split users independently.
    experiment: String,
    /// Variant names and their weights, in order, e.g. `{ control: 90, treatment: 10 }`.
    variants: Weights,
    /// The output column holding the variant's name (default `variant`).
    #[serde(default = "default_output")]
    output: String,
    /// Also write the bucket number (0 to 9999) to this column.
    bucket_output: Option<String>,
}

fn default_output() -> String {
    "variant".into()
}

/// Variant weights in the order written.
#[derive(Debug, Clone)]
struct Weights(Vec<(String, u32)>);

impl<'de> Deserialize<'de> for Weights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Weights;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of variant names to weights")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Weights, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, u32>()? {
                    out.push((k, v));
                }
                Ok(Weights(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl Params for AbBucket {
    fn validate(&self, node: &Node, path: &Location, problems: &mut Problems) {
        let total: u64 = self.variants.0.iter().map(|(_, w)| u64::from(*w)).sum();
        if self.variants.0.is_empty() || total == 0 {
            problems.at_key(
                node,
                path,
                "variants",
                "needs at least one variant with a weight above 0",
            );
        }
        if self.experiment.is_empty() {
            problems.at_key(node, path, "experiment", "must not be empty");
        }
        if self.bucket_output.as_deref() == Some(self.output.as_str()) {
            problems.at_key(node, path, "bucket_output", "must differ from `output`");
        }
    }
}

impl FunctionSpec for AbBucket {
    fn plan(&self, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        let key_type = input
            .field_with_name(&self.key)
            .map_err(|_| Error::Plan(format!("the key column `{}` is not in the input", self.key)))?
            .data_type()
            .clone();
        let key_kind = match key_type {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => KeyKind::Text,
            t if t.is_integer() => KeyKind::Integer,
            t => {
                return plan_err!(
                    "the key column `{}` is {t}; ab_bucket needs an integer or text key",
                    self.key
                );
            }
        };
        let mut new = vec![(self.output.as_str(), DataType::Utf8)];
        if let Some(b) = &self.bucket_output {
            new.push((b.as_str(), DataType::UInt16));
        }
        let output = extend_schema(input, &new)?;
        let total: u64 = self.variants.0.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut acc = 0u64;
        let thresholds = self
            .variants
            .0
            .iter()
            .map(|(name, w)| {
                acc += u64::from(*w);
                (name.clone(), acc * BUCKETS / total)
            })
            .collect();
        Ok(Arc::new(AbBucketStage {
            key: self.key.clone(),
            key_kind,
            seed: xxh3_64(self.experiment.as_bytes()),
            thresholds: Arc::new(thresholds),
            with_bucket: self.bucket_output.is_some(),
            output,
        }))
    }
}

#[derive(Debug, Clone, Copy)]
enum KeyKind {
    Integer,
    Text,
}

#[derive(Clone)]
struct AbBucketStage {
    key: String,
    key_kind: KeyKind,
    seed: u64,
    /// Variant name and the first bucket past its range.
    thresholds: Arc<Vec<(String, u64)>>,
    with_bucket: bool,
    output: SchemaRef,
}

impl StageFactory for AbBucketStage {
    fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    fn create(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(self.clone()))
    }
}

impl AbBucketStage {
    #[inline]
    fn variant(&self, bucket: u64) -> &str {
        let i = self.thresholds.partition_point(|(_, end)| *end <= bucket);
        &self.thresholds[i.min(self.thresholds.len() - 1)].0
    }

    fn hash_column(&self, column: &ArrayRef) -> Result<Vec<Option<u64>>> {
        let n = column.len();
        let mut out = Vec::with_capacity(n);
        match self.key_kind {
            KeyKind::Integer => {
                let ints = cast(column, &DataType::Int64)
                    .map_err(|e| Error::arrow("reading the key column", e))?;
                let ints = ints.as_primitive::<Int64Type>();
                for i in 0..n {
                    out.push(ints.is_valid(i).then(|| {
                        xxh3_64_with_seed(&ints.value(i).to_le_bytes(), self.seed) % BUCKETS
                    }));
                }
            }
            KeyKind::Text => {
                let text = cast(column, &DataType::Utf8)
                    .map_err(|e| Error::arrow("reading the key column", e))?;
                let text = text.as_string::<i32>();
                for i in 0..n {
                    out.push(
                        text.is_valid(i).then(|| {
                            xxh3_64_with_seed(text.value(i).as_bytes(), self.seed) % BUCKETS
                        }),
                    );
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Stage for AbBucketStage {
    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        _ctx: &StageContext,
    ) -> Result<StageOutput> {
        let column = batch
            .column_by_name(&self.key)
            .ok_or_else(|| Error::Internal(format!("key column `{}` vanished", self.key)))?;
        let buckets = self.hash_column(column)?;
        let n = buckets.len();
        let mut names = StringBuilder::with_capacity(n, n * 8);
        let mut numbers = UInt16Builder::with_capacity(if self.with_bucket { n } else { 0 });
        let mut failed = Vec::new();
        for (row, bucket) in buckets.iter().enumerate() {
            match bucket {
                Some(b) => {
                    names.append_value(self.variant(*b));
                    if self.with_bucket {
                        numbers.append_value(*b as u16);
                    }
                }
                None => {
                    names.append_null();
                    if self.with_bucket {
                        numbers.append_null();
                    }
                    failed.push(RowFailure {
                        row,
                        class: ErrorClass::Permanent,
                        reason: format!(
                            "the key `{}` is null: no variant can be assigned",
                            self.key
                        ),
                    });
                }
            }
        }
        let mut new: Vec<ArrayRef> = vec![Arc::new(names.finish())];
        if self.with_bucket {
            new.push(Arc::new(numbers.finish()));
        }
        let out = assemble(&self.output, &batch, new, &failed)?;
        Ok(StageOutput { batch: out, failed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{Field, Schema};

    fn spec(weights: &[(&str, u32)]) -> AbBucket {
        AbBucket {
            key: "user_id".into(),
            experiment: "exp".into(),
            variants: Weights(weights.iter().map(|(n, w)| (n.to_string(), *w)).collect()),
            output: "variant".into(),
            bucket_output: Some("bucket".into()),
        }
    }

    fn ctx() -> StageContext {
        StageContext::detached("ab")
    }

    #[tokio::test]
    async fn splits_by_weight_stably_and_fails_null_keys() {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "user_id",
            DataType::Int64,
            true,
        )]));
        let factory = spec(&[("control", 90), ("treatment", 10)])
            .plan(&schema)
            .unwrap();
        let mut stage = factory.create().unwrap();
        let mut ids: Vec<Option<i64>> = (0..20_000).map(Some).collect();
        ids[5] = None;
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(ids))]).unwrap();
        let out = stage.process_batch(batch.clone(), &ctx()).await.unwrap();
        assert_eq!(out.failed.len(), 1);
        assert_eq!(out.failed[0].row, 5);
        assert_eq!(out.batch.num_rows(), 19_999);
        let variants = out.batch.column(1).as_string::<i32>();
        let treatment = variants.iter().filter(|v| *v == Some("treatment")).count();
        assert!((1_700..2_300).contains(&treatment), "{treatment}");
        // Same key, same variant, in another instance.
        let again = factory
            .create()
            .unwrap()
            .process_batch(batch, &ctx())
            .await
            .unwrap();
        assert_eq!(out.batch, again.batch);
        // Pinned values: a change of hash would silently move users between variants.
        let buckets = out
            .batch
            .column(2)
            .as_primitive::<arrow::datatypes::UInt16Type>();
        assert_eq!(&buckets.values()[..3], &[5391, 301, 1837]);
    }

    #[test]
    fn plan_checks_the_key() {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "user_id",
            DataType::Float64,
            true,
        )]));
        let e = spec(&[("a", 1)]).plan(&schema).err().unwrap();
        assert!(e.to_string().contains("integer or text"), "{e}");
        let e = spec(&[("a", 1)])
            .plan(&Arc::new(Schema::empty()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("not in the input"), "{e}");
    }
}
