//! Lookups in Redis and PostgreSQL: one round trip per batch for the keys the cache lacks.
//!
//! # Errors
//! Each server's errors are sorted the same three ways:
//! - **transient** (a connection lost, refused or timed out; a server loading its data, busy
//!   or failing over; PostgreSQL's SQLSTATE classes that mean "try again"): the batch fails
//!   as transient and the stage's retry policy waits it out;
//! - **permanent** for one key (a Redis key holding another type than the format reads, a
//!   stored value that does not fit the columns): that key's rows fail alone, the others
//!   are enriched;
//! - **refused** (a wrong or missing password, a user without the permission, a command or
//!   database the server does not have): no lookup can succeed, so the run stops, with a
//!   sentence that says what to check.
//!
//! Connection strings are never shown with their password: messages and logs name a Redis
//! server as `redis://:***@host:port`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, RecordBatch, StringBuilder, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use serde::Deserialize;
use sluice_engine::{Error, ErrorClass, Result};
use tokio::sync::OnceCell;

use crate::functions::redact;

/// Where a stage's lookups go.
#[async_trait]
pub trait Remote: Send + Sync {
    /// Connects (in a worker's `open`); a server that is down now is not an error yet.
    async fn connect(&self) -> Result<()>;

    /// The values of those `keys` that exist. An error fails the whole call (a server that
    /// is down, a query refused); a stored value that does not fit the declared columns, or
    /// a key the server refuses on its own, fails its key alone.
    async fn fetch(&self, keys: &[String]) -> Result<Fetched>;

    /// For error messages: `redis://host:port` or `postgres table t`, without a password.
    fn describe(&self) -> String;

    /// Why no lookup can succeed for the rest of the run, once a call found out that the
    /// server refuses the stage itself (a wrong password, a missing permission): the stage
    /// then stops the run with this error.
    fn refused(&self) -> Option<Error> {
        None
    }
}

/// What one round trip found.
#[derive(Default)]
pub struct Fetched {
    /// The index in the asked keys, and that key's values as a one-row batch of its own.
    pub found: Vec<(usize, RecordBatch)>,
    /// Keys whose stored value could not be read as the declared columns, or that the
    /// server refused on their own (a Redis key of another type), and why.
    pub unreadable: Vec<(usize, String)>,
}

impl Fetched {
    /// Copies rows of `values` into one-row batches that own their memory (so that a cached
    /// entry never keeps a whole fetched batch alive): `(row, key)` gives the row of
    /// `values` holding the value of `keys[key]`.
    fn own_rows(
        &mut self,
        values: &RecordBatch,
        rows: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<()> {
        for (row, k) in rows {
            let one = take_record_batch(values, &UInt32Array::from(vec![row as u32]))
                .map_err(|e| Error::arrow("copying a looked-up row", e))?;
            self.found.push((k, one));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisLookup {
    /// `redis://host:port/db`, or `rediss://` for TLS.
    url: String,
    /// For `rediss://`: `ca`, the authority (PEM) that signed the server's certificate when
    /// it is not one the system trusts; `cert` and `key` (PEM) for mutual TLS.
    tls: Option<RedisTls>,
    /// Put before each key: `profile:` looks up `profile:42`.
    #[serde(default)]
    key_prefix: String,
    /// `hash`: each key is a hash of the columns (HGETALL); `json`: each key holds a JSON
    /// object of the columns (GET). A key of another type fails its own rows.
    #[serde(default)]
    format: RedisFormat,
}

/// `tls:` of a `rediss://` lookup.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTls {
    ca: Option<std::path::PathBuf>,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
}

impl RedisTls {
    fn certificates(&self) -> Result<redis::TlsCertificates, String> {
        let read = |f: &std::path::Path| {
            std::fs::read(f).map_err(|e| format!("cannot read `{}`: {e}", f.display()))
        };
        let client_tls = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            }),
            (None, None) => None,
            _ => return Err("give `tls.cert` and `tls.key` together".to_string()),
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert: self.ca.as_deref().map(read).transpose()?,
        })
    }
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
        let client = match &self.tls {
            Some(tls) => redis::Client::build_with_tls(self.url.as_str(), tls.certificates()?),
            None => redis::Client::open(self.url.as_str()),
        }
        .map_err(|e| format!("`{}` is not a Redis URL: {e}", redact(&self.url)))?;
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
            url: redact(&self.url),
            prefix: self.key_prefix.clone(),
            format: self.format,
            values: values.clone(),
            connection: OnceCell::new(),
            refused: OnceLock::new(),
        })
    }
}

