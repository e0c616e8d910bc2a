//! `sluice tap`: rows leaving a stage of a running pipeline (or arriving at an output, or
//! going to the dead letters), as JSON lines.
//!
//! The pipeline serves them at `GET /tap?stage=NAME[&where=SQL][&limit=N][&rate=N]` on its
//! metrics address when run with `--tap` (off by default; the address is loopback unless
//! `--metrics-addr` names another). The body is one JSON object per row; a line
//! `{"_tap":{"skipped":N}}` says N rows went by unseen (the reader was behind, or over
//! `rate`), `{"_tap":{"error":"..."}}` why the tap ended early. A tap never slows the
//! pipeline: see `sluice_engine::tap`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::{AsArray, RecordBatch};
use arrow::compute::filter_record_batch;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use datafusion::common::DFSchema;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use serde::Deserialize;
use sluice_engine::stats::RunStats;
use sluice_engine::tap::Tapped;
use tokio::sync::mpsc;

#[derive(Debug, Deserialize)]
pub struct TapQuery {
    stage: String,
    #[serde(rename = "where")]
    filter: Option<String>,
    limit: Option<u64>,
    /// Rows per second at most.
    rate: Option<f64>,
}

/// `GET /tap`: the rows of the named point as they go by.
pub async fn serve(State(stats): State<Arc<RunStats>>, Query(q): Query<TapQuery>) -> Response {
    let Some(taps) = stats.taps.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the pipeline has not started yet\n",
        )
            .into_response();
    };
    let Some(point) = taps.point(&q.stage) else {
        let names = taps.names().join(", ");
        return (
            StatusCode::NOT_FOUND,
            format!("nothing named `{}` to tap; there are: {names}\n", q.stage),
        )
            .into_response();
    };
    let filter = match q.filter.as_deref().map(Filter::parse).transpose() {
        Ok(filter) => filter,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let Some(rows) = point.listen() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "`{}` has {} taps already; try again when one ends\n",
                q.stage,
                sluice_engine::tap::MAX_LISTENERS
            ),
        )
            .into_response();
    };
    let (tx, body) = mpsc::channel::<Bytes>(4);
    tokio::spawn(feed(rows, tx, filter, q.limit, q.rate));
    let stream = futures::stream::unfold(body, |mut body| async move {
        body.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), body))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

/// Turns tapped batches into JSON lines for the client, until `limit` rows or it leaves.
async fn feed(
    mut rows: mpsc::Receiver<Tapped>,
    body: mpsc::Sender<Bytes>,
    mut filter: Option<Filter>,
    limit: Option<u64>,
    rate: Option<f64>,
) {
    let mut left = limit.unwrap_or(u64::MAX);
    let mut budget = rate.map(Budget::new);
    while left > 0 {
        // A client that left ends the tap at once, even when nothing comes to tell it.
        let tapped = tokio::select! {
            tapped = rows.recv() => tapped,
            () = body.closed() => return,
        };
        let Some(tapped) = tapped else {
            return;
        };
        let (lines, skipped) = match tapped {
            Tapped::Skipped(n) => (Vec::new(), n),
            Tapped::Rows(batch) => {
                let batch = match filter.as_mut().map(|f| f.apply(&batch)).transpose() {
                    Ok(filtered) => filtered.unwrap_or(batch),
                    Err(e) => {
                        let line = serde_json::json!({"_tap": {"error": e}});
                        let _ = body.send(format!("{line}\n").into()).await;
                        return;
                    }
                };
                let n = batch.num_rows() as u64;
                let allowed = budget.as_mut().map_or(n, |b| b.take(n)).min(left);
                left -= allowed;
                let taken = batch.slice(0, allowed as usize);
                (encode(&taken), n - allowed)
            }
        };
        if skipped > 0 {
            let line = serde_json::json!({"_tap": {"skipped": skipped}});
            if body.send(format!("{line}\n").into()).await.is_err() {
                return;
            }
        }
        if !lines.is_empty() && body.send(lines.into()).await.is_err() {
            return;
        }
    }
}

fn encode(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    if batch.num_rows() > 0 {
        let mut writer = sluice_connectors::json::lines_writer(&mut out);
        if writer.write(batch).and_then(|_| writer.finish()).is_err() {
            out.clear();
        }
    }
    out
}

/// `rate`: rows per second, with a second's worth of burst.
struct Budget {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Budget {
    fn new(rate: f64) -> Self {
        Budget {
            rate: rate.max(0.0),
            tokens: rate.max(0.0),
            at: Instant::now(),
        }
    }

