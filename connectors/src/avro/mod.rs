//! Avro payloads in the Confluent wire format (a `0` byte, the writer schema's 4-byte
//! registry id, the Avro body), decoded straight into Arrow by `arrow-avro`.
//!
//! ```yaml
//! source:
//!   type: kafka
//!   format: avro
//!   avro:
//!     schema: schemas/views.avsc             # the reader schema: the columns the pipeline sees
//!     schema_registry: { url: http://registry:8081 }
//! ```
//! Without `schema:`, the reader schema is the registry's latest version of the topic's
//! subject (`{topic}-value`, or `subject:`) when the pipeline starts.
//! Each writer schema is fetched from the registry by its id the first time a message
//! names it, cached for the process, and resolved against the reader schema by Avro's
//! rules (fields added with defaults, fields removed, promoted types): producers can move
//! to a new compatible schema while the pipeline runs. A message whose writer schema does
//! not resolve, that is not framed, or whose body does not decode is a bad record (a dead
//! letter with its bytes and the reason naming the schema id); the others go on. While the
//! registry does not answer, the partition waits for it (as for a broker outage): no
//! record is decoded with a schema it does not have.

mod decode;
mod encode;
mod registry;
mod shape;
mod stats;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;

use arrow::datatypes::SchemaRef;
use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use serde::Deserialize;
use sluice_engine::{Error, Result};

pub use decode::AvroDecoder;
pub use encode::{AvroEncoder, AvroSinkConfig};
pub use registry::{Latest, RegistryConfig, SchemaRegistry, SubjectStrategy};
pub use stats::{IdCounts, SchemaStats, stats};

/// `avro:` of a Kafka or Kinesis source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvroConfig {
    /// The reader schema (`.avsc`): the records' columns, whatever schema wrote them.
    /// Without it, the registry's latest version of `subject` when the pipeline starts.
    pub schema: Option<PathBuf>,
    /// Where writer schemas are fetched by id.
    pub schema_registry: RegistryConfig,
    /// Without `schema`, the subject whose latest version is the reader schema (default
    /// `{topic}-value` for a source of one topic).
    pub subject: Option<String>,
}

impl AvroConfig {
    /// What the reader schema is, for people.
    pub fn reader(&self, topics: &[String]) -> String {
        match (&self.schema, self.subject_for(topics)) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(subject)) => format!("the latest version of subject `{subject}`"),
            (None, None) => "the reader schema".into(),
        }
    }

    fn subject_for(&self, topics: &[String]) -> Option<String> {
        self.subject.clone().or(match topics {
            [topic] => Some(format!("{topic}-value")),
            _ => None,
        })
    }
}

/// A writer schema known to the process: resolvable against the reader schema, or not
/// (with the reason).
#[derive(Clone)]
enum Writer {
    Resolves(AvroSchema),
    Refused(String),
}

/// The reader schema, the registry, and the writer schemas fetched so far (shared by
/// every partition's decoder).
pub struct AvroFormat {
    reader: AvroSchema,
    records: SchemaRef,
    registry: SchemaRegistry,
    writers: Mutex<HashMap<u32, Writer>>,
}

/// The first byte of a Confluent-framed message.
const MAGIC: u8 = 0;

