//! Change events into rows: both envelope forms, every op, tombstones, bad events.

use arrow::array::{Int64Array, TimestampMillisecondArray};

use super::*;

fn table() -> Schema {
    Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("email", DataType::Utf8, true),
    ])
}

const EVENTS: [&str; 6] = [
    // A snapshot read, with the `schema`/`payload` wrapper (schemas.enable).
    r#"{"schema":{"type":"struct"},"payload":{"before":null,"after":{"id":1,"email":"a@x"},"op":"r","ts_ms":1000}}"#,
    // An insert, an update and a delete without it.
    r#"{"before":null,"after":{"id":2,"email":"b@x"},"source":{"db":"shop"},"op":"c","ts_ms":2000}"#,
    r#"{"before":{"id":2,"email":"b@x"},"after":{"id":2,"email":"b2@x"},"op":"u","ts_ms":3000}"#,
    r#"{"before":{"id":1,"email":null},"after":null,"op":"d","ts_ms":4000}"#,
    // The tombstone after the delete.
    "",
    r#"{"payload":{"before":null,"after":{"id":3,"email":null},"op":"c","ts_ms":5000}}"#,
];

fn column<'a>(batch: &'a RecordBatch, name: &str) -> &'a ArrayRef {
    batch.column_by_name(name).unwrap()
}

#[test]
fn change_events_become_one_row_each() {
    let mut decoder = DebeziumDecoder::new(&table(), &DebeziumConfig::default(), 1 << 20);
    let payloads: Vec<&[u8]> = EVENTS.iter().map(|e| e.as_bytes()).collect();
    let decoded = decoder.decode_each(&payloads, |i| payloads[i].is_empty());
    assert!(decoded.bad.is_empty(), "{:?}", decoded.bad);
    assert_eq!(decoded.skipped, [4]);
    let rows = decoded.rows.unwrap();
    assert_eq!(rows.schema(), records_schema(&table()));
    let ids = column(&rows, "id")
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!(
        ids.values(),
        &[1, 2, 2, 1, 3],
        "a delete's row is its before image"
    );
    let ops: Vec<&str> = column(&rows, OP)
        .as_string::<i32>()
        .iter()
        .flatten()
        .collect();
    assert_eq!(ops, ["r", "c", "u", "d", "c"]);
    let emails = column(&rows, "email").as_string::<i32>();
    assert_eq!(
        emails.value(2),
        "b2@x",
        "an update's row is its after image"
    );
    assert!(emails.is_null(3) && emails.is_null(4));
    let before = column(&rows, BEFORE).as_struct();
    assert!(before.is_null(0) && before.is_null(1));
    assert_eq!(before.column(1).as_string::<i32>().value(2), "b@x");
    let ts = column(&rows, TS_MS)
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .unwrap();
    assert_eq!(ts.values(), &[1000, 2000, 3000, 4000, 5000]);
}

#[test]
fn kept_tombstones_are_rows_where_their_messages_were() {
    let config = DebeziumConfig {
        tombstones: Tombstones::Keep,
    };
    let mut decoder = DebeziumDecoder::new(&table(), &config, 1 << 20);
    let payloads: Vec<&[u8]> = EVENTS.iter().map(|e| e.as_bytes()).collect();
    let decoded = decoder.decode_each(&payloads, |i| payloads[i].is_empty());
    assert!(decoded.skipped.is_empty());
    let rows = decoded.rows.unwrap();
    let ops: Vec<&str> = column(&rows, OP)
        .as_string::<i32>()
        .iter()
        .flatten()
        .collect();
    assert_eq!(ops, ["r", "c", "u", "d", "tombstone", "c"]);
    assert!(column(&rows, "id").is_null(4));
}

#[test]
fn messages_that_are_no_row_change_are_named() {
    let mut decoder = DebeziumDecoder::new(&table(), &DebeziumConfig::default(), 1 << 20);
    let payloads: Vec<&[u8]> = vec![
        br#"{"after":{"id":1},"op":"c"}"#,
        br#"{"id":5,"email":"plain row"}"#,
        br#"{"before":null,"after":null,"op":"t","ts_ms":1}"#,
        br#"{"before":null,"after":null,"op":"c"}"#,
        br#"{"before":null,"after":null,"op":"d"}"#,
        br#"{"after":{"id":"x"},"op":"c"}"#,
        b"not json",
        br#"{"after":{"id":9},"op":"u"}"#,
        // An empty value that is not null: no tombstone, and no event.
        b"",
    ];
    let decoded = decoder.decode_each(&payloads, |_| false);
    let ids = column(decoded.rows.as_ref().unwrap(), "id")
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .values()
        .to_vec();
    assert_eq!(ids, [1, 9]);
    let bad: Vec<usize> = decoded.bad.iter().map(|(i, _)| *i).collect();
    assert_eq!(bad, [1, 2, 3, 4, 5, 6, 8], "{:?}", decoded.bad);
    let why = |i: usize| decoded.bad.iter().find(|(b, _)| *b == i).unwrap().1.clone();
    assert!(why(1).contains("no `op`"), "{}", why(1));
    assert!(why(2).contains("truncate"), "{}", why(2));
    assert!(
        why(3).contains("`c` event without its `after` image"),
        "{}",
        why(3)
    );
    assert!(
        why(4).contains("`d` event without its `before` image"),
        "{}",
        why(4)
    );
}

/// Kept tombstones between events that are bad (not JSON) and invalid (no row): every
/// row where its message was, each message a row, a dead letter or skipped, never two.
#[test]
fn kept_tombstones_among_bad_events_keep_their_places() {
    let config = DebeziumConfig {
        tombstones: Tombstones::Keep,
    };
    let mut decoder = DebeziumDecoder::new(&table(), &config, 1 << 20);
    let payloads: Vec<&[u8]> = vec![
        b"",
        br#"{"after":{"id":1},"op":"c"}"#,
        b"{",
        b"",
        br#"{"op":"t"}"#,
        br#"{"after":{"id":2},"op":"r"}"#,
        b"",
    ];
    let decoded = decoder.decode_each(&payloads, |i| payloads[i].is_empty());
    let bad: Vec<usize> = decoded.bad.iter().map(|(i, _)| *i).collect();
    assert_eq!(bad, [2, 4]);
    let rows = decoded.rows.unwrap();
    let ops: Vec<&str> = column(&rows, OP)
        .as_string::<i32>()
        .iter()
        .flatten()
        .collect();
    assert_eq!(ops, ["tombstone", "c", "tombstone", "r", "tombstone"]);
    let ids = column(&rows, "id")
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!(
        ids.iter().collect::<Vec<_>>(),
        [None, Some(1), None, Some(2), None]
    );
}
