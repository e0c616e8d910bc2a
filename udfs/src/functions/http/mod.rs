//! `http`: a remote function. Each batch is POSTed as JSON to an endpoint, which answers
//! with one result per row; the result fields become new columns.
//!
//! ```yaml
//! - name: moderate
//!   type: function
//!   function: http
//!   params:
//!     url: http://127.0.0.1:8808/moderate
//!     columns: [user_id, comment]
//!     outputs:
//!       - { name: verdict, type: utf8 }
//!       - { name: toxicity, type: float64 }
//!     max_batch_rows: 500
//!     concurrency: 4
//!     timeout: 10s
//!     headers: { authorization: "Bearer ${TOKEN}" }
//! ```
//!
//! # The protocol
//! This is what an endpoint implements. The stage sends
//!
//! ```text
//! POST <url>
//! content-type: application/json
//!
//! {"rows": [{"user_id": 7, "comment": "nice"}, {"user_id": 8, "comment": null}, ...]}
//! ```
//!
//! with the `columns` of at most `max_batch_rows` rows (every key present, `null` for a null
//! value), and expects a `2xx` answer (normally `200`) whose body is
//!
//! ```text
//! {"results": [{"verdict": "ok", "toxicity": 0.04}, {"error": "comment is empty"}, ...]}
//! ```
//!
//! with exactly one object per row, in the order of the rows. A result field missing or
//! `null` gives a null; fields not named in `outputs` are ignored; numbers and booleans
//! are accepted for text outputs, and numbers written as strings for numeric ones. A
//! result object with a string field `error` marks its row as failed: that row alone
//! becomes a permanent failure (a dead letter) and the other rows go on. A `null` result
//! gives nulls in every output column.
//!
//! # Errors
//! A request that fails fails the whole batch call (the engine's failure policy decides
//! what happens next, see `sluice_engine::failure`):
//! - refused connections, timeouts and HTTP 408, 429, 500, 502, 503 and 504 are
//!   transient ([`Error::External`]): the engine retries them with backoff;
//! - any other status, a body that is not the JSON above, and a wrong number of results
//!   are permanent ([`Error::Function`]): with `bisect_on_error` the engine splits the
//!   batch to find the rows the endpoint refuses.
//!
//! # Concurrency
//! A batch is split into requests of at most `max_batch_rows` rows, sent at once and
//! reassembled in order. All instances of the stage (one per worker) share one connection
//! pool and `concurrency` permits: a request holds a permit from before it is sent until
//! its body is read, so at most `concurrency` requests are in flight for the whole stage.
//! This is not the stage-level `concurrency` of the failure policy, which limits whole
//! batch calls.
//!
//! # Cancel safety
//! Dropping a `process_batch` future drops its requests (their connections are closed)
//! and returns their permits. The endpoint may have seen some of those rows already; as
//! every retry also sends rows again, an endpoint must tolerate seeing a row twice.
//!
//! The stage spawns nothing itself; the connection pool's tasks end with the last
//! instance that holds it.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, new_empty_array, new_null_array};
use arrow::compute::concat;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::json::writer::JsonArray;
use arrow::json::{ReaderBuilder, WriterBuilder};
use async_trait::async_trait;
use futures::future::try_join_all;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use sluice_engine::config::{Duration, Location, Node, Problems, Value};
use sluice_engine::plan_err;
use sluice_engine::stage::{RowFailure, Stage, StageContext, StageFactory, StageOutput};
use sluice_engine::{Error, ErrorClass, Result, json_limits};
use tokio::sync::Semaphore;

use super::{FunctionSpec, Params, assemble, extend_schema};

mod tls;

use sluice_engine::http_body::{Capped, excerpt, read_capped};

/// The most of an answer read.
const MAX_ANSWER_BYTES: usize = 256 << 20;
use tls::HttpTls;

/// The `system` of transient errors ([`Error::External`] takes a static name, so the url
/// goes in the message).
const SYSTEM: &str = "http";

/// The result field that marks a row as failed.
const ERROR_FIELD: &str = "error";

