use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use super::*;
use arrow::array::{Float64Array, Int64Array, StringArray};
use arrow::datatypes::{Float64Type, Int64Type};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

/// How the test endpoint answers.
#[derive(Default)]
enum Reply {
    /// One result per row: `error` for the comment "bad", else a verdict.
    #[default]
    Rows,
    /// This status, with a short text body.
    Status(u16),
    /// One result fewer than rows.
    Short,
    /// A body that is not JSON.
    Garbage,
    /// A result whose value nests arrays 100,000 deep (of the wrong type for its column).
    Deep,
}

#[derive(Default)]
struct Server {
    reply: Reply,
    /// Time each request takes.
    delay: std::time::Duration,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Rows per request, in the order they arrived.
    sizes: Mutex<Vec<usize>>,
    /// A row carried a column starting with `_`.
    saw_private: AtomicBool,
}

fn verdict(comment: &str) -> &'static str {
    if comment.contains('!') { "flag" } else { "ok" }
}

async fn answer(State(s): State<Arc<Server>>, Json(body): Json<serde_json::Value>) -> Response {
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(s.delay).await;
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    let rows = body["rows"].as_array().cloned().unwrap_or_default();
    s.sizes.lock().unwrap().push(rows.len());
    if rows.iter().any(|r| {
        r.as_object()
            .is_some_and(|o| o.keys().any(|k| k.starts_with('_')))
    }) {
        s.saw_private.store(true, Ordering::SeqCst);
    }
    let mut results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| match r["comment"].as_str().unwrap_or("") {
            "bad" => json!({ "error": "comment is abusive" }),
            c => json!({
                "verdict": verdict(c),
                "toxicity": c.len() as f64 / 100.0,
                "echo": r["user_id"],
                "ignored": [1, 2],
            }),
        })
        .collect();
    match s.reply {
        Reply::Rows => Json(json!({ "results": results })).into_response(),
        Reply::Status(code) => (
            axum::http::StatusCode::from_u16(code).unwrap(),
            "the model is overloaded",
        )
            .into_response(),
        Reply::Short => {
            results.pop();
            Json(json!({ "results": results })).into_response()
        }
        Reply::Garbage => "<html>oops</html>".into_response(),
        Reply::Deep => {
            let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
            let body = format!(r#"{{"results": [{{"toxicity": {deep}}}, {{}}]}}"#);
            ([(CONTENT_TYPE, "application/json")], body).into_response()
        }
    }
}

/// Starts the endpoint on a free port; returns its url.
async fn serve(server: Arc<Server>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/moderate", post(answer))
        .with_state(server);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/moderate")
}

fn spec(url: &str, extra: serde_json::Value) -> Http {
    let mut params = json!({
        "url": url,
        "outputs": [
            { "name": "verdict", "type": "utf8" },
            { "name": "toxicity", "type": "float64" },
            { "name": "echo", "type": "int64" },
        ],
    });
    let map = params.as_object_mut().unwrap();
    for (k, v) in extra.as_object().unwrap() {
        map.insert(k.clone(), v.clone());
    }
    serde_json::from_value(params).unwrap()
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Int64, false),
        Field::new("comment", DataType::Utf8, true),
        Field::new("_timestamp", DataType::Int64, true),
    ]))
}

fn batch(comments: &[String]) -> RecordBatch {
    let n = comments.len() as i64;
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(1000..1000 + n)),
            Arc::new(StringArray::from_iter_values(comments)),
            Arc::new(Int64Array::from_iter_values(0..n)),
        ],
    )
    .unwrap()
}

fn ctx() -> StageContext {
    StageContext::detached("moderate")
}

fn comment(i: usize) -> String {
    if i.is_multiple_of(7) {
        format!("comment {i}!")
    } else {
        format!("comment {i}")
    }
}