impl AvroFormat {
    /// Reads the reader schema; the records' Arrow schema follows from it.
    /// The reader schema is `config.schema`, or (without it) the registry's latest version
    /// of the subject of `topics`, asked once now.
    pub fn open(config: &AvroConfig, topics: &[String]) -> Result<Self> {
        let registry = SchemaRegistry::new(&config.schema_registry)?;
        let text = match (&config.schema, config.subject_for(topics)) {
            (Some(path), _) => std::fs::read_to_string(path).map_err(|e| {
                Error::Plan(format!(
                    "cannot read the Avro schema {}: {e}",
                    path.display()
                ))
            })?,
            (None, None) => {
                return Err(Error::Plan(
                    "give the reader schema (`schema: FILE.avsc`), or the `subject` whose latest version it is (a source of several topics has no one subject)".into(),
                ));
            }
            (None, Some(subject)) => match latest_reader(&config.schema_registry, &subject) {
                Ok(Some(latest)) if latest.schema_type.as_deref().is_none_or(|t| t == "AVRO") => {
                    latest.schema
                }
                Ok(Some(_)) => {
                    return Err(Error::Plan(format!(
                        "the latest version of subject `{subject}` is not an Avro schema"
                    )));
                }
                Ok(None) => {
                    return Err(Error::Plan(format!(
                        "the registry at {} has no subject `{subject}` to take the reader schema from: give `schema: FILE.avsc`",
                        registry.url()
                    )));
                }
                Err(why) => {
                    return Err(Error::Plan(format!(
                        "the reader schema is the latest version of subject `{subject}`, and the registry at {} did not answer: {why}",
                        registry.url()
                    )));
                }
            },
        };
        let reader = AvroSchema::new(text);
        let records = decoder_for(&reader, &[(0, reader.clone())])
            .map_err(|e| Error::Plan(format!("the Avro schema {}: {e}", config.reader(topics))))?
            .schema();
        Ok(AvroFormat {
            reader,
            records,
            registry,
            writers: Mutex::default(),
        })
    }

    /// The records' columns (before the metadata columns).
    pub fn records(&self) -> SchemaRef {
        self.records.clone()
    }

    /// Fetches the writer schemas of `ids` not known yet, waiting while the registry does
    /// not answer.
    async fn learn(&self, ids: impl Iterator<Item = u32>) -> Result<()> {
        let missing: Vec<u32> = {
            let known = self.writers.lock().expect("writers lock");
            ids.filter(|id| !known.contains_key(id)).collect()
        };
        look_up(
            missing,
            |id| self.fetch(id),
            |id, writer| {
                // Another partition may have fetched it meanwhile: the first answer stays.
                let mut writers = self.writers.lock().expect("writers lock");
                writers.entry(id).or_insert(writer);
                forget_refused(&mut writers, |w| matches!(w, Writer::Refused(_)));
            },
        )
        .await
    }

    /// One writer schema by id: resolved against the reader schema, or refused with the
    /// reason (the registry has no such id). Waits while the registry does not answer.
    async fn fetch(&self, id: u32) -> Result<Writer> {
        Ok(match self.registry.schema(id).await? {
            Ok(s) => self.resolve(id, s.schema, s.schema_type, &s.references),
            Err(no) => Writer::Refused(format!(
                "schema id {id}: the registry at {} answers {} {}",
                self.registry.url(),
                no.status,
                no.said
            )),
        })
    }

    /// A fetched writer schema, resolved against the reader schema or refused.
    fn resolve(
        &self,
        id: u32,
        schema: String,
        kind: Option<String>,
        references: &[serde_json::Value],
    ) -> Writer {
        if let Some(kind) = kind.filter(|k| k != "AVRO") {
            return Writer::Refused(format!("schema id {id} is a {kind} schema, not Avro"));
        }
        if !references.is_empty() {
            return Writer::Refused(format!(
                "schema id {id} uses schema references, which are not read yet"
            ));
        }
        let writer = AvroSchema::new(schema);
        match decoder_for(&self.reader, &[(id, writer.clone())]) {
            Ok(_) => {
                tracing::info!(id, "new Avro writer schema");
                Writer::Resolves(writer)
            }
            Err(e) => Writer::Refused(format!(
                "schema id {id} does not resolve against the reader schema: {e}"
            )),
        }
    }

    /// For `sluice validate`: each topic's subject (`{topic}-value`) in the registry, its
    /// latest version resolved against the reader schema.
    pub async fn check_latest(
        &self,
        topics: &[String],
        file: &str,
    ) -> sluice_engine::connector::RemoteCheck {
        self.registry
            .check_subjects(topics, file, "avro", |latest| {
                match self.resolve(latest.id, latest.schema, latest.schema_type, &[]) {
                    Writer::Refused(why) => Some(why),
                    Writer::Resolves(_) => None,
                }
            })
            .await
    }