fn scalar(t: &DataType) -> bool {
    t.is_primitive() || matches!(t, DataType::Utf8 | DataType::Boolean)
}

pub struct Redis {
    client: redis::Client,
    /// The URL without its password.
    url: String,
    prefix: String,
    format: RedisFormat,
    values: SchemaRef,
    /// One multiplexed connection for all workers; it reconnects after a failure.
    connection: OnceCell<redis::aio::ConnectionManager>,
    /// Set by the first call the server refused for good (see [`Remote::refused`]).
    refused: OnceLock<String>,
}

/// What a Redis error means for the lookups (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Transient,
    Permanent,
    Refused,
}

fn verdict(e: &redis::RedisError) -> Verdict {
    use redis::ErrorKind;
    match e.kind() {
        // A server certificate not trusted: no retry cures it.
        ErrorKind::Io if e.to_string().contains("certificate") => Verdict::Refused,
        // Refused, reset or timed-out connections, and replies cut short.
        ErrorKind::Io | ErrorKind::Parse => Verdict::Transient,
        ErrorKind::AuthenticationFailed
        | ErrorKind::InvalidClientConfig
        | ErrorKind::RESP3NotSupported => Verdict::Refused,
        _ => match e.code() {
            Some(code) => server_verdict(code, e.detail().unwrap_or_default()),
            None => Verdict::Permanent,
        },
    }
}

/// The verdict on an error the server answered, by its code (the first word of the reply).
fn server_verdict(code: &str, detail: &str) -> Verdict {
    const REFUSING: [&str; 4] = [
        "unknown command",
        "unknown subcommand",
        "DB index is out of range",
        "invalid DB index",
    ];
    match code {
        "LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" => Verdict::Transient,
        "ERR" if detail.contains("max number of clients") => Verdict::Transient,
        "NOAUTH" | "WRONGPASS" | "NOPERM" => Verdict::Refused,
        "ERR" if REFUSING.iter().any(|r| detail.contains(r)) => Verdict::Refused,
        // WRONGTYPE (a key of another type) and whatever else a command is answered with.
        _ => Verdict::Permanent,
    }
}

/// A Redis error for a person: `WRONGTYPE Operation against a key holding …`.
fn said(e: &redis::RedisError) -> String {
    match (e.kind(), e.code(), e.detail()) {
        (redis::ErrorKind::AuthenticationFailed, _, _) => {
            "authentication failed: the user or password is wrong".to_string()
        }
        (_, Some(code), Some(detail)) => format!("{code} {detail}"),
        (_, Some(code), None) => code.to_string(),
        _ => e.to_string(),
    }
}

impl Redis {
    async fn connection(&self) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
        self.connection
            .get_or_try_init(|| {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
                    .set_response_timeout(Some(std::time::Duration::from_secs(10)))
                    .set_number_of_retries(2);
                self.client.get_connection_manager_with_config(config)
            })
            .await
            .cloned()
    }

    /// What to check when a plaintext connection was closed without an answer: a server
    /// that takes TLS only does that (and says nothing a client could read).
    fn closed_hint(&self, e: &redis::RedisError) -> &'static str {
        let closed = (e.is_connection_dropped() && !e.is_connection_refusal() && !e.is_timeout())
            || e.to_string().contains("closed");
        if closed && self.url.starts_with("redis://") {
            " (the server closed the connection without answering: if it takes TLS \
             connections only, use a rediss:// URL)"
        } else {
            ""
        }
    }

    /// The error that fails a whole call; a refusal is kept for [`Remote::refused`].
    fn error(&self, e: redis::RedisError) -> Error {
        let said = format!("{}{}", said(&e), self.closed_hint(&e));
        match verdict(&e) {
            Verdict::Transient => Error::External {
                system: "redis",
                message: format!("looking up in {}: {said}", self.url),
            },
            Verdict::Permanent => Error::Function {
                class: ErrorClass::Permanent,
                message: format!("Redis at {} refused the lookup: {said}", self.url),
            },
            Verdict::Refused => Error::Refused {
                system: "redis",
                message: self
                    .refused
                    .get_or_init(|| {
                        format!(
                            "Redis at {} refused the lookups: {}. Check the user, password \
                             and database in the stage's `url`, the user's permissions, and for \
                             rediss:// the authority in `tls.ca`: no lookup can succeed, so the \
                             run stops",
                            self.url,
                            said.trim_end_matches('.')
                        )
                    })
                    .clone(),
            },
        }
    }

    /// Each key's answer: its value, or (in `failed`) the reason the server refused that
    /// key alone. An error that is not about one key fails the call.
    fn answers(
        &self,
        keys: &[String],
        answers: Vec<redis::Value>,
        failed: &mut Vec<(usize, String)>,
    ) -> Result<Vec<(usize, redis::Value)>> {
        if answers.len() != keys.len() {
            return Err(Error::External {
                system: "redis",
                message: format!(
                    "looking up in {}: {} answers to {} commands",
                    self.url,
                    answers.len(),
                    keys.len()
                ),
            });
        }
        let mut values = Vec::with_capacity(keys.len());
        for (i, answer) in answers.into_iter().enumerate() {
            let redis::Value::ServerError(e) = answer else {
                values.push((i, answer));
                continue;
            };
            let e = redis::RedisError::from(e);
            if verdict(&e) != Verdict::Permanent {
                return Err(self.error(e));
            }
            let reason = format!(
                "{}: key `{}{}`: {}",
                self.describe(),
                self.prefix,
                keys[i],
                said(&e)
            );
            failed.push((i, reason));
        }
        Ok(values)
    }
}

