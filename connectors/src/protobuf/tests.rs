//! Protobuf messages into columns: every kind of field, framing, and messages refused.

use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch};
use prost::Message as _;
use prost_reflect::{DynamicMessage, Value};

use super::*;

const PROTO: &str = r#"
syntax = "proto3";
package shop;
import "google/protobuf/timestamp.proto";
message Order {
  int64 id = 1;
  optional string user = 2;
  google.protobuf.Timestamp at = 3;
  Address address = 4;
  repeated int64 items = 5;
  oneof payment { string card = 6; string voucher = 7; }
  Status status = 8;
  map<string, int32> counts = 9;
  message Address { string city = 1; optional int32 zip = 2; }
  enum Status { NEW = 0; PAID = 1; }
}
message Refund { int64 order_id = 1; }
message Node { Node next = 1; }
"#;

fn config(dir: &std::path::Path, message: &str, registry: bool) -> ProtobufConfig {
    std::fs::write(dir.join("order.proto"), PROTO).unwrap();
    ProtobufConfig {
        schema: dir.join("order.proto"),
        message: message.into(),
        include: Vec::new(),
        schema_registry: registry.then(|| RegistryConfig::at("http://127.0.0.1:9")),
    }
}

/// An order with every field set as `i` says.
fn order(format: &ProtobufFormat, i: i64) -> DynamicMessage {
    let d = &format.message;
    let mut m = DynamicMessage::new(d.clone());
    m.set_field_by_name("id", Value::I64(i));
    if i % 2 == 0 {
        m.set_field_by_name("user", Value::String(format!("u{i}")));
        m.set_field_by_name("card", Value::String("visa".into()));
    } else {
        m.set_field_by_name("voucher", Value::String("V1".into()));
    }
    let mut at = DynamicMessage::new(
        d.get_field_by_name("at")
            .unwrap()
            .kind()
            .as_message()
            .unwrap()
            .clone(),
    );
    at.set_field_by_name("seconds", Value::I64(1_700_000_000 + i));
    at.set_field_by_name("nanos", Value::I32(5));
    m.set_field_by_name("at", Value::Message(at));
    let mut address = DynamicMessage::new(
        d.get_field_by_name("address")
            .unwrap()
            .kind()
            .as_message()
            .unwrap()
            .clone(),
    );
    address.set_field_by_name("city", Value::String("Lagos".into()));
    m.set_field_by_name("address", Value::Message(address));
    m.set_field_by_name("items", Value::List((0..i).map(Value::I64).collect()));
    m.set_field_by_name("status", Value::EnumNumber((i % 2) as i32));
    let mut counts = std::collections::HashMap::new();
    counts.insert(prost_reflect::MapKey::String("b".into()), Value::I32(2));
    counts.insert(prost_reflect::MapKey::String("a".into()), Value::I32(1));
    m.set_field_by_name("counts", Value::Map(counts));
    m
}

/// `body` framed with schema `id` and the index path `[index]` (`[0]` as one 0 byte).
fn framed(id: u32, index: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&id.to_be_bytes());
    if index == 0 {
        out.push(0);
    } else {
        out.extend_from_slice(&[2, index * 2]);
    }
    out.extend_from_slice(body);
    out
}