    /// Takes writer schema `schema` as id `id` without asking the registry (a schema the
    /// caller already has, as benches do); whether it resolves against the reader schema.
    pub fn add_writer(&self, id: u32, schema: String) -> bool {
        let writer = self.resolve(id, schema, None, &[]);
        let resolves = matches!(writer, Writer::Resolves(_));
        self.writers
            .lock()
            .expect("writers lock")
            .entry(id)
            .or_insert(writer);
        resolves
    }

    /// The writer schemas that resolve, and every id known (both read at once).
    fn known(&self) -> (Vec<(u32, AvroSchema)>, HashSet<u32>) {
        let writers = self.writers.lock().expect("writers lock");
        let resolvable = writers
            .iter()
            .filter_map(|(id, w)| match w {
                Writer::Resolves(s) => Some((*id, s.clone())),
                Writer::Refused(_) => None,
            })
            .collect();
        (resolvable, writers.keys().copied().collect())
    }
}

/// Refused writer schemas kept at most. Ids come from the messages, and a producer can
/// name a new one in each: past this many refused ones, they are all forgotten (their
/// messages are then refused as "not fetched" by partitions that had looked them up, and
/// looked up again by the others).
pub(crate) const MAX_REFUSED: usize = 65_536;

/// Why a message naming schema `id` is refused when no writer of that id is known.
pub(crate) fn not_fetched(id: u32) -> String {
    format!(
        "schema id {id} was not fetched: its chunk of messages named more than {MAX_LOOKUPS} ids not seen before, or it was refused and forgotten among more than {MAX_REFUSED} refused ids"
    )
}

/// Schema ids not seen before looked up at most for one chunk of messages. Ids come from
/// the messages: without a bound, a chunk naming a new id in each message would wait for
/// as many registry round trips. The messages of the ids past it are dead letters
/// ([`not_fetched`]); no producer's schemas change that fast.
pub(crate) const MAX_LOOKUPS: usize = 256;

/// Schema ids by how many messages name them, most first (ties by id): the order
/// [`look_up`] takes them in, so that a chunk over its bound still gets the ids of most of
/// its messages.
pub(crate) fn most_named_first(counts: HashMap<u32, u64>) -> Vec<u32> {
    let mut ids: Vec<(u32, u64)> = counts.into_iter().collect();
    ids.sort_unstable_by_key(|&(id, n)| (std::cmp::Reverse(n), id));
    ids.into_iter().map(|(id, _)| id).collect()
}

/// Registry lookups in flight at once.
const LOOKUPS_IN_FLIGHT: usize = 8;

/// Looks up the first [`MAX_LOOKUPS`] of `missing` with `fetch`, [`LOOKUPS_IN_FLIGHT`] at
/// a time, and gives each answer to `keep` as it comes.
pub(crate) async fn look_up<W, F>(
    missing: Vec<u32>,
    fetch: impl Fn(u32) -> F,
    mut keep: impl FnMut(u32, W),
) -> Result<()>
where
    F: std::future::Future<Output = Result<W>>,
{
    use futures::StreamExt;
    if missing.len() > MAX_LOOKUPS {
        static WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if WARNED
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(1000)
        {
            tracing::warn!(
                ids = missing.len(),
                "a chunk of messages names more than {MAX_LOOKUPS} schema ids not seen before: the messages of the ids past the first {MAX_LOOKUPS} are dead letters (said the first time, then every 1,000th)"
            );
        }
    }
    let mut answers = futures::stream::iter(missing.into_iter().take(MAX_LOOKUPS))
        .map(|id| {
            let answer = fetch(id);
            async move { (id, answer.await) }
        })
        .buffer_unordered(LOOKUPS_IN_FLIGHT);
    while let Some((id, answer)) = answers.next().await {
        keep(id, answer?);
    }
    Ok(())
}