#[async_trait]
impl Remote for Redis {
    async fn connect(&self) -> Result<()> {
        let Err(e) = self.connection().await else {
            return Ok(());
        };
        if verdict(&e) == Verdict::Transient {
            tracing::warn!(url = %self.url, "Redis not reachable yet, will try again at the first batch: {}{}", said(&e), self.closed_hint(&e));
            return Ok(());
        }
        Err(self.error(e))
    }

    async fn fetch(&self, keys: &[String]) -> Result<Fetched> {
        if let Some(refused) = self.refused() {
            return Err(refused);
        }
        let mut connection = self.connection().await.map_err(|e| self.error(e))?;
        let source = self.describe();
        // One command per key, pipelined: a key of another type is answered with WRONGTYPE
        // on its own (MGET would answer nil, as if the key were missing), and with
        // `ignore_errors` that error comes back in its key's place instead of failing the
        // pipeline.
        let command = match self.format {
            RedisFormat::Hash => "HGETALL",
            RedisFormat::Json => "GET",
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for key in keys {
            pipe.cmd(command).arg(format!("{}{key}", self.prefix));
        }
        let answers: Vec<redis::Value> = pipe
            .query_async(&mut connection)
            .await
            .map_err(|e| self.error(e))?;
        let mut failed = Vec::new();
        let answers = self.answers(keys, answers, &mut failed)?;
        let unreadable = |i: usize, what: &str, e: redis::ParsingError| {
            let key = &keys[i];
            (
                i,
                format!("{source}: key `{}{key}`: {what}: {e}", self.prefix),
            )
        };
        let mut fetched = match self.format {
            RedisFormat::Hash => {
                let mut found = Vec::new();
                let mut hashes = Vec::new();
                for (i, answer) in answers {
                    match redis::from_redis_value::<HashMap<String, String>>(answer) {
                        Ok(hash) if hash.is_empty() => {}
                        Ok(hash) => {
                            found.push(i);
                            hashes.push(hash);
                        }
                        Err(e) => failed.push(unreadable(i, "the hash is not text", e)),
                    }
                }
                let texts: Vec<ArrayRef> = self
                    .values
                    .fields()
                    .iter()
                    .map(|field| {
                        let mut text = StringBuilder::new();
                        for hash in &hashes {
                            text.append_option(hash.get(field.name()));
                        }
                        Arc::new(text.finish()) as ArrayRef
                    })
                    .collect();
                cast_texts(texts, &found, &self.values, &source)?
            }
            RedisFormat::Json => {
                let mut texts = Vec::new();
                for (i, answer) in answers {
                    match redis::from_redis_value::<Option<String>>(answer) {
                        Ok(Some(text)) => texts.push((i, text)),
                        Ok(None) => {}
                        Err(e) => failed.push(unreadable(i, "the value is not text", e)),
                    }
                }
                let objects: Vec<(usize, &str)> =
                    texts.iter().map(|(i, t)| (*i, t.as_str())).collect();
                decode_objects(&objects, &self.values, &source)?
            }
        };
        fetched.unreadable.extend(failed);
        Ok(fetched)
    }

    fn describe(&self) -> String {
        format!("{} (keys `{}…`)", self.url, self.prefix)
    }

    fn refused(&self) -> Option<Error> {
        self.refused.get().map(|message| Error::Refused {
            system: "redis",
            message: message.clone(),
        })
    }
}

/// Casts that fail on a value that does not convert, instead of making it null.
pub fn strict() -> arrow::compute::CastOptions<'static> {
    arrow::compute::CastOptions {
        safe: false,
        ..Default::default()
    }
}