/// ```yaml
/// params:
///   url: http://127.0.0.1:8808/moderate
///   columns: [user_id, comment]
///   outputs:
///     - { name: verdict, type: utf8 }
///     - { name: toxicity, type: float64 }
///   max_batch_rows: 500
///   concurrency: 4
///   timeout: 10s
///   headers: { authorization: "Bearer ${TOKEN}" }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    /// The endpoint rows are POSTed to, e.g. `https://models.internal/moderate`.
    url: String,
    /// For `https` endpoints: `ca`, the authority (PEM) that signed the server's
    /// certificate when it is not one the system trusts; `cert` and `key` (PEM), this
    /// client's certificate for servers that ask for one (mutual TLS). The server's host
    /// name is always verified.
    tls: Option<HttpTls>,
    /// The input columns sent for each row (default: every column whose name does not
    /// start with `_`).
    columns: Option<Vec<String>>,
    /// The result fields, in order; each becomes a new nullable column.
    outputs: Vec<OutputField>,
    /// Rows per request (default 500). A larger batch is split into several requests.
    #[serde(default = "default_max_batch_rows")]
    max_batch_rows: usize,
    /// Requests in flight at once for the whole stage, across all workers (default 4).
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    /// The longest a request may take, from connecting to the end of the response body
    /// (default 10s). A request that takes longer fails as transient.
    #[serde(default = "default_timeout")]
    timeout: Duration,
    /// Headers sent with every request, e.g. `{ authorization: "Bearer ${TOKEN}" }`.
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// One result field: `{ name: verdict, type: utf8 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputField {
    /// The new column's name, and the key read from each result object.
    name: String,
    /// `utf8`, `int64`, `int32`, `float64`, `float32` or `boolean`.
    #[serde(rename = "type")]
    ty: String,
}

fn default_max_batch_rows() -> usize {
    500
}

fn default_concurrency() -> usize {
    4
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The Arrow type of an output `type`.
fn output_type(ty: &str) -> Result<DataType> {
    Ok(match ty {
        "utf8" => DataType::Utf8,
        "int64" => DataType::Int64,
        "int32" => DataType::Int32,
        "float64" => DataType::Float64,
        "float32" => DataType::Float32,
        "boolean" => DataType::Boolean,
        other => {
            return plan_err!(
                "the output type `{other}` is not supported; expected one of utf8, int64, \
                 int32, float64, float32, boolean"
            );
        }
    })
}

fn parse_url(url: &str) -> Result<Url> {
    let parsed = Url::parse(url)
        .map_err(|e| Error::Plan(format!("`{}` is not a valid URL ({e})", super::redact(url))))?;
    match parsed.scheme() {
        "http" | "https" => Ok(parsed),
        other => plan_err!(
            "`{}` is a {other} URL; expected an http:// or https:// URL",
            super::redact(url)
        ),
    }
}

fn parse_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue)> {
    let header = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| Error::Plan(format!("`{name}` is not a valid header name")))?;
    let mut value = HeaderValue::from_str(value).map_err(|_| {
        Error::Plan(format!(
            "the value of `{name}` has characters a header cannot carry (control characters)"
        ))
    })?;
    // Kept out of `Debug` output: headers usually carry credentials.
    value.set_sensitive(true);
    Ok((header, value))
}

impl Http {
    /// Checks of single numbers, as (key, message); shared by `validate` and `plan`.
    fn number_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.max_batch_rows == 0 {
            out.push(("max_batch_rows", "must be at least 1".to_string()));
        }
        if self.concurrency == 0 {
            out.push(("concurrency", "must be at least 1".to_string()));
        }
        if self.timeout.get().is_zero() {
            out.push(("timeout", "must be longer than 0s".to_string()));
        }
        out
    }
}

