//! A client of a schema registry with the Confluent REST API (Confluent's, Karapace,
//! Redpanda's, Apicurio's compatibility API): schemas by id, and registering a schema under
//! a subject.
//!
//! A registry that does not answer is waited for, a second between tries and a warning
//! every 10 s, as for a broker outage: a request fails only when the registry itself says
//! no (an unknown id, an incompatible or invalid schema) or refuses Sluice's login.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::{RequestBuilder, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sluice_engine::{Error, Result};

use super::stats;

/// How a sink names the subject its writer schema registers under, as Confluent's
/// serializers do: `topic` (`{topic}-value`, the default), `record` (the record's or
/// message's full name: one subject per type, topics sharing it) or `topic_record`
/// (`{topic}-{full name}`: several types on one topic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategy {
    #[default]
    Topic,
    Record,
    TopicRecord,
}

impl SubjectStrategy {
    /// The subject for a value of type `record` (its full name) written to `topic`.
    pub fn subject(self, topic: &str, record: &str) -> String {
        match self {
            SubjectStrategy::Topic => format!("{topic}-value"),
            SubjectStrategy::Record => record.to_string(),
            SubjectStrategy::TopicRecord => format!("{topic}-{record}"),
        }
    }
}

/// `schema_registry:` of an Avro source or sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The registry's base URL (`http://registry:8081`, `https://…`).
    pub url: String,
    /// HTTP basic authentication (Confluent Cloud: the API key and secret).
    pub username: Option<String>,
    pub password: Option<String>,
    /// A PEM file of the certificate authority that signed an `https://` registry's
    /// certificate, when the system's roots do not hold it.
    pub ca_file: Option<PathBuf>,
}

impl RegistryConfig {
    /// A registry at `url`, without login or CA file.
    pub fn at(url: impl Into<String>) -> Self {
        RegistryConfig {
            url: url.into(),
            username: None,
            password: None,
            ca_file: None,
        }
    }
}

/// The registry, with one HTTP client for every request.
pub struct SchemaRegistry {
    url: String,
    client: reqwest::Client,
    login: Option<(String, Option<String>)>,
}

/// A schema the registry holds under an id.
#[derive(Deserialize)]
pub struct Stored {
    pub schema: String,
    /// `AVRO` when absent.
    #[serde(rename = "schemaType", default)]
    pub schema_type: Option<String>,
    #[serde(default)]
    pub references: Vec<serde_json::Value>,
}

impl SchemaRegistry {
    /// For `sluice validate`: the latest version of each topic's subject (`{topic}-value`)
    /// put to `reads` (why the pipeline's schema, `file`, cannot read it, if it cannot),
    /// each refusal a problem at `key`; a missing subject or a silent registry a note.
    pub async fn check_subjects(
        &self,
        topics: &[String],
        file: &str,
        key: &'static str,
        reads: impl Fn(Latest) -> Option<String>,
    ) -> sluice_engine::connector::RemoteCheck {
        let mut check = sluice_engine::connector::RemoteCheck::default();
        for topic in topics {
            let subject = format!("{topic}-value");
            match self.latest_once(&subject).await {
                Err(why) => check.notes.push(format!(
                    "the schema registry at {} did not answer ({why}): {file} not checked against subject `{subject}`",
                    self.url
                )),
                Ok(None) => check.notes.push(format!(
                    "the schema registry has no subject `{subject}` yet: {file} not checked against it"
                )),
                Ok(Some(latest)) => {
                    let version = latest.version;
                    if let Some(why) = reads(latest) {
                        check.problems.push((
                            key,
                            format!(
                                "the registry's latest version of subject `{subject}` (version {version}): {why}; {file} cannot read what producers write now"
                            ),
                        ));
                    }
                }
            }
        }
        check
    }
}

/// [`SchemaRegistry::latest_once`] from synchronous code (planning a pipeline): on a thread
/// of its own, with a runtime of its own.
pub fn latest_blocking(
    config: &RegistryConfig,
    subject: &str,
) -> std::result::Result<Option<Latest>, String> {
    let (config, subject) = (config.clone(), subject.to_string());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let registry = SchemaRegistry::new(&config).map_err(|e| e.to_string())?;
            registry.latest_once(&subject).await
        })
    })
    .join()
    .map_err(|_| "the registry lookup failed".to_string())?
}