/// Text columns (row `i` for key `keys[i]`) cast to the declared types. A key with a value
/// that does not convert is unreadable on its own; the others are found.
fn cast_texts(
    texts: Vec<ArrayRef>,
    keys: &[usize],
    schema: &SchemaRef,
    source: &str,
) -> Result<Fetched> {
    let mut bad: Vec<Option<String>> = vec![None; keys.len()];
    let mut columns = Vec::with_capacity(texts.len());
    for (text, field) in texts.iter().zip(schema.fields()) {
        let to = field.data_type();
        match arrow::compute::cast_with_options(text, to, &strict()) {
            Ok(column) => columns.push(column),
            Err(_) => {
                // Find the values that do not convert, row by row (only on this rare path).
                for (row, reason) in bad.iter_mut().enumerate() {
                    if let Err(e) =
                        arrow::compute::cast_with_options(&text.slice(row, 1), to, &strict())
                    {
                        reason.get_or_insert_with(|| {
                            format!("{source}: field `{}` is not {to}: {e}", field.name())
                        });
                    }
                }
                let lenient = arrow::compute::cast(text, to)
                    .map_err(|e| Error::arrow("casting looked-up values", e))?;
                columns.push(lenient);
            }
        }
    }
    let values = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| Error::arrow("assembling looked-up values", e))?;
    let mut fetched = Fetched::default();
    let good = (0..keys.len()).filter(|&row| bad[row].is_none());
    fetched.own_rows(&values, good.map(|row| (row, keys[row])))?;
    fetched.unreadable = bad
        .into_iter()
        .enumerate()
        .filter_map(|(row, reason)| Some((keys[row], reason?)))
        .collect();
    Ok(fetched)
}

/// JSON objects (with the index of their key) decoded against the declared columns. Each
/// must be exactly one JSON value: an empty value, two values, or one that does not fit the
/// columns is unreadable on its own, and can never shift another key's row.
fn decode_objects(objects: &[(usize, &str)], schema: &SchemaRef, source: &str) -> Result<Fetched> {
    let mut fetched = Fetched::default();
    let decoder = |rows: usize| {
        arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(rows.max(1) + 1)
            .build_decoder()
            .map_err(|e| Error::arrow("making a JSON decoder", e))
    };
    // All at once, checking that every value adds exactly one row.
    let mut all = decoder(objects.len())?;
    let at_once = objects.iter().all(|(_, object)| {
        let before = all.len();
        matches!(all.decode(object.as_bytes()), Ok(n) if n == object.len())
            && all.decode(b"\n").is_ok()
            && all.len() == before + 1
    });
    if at_once {
        if let Some(values) = all
            .flush()
            .map_err(|e| Error::arrow("decoding looked-up values", e))?
        {
            fetched.own_rows(
                &values,
                objects.iter().enumerate().map(|(row, (k, _))| (row, *k)),
            )?;
        }
        return Ok(fetched);
    }
    // One at a time, to tell the good from the bad.
    for &(k, object) in objects {
        let mut one = decoder(1)?;
        let read = one
            .decode(object.as_bytes())
            .and_then(|n| {
                one.decode(b"\n")?;
                Ok(n)
            })
            .and_then(|n| Ok((n, one.flush()?)));
        let reason = match read {
            Ok((n, Some(values))) if n == object.len() && values.num_rows() == 1 => {
                fetched.own_rows(&values, [(0, k)])?;
                continue;
            }
            Ok((_, None)) => "the stored value is empty, not a JSON object".to_string(),
            Ok(_) => "the stored value holds more than one JSON value".to_string(),
            Err(e) => format!("the stored value does not fit the declared columns: {e}"),
        };
        fetched.unreadable.push((k, format!("{source}: {reason}")));
    }
    Ok(fetched)
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
        let (url, tls) = PgTls::split(&self.url)?;
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            format!(
                "`{}` is not a PostgreSQL connection string: {e}",
                redact(&self.url)
            )
        })?;
        config.ssl_mode(tls.mode.ssl_mode());
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tls.connector()?,
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
                "SELECT {key}, json_build_object({fields})::text FROM {table} WHERE {key} = ANY($1)",
                key = quoted(key),
            ),
            table: self.table.clone(),
            values: values.clone(),
        })
    }
}