    /// How many of `n` rows may go now.
    fn take(&mut self, n: u64) -> u64 {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate.max(1.0));
        self.at = now;
        let taken = (self.tokens.floor() as u64).min(n);
        self.tokens -= taken as f64;
        taken
    }
}

/// `where`: a SQL predicate over the tapped rows' columns, compiled for their schema.
struct Filter {
    sql: String,
    compiled: Option<(arrow::datatypes::SchemaRef, Arc<dyn PhysicalExpr>)>,
}

impl Filter {
    fn parse(sql: &str) -> Result<Filter, String> {
        use datafusion::sql::sqlparser::dialect::GenericDialect;
        use datafusion::sql::sqlparser::parser::Parser;
        Parser::new(&GenericDialect {})
            .try_with_sql(sql)
            .and_then(|mut p| p.parse_expr())
            .map_err(|e| format!("`where` is not a SQL expression: {e}"))?;
        Ok(Filter {
            sql: sql.to_string(),
            compiled: None,
        })
    }

    fn apply(&mut self, batch: &RecordBatch) -> Result<RecordBatch, String> {
        let schema = batch.schema();
        let expr = match &self.compiled {
            Some((s, expr)) if *s == schema => expr.clone(),
            _ => {
                let ctx = SessionContext::new();
                let df_schema =
                    DFSchema::try_from(schema.as_ref().clone()).map_err(|e| e.to_string())?;
                let expr = ctx
                    .parse_sql_expr(&self.sql, &df_schema)
                    .and_then(|e| ctx.create_physical_expr(e, &df_schema))
                    .map_err(|e| format!("`where {}`: {e}", self.sql))?;
                self.compiled = Some((schema, expr.clone()));
                expr
            }
        };
        let mask = expr
            .evaluate(batch)
            .and_then(|v| v.into_array(batch.num_rows()))
            .map_err(|e| format!("`where {}`: {e}", self.sql))?;
        let Some(mask) = mask.as_boolean_opt() else {
            return Err(format!("`where {}` is not true or false", self.sql));
        };
        filter_record_batch(batch, mask).map_err(|e| e.to_string())
    }
}

/// `sluice tap ADDR --stage NAME`: prints the rows as JSON lines on stdout, and what went
/// by unseen on stderr; ends after `limit` rows, or when the pipeline does.
pub async fn client(
    addr: &str,
    stage: &str,
    filter: Option<&str>,
    limit: Option<u64>,
    rate: Option<f64>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut url = reqwest::Url::parse(&format!("http://{addr}/tap"))
        .with_context(|| format!("`{addr}` is not HOST:PORT"))?;
    url.query_pairs_mut().append_pair("stage", stage);
    if let Some(filter) = filter {
        url.query_pairs_mut().append_pair("where", filter);
    }
    if let Some(limit) = limit {
        url.query_pairs_mut()
            .append_pair("limit", &limit.to_string());
    }
    if let Some(rate) = rate {
        url.query_pairs_mut().append_pair("rate", &rate.to_string());
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let mut response = client.get(url).send().await.with_context(|| {
        format!("tapping the pipeline at {addr} (run with --metrics-addr and --tap?)")
    })?;
    let status = response.status();
    if status == StatusCode::NOT_FOUND && response.headers().get("content-type").is_none() {
        bail!("the pipeline at {addr} serves no taps: run it with --tap");
    }
    if !status.is_success() {
        bail!("{}", response.text().await.unwrap_or_default().trim());
    }
    let stdout = std::io::stdout();
    let mut pending = Vec::new();
    let mut skipped = 0;
    while let Some(chunk) = response.chunk().await? {
        pending.extend_from_slice(&chunk);
        let end = pending
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let mut out = stdout.lock();
        for line in pending[..end]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
        {
            if line.starts_with(b"{\"_tap\":") {
                let note: serde_json::Value = serde_json::from_slice(line)?;
                if let Some(n) = note["_tap"]["skipped"].as_u64() {
                    skipped += n;
                }
                if let Some(e) = note["_tap"]["error"].as_str() {
                    bail!("{e}");
                }
                continue;
            }
            out.write_all(line)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        pending.drain(..end);
    }
    if skipped > 0 {
        eprintln!("tap: {skipped} rows went by unseen (the tap was behind, or over --rate)");
    }
    Ok(())
}