#[test]
fn plain_messages_decode_into_columns() {
    let dir = tempfile::tempdir().unwrap();
    let format = Arc::new(ProtobufFormat::open(&config(dir.path(), "shop.Order", false)).unwrap());
    let names: Vec<String> = format
        .records()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "id", "user", "at", "address", "items", "card", "voucher", "status", "counts"
        ]
    );
    let bodies: Vec<Vec<u8>> = (0..3).map(|i| order(&format, i).encode_to_vec()).collect();
    let payloads: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
    let mut decoder = ProtobufDecoder::new(format, 1 << 20);
    let (batch, bad) = decoder.decode_each(&payloads, |_| false);
    assert!(bad.is_empty(), "{bad:?}");
    let batch = batch.unwrap();
    let column = |name: &str| batch.column_by_name(name).unwrap().clone();
    let ids = column("id");
    assert_eq!(
        ids.as_any().downcast_ref::<Int64Array>().unwrap().values(),
        &[0, 1, 2]
    );
    let user = column("user");
    assert_eq!(
        (user.as_string::<i32>().value(0), user.is_null(1)),
        ("u0", true)
    );
    let at = column("at");
    let at = at.as_primitive::<arrow::datatypes::TimestampNanosecondType>();
    assert_eq!(at.value(1), 1_700_000_001_000_000_005);
    let address = column("address");
    assert_eq!(
        address.as_struct().column(0).as_string::<i32>().value(2),
        "Lagos"
    );
    assert!(
        address.as_struct().column(1).is_null(2),
        "an optional field not set is null"
    );
    let items = column("items");
    assert_eq!(items.as_list::<i32>().value(2).len(), 2);
    let (card, voucher) = (column("card"), column("voucher"));
    assert_eq!(
        (card.is_null(0), voucher.is_null(0)),
        (false, true),
        "a oneof's other fields are null"
    );
    assert_eq!(column("status").as_string::<i32>().value(1), "PAID");
    let counts = column("counts");
    let keys = counts
        .as_map()
        .keys()
        .as_string::<i32>()
        .iter()
        .flatten()
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(keys, ["a", "b"], "map entries ordered by key");
}

#[test]
fn framed_messages_of_another_type_or_index_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let format = Arc::new(ProtobufFormat::open(&config(dir.path(), "shop.Order", true)).unwrap());
    let file = protox_parse::parse("order.proto", PROTO).unwrap();
    format
        .writers
        .lock()
        .unwrap()
        .insert(4, Writer::File(Box::new(file)));
    let good = framed(4, 0, &order(&format, 7).encode_to_vec());
    let refund = framed(4, 1, &[8, 1]);
    let out_of_range = framed(4, 9, &[8, 1]);
    let unknown = framed(999, 0, &[8, 1]);
    let truncated = good[..good.len() - 3].to_vec();
    let payloads: Vec<&[u8]> = vec![
        &good,
        &refund,
        &out_of_range,
        &unknown,
        b"\x01\x00\x00\x00\x04\x00",
        &truncated,
        b"",
    ];
    let mut decoder = ProtobufDecoder::new(format, 1 << 20);
    let (batch, bad) = decoder.decode_each(&payloads, |_| false);
    assert_eq!(batch.unwrap().num_rows(), 1);
    let why: Vec<(usize, &str)> = bad.iter().map(|(i, w)| (*i, w.as_str())).collect();
    assert_eq!(why.len(), 6, "{why:?}");
    assert!(
        why[0]
            .1
            .contains("the message is a shop.Refund, not a shop.Order"),
        "{why:?}"
    );
    assert!(why[1].1.contains("no message at index path [9]"), "{why:?}");
    assert!(
        why[2].1.contains("schema id 999 was not fetched"),
        "{why:?}"
    );
    assert!(why[3].1.contains("Confluent wire format"), "{why:?}");
    assert!(why[4].1.contains("not a shop.Order"), "{why:?}");
    assert!(
        why[5].1.contains("Confluent wire format"),
        "an empty value is not framed: {why:?}"
    );
}

#[test]
fn a_schema_or_message_that_cannot_be_columns_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let err = |message: &str| {
        ProtobufFormat::open(&config(dir.path(), message, false))
            .err()
            .unwrap()
            .to_string()
    };
    assert!(
        err("shop.Node").contains("holds itself (shop.Node → shop.Node)"),
        "{}",
        err("shop.Node")
    );
    assert!(
        err("shop.Nope").contains("declares no message `shop.Nope`"),
        "{}",
        err("shop.Nope")
    );
    let mut bad = config(dir.path(), "shop.Order", false);
    std::fs::write(&bad.schema, "syntax = \"proto3\"; message {").unwrap();
    bad.schema = bad.schema.clone();
    let e = ProtobufFormat::open(&bad).err().unwrap().to_string();
    assert!(e.contains("the Protobuf schema"), "{e}");
}

fn sink_config(dir: &std::path::Path) -> ProtobufSinkConfig {
    let source = config(dir, "shop.Order", false);
    ProtobufSinkConfig {
        schema: source.schema,
        message: source.message,
        include: Vec::new(),
        schema_registry: None,
        subject: None,
        subject_strategy: Default::default(),
    }
}

