//! Records aggregated by the Kinesis Producer Library: several user records in one Kinesis
//! record, as the KPL writes them and the KCL reads them back.
//!
//! ```text
//! F3 89 9A C2 | AggregatedRecord (protobuf) | MD5 of the protobuf bytes (16 bytes)
//! ```
//! A record that starts with the magic bytes but whose digest does not match, or whose
//! protobuf does not parse, is a plain record (as the KCL reads it). So is an aggregate the
//! KCL would not hand out whole: one with no user record, more than [`MAX_USER_RECORDS`],
//! or a record naming a partition key the table does not have. Read as a plain record, its
//! bytes then fail to decode: a dead letter naming the shard and sequence, never records
//! dropped or keys made up unseen.

use std::sync::Arc;

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::Message;

pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// User records in one aggregate at most: empty user records take two bytes each, so a
/// 1 MiB aggregate could otherwise become half a million rows (and dead letters).
pub const MAX_USER_RECORDS: usize = 65_536;
const DIGEST_LEN: usize = 16;

#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<UserRecord>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UserRecord {
    #[prost(uint64, tag = "1")]
    pub partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    /// Decoded from a `Bytes` buffer, a slice of it: no copy per user record.
    #[prost(bytes = "bytes", tag = "3")]
    pub data: Bytes,
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Tag {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// The user records of `data` with their partition keys, when `data` is a KPL aggregate;
/// each record's bytes are a slice of `data`, each key shared by the records that have it.
pub fn deaggregate(data: &Bytes) -> Option<Vec<(Option<Arc<str>>, Bytes)>> {
    let body = data.strip_prefix(&MAGIC)?;
    if body.len() < DIGEST_LEN {
        return None;
    }
    let (message, digest) = body.split_at(body.len() - DIGEST_LEN);
    if Md5::digest(message).as_slice() != digest {
        return None;
    }
    let message = data.slice(MAGIC.len()..data.len() - DIGEST_LEN);
    let aggregate = AggregatedRecord::decode(message).ok()?;
    let keyed = |r: &UserRecord| {
        usize::try_from(r.partition_key_index)
            .is_ok_and(|i| i < aggregate.partition_key_table.len())
    };
    if aggregate.records.is_empty()
        || aggregate.records.len() > MAX_USER_RECORDS
        || !aggregate.records.iter().all(keyed)
    {
        return None;
    }
    let keys: Vec<Arc<str>> = aggregate
        .partition_key_table
        .into_iter()
        .map(Arc::from)
        .collect();
    Some(
        aggregate
            .records
            .into_iter()
            .map(|r| {
                // In the table: checked above.
                let key = keys[r.partition_key_index as usize].clone();
                (Some(key), r.data)
            })
            .collect(),
    )
}

/// A KPL aggregate of `records` (partition key, data), as the KPL writes one.
pub fn aggregate(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut keys: Vec<String> = Vec::new();
    let mut user = Vec::with_capacity(records.len());
    for (key, data) in records {
        let index = match keys.iter().position(|k| k == key) {
            Some(i) => i,
            None => {
                keys.push((*key).to_string());
                keys.len() - 1
            }
        };
        user.push(UserRecord {
            partition_key_index: index as u64,
            explicit_hash_key_index: None,
            data: Bytes::copy_from_slice(data),
            tags: Vec::new(),
        });
    }
    frame(&AggregatedRecord {
        partition_key_table: keys,
        explicit_hash_key_table: Vec::new(),
        records: user,
    })
}

/// `aggregate` as a Kinesis record's data: the magic bytes, the protobuf, its digest.
fn frame(aggregate: &AggregatedRecord) -> Vec<u8> {
    let message = aggregate.encode_to_vec();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&message);
    out.extend_from_slice(&Md5::digest(&message));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aggregate_gives_back_its_user_records_in_order() {
        let made = Bytes::from(aggregate(&[
            ("a", b"{\"id\":1}"),
            ("b", b"{\"id\":2}"),
            ("a", b"{\"id\":3}"),
        ]));
        let records = deaggregate(&made).unwrap();
        let read: Vec<(Option<&str>, &[u8])> = records
            .iter()
            .map(|(k, d)| (k.as_deref(), d.as_ref()))
            .collect();
        assert_eq!(
            read,
            [
                (Some("a"), &b"{\"id\":1}"[..]),
                (Some("b"), b"{\"id\":2}"),
                (Some("a"), b"{\"id\":3}"),
            ]
        );
        // The records are slices of the aggregate, not copies.
        let inside = made.as_ptr_range();
        assert!(records.iter().all(|(_, d)| inside.contains(&d.as_ptr())));
    }

    #[test]
    fn a_record_that_only_looks_aggregated_is_a_plain_record() {
        let mut made = aggregate(&[("a", b"x")]);
        let last = made.len() - 1;
        made[last] ^= 1; // the digest no longer matches
        assert_eq!(deaggregate(&Bytes::from(made)), None);
        assert_eq!(deaggregate(&Bytes::from_static(&MAGIC)), None);
        assert_eq!(deaggregate(&Bytes::from_static(b"{\"id\":1}")), None);
        let mut garbage = MAGIC.to_vec();
        garbage.extend_from_slice(&[0xFF; 3]);
        garbage.extend_from_slice(&Md5::digest([0xFF; 3]));
        assert_eq!(deaggregate(&Bytes::from(garbage)), None);
    }

    fn framed(aggregate: AggregatedRecord) -> Bytes {
        Bytes::from(frame(&aggregate))
    }

    #[test]
    fn an_aggregate_the_kcl_would_refuse_is_a_plain_record_not_rows_made_up_or_dropped() {
        let user = |key: u64| UserRecord {
            partition_key_index: key,
            explicit_hash_key_index: None,
            data: Bytes::new(),
            tags: Vec::new(),
        };
        let with = |records: Vec<UserRecord>| AggregatedRecord {
            partition_key_table: vec!["k".into()],
            explicit_hash_key_table: Vec::new(),
            records,
        };
        // No user record: it was dropped unseen.
        assert_eq!(deaggregate(&framed(with(Vec::new()))), None);
        // A key index past the table: its key was made up as null.
        assert_eq!(deaggregate(&framed(with(vec![user(0), user(1)]))), None);
        // Empty user records take two bytes each: one row each past the limit.
        let many = with((0..=MAX_USER_RECORDS).map(|_| user(0)).collect());
        assert_eq!(deaggregate(&framed(many)), None);
        let most = deaggregate(&framed(with(
            (0..MAX_USER_RECORDS).map(|_| user(0)).collect(),
        )));
        assert_eq!(most.map(|r| r.len()), Some(MAX_USER_RECORDS));
    }
}