/// The most of a registry's answer read: schemas are kilobytes, and a URL that points
/// at something else (or a hostile server) could otherwise fill memory.
pub const MAX_REGISTRY_ANSWER: usize = 16 << 20;

/// A registry's answer as `T`, read up to [`MAX_REGISTRY_ANSWER`] bytes.
async fn read_json<T: DeserializeOwned>(
    answer: reqwest::Response,
) -> std::result::Result<T, String> {
    use sluice_engine::http_body::{Capped, excerpt, read_capped};
    let body = read_capped(answer, MAX_REGISTRY_ANSWER)
        .await
        .map_err(|e| match e {
            Capped::Failed(e) => e.to_string(),
            Capped::Over(cap) => format!("its answer is longer than {cap} bytes"),
        })?;
    serde_json::from_slice(&body).map_err(|e| format!("{e} (it said: {})", excerpt(&body)))
}

/// A subject's latest version.
#[derive(Deserialize, Clone)]
pub struct Latest {
    pub id: u32,
    pub version: u32,
    pub schema: String,
    #[serde(rename = "schemaType", default)]
    pub schema_type: Option<String>,
}

/// The registry said no: the HTTP status and its message.
pub struct Refusal {
    pub status: StatusCode,
    pub said: String,
}

impl SchemaRegistry {
    pub fn new(config: &RegistryConfig) -> Result<Self> {
        let url = config.url.trim_end_matches('/').to_string();
        match reqwest::Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                return Err(Error::Plan(format!(
                    "the schema registry's url `{url}` is not an http:// or https:// URL"
                )));
            }
        }
        let mut client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                Error::Plan(format!(
                    "cannot read the schema registry's ca_file {}: {e}",
                    path.display()
                ))
            })?;
            let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                Error::Plan(format!(
                    "the schema registry's ca_file {} is not a PEM certificate: {e}",
                    path.display()
                ))
            })?;
            client = client.add_root_certificate(ca);
        }
        let login = match (&config.username, &config.password) {
            (Some(user), password) => Some((user.clone(), password.clone())),
            (None, Some(_)) => {
                return Err(Error::Plan(
                    "the schema registry's `password` needs a `username`".into(),
                ));
            }
            (None, None) => None,
        };
        Ok(SchemaRegistry {
            url,
            client: client
                .build()
                .map_err(|e| Error::Plan(format!("an HTTP client for the schema registry: {e}")))?,
            login,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of the endpoint at `segments` under the registry's URL (each escaped: a
    /// subject may hold `/` or `%`).
    fn endpoint(&self, segments: &[&str]) -> String {
        let mut url = reqwest::Url::parse(&self.url).expect("checked in new");
        url.path_segments_mut()
            .expect("an http(s) URL")
            .pop_if_empty()
            .extend(segments);
        url.to_string()
    }

    /// The schema registered as `id` (`GET /schemas/ids/{id}`); the registry's refusal
    /// when it has none.
    pub async fn schema(&self, id: u32) -> Result<std::result::Result<Stored, Refusal>> {
        let url = self.endpoint(&["schemas", "ids", &id.to_string()]);
        self.answer(|| self.client.get(&url), &format!("schema id {id}"))
            .await
    }

    /// Registers `schema` (Avro JSON) under `subject` (`POST /subjects/{subject}/versions`;
    /// a schema registered before gets its id back) and returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32> {
        self.register_as(subject, schema, "AVRO").await
    }

    /// Registers `schema` of the type `kind` (`AVRO`, `PROTOBUF`) under `subject`.
    pub async fn register_as(&self, subject: &str, schema: &str, kind: &str) -> Result<u32> {
        #[derive(Deserialize)]
        struct Registered {
            id: u32,
        }
        let url = self.endpoint(&["subjects", subject, "versions"]);
        let body = match kind {
            "AVRO" => serde_json::json!({ "schema": schema }),
            kind => serde_json::json!({ "schema": schema, "schemaType": kind }),
        };
        let what = format!("registering the schema under subject `{subject}`");
        match self
            .answer::<Registered>(|| self.client.post(&url).json(&body), &what)
            .await?
        {
            Ok(r) => Ok(r.id),
            Err(Refusal { status, said }) => Err(Error::Refused {
                system: "schema registry",
                message: format!(
                    "the registry at {} refuses the schema for subject `{subject}`: {status} {said}",
                    self.url
                ),
            }),
        }
    }

    /// The latest version of `subject` (`GET /subjects/{subject}/versions/latest`), asked
    /// once (for `sluice validate`): `None` when the registry has no such subject; why not,
    /// when the registry does not answer.
    pub async fn latest_once(&self, subject: &str) -> std::result::Result<Option<Latest>, String> {
        let url = self.endpoint(&["subjects", subject, "versions", "latest"]);
        let mut request = self.client.get(&url).timeout(Duration::from_secs(5));
        if let Some((user, password)) = &self.login {
            request = request.basic_auth(user, password.as_ref());
        }
        let answer = request.send().await.map_err(|e| e.to_string())?;
        match answer.status() {
            s if s.is_success() => read_json::<Latest>(answer).await.map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(format!("HTTP {s}")),
        }
    }

    /// Sends the request `make` builds until the registry answers: its answer, or its
    /// refusal. The registry's own "not found" (a 404 with an error code: a proxy's 404
    /// has none) and a 4xx other than 401, 403, 408 and 429 are refusals; 401 and 403, an
    /// untrusted certificate and a success that is not a registry's answer stop the run
    /// (no retry cures them); anything else (no answer, 5xx, 408, 429, a proxy's 404) is
    /// waited out, a second apart, with a warning every 10 s.
    async fn answer<T: DeserializeOwned>(
        &self,
        make: impl Fn() -> RequestBuilder,
        what: &str,
    ) -> Result<std::result::Result<T, Refusal>> {
        #[derive(Deserialize)]
        struct Said {
            error_code: Option<i64>,
            message: Option<String>,
        }
        let started = Instant::now();
        let mut next_warning = Duration::from_secs(10);
        loop {
            let mut request = make();
            if let Some((user, password)) = &self.login {
                request = request.basic_auth(user, password.as_ref());
            }
            let refused = |message: String| {
                stats().count(&stats().refused, 1);
                Err(Error::Refused {
                    system: "schema registry",
                    message: format!("{what}: {message}"),
                })
            };
            let why = match request.send().await {
                Ok(r) if r.status().is_success() => match read_json::<T>(r).await {
                    Ok(answer) => {
                        stats().count(&stats().fetched, 1);
                        return Ok(Ok(answer));
                    }
                    // Not a registry there (a web page, another API): the URL is wrong.
                    Err(e) => {
                        return refused(format!(
                            "{} answers, but not as a schema registry: {e}",
                            self.url
                        ));
                    }
                },
                Ok(r) => {
                    let status = r.status();
                    let said = read_json::<Said>(r).await.ok();
                    let code = said.as_ref().and_then(|s| s.error_code);
                    let said = said.and_then(|s| s.message).unwrap_or_default();
                    if matches!(status.as_u16(), 401 | 403) {
                        return refused(format!(
                            "the registry at {} refuses the login: {status} {said}",
                            self.url
                        ));
                    }
                    let passing = matches!(status.as_u16(), 404 | 408 | 429);
                    if (status == StatusCode::NOT_FOUND && code.is_some())
                        || (status.is_client_error() && !passing)
                    {
                        stats().count(&stats().refused, 1);
                        return Ok(Err(Refusal { status, said }));
                    }
                    format!("HTTP {status} {said}")
                }
                Err(e) => {
                    // An untrusted or wrong certificate: no retry cures it.
                    let chain = format!("{e:?}");
                    if chain.contains("certificate") || chain.contains("Certificate") {
                        return refused(format!(
                            "the TLS handshake with {} fails (is `ca_file` the CA that signed its certificate?): {chain}",
                            self.url
                        ));
                    }
                    e.to_string()
                }
            };
            stats().count(&stats().unanswered, 1);
            if started.elapsed() >= next_warning {
                tracing::warn!(registry = %self.url, %why, waited = ?started.elapsed(), "{what}: waiting for the schema registry");
                next_warning += Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A registry on loopback that answers its connections in turn with `answers`
    /// (status and JSON body; status 0 closes the connection without a word). The
    /// requests' first lines come back once all are answered.
    pub(crate) async fn scripted(
        answers: Vec<(u16, &'static str)>,
    ) -> (SchemaRegistry, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (status, body) in answers {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The head, then as many body bytes as it announces.
                loop {
                    let n = conn.read(&mut buf).await.unwrap();
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if rest.len() >= length {
                            seen.push(head.lines().next().unwrap().to_string());
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                if status == 0 {
                    continue;
                }
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(reply.as_bytes()).await.unwrap();
            }
            seen
        });
        (
            SchemaRegistry::new(&RegistryConfig::at(url)).unwrap(),
            served,
        )
    }

    /// No answer, a 5xx and a proxy's 404 (no error code) are waited out; the id comes.
    #[tokio::test]
    async fn a_registry_that_does_not_answer_is_waited_for() {
        let (registry, served) = scripted(vec![
            (0, ""),
            (503, r#"{"message":"starting"}"#),
            (404, "<html>not here</html>"),
            (200, r#"{"id":7}"#),
        ])
        .await;
        let unanswered = stats()
            .unanswered
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            registry
                .register("shop/views-value", "\"long\"")
                .await
                .unwrap(),
            7
        );
        let requests = served.await.unwrap();
        assert_eq!(requests.len(), 4);
        assert!(
            requests
                .iter()
                .all(|r| r.starts_with("POST /subjects/shop%2Fviews-value/versions")),
            "{requests:?}"
        );
        assert!(
            stats()
                .unanswered
                .load(std::sync::atomic::Ordering::Relaxed)
                >= unanswered + 3
        );
    }

    /// The registry's "no": an unknown id is a refusal of that id, an incompatible schema
    /// and a refused login stop the run with the registry's words.
    #[tokio::test]
    async fn the_registry_saying_no_is_not_waited_out() {
        let (registry, _) = scripted(vec![
            (404, r#"{"error_code":40403,"message":"Schema 9 not found"}"#),
            (409, r#"{"error_code":409,"message":"Schema being registered is incompatible with an earlier schema"}"#),
            (401, r#"{"error_code":401,"message":"Unauthorized"}"#),
        ])
        .await;
        let Err(no) = registry.schema(9).await.unwrap() else {
            panic!("an unknown id is refused");
        };
        assert_eq!(
            (no.status.as_u16(), no.said.as_str()),
            (404, "Schema 9 not found")
        );
        let err = registry
            .register("views-value", "\"long\"")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{err}");
        assert!(
            err.to_string().contains("subject `views-value`: 409"),
            "{err}"
        );
        assert!(err.to_string().contains("incompatible"), "{err}");
        let err = registry
            .schema(1)
            .await
            .err()
            .expect("a refused login stops");
        assert!(err.to_string().contains("refuses the login: 401"), "{err}");
    }

    /// An answer past the cap is not read on (it would fill memory): the registry is not
    /// one, and the run stops saying so.
    #[tokio::test]
    async fn an_answer_longer_than_any_schema_is_not_read_whole() {
        let huge: &'static str = Box::leak(
            format!(r#"{{"schema":"{}"}}"#, "x".repeat(MAX_REGISTRY_ANSWER)).into_boxed_str(),
        );
        let (registry, _served) = scripted(vec![(200, huge)]).await;
        let err = registry.schema(3).await.err().expect("refused");
        assert!(
            err.to_string()
                .contains(&format!("longer than {MAX_REGISTRY_ANSWER} bytes")),
            "{err}"
        );
    }
}