/// libpq's `sslmode`: tokio-postgres reads only disable, prefer and require, so the modes
/// that verify are read here and put into the TLS connector.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PgSslMode {
    Disable,
    /// TLS when the server offers it, unverified (libpq's default).
    Prefer,
    /// TLS, unverified unless `sslrootcert` is given (as libpq).
    Require,
    /// TLS with the server's certificate signed by `sslrootcert` (or the system's roots).
    VerifyCa,
    /// As `VerifyCa`, and the certificate names the host connected to.
    VerifyFull,
}

impl PgSslMode {
    fn ssl_mode(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode;
        match self {
            PgSslMode::Disable => SslMode::Disable,
            PgSslMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }
}

/// The TLS parameters of a PostgreSQL connection string (`sslmode`, `sslrootcert`,
/// `sslcert`, `sslkey`, as libpq reads them).
struct PgTls {
    mode: PgSslMode,
    root: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl PgTls {
    /// The connection string without its TLS parameters, and those parameters.
    fn split(url: &str) -> Result<(String, PgTls), String> {
        let mut tls = PgTls {
            mode: PgSslMode::Prefer,
            root: None,
            cert: None,
            key: None,
        };
        let mut take = |key: &str, value: &str| -> Result<bool, String> {
            match key {
                "sslmode" => {
                    tls.mode = match value {
                        "disable" => PgSslMode::Disable,
                        "allow" | "prefer" => PgSslMode::Prefer,
                        "require" => PgSslMode::Require,
                        "verify-ca" => PgSslMode::VerifyCa,
                        "verify-full" => PgSslMode::VerifyFull,
                        other => {
                            return Err(format!(
                                "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
                            ));
                        }
                    }
                }
                "sslrootcert" => tls.root = Some(value.to_string()),
                "sslcert" => tls.cert = Some(value.to_string()),
                "sslkey" => tls.key = Some(value.to_string()),
                _ => return Ok(false),
            }
            Ok(true)
        };
        let rest = if url.contains("://") {
            // A URL: its query parameters.
            match url.split_once('?') {
                Some((base, query)) => {
                    let mut kept = Vec::new();
                    for pair in query.split('&') {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        if !take(k, v)? {
                            kept.push(pair);
                        }
                    }
                    match kept.is_empty() {
                        true => base.to_string(),
                        false => format!("{base}?{}", kept.join("&")),
                    }
                }
                None => url.to_string(),
            }
        } else {
            // `key=value` words.
            let mut kept = Vec::new();
            for word in url.split_whitespace() {
                let (k, v) = word.split_once('=').unwrap_or((word, ""));
                if !take(k, v)? {
                    kept.push(word);
                }
            }
            kept.join(" ")
        };
        Ok((rest, tls))
    }

    /// A connector that verifies as the mode says, with the given authority and identity.
    fn connector(&self) -> Result<postgres_native_tls::MakeTlsConnector, String> {
        let read = |f: &str| std::fs::read(f).map_err(|e| format!("cannot read `{f}`: {e}"));
        let mut builder = native_tls::TlsConnector::builder();
        if let Some(root) = &self.root {
            let cert = native_tls::Certificate::from_pem(&read(root)?)
                .map_err(|e| format!("`{root}` (sslrootcert) is not a PEM certificate: {e}"))?;
            builder.add_root_certificate(cert);
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let identity = native_tls::Identity::from_pkcs8(&read(cert)?, &read(key)?)
                    .map_err(|e| format!("`{cert}` and `{key}` (sslcert, sslkey): {e}"))?;
                builder.identity(identity);
            }
            (None, None) => {}
            _ => return Err("give `sslcert` and `sslkey` together".to_string()),
        }
        let verify_chain = match self.mode {
            PgSslMode::Disable | PgSslMode::Prefer => false,
            PgSslMode::Require => self.root.is_some(),
            PgSslMode::VerifyCa | PgSslMode::VerifyFull => true,
        };
        builder
            .danger_accept_invalid_certs(!verify_chain)
            .danger_accept_invalid_hostnames(self.mode != PgSslMode::VerifyFull);
        let connector = builder
            .build()
            .map_err(|e| format!("cannot set up TLS for PostgreSQL: {e}"))?;
        Ok(postgres_native_tls::MakeTlsConnector::new(connector))
    }
}

pub struct Postgres {
    pool: deadpool_postgres::Pool,
    sql: String,
    table: String,
    values: SchemaRef,
}

/// How keys are sent and matched: as integers (so that `007` finds 7) or as text.
enum KeyType {
    Int8,
    Int4,
    Int2,
    Text,
}

impl Postgres {
    /// A failed query: transient for a lost connection and for the SQLSTATE classes that
    /// mean "try again" (connection exceptions 08, transaction rollbacks 40 such as
    /// serialization failures and deadlocks, insufficient resources 53, operator
    /// intervention 57 such as a shutdown or a cancelled query, system errors 58, a lock not
    /// available 55P03); permanent for the others (no such table or column, wrong types),
    /// which asking again will not cure; refused for bad credentials and missing
    /// privileges, which stop the run.
    fn error(&self, e: tokio_postgres::Error) -> Error {
        let Some(db) = e.as_db_error() else {
            return Error::External {
                system: "postgres",
                message: format!("looking up in `{}`: {e}", self.table),
            };
        };
        let code = db.code().code();
        let message = format!("looking up in `{}`: {} ({code})", self.table, db.message());
        // Invalid authorization (28xxx) or a missing privilege: no lookup can succeed.
        if code.starts_with("28") || code == "42501" {
            return Error::Refused {
                system: "postgres",
                message: format!(
                    "PostgreSQL refused the lookups: {message}. Check the user, password and \
                     permissions in the stage's `url`: no lookup can succeed, so the run stops"
                ),
            };
        }
        if matches!(&code[..2.min(code.len())], "08" | "40" | "53" | "57" | "58") || code == "55P03"
        {
            Error::External {
                system: "postgres",
                message,
            }
        } else {
            Error::Function {
                class: ErrorClass::Permanent,
                message: format!("PostgreSQL refused the lookup: {message}"),
            }
        }
    }