impl Params for Http {
    fn validate(&self, node: &Node, path: &Location, problems: &mut Problems) {
        if let Err(e) = parse_url(&self.url) {
            problems.at_key(node, path, "url", e.to_string());
        }
        if let Some(columns) = &self.columns {
            if columns.is_empty() {
                problems.at_key(
                    node,
                    path,
                    "columns",
                    "needs at least one column (leave `columns` out to send every column \
                     not starting with `_`)",
                );
            }
            for (i, c) in columns.iter().enumerate() {
                if columns[..i].contains(c) {
                    problems.at_key(node, path, "columns", format!("names `{c}` twice"));
                }
            }
        }
        if self.outputs.is_empty() {
            problems.at_key(node, path, "outputs", "needs at least one result field");
        }
        let items = match node.get("outputs").map(|n| &n.value) {
            Some(Value::Seq(items)) => Some(items),
            _ => None,
        };
        let outputs_path = path.key("outputs");
        for (i, o) in self.outputs.iter().enumerate() {
            let mut report = |key: &str, message: String| match items.and_then(|it| it.get(i)) {
                Some(item) => problems.at_key(item, &outputs_path.index(i), key, message),
                None => problems.at_key(node, path, "outputs", message),
            };
            if let Err(e) = output_type(&o.ty) {
                report("type", e.to_string());
            }
            if o.name == ERROR_FIELD {
                report(
                    "name",
                    "`error` is reserved: a result's `error` field marks its row as failed"
                        .to_string(),
                );
            } else if self.outputs[..i].iter().any(|p| p.name == o.name) {
                report("name", format!("`{}` is named twice", o.name));
            }
        }
        for (key, message) in self.number_problems() {
            problems.at_key(node, path, key, message);
        }
        if let Some(headers) = node.get("headers") {
            let headers_path = path.key("headers");
            for (name, value) in &self.headers {
                if let Err(e) = parse_header(name, value) {
                    problems.at_key(headers, &headers_path, name, e.to_string());
                }
            }
        }
    }
}

impl FunctionSpec for Http {
    fn plan(&self, input: &SchemaRef) -> Result<Arc<dyn StageFactory>> {
        if let Some((key, message)) = self.number_problems().into_iter().next() {
            return plan_err!("`{key}` {message}");
        }
        let url = parse_url(&self.url)?;
        let columns: Vec<String> = match &self.columns {
            Some(columns) => columns.clone(),
            None => input
                .fields()
                .iter()
                .map(|f| f.name())
                .filter(|n| !n.starts_with('_'))
                .cloned()
                .collect(),
        };
        if columns.is_empty() {
            return plan_err!(
                "there is no column to send: every input column starts with `_`; name the \
                 columns in `columns`"
            );
        }
        for name in &columns {
            let field = input
                .field_with_name(name)
                .map_err(|_| Error::Plan(format!("the column `{name}` is not in the input")))?;
            // Encodes one null of the type: fails now for a type the JSON writer lacks.
            let probe = Field::new(name, field.data_type().clone(), true);
            RecordBatch::try_new(
                Arc::new(Schema::new(vec![probe])),
                vec![new_null_array(field.data_type(), 1)],
            )
            .ok()
            .and_then(|b| encode(&b).ok())
            .ok_or_else(|| {
                Error::Plan(format!(
                    "the column `{name}` is {}, which cannot be sent as JSON",
                    field.data_type()
                ))
            })?;
        }
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for o in &self.outputs {
            if o.name == ERROR_FIELD {
                return plan_err!(
                    "the output name `error` is reserved: a result's `error` field marks its \
                     row as failed"
                );
            }
            outputs.push((o.name.as_str(), output_type(&o.ty)?));
        }
        if outputs.is_empty() {
            return plan_err!("`outputs` needs at least one result field");
        }
        let output = extend_schema(input, &outputs)?;

        // `{"results": [{<outputs>, "error": ...}, ...]}`, decoded as one row.
        let mut result_fields: Vec<Field> = outputs
            .iter()
            .map(|(n, t)| Field::new(*n, t.clone(), true))
            .collect();
        result_fields.push(Field::new(ERROR_FIELD, DataType::Utf8, true));
        let response = Arc::new(Schema::new(vec![Field::new_list(
            "results",
            Field::new_struct("item", result_fields, true),
            true,
        )]));

        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let (name, value) = parse_header(name, value)?;
            headers.insert(name, value);
        }
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .timeout(self.timeout.get())
            .pool_max_idle_per_host(self.concurrency);
        if let Some(tls) = &self.tls {
            builder = tls.apply(builder)?;
        }
        let client = builder
            .build()
            .map_err(|e| Error::Plan(format!("cannot set up the HTTP client: {e}")))?;

        Ok(Arc::new(HttpFactory {
            client,
            permits: Arc::new(Semaphore::new(self.concurrency.min(Semaphore::MAX_PERMITS))),
            endpoint: Arc::new(Endpoint {
                name: super::redact(&self.url),
                url,
                columns,
                outputs: outputs.iter().map(|(_, t)| t.clone()).collect(),
                response,
                max_batch_rows: self.max_batch_rows,
                timeout: self.timeout,
            }),
            output,
        }))
    }
}