/// Rows written as messages read back as the same rows; a row Protobuf cannot hold (a
/// null where the field has no presence, a null list item, an enum name the enum does
/// not have) is refused alone with the reason.
#[tokio::test]
async fn rows_written_as_messages_read_back_and_rows_protobuf_cannot_hold_are_refused() {
    use arrow::array::{ListArray, StringArray};
    use arrow::datatypes::{DataType, Field, Int32Type, Schema};
    let dir = tempfile::tempdir().unwrap();
    let format = Arc::new(ProtobufFormat::open(&config(dir.path(), "shop.Order", false)).unwrap());
    let bodies: Vec<Vec<u8>> = (0..4).map(|i| order(&format, i).encode_to_vec()).collect();
    let payloads: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
    let (rows, _) = ProtobufDecoder::new(format.clone(), 1 << 20).decode_each(&payloads, |_| false);
    let rows = rows.unwrap();

    let mut encoder = ProtobufEncoder::open(&sink_config(dir.path()), "t", &rows.schema()).unwrap();
    let (mut out, mut ends, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    encoder
        .encode(&rows, &mut out, &mut ends, &mut refused)
        .await
        .unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    let mut start = 0;
    for (i, end) in ends.iter().enumerate() {
        let back = DynamicMessage::decode(format.message.clone(), &out[start..*end]).unwrap();
        // Both as decoded: a default set explicitly is the default not set.
        let want = DynamicMessage::decode(format.message.clone(), bodies[i].as_slice()).unwrap();
        assert_eq!(back, want, "row {i}");
        start = *end;
    }

    // `id` (no presence) null, an item null, a status no enum value has.
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int32, true),
        Field::new(
            "items",
            DataType::List(Arc::new(Field::new_list_field(DataType::Int32, true))),
            true,
        ),
        Field::new("status", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(arrow::array::Int32Array::from(vec![
                Some(1),
                None,
                Some(3),
                Some(4),
            ])),
            Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
                Some(vec![Some(1)]),
                Some(vec![]),
                Some(vec![Some(2), None]),
                None,
            ])),
            Arc::new(StringArray::from(vec!["PAID", "NEW", "NEW", "LOST"])),
        ],
    )
    .unwrap();
    let mut encoder = ProtobufEncoder::open(&sink_config(dir.path()), "t", &schema).unwrap();
    let (mut out, mut ends, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    encoder
        .encode(&batch, &mut out, &mut ends, &mut refused)
        .await
        .unwrap();
    let why: Vec<(u32, bool)> = refused
        .iter()
        .map(|(row, w)| {
            let said = [
                "`id` is null",
                "`items` holds a null item",
                "LOST is not a value of shop.Order.Status",
            ];
            (*row, said.iter().any(|s| w.contains(s)))
        })
        .collect();
    assert_eq!(why, [(1, true), (2, true), (3, true)], "{refused:?}");
    assert_eq!(ends.len(), 4);
    let first = DynamicMessage::decode(format.message.clone(), &out[..ends[0]]).unwrap();
    assert_eq!(
        first.get_field_by_name("id").unwrap().as_i64(),
        Some(1),
        "an int32 column cast to int64"
    );
}

#[test]
fn columns_that_are_no_field_or_of_another_type_are_refused_at_open() {
    use arrow::datatypes::{DataType, Field, Schema};
    let dir = tempfile::tempdir().unwrap();
    let schema = Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("extra", DataType::Int64, false),
    ]);
    let err = ProtobufEncoder::open(&sink_config(dir.path()), "t", &schema)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`extra` is not a field of shop.Order"),
        "{err}"
    );
    assert!(
        err.contains("`id` is Utf8; the field is read as Int64"),
        "{err}"
    );
}