    /// A connection that could not be had: the server's refusal (a role that does not
    /// exist, a wrong password) stops the run; anything else may pass.
    fn pool_error(&self, e: deadpool_postgres::PoolError) -> Error {
        let detail = sluice_engine::error::error_chain(&e);
        match e {
            deadpool_postgres::PoolError::Backend(e) if e.as_db_error().is_some() => self.error(e),
            // No retry cures an untrusted certificate or one for another host.
            _ if detail.contains("certificate") => Error::Refused {
                system: "postgres",
                message: format!(
                    "the TLS certificate of the PostgreSQL server for `{}` is refused: {detail}; \
                     give the authority that signed it as `sslrootcert`, and check that it names \
                     the host (sslmode=verify-full)",
                    self.table
                ),
            },
            e => Error::External {
                system: "postgres",
                message: format!("looking up in `{}`: {e}", self.table),
            },
        }
    }

    fn key_type(&self, statement: &tokio_postgres::Statement) -> Result<KeyType> {
        use tokio_postgres::types::Type;
        match statement.params().first() {
            Some(&Type::INT8_ARRAY) => Ok(KeyType::Int8),
            Some(&Type::INT4_ARRAY) => Ok(KeyType::Int4),
            Some(&Type::INT2_ARRAY) => Ok(KeyType::Int2),
            Some(&Type::TEXT_ARRAY) | Some(&Type::VARCHAR_ARRAY) | Some(&Type::BPCHAR_ARRAY) => {
                Ok(KeyType::Text)
            }
            other => Err(Error::Function {
                class: ErrorClass::Permanent,
                message: format!(
                    "the key column of `{}` is {}; lookups support integer and text keys (a view can cast it to text)",
                    self.table,
                    other.map_or("unknown".to_string(), |t| t
                        .name()
                        .trim_start_matches('_')
                        .to_string())
                ),
            }),
        }
    }
}

#[async_trait]
impl Remote for Postgres {
    async fn connect(&self) -> Result<()> {
        let client = match self.pool.get().await {
            Ok(client) => client,
            Err(e) => match self.pool_error(e) {
                refused @ Error::Refused { .. } => return Err(refused),
                e => {
                    tracing::warn!(table = %self.table, "PostgreSQL not reachable yet, will try again at the first batch: {e}");
                    return Ok(());
                }
            },
        };
        // A missing table or column, or a key type that cannot be looked up, is reported
        // now rather than at every batch.
        match client.prepare_cached(&self.sql).await {
            Ok(statement) => self.key_type(&statement).map(|_| ()),
            Err(e) => match self.error(e) {
                Error::External { message, .. } => {
                    tracing::warn!(table = %self.table, "PostgreSQL not ready yet, will try again at the first batch: {message}");
                    Ok(())
                }
                refused => Err(refused),
            },
        }
    }

