//! A remote function that fails: the circuit breaker opens, each fallback (dead letters, a
//! default row, a pause) takes the failed records, and the breaker closes after recovery.

use super::*;

/// A scoring service on loopback that can be told to fail with 503.
struct ScoringServer {
    url: String,
    failing: Arc<std::sync::atomic::AtomicBool>,
    requests: Arc<AtomicU64>,
}

impl ScoringServer {
    async fn start() -> ScoringServer {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/score", listener.local_addr().unwrap());
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (f, r) = (failing.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (f, r) = (f.clone(), r.clone());
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    loop {
                        let mut length = 0;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                length = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; length];
                        stream.read_exact(&mut body).await.unwrap();
                        r.fetch_add(1, Ordering::SeqCst);
                        let response = if f.load(Ordering::SeqCst) {
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                                .to_string()
                        } else {
                            let ids: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            let scores: Vec<f64> = ids["ids"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|i| i.as_f64().unwrap() * 2.0)
                                .collect();
                            let json = serde_json::json!({ "scores": scores }).to_string();
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
                                json.len()
                            )
                        };
                        if stream
                            .get_mut()
                            .write_all(response.as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        ScoringServer {
            url,
            failing,
            requests,
        }
    }
}

/// Calls the scoring service with the batch's offsets; adds `score`.
#[derive(Clone)]
struct RemoteScore {
    url: String,
    client: reqwest::Client,
    output: SchemaRef,
}

impl StageFactory for RemoteScore {
    fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }
    fn create(&self) -> sluice_engine::Result<Box<dyn Stage>> {
        Ok(Box::new(self.clone()))
    }
}

#[async_trait]
impl Stage for RemoteScore {
    async fn process_batch(
        &mut self,
        batch: RecordBatch,
        _ctx: &StageContext,
    ) -> sluice_engine::Result<StageOutput> {
        let transient = |m: String| Error::Function {
            class: ErrorClass::Transient,
            message: m,
        };
        let response = self
            .client
            .post(&self.url)
            .json(&serde_json::json!({ "ids": offsets(&batch) }))
            .send()
            .await
            .map_err(|e| transient(format!("calling the scoring service: {e}")))?;
        if !response.status().is_success() {
            return Err(transient(format!(
                "scoring service answered {}",
                response.status()
            )));
        }
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|e| transient(format!("reading the scores: {e}")))?;
        let scores: Vec<f64> = body["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .collect();
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(arrow::array::Float64Array::from(scores)));
        Ok(StageOutput::ok(
            RecordBatch::try_new(self.output.clone(), columns).unwrap(),
        ))
    }
}

