//! The example pipelines: every file in `pipelines/` validates and passes its own tests,
//! and the quickstart's output is checked row by row against an independent computation.

use std::collections::HashMap;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use arrow::datatypes::{Int32Type, Int64Type, TimestampMillisecondType};
use serde_json::Value;
use sluice_connectors::generator::{GeneratorConfig, GeneratorSource};
use sluice_connectors::kafka::{KafkaSinkConfig, KafkaSourceConfig};
use sluice_connectors::kinesis::{KinesisSinkConfig, KinesisSourceConfig};
use sluice_engine::config::yaml::ProcessEnv;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::{parse, read_lines, root};

fn pipeline_files() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(root().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

#[tokio::test]
async fn every_example_pipeline_validates_and_passes_its_tests() {
    for file in pipeline_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.display().to_string();
        let config =
            sluice::config::parse(&name, &text, &ProcessEnv).unwrap_or_else(|p| panic!("{p}"));
        sluice::plan::check(&config)
            .await
            .unwrap_or_else(|p| panic!("{p}"));
        for outcome in sluice::testing::run_tests(&config)
            .await
            .unwrap_or_else(|p| panic!("{p}"))
        {
            if let Some(why) = outcome.failure {
                panic!("{name} / {}: {why}", outcome.name);
            }
        }
    }
}

/// One output row of the quickstart, as comparable values.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Row {
    user_id: i64,
    title_id: i64,
    device: String,
    country: String,
    watch_seconds: i32,
    quality: &'static str,
    minute_ms: i64,
    event_time_ms: i64,
    variant: &'static str,
}

fn ms(text: &str) -> i64 {
    string_to_timestamp_nanos(text).unwrap() / 1_000_000
}

fn quality(kbps: i32) -> &'static str {
    match kbps {
        k if k >= 8000 => "uhd",
        k if k >= 3000 => "hd",
        _ => "sd",
    }
}

/// What the quickstart's stages must produce from one generated batch, computed in plain
/// Rust rather than SQL.
fn expected_rows(batch: &RecordBatch, out: &mut Vec<Row>) {
    let col = |n: &str| batch.column_by_name(n).unwrap().clone();
    let (users, titles) = (col("user_id"), col("title_id"));
    let (kind, device, country) = (col("event_type"), col("device"), col("country"));
    let (watch, bitrate, time) = (col("watch_seconds"), col("bitrate_kbps"), col("event_time"));
    let seed = xxh3_64(b"home-row-order");
    for i in 0..batch.num_rows() {
        let watch_seconds = watch.as_primitive::<Int32Type>().value(i);
        if kind.as_string::<i32>().value(i) != "play" || watch_seconds < 30 {
            continue;
        }
        let user_id = users.as_primitive::<Int64Type>().value(i);
        let t = time.as_primitive::<TimestampMillisecondType>().value(i);
        let bucket = xxh3_64_with_seed(&user_id.to_le_bytes(), seed) % 10_000;
        out.push(Row {
            user_id,
            title_id: titles.as_primitive::<Int64Type>().value(i),
            device: device.as_string::<i32>().value(i).to_string(),
            country: country.as_string::<i32>().value(i).to_string(),
            watch_seconds,
            quality: quality(bitrate.as_primitive::<Int32Type>().value(i)),
            minute_ms: t - t.rem_euclid(60_000),
            event_time_ms: t,
            variant: if bucket < 5_000 {
                "control"
            } else {
                "personalized"
            },
        });
    }
}