/// A writer schema comes as .proto text or a base64 descriptor; one whose declaration of
/// the message reads wrong (a field number of another type, or repeated on one side only)
/// is refused with the field named, while Protobuf's compatible changes pass.
#[test]
fn writer_schemas_that_read_wrong_are_refused() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let format = ProtobufFormat::open(&config(dir.path(), "shop.Order", true)).unwrap();
    let text =
        |fields: &str| format!("syntax = \"proto3\"; package shop; message Order {{ {fields} }}");
    let file = |fields: &str| match writer_of(1, &text(fields), Some("PROTOBUF")) {
        Writer::File(file) => file,
        Writer::Refused(why) => panic!("{why}"),
    };
    // int32 to int64 and a field the pipeline does not have: compatible.
    assert_eq!(
        conflicts(&file("int32 id = 1; string note = 42;"), &format.message),
        None
    );
    let why = conflicts(&file("string id = 1;"), &format.message).unwrap();
    assert!(
        why.contains("field 1 (`id` of shop.Order) is String"),
        "{why}"
    );
    let why = conflicts(&file("int64 items = 5;"), &format.message).unwrap();
    assert!(why.contains("repeated on one side only"), "{why}");
    // In a nested message too.
    let why = conflicts(
        &file("Address address = 4; message Address { int64 city = 1; }"),
        &format.message,
    )
    .unwrap();
    assert!(why.contains("`city` of shop.Order.Address"), "{why}");
    // A type from an import (not in the file) is not checked; an enum of the file reads
    // as the pipeline's enum.
    assert_eq!(
        conflicts(
            &file("google.protobuf.Timestamp at = 3; S status = 8; enum S { A = 0; }"),
            &format.message
        ),
        None
    );
    // The same file as a base64 descriptor reads the same; another type is refused.
    let serialized =
        base64::engine::general_purpose::STANDARD.encode(file("int64 id = 1;").encode_to_vec());
    assert!(matches!(
        writer_of(2, &serialized, Some("PROTOBUF")),
        Writer::File(_)
    ));
    assert!(
        matches!(writer_of(3, "{}", None), Writer::Refused(why) if why.contains("not Protobuf"))
    );
}

/// A null value (a tombstone) is no message; an empty value is the message of defaults.
#[test]
fn an_empty_value_is_a_message_of_defaults_and_a_null_one_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let format = Arc::new(ProtobufFormat::open(&config(dir.path(), "shop.Order", false)).unwrap());
    let mut decoder = ProtobufDecoder::new(format, 1 << 20);
    let (batch, bad) = decoder.decode_each(&[b"", b""], |i| i == 1);
    let batch = batch.unwrap();
    assert_eq!(batch.num_rows(), 1);
    assert_eq!(
        batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0),
        0
    );
    assert_eq!(bad.len(), 1);
    assert!(bad[0].1.contains("tombstone"), "{bad:?}");
}

/// A value a widening cast cannot hold refuses its row (it would be written as an unset
/// field); a struct whose children are not the message's fields by name is refused at
/// open (its values would be written nowhere).
#[tokio::test]
async fn values_out_of_a_fields_range_and_renamed_struct_children_are_refused() {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Fields, Schema};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.proto"),
        "syntax = \"proto3\"; package t; message M { optional int32 n = 1; Sub s = 2; message Sub { int64 a = 1; } }",
    )
    .unwrap();
    let sink = ProtobufSinkConfig {
        schema: dir.path().join("m.proto"),
        message: "t.M".into(),
        include: Vec::new(),
        schema_registry: None,
        subject: None,
        subject_strategy: Default::default(),
    };
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int64Array::from(vec![7, 3_000_000_000]))],
    )
    .unwrap();
    let mut encoder = ProtobufEncoder::open(&sink, "t", &schema).unwrap();
    let (mut out, mut ends, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    encoder
        .encode(&batch, &mut out, &mut ends, &mut refused)
        .await
        .unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, 1);
    assert!(
        refused[0]
            .1
            .contains("`n` holds a value a Int32 field cannot"),
        "{refused:?}"
    );
    assert_eq!(&out[..ends[0]], &[8, 7]);

    let renamed = Fields::from(vec![Field::new("b", DataType::Int64, true)]);
    let schema = Schema::new(vec![Field::new("s", DataType::Struct(renamed), true)]);
    let err = ProtobufEncoder::open(&sink, "t", &schema)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`s` is Struct"), "{err}");
}
