//! PostgreSQL lookups: one `WHERE key = ANY($1)` per batch on a pooled connection.

use super::*;

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

pub(super) fn default_pool_size() -> usize {
    4
}

impl PostgresLookup {
    pub fn plan(&self, values: &SchemaRef, stage_key: &str) -> Result<Postgres> {
        let (url, tls) = PgTls::split(&self.url)?;
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::Plan(format!(
                "`{}` is not a PostgreSQL connection string: {e}",
                redact(&self.url)
            ))
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
            .map_err(|e| Error::Plan(format!("PostgreSQL pool: {e}")))?;
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
pub(super) enum PgSslMode {
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
    pub(super) fn ssl_mode(self) -> tokio_postgres::config::SslMode {
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
pub(super) struct PgTls {
    pub(super) mode: PgSslMode,
    pub(super) root: Option<String>,
    pub(super) cert: Option<String>,
    pub(super) key: Option<String>,
}

impl PgTls {
    /// The connection string without its TLS parameters, and those parameters.
    pub(super) fn split(url: &str) -> Result<(String, PgTls)> {
        let mut tls = PgTls {
            mode: PgSslMode::Prefer,
            root: None,
            cert: None,
            key: None,
        };
        let mut take = |key: &str, value: &str| -> Result<bool> {
            match key {
                "sslmode" => {
                    tls.mode = match value {
                        "disable" => PgSslMode::Disable,
                        "allow" | "prefer" => PgSslMode::Prefer,
                        "require" => PgSslMode::Require,
                        "verify-ca" => PgSslMode::VerifyCa,
                        "verify-full" => PgSslMode::VerifyFull,
                        other => {
                            return plan_err!(
                                "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
                            );
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
    fn connector(&self) -> Result<postgres_native_tls::MakeTlsConnector> {
        let read =
            |f: &str| std::fs::read(f).map_err(|e| Error::Plan(format!("cannot read `{f}`: {e}")));
        let mut builder = native_tls::TlsConnector::builder();
        if let Some(root) = &self.root {
            let cert = native_tls::Certificate::from_pem(&read(root)?).map_err(|e| {
                Error::Plan(format!(
                    "`{root}` (sslrootcert) is not a PEM certificate: {e}"
                ))
            })?;
            builder.add_root_certificate(cert);
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let identity = native_tls::Identity::from_pkcs8(&read(cert)?, &read(key)?)
                    .map_err(|e| {
                        Error::Plan(format!("`{cert}` and `{key}` (sslcert, sslkey): {e}"))
                    })?;
                builder.identity(identity);
            }
            (None, None) => {}
            _ => return Err(Error::Plan("give `sslcert` and `sslkey` together".into())),
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
            .map_err(|e| Error::Plan(format!("cannot set up TLS for PostgreSQL: {e}")))?;
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