#[tokio::test]
async fn quickstart_output_is_exactly_right() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("q").display().to_string();
    let yaml = std::fs::read_to_string(root().join("pipelines/quickstart.yaml")).unwrap();
    let config = parse(&yaml, &[("COUNT", "20000"), ("OUT_DIR", &out_dir)]).unwrap();
    let (stats, _) = sluice::run_config(&config, Default::default(), Default::default())
        .await
        .unwrap();
    assert_eq!(
        sluice_engine::stats::RunStats::get(&stats.records_in),
        20_000
    );

    let variants: HashMap<&str, &'static str> =
        [("control", "control"), ("personalized", "personalized")].into();
    let qualities: HashMap<&str, &'static str> =
        [("sd", "sd"), ("hd", "hd"), ("uhd", "uhd")].into();
    let mut actual: Vec<Row> = read_lines(std::path::Path::new(&out_dir))
        .iter()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            Row {
                user_id: v["user_id"].as_i64().unwrap(),
                title_id: v["title_id"].as_i64().unwrap(),
                device: v["device"].as_str().unwrap().to_string(),
                country: v["country"].as_str().unwrap().to_string(),
                watch_seconds: v["watch_seconds"].as_i64().unwrap() as i32,
                quality: qualities[v["quality"].as_str().unwrap()],
                minute_ms: ms(v["minute"].as_str().unwrap()),
                event_time_ms: ms(v["event_time"].as_str().unwrap()),
                variant: variants[v["variant"].as_str().unwrap()],
            }
        })
        .collect();

    // The same records, from the generator directly, with the same settings.
    let source = GeneratorSource::new(GeneratorConfig {
        partitions: 4,
        count: Some(20_000),
        rate: None,
        users: 50_000,
        titles: 2000,
        seed: 42,
        start_time: None,
        interval: None,
        disorder: None,
    })
    .unwrap();
    let mut expected = Vec::new();
    for p in 0..4 {
        let batch = source.partition(p).generate(usize::MAX).unwrap().batch;
        expected_rows(&batch, &mut expected);
    }
    assert!(
        expected.len() > 5_000,
        "the filter should keep a good share: {}",
        expected.len()
    );
    actual.sort();
    expected.sort();
    assert_eq!(actual.len(), expected.len());
    assert!(
        actual == expected,
        "quickstart rows differ from the independent computation"
    );
}

