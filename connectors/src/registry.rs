//! Every source and sink kind, by the `type:` that names it. A new connector is a folder
//! beside these with a configuration type implementing `SourceSpec` or `SinkSpec`
//! (`sluice_engine::connector`), and one line here.

use sluice_engine::connector::{SinkEntry, SourceEntry, parse_sink, parse_source};

use crate::{file, generator, kafka, kinesis, nexmark, null, stdout};

pub static SOURCES: &[SourceEntry] = &[
    SourceEntry {
        name: "generator",
        summary: "synthetic view events of a streaming service, deterministic by seed, counted or endless",
        parse: parse_source::<generator::GeneratorConfig>,
    },
    SourceEntry {
        name: "nexmark",
        summary: "the Nexmark benchmark's auctions, bids and people",
        parse: parse_source::<nexmark::NexmarkConfig>,
    },
    SourceEntry {
        name: "file",
        summary: "JSON lines, CSV or Parquet files, a file per partition",
        parse: parse_source::<file::FileSourceConfig>,
    },
    SourceEntry {
        name: "kafka",
        summary: "topics read as a consumer group member, a partition per Kafka partition",
        parse: parse_source::<kafka::KafkaSourceConfig>,
    },
    SourceEntry {
        name: "kinesis",
        summary: "a Kinesis data stream, a partition per shard, followed through splits and merges",
        parse: parse_source::<kinesis::KinesisSourceConfig>,
    },
];

pub static SINKS: &[SinkEntry] = &[
    SinkEntry {
        name: "file",
        summary: "JSON lines, CSV or Parquet files, rolled by size or age",
        parse: parse_sink::<file::FileSinkConfig>,
    },
    SinkEntry {
        name: "kafka",
        summary: "a topic, through an idempotent producer (acks=all)",
        parse: parse_sink::<kafka::KafkaSinkConfig>,
    },
    SinkEntry {
        name: "kinesis",
        summary: "a Kinesis data stream, through PutRecords (acknowledged before each checkpoint)",
        parse: parse_sink::<kinesis::KinesisSinkConfig>,
    },
    SinkEntry {
        name: "stdout",
        summary: "each row as a JSON object on its own line",
        parse: parse_sink::<stdout::StdoutConfig>,
    },
    SinkEntry {
        name: "null",
        summary: "discards every row, counting them",
        parse: parse_sink::<null::NullConfig>,
    },
];
