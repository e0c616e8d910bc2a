//! Lookups in Redis and PostgreSQL: one round trip per batch for the keys the cache lacks.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use serde::Deserialize;
use sluice_engine::{Error, ErrorClass, Result};
use tokio::sync::OnceCell;

/// Where a stage's lookups go.
#[async_trait]
pub trait Remote: Send + Sync {
    /// Connects (in a worker's `open`); a server that is down now is not an error yet.
    async fn connect(&self) -> Result<()>;

    /// The values of those `keys` that exist: the index in `keys` of each row of the batch.
    async fn fetch(&self, keys: &[String]) -> Result<(Vec<usize>, RecordBatch)>;

    /// For error messages: `redis://host:port` or `postgres table t`.
    fn describe(&self) -> String;
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisLookup {
    /// `redis://host:port/db`.
    url: String,
    /// Put before each key: `profile:` looks up `profile:42`.
    #[serde(default)]
    key_prefix: String,
    /// `hash`: each key is a hash of the columns (HGETALL); `json`: each key holds a JSON
    /// object of the columns (MGET).
    #[serde(default)]
    format: RedisFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RedisFormat {
    #[default]
    Hash,
    Json,
}

impl RedisLookup {
    pub fn plan(&self, values: &SchemaRef) -> Result<Redis, String> {
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| format!("`{}` is not a Redis URL: {e}", self.url))?;
        if self.format == RedisFormat::Hash
            && let Some(f) = values.fields().iter().find(|f| !scalar(f.data_type()))
        {
            return Err(format!(
                "the column `{}` is {}: a Redis hash holds text, so only plain types can be read from one; use `format: json`",
                f.name(),
                f.data_type()
            ));
        }
        Ok(Redis {
            client,
            url: self.url.clone(),
            prefix: self.key_prefix.clone(),
            format: self.format,
            values: values.clone(),
            connection: OnceCell::new(),
        })
    }
}

fn scalar(t: &DataType) -> bool {
    t.is_primitive() || matches!(t, DataType::Utf8 | DataType::Boolean)
}

pub struct Redis {
    client: redis::Client,
    url: String,
    prefix: String,
    format: RedisFormat,
    values: SchemaRef,
    /// One multiplexed connection for all workers; it reconnects after a failure.
    connection: OnceCell<redis::aio::ConnectionManager>,
}

fn redis_error(e: redis::RedisError) -> Error {
    Error::External {
        system: "redis",
        message: e.to_string(),
    }
}

impl Redis {
    async fn connection(&self) -> Result<redis::aio::ConnectionManager> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
            .set_response_timeout(Some(std::time::Duration::from_secs(10)))
            .set_number_of_retries(2);
        self.connection
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await
            .cloned()
            .map_err(redis_error)
    }
}

#[async_trait]
impl Remote for Redis {
    async fn connect(&self) -> Result<()> {
        if let Err(e) = self.connection().await {
            tracing::warn!(url = %self.url, "Redis not reachable yet, will try again at the first batch: {e}");
        }
        Ok(())
    }

    async fn fetch(&self, keys: &[String]) -> Result<(Vec<usize>, RecordBatch)> {
        let mut connection = self.connection().await?;
        let mut pipe = redis::pipe();
        match self.format {
            RedisFormat::Hash => {
                for key in keys {
                    pipe.cmd("HGETALL").arg(format!("{}{key}", self.prefix));
                }
                let hashes: Vec<HashMap<String, String>> = pipe
                    .query_async(&mut connection)
                    .await
                    .map_err(redis_error)?;
                let found: Vec<usize> =
                    (0..keys.len()).filter(|&i| !hashes[i].is_empty()).collect();
                let mut columns = Vec::with_capacity(self.values.fields().len());
                for field in self.values.fields() {
                    let mut text = StringBuilder::new();
                    for &i in &found {
                        text.append_option(hashes[i].get(field.name()));
                    }
                    let text: ArrayRef = Arc::new(text.finish());
                    columns.push(cast_text(
                        &text,
                        field.name(),
                        field.data_type(),
                        &self.describe(),
                    )?);
                }
                let batch = RecordBatch::try_new(self.values.clone(), columns)
                    .map_err(|e| Error::arrow("assembling Redis values", e))?;
                Ok((found, batch))
            }
            RedisFormat::Json => {
                let mut cmd = redis::cmd("MGET");
                for key in keys {
                    cmd.arg(format!("{}{key}", self.prefix));
                }
                let values: Vec<Option<String>> = cmd
                    .query_async(&mut connection)
                    .await
                    .map_err(redis_error)?;
                let found: Vec<usize> = (0..keys.len()).filter(|&i| values[i].is_some()).collect();
                let objects = found.iter().filter_map(|&i| values[i].as_deref());
                let batch = decode_objects(objects, found.len(), &self.values, &self.describe())?;
                Ok((found, batch))
            }
        }
    }

    fn describe(&self) -> String {
        format!("{} (keys `{}…`)", self.url, self.prefix)
    }
}

/// Text values as the declared type; a value that does not convert fails the batch.
fn cast_text(text: &ArrayRef, name: &str, to: &DataType, source: &str) -> Result<ArrayRef> {
    let options = arrow::compute::CastOptions {
        safe: false,
        ..Default::default()
    };
    arrow::compute::cast_with_options(text, to, &options).map_err(|e| Error::Function {
        class: ErrorClass::Permanent,
        message: format!("{source}: field `{name}` is not {to}: {e}"),
    })
}