/// docker-compose.yml cannot be run here (no Docker engine): it is read, checked for what
/// makes it work (services, the image build, listeners, topics), and every pipeline it runs
/// is validated with the environment the compose file gives it.
#[test]
fn docker_compose_runs_pipelines_that_validate() {
    use sluice_engine::config::yaml;
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let mut problems = sluice_engine::config::Problems::new("docker-compose.yml");
    let env: HashMap<String, String> = HashMap::new();
    let doc = yaml::parse(&text, &env, &mut problems).expect("docker-compose.yml parses");
    assert!(problems.is_empty(), "{problems}");
    let services = doc.get("services").expect("services");
    let service = |name: &str| {
        services
            .get(name)
            .unwrap_or_else(|| panic!("service {name}"))
    };
    let list = |node: &sluice_engine::config::Node| -> Vec<String> {
        match &node.value {
            yaml::Value::Seq(items) => items
                .iter()
                .map(|i| i.scalar().unwrap().to_string())
                .collect(),
            yaml::Value::Scalar { text, .. } => vec![text.clone()],
            yaml::Value::Map(_) => panic!("a list"),
        }
    };
    // A service's `environment:` mapping.
    let environment = |s: &sluice_engine::config::Node| -> Vec<(String, String)> {
        match &s.get("environment").unwrap().value {
            yaml::Value::Map(entries) => entries
                .iter()
                .map(|(k, v)| (k.scalar().unwrap().into(), v.scalar().unwrap().into()))
                .collect(),
            _ => panic!("environment as a mapping"),
        }
    };

    // The pipeline a service's `command` runs, read with its environment.
    let pipeline_of = |command: &[String], vars: &[(String, String)]| {
        let file = root().join(&command[1]);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let text = std::fs::read_to_string(&file).unwrap();
        let config = parse(&text, &vars).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        (file, config)
    };

    let kafka = service("kafka");
    assert!(
        kafka
            .get("image")
            .unwrap()
            .scalar()
            .unwrap()
            .starts_with("apache/kafka:")
    );
    let kenv = kafka.get("environment").unwrap();
    assert_eq!(
        kenv.get("KAFKA_PROCESS_ROLES").unwrap().scalar(),
        Some("broker,controller")
    );
    let advertised = kenv
        .get("KAFKA_ADVERTISED_LISTENERS")
        .unwrap()
        .scalar()
        .unwrap();
    let topics_script = list(service("topics").get("command").unwrap()).join("\n");
    // `for t in views views-enriched; do kafka-topics.sh --create ...`
    let created: Vec<&str> = topics_script
        .split("for t in ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .expect("the topics loop")
        .split_whitespace()
        .collect();

    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo build --release --locked --bin sluice"));
    assert!(dockerfile.contains("COPY pipelines /app/pipelines"));

    // The `avro` profile: a schema registry on the broker, and the Avro example using it.
    let registry = service("schema-registry");
    assert_eq!(list(registry.get("profiles").unwrap()), ["avro"]);
    let image = registry.get("image").unwrap().scalar().unwrap();
    assert!(
        image.starts_with("confluentinc/cp-schema-registry:"),
        "{image}"
    );
    let renv = environment(registry);
    let store = &renv
        .iter()
        .find(|(k, _)| k == "SCHEMA_REGISTRY_KAFKASTORE_BOOTSTRAP_SERVERS")
        .unwrap()
        .1;
    assert!(advertised.contains(store.as_str()), "{store}: {advertised}");
    let avro = environment(service("orders-avro"));
    assert!(avro.contains(&(
        "SCHEMA_REGISTRY".into(),
        "http://schema-registry:8081".into()
    )));

    let mut pipelines = 0;
    for name in ["generate", "sluice", "orders-avro"] {
        let s = service(name);
        assert_eq!(
            s.get("build").and_then(|b| b.scalar()),
            Some("."),
            "{name} builds the Dockerfile"
        );
        let command = list(s.get("command").unwrap());
        let expected = if name == "sluice" { "worker" } else { "run" };
        assert_eq!(command[0], expected, "{name}: {command:?}");
        let vars = environment(s);
        let bootstrap = &vars.iter().find(|(k, _)| k == "KAFKA_BOOTSTRAP").unwrap().1;
        assert!(
            advertised.contains(&format!("PLAINTEXT://{bootstrap}")),
            "{name} connects to {bootstrap}, the broker advertises {advertised}"
        );
        let (file, config) = pipeline_of(&command, &vars);
        // The topics the pipeline reads and writes are created by the `topics` service.
        let mut topics = Vec::new();
        if let Some(k) = config.source.spec_as::<KafkaSourceConfig>() {
            topics.extend(k.topics.clone());
        }
        for output in &config.outputs {
            if let Some(k) = output.spec_as::<KafkaSinkConfig>() {
                topics.push(k.topic.clone());
            }
        }
        if let Some(k) = config
            .dead_letter
            .as_ref()
            .and_then(|d| d.spec_as::<KafkaSinkConfig>())
        {
            topics.push(k.topic.clone());
        }
        assert!(!topics.is_empty(), "{name} uses Kafka");
        for topic in topics {
            assert!(
                created.contains(&topic.as_str()),
                "topic {topic} is created: {created:?}"
            );
        }
        let validated = crate::sluice(&["validate", file.to_str().unwrap()]);
        assert!(
            validated.status.success(),
            "{}",
            crate::text(&validated.stderr)
        );
        pipelines += 1;
    }
    assert_eq!(pipelines, 3);

    // The `kinesis` profile: kinesalite, the streams, and two pipelines that use them.
    let kinesis = service("kinesis");
    assert_eq!(list(kinesis.get("profiles").unwrap()), ["kinesis"]);
    let serve = list(kinesis.get("command").unwrap()).join(" ");
    assert!(
        serve.contains("kinesalite@") && serve.contains("--port 4567"),
        "{serve}"
    );
    let streams_script = list(service("kinesis-streams").get("command").unwrap()).join("\n");
    let streams: Vec<&str> = streams_script
        .split("for s in ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .expect("the streams loop")
        .split_whitespace()
        .filter_map(|s| s.split(':').next())
        .collect();
    for name in ["kinesis-generate", "kinesis-quickstart"] {
        let s = service(name);
        assert_eq!(list(s.get("profiles").unwrap()), ["kinesis"]);
        assert_eq!(s.get("build").and_then(|b| b.scalar()), Some("."));
        let command = list(s.get("command").unwrap());
        assert_eq!(command[0], "run", "{name}: {command:?}");
        let (_, config) = pipeline_of(&command, &environment(s));
        let mut used = Vec::new();
        if let Some(k) = config.source.spec_as::<KinesisSourceConfig>() {
            assert_eq!(k.endpoint.as_deref(), Some("http://kinesis:4567"));
            used.push(k.stream.clone().unwrap());
        }
        for output in &config.outputs {
            if let Some(k) = output.spec_as::<KinesisSinkConfig>() {
                assert_eq!(k.endpoint.as_deref(), Some("http://kinesis:4567"));
                used.push(k.stream.clone().unwrap());
            }
        }
        assert!(!used.is_empty(), "{name} uses Kinesis");
        for stream in used {
            assert!(
                streams.contains(&stream.as_str()),
                "stream {stream} is created: {streams:?}"
            );
        }
    }
}

/// docs/kubernetes.md cannot be applied here (no cluster): its manifests are read, the
/// pipeline in its ConfigMap is validated, and the Deployment, volume and KEDA triggers are
/// checked against that pipeline and the metrics Sluice exports.
#[tokio::test]
async fn the_kubernetes_example_runs_workers_of_a_pipeline_that_validates() {
    use sluice_engine::config::{Node, yaml};
    let text = std::fs::read_to_string(root().join("docs/kubernetes.md")).unwrap();
    let blocks: Vec<&str> = text
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    let env: HashMap<String, String> = HashMap::new();
    let mut docs: Vec<Node> = Vec::new();
    for block in &blocks {
        for doc in block.split("\n---\n") {
            let mut problems = sluice_engine::config::Problems::new("docs/kubernetes.md");
            let node = yaml::parse(doc, &env, &mut problems).expect("a manifest parses");
            assert!(problems.is_empty(), "{problems}\n{doc}");
            docs.push(node);
        }
    }
    let of_kind = |kind: &str| -> Vec<&Node> {
        docs.iter()
            .filter(|d| d.get("kind").and_then(Node::scalar) == Some(kind))
            .collect()
    };
    let get = |node: &Node, path: &[&str]| -> Node {
        path.iter().fold(node.clone(), |n, k| {
            n.get(k)
                .unwrap_or_else(|| panic!("no `{k}` in {path:?}"))
                .clone()
        })
    };
    let seq = |node: &Node| -> Vec<Node> {
        match &node.value {
            yaml::Value::Seq(items) => items.clone(),
            _ => panic!("a list"),
        }
    };

    // The pipeline in the ConfigMap validates.
    let config_map = of_kind("ConfigMap")[0];
    let pipeline_text = get(config_map, &["data", "pipeline.yaml"])
        .scalar()
        .unwrap()
        .to_string();
    let config = parse(&pipeline_text, &[]).unwrap_or_else(|e| panic!("{e}"));
    sluice::plan::check(&config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let Some(kafka) = config.source.spec_as::<KafkaSourceConfig>() else {
        panic!("a Kafka source")
    };
    let checkpoint_dir = config
        .checkpoint
        .as_ref()
        .expect("a checkpoint dir")
        .dir
        .clone();

    // The Deployment runs `sluice worker` on it, names members by pod, shares the volume.
    let deployment = of_kind("Deployment")[0];
    let name = get(deployment, &["metadata", "name"])
        .scalar()
        .unwrap()
        .to_string();
    let container = seq(&get(
        deployment,
        &["spec", "template", "spec", "containers"],
    ))[0]
        .clone();
    let args: Vec<String> = seq(&get(&container, &["args"]))
        .iter()
        .map(|a| a.scalar().unwrap().to_string())
        .collect();
    assert_eq!(args[0], "worker", "{args:?}");
    let mounts = seq(&get(&container, &["volumeMounts"]));
    let mount_of = |volume: &str| -> String {
        mounts
            .iter()
            .find(|m| m.get("name").and_then(Node::scalar) == Some(volume))
            .and_then(|m| m.get("mountPath").and_then(Node::scalar))
            .unwrap_or_else(|| panic!("volume {volume} mounted"))
            .to_string()
    };
    assert_eq!(args[1], format!("{}/pipeline.yaml", mount_of("pipeline")));
    assert!(
        checkpoint_dir.starts_with(mount_of("checkpoints")),
        "{} is on the shared volume",
        checkpoint_dir.display()
    );
    assert!(
        seq(&get(&container, &["env"]))
            .iter()
            .any(|e| e.get("name").and_then(Node::scalar) == Some("SLUICE_MEMBER")),
        "members named by pod"
    );
    let claim = of_kind("PersistentVolumeClaim")[0];
    let modes: Vec<String> = seq(&get(claim, &["spec", "accessModes"]))
        .iter()
        .map(|m| m.scalar().unwrap().to_string())
        .collect();
    assert_eq!(modes, vec!["ReadWriteMany"]);

    // KEDA scales that Deployment on the group's lag, or on Sluice's lag metric.
    let scaled = of_kind("ScaledObject")[0];
    assert_eq!(
        get(scaled, &["spec", "scaleTargetRef", "name"]).scalar(),
        Some(name.as_str())
    );
    let kafka_trigger = get(&seq(&get(scaled, &["spec", "triggers"]))[0], &["metadata"]);
    assert_eq!(
        get(&kafka_trigger, &["consumerGroup"]).scalar(),
        Some(kafka.group.as_str())
    );
    assert!(
        kafka
            .topics
            .iter()
            .any(|t| Some(t.as_str()) == get(&kafka_trigger, &["topic"]).scalar())
    );
    assert_eq!(
        get(&kafka_trigger, &["bootstrapServers"]).scalar(),
        Some(kafka.bootstrap_servers.as_str())
    );
    let prometheus = blocks
        .iter()
        .find(|b| b.contains("type: prometheus"))
        .expect("a Prometheus trigger");
    let metrics = std::fs::read_to_string(root().join("src/metrics.rs")).unwrap();
    assert!(prometheus.contains(&format!(
        "sluice_lag_records{{pipeline=\"{}\"}}",
        config.name
    )));
    assert!(metrics.contains("\"sluice_lag_records\""));
}