    async fn fetch(&self, keys: &[String]) -> Result<Fetched> {
        let client = self.pool.get().await.map_err(|e| self.pool_error(e))?;
        let statement = client
            .prepare_cached(&self.sql)
            .await
            .map_err(|e| self.error(e))?;
        let key_type = self.key_type(&statement)?;
        // Answers are matched to the asked keys by value: integers by number (the text
        // `007` and the row with key 7 match), text exactly as PostgreSQL compares it.
        let mut objects: Vec<(usize, String)> = Vec::new();
        match key_type {
            KeyType::Text => {
                let rows = client
                    .query(&statement, &[&keys])
                    .await
                    .map_err(|e| self.error(e))?;
                let position: HashMap<&str, usize> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (k.as_str(), i))
                    .collect();
                for row in &rows {
                    let key: Option<&str> = row.get(0);
                    if let Some(&i) = key.and_then(|k| position.get(k)) {
                        objects.push((i, row.get(1)));
                    }
                }
            }
            int => {
                let mut asked: HashMap<i64, Vec<usize>> = HashMap::new();
                for (i, k) in keys.iter().enumerate() {
                    if let Ok(v) = k.trim().parse::<i64>() {
                        asked.entry(v).or_default().push(i);
                    }
                }
                let values: Vec<i64> = asked.keys().copied().collect();
                let rows = match int {
                    KeyType::Int8 => client.query(&statement, &[&values]).await,
                    KeyType::Int4 => {
                        let v: Vec<i32> = values
                            .iter()
                            .filter_map(|&v| i32::try_from(v).ok())
                            .collect();
                        client.query(&statement, &[&v]).await
                    }
                    _ => {
                        let v: Vec<i16> = values
                            .iter()
                            .filter_map(|&v| i16::try_from(v).ok())
                            .collect();
                        client.query(&statement, &[&v]).await
                    }
                }
                .map_err(|e| self.error(e))?;
                for row in &rows {
                    let key: Option<i64> = match int {
                        KeyType::Int8 => row.get(0),
                        KeyType::Int4 => row.get::<_, Option<i32>>(0).map(i64::from),
                        _ => row.get::<_, Option<i16>>(0).map(i64::from),
                    };
                    for &i in key.and_then(|k| asked.get(&k)).into_iter().flatten() {
                        objects.push((i, row.get(1)));
                    }
                }
            }
        }
        // A key repeated in the table: the first row wins.
        let mut seen = vec![false; keys.len()];
        objects.retain(|(i, _)| !std::mem::replace(&mut seen[*i], true));
        let objects: Vec<(usize, &str)> = objects.iter().map(|(i, o)| (*i, o.as_str())).collect();
        decode_objects(&objects, &self.values, &self.describe())
    }

