//! What the stream sources (Kafka, Kinesis) share in their configuration.

use serde::Deserialize;

/// `start_from`: where a partition with nothing checkpointed starts.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum StartFrom {
    /// Its oldest record (Kafka `earliest`, Kinesis `trim_horizon`).
    Earliest,
    /// Records written from now on.
    #[default]
    Latest,
    /// The first record at or after this time, in milliseconds since the epoch.
    Time(i64),
}

impl StartFrom {
    /// Reads `earliest` (as the source names it: `earliest`, `trim_horizon`), `latest` or an
    /// RFC 3339 time.
    pub fn read(text: &str, earliest: &str) -> Result<StartFrom, String> {
        match text {
            "latest" => Ok(StartFrom::Latest),
            t if t == earliest => Ok(StartFrom::Earliest),
            t => crate::generator::parse_time_ms(t)
                .map(StartFrom::Time)
                .ok_or_else(|| {
                    format!(
                        "`{t}` is not {earliest}, latest or an RFC 3339 time such as 2026-01-31T12:00:00Z"
                    )
                }),
        }
    }
}

/// Kafka's spelling.
impl<'de> Deserialize<'de> for StartFrom {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        StartFrom::read(&String::deserialize(de)?, "earliest").map_err(serde::de::Error::custom)
    }
}

/// Kinesis's spelling (`trim_horizon`), for `#[serde(deserialize_with)]`.
pub fn kinesis_start_from<'de, D: serde::Deserializer<'de>>(de: D) -> Result<StartFrom, D::Error> {
    StartFrom::read(&String::deserialize(de)?, "trim_horizon").map_err(serde::de::Error::custom)
}

/// The payload format of a Kafka or Kinesis source or sink: `json` (one JSON object per
/// record), `avro` (Confluent-framed Avro: see [`crate::avro`]), `protobuf` (plain or
/// Confluent-framed: see [`crate::protobuf`]) or, for sources, `debezium` (change events
/// in Debezium's JSON or Avro envelope: see [`crate::debezium`]); see [`crate::format`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageFormat {
    #[default]
    Json,
    Avro,
    Protobuf,
    Debezium,
}