/// Forgets every refused writer of `writers` once there are more than [`MAX_REFUSED`].
pub(crate) fn forget_refused<W>(
    writers: &mut HashMap<u32, W>,
    refused: impl Fn(&W) -> bool,
) -> bool {
    if writers.len() <= MAX_REFUSED
        || writers.values().filter(|w| refused(w)).count() <= MAX_REFUSED
    {
        return false;
    }
    writers.retain(|_, w| !refused(w));
    tracing::warn!(
        "more than {MAX_REFUSED} schema ids the registry refused were named by messages: forgetting them"
    );
    true
}

/// The registry's latest version of `subject`, asked once per process: the config check,
/// the plan's columns and the source each open the format at start, and a reader schema
/// is fixed for the run. Only answers are kept (a failed lookup is asked again).
fn latest_reader(
    config: &RegistryConfig,
    subject: &str,
) -> std::result::Result<Option<registry::Latest>, String> {
    static KNOWN: Mutex<Vec<((String, String), registry::Latest)>> = Mutex::new(Vec::new());
    let key = (config.url.clone(), subject.to_string());
    if let Some((_, latest)) = KNOWN
        .lock()
        .expect("reader schemas lock")
        .iter()
        .find(|(k, _)| *k == key)
    {
        return Ok(Some(latest.clone()));
    }
    let latest = registry::latest_blocking(config, subject)?;
    if let Some(found) = &latest {
        tracing::info!(%subject, version = found.version, id = found.id, "reader schema: the registry's latest version");
        KNOWN
            .lock()
            .expect("reader schemas lock")
            .push((key, found.clone()));
    }
    Ok(latest)
}

/// A decoder from the writer schemas `writers` (by id) to the reader schema.
pub(crate) fn decoder_for(
    reader: &AvroSchema,
    writers: &[(u32, AvroSchema)],
) -> std::result::Result<Decoder, arrow::error::ArrowError> {
    let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
    for (id, schema) in writers {
        store.set(Fingerprint::Id(*id), schema.clone())?;
    }
    ReaderBuilder::new()
        .with_batch_size(65_536)
        .with_reader_schema(reader.clone())
        .with_writer_schema_store(store)
        .build_decoder()
}

/// The writer schema id a message is framed with, if it is framed.
pub(crate) fn schema_id(payload: &[u8]) -> Option<u32> {
    match payload {
        [MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk naming more new ids than the bound looks up the first ones only, several
    /// at a time.
    #[tokio::test]
    async fn new_ids_past_the_bound_are_not_looked_up() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (in_flight, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let mut kept = Vec::new();
        look_up(
            (0..MAX_LOOKUPS as u32 + 44).collect(),
            |id| {
                let (in_flight, most) = (&in_flight, &most);
                async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    Ok(id * 10)
                }
            },
            |id, w| kept.push((id, w)),
        )
        .await
        .unwrap();
        kept.sort_unstable();
        let expected: Vec<(u32, u32)> = (0..MAX_LOOKUPS as u32).map(|id| (id, id * 10)).collect();
        assert_eq!(kept, expected);
        assert_eq!(most.load(Ordering::SeqCst), LOOKUPS_IN_FLIGHT);
    }

    #[test]
    fn refused_ids_past_the_limit_are_forgotten_and_resolved_ones_stay() {
        let mut writers: HashMap<u32, Option<&str>> = HashMap::new();
        writers.insert(0, Some("resolves"));
        for id in 1..=MAX_REFUSED as u32 {
            writers.insert(id, None);
            assert!(!forget_refused(&mut writers, Option::is_none));
        }
        writers.insert(u32::MAX, None);
        assert!(forget_refused(&mut writers, Option::is_none));
        assert_eq!(writers.len(), 1);
        assert_eq!(writers[&0], Some("resolves"));
    }
}