/// The remote function fails for a second in the middle of the run: the breaker opens,
/// the fallback applies, the breaker closes once the service answers again; every record
/// is in the output or the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_remote_function_opens_the_breaker_and_it_closes_after_recovery() {
    use sluice_engine::breaker::{Breaker, BreakerPolicy, Fallback, State};
    for fallback in [
        Fallback::DeadLetter,
        Fallback::Default(
            serde_json::json!({ "score": -1.0 })
                .as_object()
                .unwrap()
                .clone(),
        ),
        Fallback::Pause,
    ] {
        const N: u64 = 12_000;
        let server = ScoringServer::start().await;
        let source = generator(2, N, Some(4_000.0));
        let input = {
            use sluice_engine::source::Source;
            source.schema()
        };
        let mut fields: Vec<arrow::datatypes::Field> =
            input.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(arrow::datatypes::Field::new(
            "score",
            arrow::datatypes::DataType::Float64,
            true,
        ));
        let breaker = Arc::new(Breaker::new(BreakerPolicy {
            failure_ratio: 0.5,
            min_calls: 4,
            window: Duration::from_secs(2),
            open_for: Duration::from_millis(300),
            half_open_calls: 2,
        }));
        let stage = PlannedStage {
            name: "score".into(),
            factory: Arc::new(RemoteScore {
                url: server.url.clone(),
                client: reqwest::Client::new(),
                output: Arc::new(arrow::datatypes::Schema::new(fields)),
            }),
            policy: FailurePolicy {
                breaker: Some(breaker.clone()),
                fallback: fallback.clone(),
                timeout: Some(Duration::from_secs(2)),
                ..fast_retries(2)
            },
        };
        let stats = RunStats::new([&stage.name]);
        let (out, dead) = (Collect::default(), Collect::default());
        let pipeline = Pipeline {
            name: "remote".into(),
            source: Box::new(source),
            batching: Batching {
                size: 100,
                window: Duration::from_millis(20),
            },
            stages: vec![stage],
            graph: Graph::chain(1),
            outputs: Output::single(
                Box::new(out.clone()),
                ColumnSelection {
                    keep_metadata: vec!["_partition".into(), "_offset".into()],
                },
            ),
            checkpoint: None,
            dead_letter: Some(DeadLetterSink {
                sink: Box::new(dead.clone()),
                text: true,
            }),
        };
        let failing = server.failing.clone();
        let outage = async move {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            failing.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1000)).await;
            failing.store(false, Ordering::SeqCst);
        };
        let (run, ()) = tokio::join!(
            executor::run(
                pipeline,
                RunOptions::default(),
                stats.clone(),
                CancellationToken::new(),
                None
            ),
            outage
        );
        run.unwrap();
        let s = &stats.stages[0];
        assert!(
            RunStats::get(&s.breaker_opened) >= 1,
            "{fallback:?}: the breaker opened"
        );
        assert!(
            RunStats::get(&s.breaker_closed) >= 1,
            "{fallback:?}: and closed again"
        );
        assert_eq!(breaker.state(), State::Closed, "{fallback:?}");

        let mut seen: HashSet<(u32, i64)> = out.positions().into_iter().collect();
        let letters = dead.letters();
        for l in &letters {
            assert_eq!(l["stage"], "score");
            assert_eq!(l["error_class"], "transient");
            seen.insert((
                l["partition"].as_u64().unwrap() as u32,
                l["offset"].as_i64().unwrap(),
            ));
        }
        assert_eq!(
            out.positions().len() + letters.len(),
            N as usize,
            "{fallback:?}: each record once"
        );
        assert_eq!(
            seen.len() as u64,
            N,
            "{fallback:?}: output + dead letters = input"
        );
        let scores: Vec<(i64, f64)> = out
            .batches()
            .iter()
            .flat_map(|b| {
                let o = b
                    .column_by_name("_offset")
                    .unwrap()
                    .as_primitive::<Int64Type>()
                    .clone();
                let s = b
                    .column_by_name("score")
                    .unwrap()
                    .as_primitive::<arrow::datatypes::Float64Type>()
                    .clone();
                o.values().to_vec().into_iter().zip(s.values().to_vec())
            })
            .collect();
        let defaulted = scores.iter().filter(|(_, s)| *s == -1.0).count();
        assert!(
            scores
                .iter()
                .all(|(o, s)| *s == *o as f64 * 2.0 || *s == -1.0)
        );
        match fallback {
            Fallback::DeadLetter => {
                assert!(!letters.is_empty() && defaulted == 0);
                assert!(letters.iter().any(|l| {
                    l["error"]
                        .as_str()
                        .unwrap()
                        .contains("circuit breaker open")
                }));
            }
            Fallback::Pause => {
                // While open, the worker waited: no row was given up because of the circuit.
                assert!(letters.iter().all(|l| {
                    l["error"]
                        .as_str()
                        .unwrap()
                        .contains("gave up after 2 attempts")
                }));
                assert_eq!(defaulted, 0);
            }
            _ => {
                // Calls that ran out of retries before the circuit opened are dead letters;
                // while it was open, rows got the default score instead.
                assert!(letters.iter().all(|l| {
                    l["error"]
                        .as_str()
                        .unwrap()
                        .contains("gave up after 2 attempts")
                }));
                assert_eq!(defaulted as u64, RunStats::get(&s.defaulted));
                assert!(defaulted > 0);
            }
        }
        eprintln!(
            "{fallback:?}: {} requests, breaker opened {}x closed {}x, {} dead letters, {} defaulted",
            server.requests.load(Ordering::SeqCst),
            RunStats::get(&s.breaker_opened),
            RunStats::get(&s.breaker_closed),
            letters.len(),
            defaulted
        );
    }
}