#[tokio::test]
async fn splits_into_requests_and_keeps_row_order() {
    let server = Arc::new(Server::default());
    let url = serve(server.clone()).await;
    let factory = spec(&url, json!({ "max_batch_rows": 300 }))
        .plan(&schema())
        .unwrap();
    let comments: Vec<String> = (0..2_000).map(comment).collect();
    let input = batch(&comments);
    let out = factory
        .create()
        .unwrap()
        .process_batch(input.clone(), &ctx())
        .await
        .unwrap();

    let mut sizes = server.sizes.lock().unwrap().clone();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![200, 300, 300, 300, 300, 300, 300]);
    assert!(
        !server.saw_private.load(Ordering::SeqCst),
        "sent a `_` column"
    );

    assert!(out.failed.is_empty());
    assert_eq!(out.batch.schema(), factory.output_schema());
    assert_eq!(out.batch.num_rows(), 2_000);
    assert_eq!(out.batch.column(0), input.column(0));
    let verdicts = out
        .batch
        .column_by_name("verdict")
        .unwrap()
        .as_string::<i32>();
    let toxicity = out
        .batch
        .column_by_name("toxicity")
        .unwrap()
        .as_primitive::<Float64Type>();
    let echo = out
        .batch
        .column_by_name("echo")
        .unwrap()
        .as_primitive::<Int64Type>();
    for (i, c) in comments.iter().enumerate() {
        assert_eq!(verdicts.value(i), verdict(c), "row {i}");
        assert_eq!(toxicity.value(i), c.len() as f64 / 100.0, "row {i}");
        assert_eq!(echo.value(i), 1000 + i as i64, "row {i}");
    }
}

#[tokio::test]
async fn requests_in_flight_stay_within_concurrency_across_workers() {
    let server = Arc::new(Server {
        delay: std::time::Duration::from_millis(30),
        ..Server::default()
    });
    let url = serve(server.clone()).await;
    let factory = spec(&url, json!({ "max_batch_rows": 100, "concurrency": 3 }))
        .plan(&schema())
        .unwrap();
    let mut stages: Vec<Box<dyn Stage>> = (0..4).map(|_| factory.create().unwrap()).collect();
    let input = batch(&(0..600).map(comment).collect::<Vec<_>>());
    let ctx = ctx();
    let outs = futures::future::join_all(
        stages
            .iter_mut()
            .map(|s| s.process_batch(input.clone(), &ctx)),
    )
    .await;
    for out in outs {
        assert_eq!(out.unwrap().batch.num_rows(), 600);
    }
    assert_eq!(server.sizes.lock().unwrap().len(), 24);
    assert_eq!(server.max_in_flight.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_slow_endpoint_times_out_as_transient() {
    let server = Arc::new(Server {
        delay: std::time::Duration::from_secs(5),
        ..Server::default()
    });
    let url = serve(server).await;
    let mut stage = spec(&url, json!({ "timeout": "200ms" }))
        .plan(&schema())
        .unwrap()
        .create()
        .unwrap();
    let started = Instant::now();
    let e = stage
        .process_batch(batch(&[comment(1)]), &ctx())
        .await
        .unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert_eq!(e.class(), ErrorClass::Transient);
    assert!(e.to_string().contains("timed out after 200ms"), "{e}");
}

#[tokio::test]
async fn statuses_and_refusals_are_classified() {
    let replies = [
        (
            Reply::Status(503),
            ErrorClass::Transient,
            "HTTP 503: the model is overloaded",
        ),
        (
            Reply::Status(400),
            ErrorClass::Permanent,
            "HTTP 400: the model is overloaded",
        ),
        (
            Reply::Short,
            ErrorClass::Permanent,
            "returned 1 results for 2 rows",
        ),
        (Reply::Garbage, ErrorClass::Permanent, "malformed response"),
        // arrow-json quoting such a value in its error recursed once per level: a stack
        // overflow, the process aborted, and again at every retry.
        (Reply::Deep, ErrorClass::Permanent, "nesting limit"),
    ];
    let mut cases = Vec::new();
    for (reply, class, says) in replies {
        let url = serve(Arc::new(Server {
            reply,
            ..Server::default()
        }))
        .await;
        cases.push((url, class, says.to_string()));
    }
    // A port nobody listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    cases.push((
        format!("http://{addr}/moderate"),
        ErrorClass::Transient,
        "cannot connect".to_string(),
    ));

    for (url, class, says) in cases {
        let mut stage = spec(&url, json!({}))
            .plan(&schema())
            .unwrap()
            .create()
            .unwrap();
        let e = stage
            .process_batch(batch(&[comment(1), comment(2)]), &ctx())
            .await
            .unwrap_err();
        assert_eq!(e.class(), class, "{e}");
        assert!(e.to_string().contains(&says), "{e}");
        assert!(e.to_string().contains(&url), "{e}");
    }
}