    fn describe(&self) -> String {
        format!("PostgreSQL table `{}`", self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::{Field, Int64Type, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("plan", DataType::Utf8, true),
            Field::new("age", DataType::Int64, true),
        ]))
    }

    fn age(values: &RecordBatch) -> i64 {
        values.column(1).as_primitive::<Int64Type>().value(0)
    }

    #[test]
    fn a_bad_json_value_fails_its_own_key_and_never_shifts_another() {
        let objects = [
            (0, r#"{"plan": "a", "age": 1}"#),
            (1, ""),
            (2, r#"{"plan": "b", "age": 2}{"plan": "x", "age": 99}"#),
            (3, r#"{"plan": "c", "age": "old"}"#),
            (4, r#"{"plan": "d", "age": 4}"#),
            (5, r#"{"plan": "e""#),
        ];
        let fetched = decode_objects(&objects, &schema(), "redis").unwrap();
        let found: Vec<(usize, i64)> = fetched.found.iter().map(|(k, v)| (*k, age(v))).collect();
        assert_eq!(found, [(0, 1), (4, 4)]);
        let bad: Vec<usize> = fetched.unreadable.iter().map(|(k, _)| *k).collect();
        assert_eq!(bad, [1, 2, 3, 5], "{:?}", fetched.unreadable);
        assert!(
            fetched.unreadable[0].1.contains("empty"),
            "{:?}",
            fetched.unreadable
        );
        assert!(
            fetched.unreadable[1].1.contains("more than one"),
            "{:?}",
            fetched.unreadable
        );
        // Each found row owns its memory: one row, not a slice of the whole fetch.
        assert!(fetched.found.iter().all(|(_, v)| v.num_rows() == 1));
    }

    #[test]
    fn good_json_values_are_decoded_at_once() {
        let objects = [
            (3, r#"{"plan": "a", "age": 1}"#),
            (1, r#"{"age": 2, "other": true}"#),
        ];
        let fetched = decode_objects(&objects, &schema(), "redis").unwrap();
        let found: Vec<(usize, i64)> = fetched.found.iter().map(|(k, v)| (*k, age(v))).collect();
        assert_eq!(found, [(3, 1), (1, 2)]);
        assert!(fetched.found[1].1.column(0).is_null(0));
        assert!(fetched.unreadable.is_empty());
    }

    #[test]
    fn redis_urls_are_shown_without_their_password() {
        for (url, shown) in [
            (
                "redis://:secret@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            (
                "rediss://app:se:cr@t@cache.internal:6380",
                "rediss://app:***@cache.internal:6380",
            ),
            ("redis://secret@host", "redis://***@host"),
            ("redis://:pa#ss@h:6379", "redis://:***@h:6379"),
            ("redis://:pa/s?s@h:6379/2", "redis://:***@h:6379/2"),
            (
                "postgres://app:pa/ss@db:5432/x",
                "postgres://app:***@db:5432/x",
            ),
            (
                "host=db user=app password=secret dbname=x",
                "host=db user=app password=*** dbname=x",
            ),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=secret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
        ] {
            assert_eq!(redact(url), shown);
        }
    }

    #[test]
    fn redis_errors_are_transient_permanent_or_refused() {
        let io =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(verdict(&io), Verdict::Transient);
        let timeout = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(verdict(&timeout), Verdict::Transient);
        let auth = redis::RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert_eq!(verdict(&auth), Verdict::Refused);
        assert!(said(&auth).contains("password"), "{}", said(&auth));
        for (code, detail, expected) in [
            (
                "WRONGTYPE",
                "Operation against a key holding the wrong kind of value",
                Verdict::Permanent,
            ),
            ("NOAUTH", "Authentication required.", Verdict::Refused),
            (
                "WRONGPASS",
                "invalid username-password pair",
                Verdict::Refused,
            ),
            (
                "NOPERM",
                "this user has no permissions to run the 'hgetall' command",
                Verdict::Refused,
            ),
            (
                "ERR",
                "unknown command 'HGETALL', with args beginning with: ",
                Verdict::Refused,
            ),
            ("ERR", "max number of clients reached", Verdict::Transient),
            (
                "LOADING",
                "Redis is loading the dataset in memory",
                Verdict::Transient,
            ),
            (
                "BUSY",
                "Redis is busy running a script.",
                Verdict::Transient,
            ),
            (
                "TRYAGAIN",
                "Multiple keys request during rehashing of slot",
                Verdict::Transient,
            ),
        ] {
            let e = redis::make_extension_error(code.into(), Some(detail.into()));
            assert_eq!(verdict(&e), expected, "{code} {detail}");
            assert_eq!(said(&e), format!("{code} {detail}"));
        }
    }

    #[test]
    fn a_hash_field_that_does_not_convert_fails_its_own_key() {
        let texts: Vec<ArrayRef> = vec![
            Arc::new(arrow::array::StringArray::from(vec![
                Some("a"),
                Some("b"),
                None,
            ])),
            Arc::new(arrow::array::StringArray::from(vec![
                Some("1"),
                Some("two"),
                Some("3"),
            ])),
        ];
        let fetched = cast_texts(texts, &[7, 8, 9], &schema(), "redis").unwrap();
        let found: Vec<(usize, i64)> = fetched.found.iter().map(|(k, v)| (*k, age(v))).collect();
        assert_eq!(found, [(7, 1), (9, 3)]);
        assert_eq!(fetched.unreadable.len(), 1);
        assert_eq!(fetched.unreadable[0].0, 8);
        assert!(
            fetched.unreadable[0].1.contains("field `age` is not Int64"),
            "{:?}",
            fetched.unreadable
        );
    }
}
