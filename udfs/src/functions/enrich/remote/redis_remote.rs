//! Redis lookups: hashes by pipelined `HGETALL`, or JSON values by pipelined `GET`.

use super::*;

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
    pub(super) fn certificates(&self) -> Result<redis::TlsCertificates> {
        let read = |f: &std::path::Path| {
            std::fs::read(f).map_err(|e| Error::Plan(format!("cannot read `{}`: {e}", f.display())))
        };
        let client_tls = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            }),
            (None, None) => None,
            _ => return Err(Error::Plan("give `tls.cert` and `tls.key` together".into())),
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert: self.ca.as_deref().map(read).transpose()?,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RedisFormat {
    #[default]
    Hash,
    Json,
}

impl RedisLookup {
    pub fn plan(&self, values: &SchemaRef) -> Result<Redis> {
        let client = match &self.tls {
            Some(tls) => redis::Client::build_with_tls(self.url.as_str(), tls.certificates()?),
            None => redis::Client::open(self.url.as_str()),
        }
        .map_err(|e| Error::Plan(format!("`{}` is not a Redis URL: {e}", redact(&self.url))))?;
        if self.format == RedisFormat::Hash
            && let Some(f) = values.fields().iter().find(|f| !scalar(f.data_type()))
        {
            return plan_err!(
                "the column `{}` is {}: a Redis hash holds text, so only plain types can be read from one; use `format: json`",
                f.name(),
                f.data_type()
            );
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

pub(super) fn scalar(t: &DataType) -> bool {
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
pub(super) enum Verdict {
    Transient,
    Permanent,
    Refused,
}

pub(super) fn verdict(e: &redis::RedisError) -> Verdict {
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
pub(super) fn server_verdict(code: &str, detail: &str) -> Verdict {
    pub(super) const REFUSING: [&str; 4] = [
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
pub(super) fn said(e: &redis::RedisError) -> String {
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
    pub(super) async fn connection(
        &self,
    ) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
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
    pub(super) fn closed_hint(&self, e: &redis::RedisError) -> &'static str {
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