/// What every instance needs to know about the endpoint.
struct Endpoint {
    /// The url as the user wrote it, its password hidden, for messages.
    name: String,
    url: Url,
    columns: Vec<String>,
    /// The types of the output columns, in order.
    outputs: Vec<DataType>,
    /// The schema a response body is decoded with.
    response: SchemaRef,
    max_batch_rows: usize,
    timeout: Duration,
}

/// Holds what the stage's instances share: one connection pool and one set of permits.
struct HttpFactory {
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    endpoint: Arc<Endpoint>,
    output: SchemaRef,
}

impl StageFactory for HttpFactory {
    fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    fn create(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(HttpStage {
            client: self.client.clone(),
            permits: self.permits.clone(),
            endpoint: self.endpoint.clone(),
            output: self.output.clone(),
        }))
    }
}

struct HttpStage {
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    endpoint: Arc<Endpoint>,
    output: SchemaRef,
}

/// The answer to one request: the output columns for its rows, and the rows it rejected
/// (index within the request, reason).
struct Answer {
    columns: Vec<ArrayRef>,
    rejected: Vec<(usize, String)>,
}

/// `{"rows": [...]}`, written straight from the Arrow columns.
fn encode(rows: &RecordBatch) -> Result<Vec<u8>> {
    let mut body = Vec::with_capacity(16 + 64 * rows.num_rows());
    body.extend_from_slice(b"{\"rows\":");
    let mut writer = WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, JsonArray>(body);
    let failed = |e| Error::arrow("encoding rows as JSON", e);
    writer.write(rows).map_err(failed)?;
    writer.finish().map_err(failed)?;
    let mut body = writer.into_inner();
    body.push(b'}');
    Ok(body)
}

/// The start of a response body, for an error message.
fn permanent(message: String) -> Error {
    Error::Function {
        class: ErrorClass::Permanent,
        message,
    }
}

impl HttpStage {
    /// A request that did not get a complete answer.
    fn send_error(&self, e: reqwest::Error) -> Error {
        let url = &self.endpoint.name;
        if e.is_timeout() {
            return Error::External {
                system: SYSTEM,
                message: format!("POST {url} timed out after {}", self.endpoint.timeout),
            };
        }
        let connect = e.is_connect();
        let builder = e.is_builder();
        // reqwest's own message is generic; the causes say what happened.
        let detail = sluice_engine::error::error_chain(&e.without_url());
        if builder {
            permanent(format!("cannot build a request to {url}: {detail}"))
        } else if connect && detail.contains("certificate") {
            // No retry cures an untrusted certificate or one for another host.
            Error::Refused {
                system: SYSTEM,
                message: format!(
                    "the TLS certificate of {url} is refused: {detail}; give the authority \
                     that signed it in `tls.ca`, and check that it names the URL's host"
                ),
            }
        } else if connect {
            Error::External {
                system: SYSTEM,
                message: format!("cannot connect to {url}: {detail}"),
            }
        } else {
            Error::External {
                system: SYSTEM,
                message: format!("POST {url} failed: {detail}"),
            }
        }
    }

    /// A response whose status is not a success.
    fn status_error(&self, status: StatusCode, body: &[u8]) -> Error {
        let url = &self.endpoint.name;
        let code = status.as_u16();
        if matches!(code, 408 | 429 | 500 | 502 | 503 | 504) {
            Error::External {
                system: SYSTEM,
                message: format!("POST {url}: HTTP {code}: {}", excerpt(body)),
            }
        } else {
            permanent(format!("{url} answered HTTP {code}: {}", excerpt(body)))
        }
    }