#[tokio::test]
async fn an_answer_is_read_up_to_its_cap() {
    let url = serve(Arc::new(Server::default())).await;
    let client = reqwest::Client::new();
    let body = || json!({ "rows": [{ "comment": "a" }, { "comment": "b" }] }).to_string();
    let send = || {
        client
            .post(&url)
            .header(CONTENT_TYPE, "application/json")
            .body(body())
    };
    let whole = read_capped(send().send().await.unwrap(), 1 << 20).await;
    let whole = whole.ok().expect("within the cap");
    assert!(whole.starts_with(br#"{"results""#));
    let cut = read_capped(send().send().await.unwrap(), whole.len() - 1).await;
    assert!(matches!(cut, Err(Capped::Over(n)) if n == whole.len() - 1));
}

#[tokio::test]
async fn an_error_result_fails_its_row_only() {
    let url = serve(Arc::new(Server::default())).await;
    let mut stage = spec(&url, json!({ "columns": ["user_id", "comment"] }))
        .plan(&schema())
        .unwrap()
        .create()
        .unwrap();
    let comments = ["fine", "bad", "great!"].map(String::from);
    let out = stage.process_batch(batch(&comments), &ctx()).await.unwrap();
    assert_eq!(
        out.failed,
        vec![RowFailure {
            row: 1,
            class: ErrorClass::Permanent,
            reason: format!("{url} rejected the row: comment is abusive"),
        }]
    );
    assert_eq!(out.batch.num_rows(), 2);
    let verdicts = out.batch.column_by_name("verdict").unwrap();
    assert_eq!(
        verdicts.as_string::<i32>(),
        &StringArray::from(vec!["ok", "flag"])
    );
    let toxicity = out.batch.column_by_name("toxicity").unwrap();
    assert_eq!(
        toxicity.as_primitive::<Float64Type>(),
        &Float64Array::from(vec![0.04, 0.06])
    );
}

#[tokio::test]
async fn an_empty_batch_sends_nothing() {
    let server = Arc::new(Server::default());
    let url = serve(server.clone()).await;
    let factory = spec(&url, json!({})).plan(&schema()).unwrap();
    let out = factory
        .create()
        .unwrap()
        .process_batch(batch(&[]), &ctx())
        .await
        .unwrap();
    assert_eq!(out.batch.num_rows(), 0);
    assert_eq!(out.batch.schema(), factory.output_schema());
    assert!(server.sizes.lock().unwrap().is_empty());
}

#[test]
fn plan_checks_columns_types_and_url() {
    let url = "http://127.0.0.1:9/x";
    let err = |extra: serde_json::Value| spec(url, extra).plan(&schema()).err().unwrap();
    let e = err(json!({ "columns": ["user_id", "nope"] }));
    assert!(e.to_string().contains("`nope` is not in the input"), "{e}");
    let e = err(json!({ "outputs": [{ "name": "x", "type": "decimal" }] }));
    assert!(e.to_string().contains("`decimal` is not supported"), "{e}");
    let e = err(json!({ "outputs": [{ "name": "comment", "type": "utf8" }] }));
    assert!(e.to_string().contains("already exists"), "{e}");
    let e = err(json!({ "outputs": [{ "name": "error", "type": "utf8" }] }));
    assert!(e.to_string().contains("reserved"), "{e}");
    let e = err(json!({ "url": "ftp://example.com/x" }));
    assert!(
        e.to_string()
            .contains("expected an http:// or https:// URL"),
        "{e}"
    );
    let e = err(json!({ "max_batch_rows": 0 }));
    assert!(e.to_string().contains("max_batch_rows"), "{e}");

    let parsed: Result<Http, _> =
        serde_json::from_value(json!({ "url": url, "outputs": [], "colums": ["a"] }));
    assert!(parsed.is_err());
    let defaults = spec(url, json!({}));
    assert_eq!(
        (
            defaults.max_batch_rows,
            defaults.concurrency,
            defaults.timeout
        ),
        (500, 4, Duration::from_secs(10))
    );
}