/// JSON objects (one per found key) decoded against the declared columns.
fn decode_objects<'a>(
    objects: impl Iterator<Item = &'a str>,
    rows: usize,
    schema: &SchemaRef,
    source: &str,
) -> Result<RecordBatch> {
    let fail = |e: arrow::error::ArrowError| Error::Function {
        class: ErrorClass::Permanent,
        message: format!("{source}: a value does not fit the declared columns: {e}"),
    };
    let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.max(1))
        .build_decoder()
        .map_err(fail)?;
    for object in objects {
        decoder.decode(object.as_bytes()).map_err(fail)?;
        decoder.decode(b"\n").map_err(fail)?;
    }
    Ok(decoder
        .flush()
        .map_err(fail)?
        .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresLookup {
    /// `postgres://user:password@host:port/database` (or `host=… user=…`).
    url: String,
    /// The table (or view), optionally `schema.table`.
    table: String,
    /// Its key column (default: the stage's `key`).
    key: Option<String>,
    /// Connections in the pool, shared by the stage's workers.
    #[serde(default = "default_pool_size")]
    pool_size: usize,
}

fn default_pool_size() -> usize {
    4
}

impl PostgresLookup {
    pub fn plan(&self, values: &SchemaRef, stage_key: &str) -> Result<Postgres, String> {
        let config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| format!("`{}` is not a PostgreSQL connection string: {e}", self.url))?;
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(self.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(std::time::Duration::from_secs(5)))
            .wait_timeout(Some(std::time::Duration::from_secs(30)))
            .build()
            .map_err(|e| format!("PostgreSQL pool: {e}"))?;
        let key = self.key.as_deref().unwrap_or(stage_key);
        let quoted = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
        let table = self
            .table
            .split('.')
            .map(quoted)
            .collect::<Vec<_>>()
            .join(".");
        // The values come back as one JSON object per row, so that every PostgreSQL type
        // (arrays included) arrives in the declared Arrow type through one decoder.
        let fields = values
            .fields()
            .iter()
            .map(|f| format!("'{}', {}", f.name().replace('\'', "''"), quoted(f.name())))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Postgres {
            pool,
            sql: format!(
                "SELECT {key}::text, json_build_object({fields})::text FROM {table} WHERE {key} = ANY($1)",
                key = quoted(key),
            ),
            table: self.table.clone(),
            values: values.clone(),
        })
    }
}

pub struct Postgres {
    pool: deadpool_postgres::Pool,
    sql: String,
    table: String,
    values: SchemaRef,
}

impl Postgres {
    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::External {
            system: "postgres",
            message: format!("looking up `{}`: {e}", self.table),
        }
    }

    /// A database error (no such table or column, wrong types) that asking again will not
    /// cure, as opposed to a connection that failed.
    fn refused(&self, e: &tokio_postgres::Error) -> Option<Error> {
        let db = e.as_db_error()?;
        Some(Error::Function {
            class: ErrorClass::Permanent,
            message: format!(
                "PostgreSQL refused the lookup in `{}`: {} ({})",
                self.table,
                db.message(),
                db.code().code()
            ),
        })
    }
}

#[async_trait]
impl Remote for Postgres {
    async fn connect(&self) -> Result<()> {
        let client = match self.pool.get().await {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(table = %self.table, "PostgreSQL not reachable yet, will try again at the first batch: {e}");
                return Ok(());
            }
        };
        // A missing table or column is reported now rather than at every batch.
        match client.prepare_cached(&self.sql).await {
            Ok(_) => Ok(()),
            Err(e) => match self.refused(&e) {
                Some(refused) => Err(refused),
                None => Ok(()),
            },
        }
    }

    async fn fetch(&self, keys: &[String]) -> Result<(Vec<usize>, RecordBatch)> {
        let client = self.pool.get().await.map_err(|e| self.error(e))?;
        let statement = client
            .prepare_cached(&self.sql)
            .await
            .map_err(|e| self.refused(&e).unwrap_or_else(|| self.error(e)))?;
        use tokio_postgres::types::Type;
        let rows = match statement.params().first() {
            Some(&Type::INT8_ARRAY) | Some(&Type::INT4_ARRAY) | Some(&Type::INT2_ARRAY) => {
                let ints: Vec<i64> = keys.iter().filter_map(|k| k.parse().ok()).collect();
                let param = statement.params()[0].clone();
                match param {
                    Type::INT8_ARRAY => client.query(&statement, &[&ints]).await,
                    Type::INT4_ARRAY => {
                        let ints: Vec<i32> =
                            ints.iter().filter_map(|&i| i32::try_from(i).ok()).collect();
                        client.query(&statement, &[&ints]).await
                    }
                    _ => {
                        let ints: Vec<i16> =
                            ints.iter().filter_map(|&i| i16::try_from(i).ok()).collect();
                        client.query(&statement, &[&ints]).await
                    }
                }
            }
            _ => client.query(&statement, &[&keys]).await,
        }
        .map_err(|e| self.refused(&e).unwrap_or_else(|| self.error(e)))?;
        let position: HashMap<&str, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i))
            .collect();
        let mut found = Vec::with_capacity(rows.len());
        let mut objects = Vec::with_capacity(rows.len());
        for row in &rows {
            let key: Option<&str> = row.get(0);
            if let Some(&i) = key.and_then(|k| position.get(k)) {
                found.push(i);
                objects.push(row.get::<_, &str>(1));
            }
        }
        let batch = decode_objects(
            objects.into_iter(),
            found.len(),
            &self.values,
            &self.describe(),
        )?;
        Ok((found, batch))
    }

    fn describe(&self) -> String {
        format!("PostgreSQL table `{}`", self.table)
    }
}