    /// Decodes `{"results": [...]}` into the output columns, checking there is one result
    /// per row.
    fn read_answer(&self, body: &[u8], rows: usize) -> Result<Answer> {
        let url = &self.endpoint.name;
        let malformed = |why: String| {
            permanent(format!(
                "{url} sent a malformed response ({why}); expected \
                 {{\"results\": [...]}} with one object per row: {}",
                excerpt(body)
            ))
        };
        // Nested past the limit, or not one whole value: arrow-json quoting a value in an
        // error recurses once per level (a stack overflow, at every retry).
        json_limits::check_line(body).map_err(malformed)?;
        let mut decoder = ReaderBuilder::new(self.endpoint.response.clone())
            .with_batch_size(1)
            .with_coerce_primitive(true)
            .build_decoder()
            .map_err(|e| Error::Internal(format!("building the response decoder: {e}")))?;
        let read = decoder.decode(body).map_err(|e| malformed(e.to_string()))?;
        if read < body.len() {
            return Err(malformed("more than one JSON value".to_string()));
        }
        let decoded = decoder
            .flush()
            .map_err(|e| malformed(e.to_string()))?
            .ok_or_else(|| malformed("no JSON value".to_string()))?;
        let list = decoded.column(0).as_list::<i32>();
        if list.is_null(0) {
            return Err(malformed("no `results` array".to_string()));
        }
        let results = list.value(0);
        if results.len() != rows {
            return Err(permanent(format!(
                "{url} returned {} results for {rows} rows: expected one result per row, \
                 in order",
                results.len()
            )));
        }
        let results = results.as_struct();
        let n = self.endpoint.outputs.len();
        let rejected = results
            .column(n)
            .as_string::<i32>()
            .iter()
            .enumerate()
            .filter_map(|(row, e)| e.map(|e| (row, format!("{url} rejected the row: {e}"))))
            .collect();
        Ok(Answer {
            columns: results.columns()[..n].to_vec(),
            rejected,
        })
    }

    /// One request: waits for a permit, sends `rows`, reads the answer.
    async fn call(&self, rows: RecordBatch) -> Result<Answer> {
        let body = encode(&rows)?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Internal("the http stage's permits were closed".into()))?;
        let response = self
            .client
            .post(self.endpoint.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| self.send_error(e))?;
        let status = response.status();
        let body = read_capped(response, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                Capped::Failed(e) => self.send_error(e),
                Capped::Over(cap) => permanent(format!(
                    "{} answered more than {} MiB for {} rows (lower max_batch_rows)",
                    self.endpoint.name,
                    cap >> 20,
                    rows.num_rows()
                )),
            })?;
        if !status.is_success() {
            return Err(self.status_error(status, &body));
        }
        self.read_answer(&body, rows.num_rows())
    }
}

#[async_trait]
impl Stage for HttpStage {
    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        _ctx: &StageContext,
    ) -> Result<StageOutput> {
        let this: &HttpStage = self;
        let indices = this
            .endpoint
            .columns
            .iter()
            .map(|c| {
                batch
                    .schema_ref()
                    .index_of(c)
                    .map_err(|_| Error::Internal(format!("column `{c}` vanished")))
            })
            .collect::<Result<Vec<_>>>()?;
        let sent = batch
            .project(&indices)
            .map_err(|e| Error::arrow("selecting the columns to send", e))?;
        let n = sent.num_rows();
        let step = this.endpoint.max_batch_rows;
        // In order of the rows; any failed request fails the call (and drops the others).
        let answers = try_join_all(
            (0..n)
                .step_by(step)
                .map(|start| this.call(sent.slice(start, step.min(n - start)))),
        )
        .await?;

        let mut failed = Vec::new();
        let mut parts: Vec<Vec<ArrayRef>> =
            vec![Vec::with_capacity(answers.len()); this.endpoint.outputs.len()];
        for (i, answer) in answers.into_iter().enumerate() {
            let offset = i * step;
            failed.extend(answer.rejected.into_iter().map(|(row, reason)| RowFailure {
                row: offset + row,
                class: ErrorClass::Permanent,
                reason,
            }));
            for (part, column) in parts.iter_mut().zip(answer.columns) {
                part.push(column);
            }
        }
        let new = parts
            .iter()
            .zip(&this.endpoint.outputs)
            .map(|(part, ty)| match part.as_slice() {
                [] => Ok(new_empty_array(ty)),
                [one] => Ok(one.clone()),
                many => concat(&many.iter().map(|a| a.as_ref()).collect::<Vec<_>>())
                    .map_err(|e| Error::arrow("joining the answers", e)),
            })
            .collect::<Result<Vec<_>>>()?;
        let out = assemble(&this.output, &batch, new, &failed)?;
        Ok(StageOutput { batch: out, failed })
    }
}

#[cfg(test)]
mod tests;
