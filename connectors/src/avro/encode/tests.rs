//! The Avro encoder: rows out and back, refusals, schemas that do not fit.
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Decimal128Array, Int64Array, ListArray, StringArray, StructArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Fields, Int64Type, TimeUnit};

use super::*;
use crate::avro::{AvroConfig, AvroDecoder, AvroFormat};

fn config(schema: Option<PathBuf>) -> AvroSinkConfig {
    AvroSinkConfig {
        schema,
        schema_registry: RegistryConfig::at("http://127.0.0.1:9"),
        subject: None,
        subject_strategy: SubjectStrategy::Topic,
        schema_id: None,
    }
}

/// Nullable strings, timestamps, decimals, a nested record and an array: rows into a
/// derived writer schema and back, unchanged.
fn rows() -> RecordBatch {
    let point = Fields::from(vec![
        Field::new("x", DataType::Int64, false),
        Field::new("label", DataType::Utf8, true),
    ]);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![1, 2, 3])),
        Arc::new(StringArray::from(vec![Some("a"), None, Some("c\nd")])),
        Arc::new(
            TimestampMicrosecondArray::from(vec![0, 1_700_000_000_123_456, -5])
                .with_timezone("+00:00"),
        ),
        Arc::new(
            Decimal128Array::from(vec![12345, -1, 0])
                .with_precision_and_scale(10, 2)
                .unwrap(),
        ),
        Arc::new(StructArray::new(
            point.clone(),
            vec![
                Arc::new(Int64Array::from(vec![7, 8, 9])),
                Arc::new(StringArray::from(vec![None, Some("p"), Some("q")])),
            ],
            None,
        )),
        Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
            Some(vec![Some(1), Some(2)]),
            Some(vec![]),
            Some(vec![Some(3)]),
        ])),
    ];
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("user", DataType::Utf8, true),
        Field::new(
            "at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            false,
        ),
        Field::new("amount", DataType::Decimal128(10, 2), false),
        Field::new("point", DataType::Struct(point), false),
        Field::new(
            "tags",
            DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true))),
            false,
        ),
    ]);
    RecordBatch::try_new(Arc::new(schema), columns).unwrap()
}

/// An encoder framing with `id`, as if the registry had given it.
fn encoder(config: &AvroSinkConfig, input: &Schema, id: u32) -> AvroEncoder {
    let mut encoder = AvroEncoder::open(config, "views-out", input).unwrap();
    let writer = AvroSchema::new(encoder.schema_json().unwrap().to_string());
    encoder.build(writer, id).unwrap();
    encoder
}

#[tokio::test]
async fn rows_encode_into_a_derived_schema_and_decode_back_unchanged() {
    let batch = rows();
    let mut encoder = encoder(&config(None), &batch.schema(), 42);
    let (mut out, mut ends, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    encoder
        .encode(&batch, &mut out, &mut ends, &mut refused)
        .await
        .unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(ends.len(), 3);
    let mut messages = Vec::new();
    let mut start = 0;
    for end in &ends {
        assert_eq!(
            &out[start..start + 5],
            &[0, 0, 0, 0, 42],
            "Confluent framing"
        );
        messages.push(&out[start..*end]);
        start = *end;
    }

    // Read back with the writer schema as the reader schema.
    let json = encoder.schema_json().unwrap().to_string();
    assert!(json.contains("\"name\":\"views_out\""), "{json}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.avsc"), &json).unwrap();
    let format = AvroFormat::open(
        &AvroConfig {
            schema: Some(dir.path().join("w.avsc")),
            schema_registry: RegistryConfig::at("http://127.0.0.1:9"),
            subject: None,
        },
        &[],
    )
    .unwrap();
    assert!(format.add_writer(42, json));
    let mut decoder = AvroDecoder::new(Arc::new(format), 1 << 20);
    let (back, bad) = decoder.decode_each(&messages);
    assert!(bad.is_empty(), "{bad:?}");
    let back = back.unwrap();
    for (i, column) in batch.columns().iter().enumerate() {
        assert_eq!(
            back.column(i).to_data(),
            column.to_data(),
            "column {}",
            batch.schema().field(i).name()
        );
    }
}

/// A given `.avsc` takes the columns it names; a row with a null where it has no null
/// is refused with the reason, the others are written.
#[tokio::test]
async fn a_row_the_writer_schema_cannot_hold_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.avsc");
    std::fs::write(
        &path,
        r#"{"type":"record","name":"Out","fields":[{"name":"user","type":"string"},{"name":"id","type":"long"}]}"#,
    )
    .unwrap();
    let batch = rows();
    let mut encoder = encoder(&config(Some(path)), &batch.schema(), 3);
    let (mut out, mut ends, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    encoder
        .encode(&batch, &mut out, &mut ends, &mut refused)
        .await
        .unwrap();
    assert_eq!(ends.len(), 3, "a slot per row");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, 1);
    assert!(
        refused[0]
            .1
            .contains("`user` is null, and the writer schema has no null"),
        "{refused:?}"
    );
    assert_eq!(ends[1], ends[0], "the refused row's slot is empty");
    // `user` first, as the schema orders it: "a" is a length 1 (zig-zag 2) and `a`.
    assert_eq!(&out[5..7], &[2, b'a']);
}

#[test]
fn columns_the_schema_names_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.avsc");
    std::fs::write(
        &path,
        r#"{"type":"record","name":"Out","fields":[{"name":"missing","type":"long"}]}"#,
    )
    .unwrap();
    let err = AvroEncoder::open(&config(Some(path)), "t", &rows().schema())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing"), "{err}");
}

/// A given schema whose types are not what the columns are written as is refused at
/// open, naming the fields (arrow-avro would write them by the Arrow type).
#[test]
fn a_given_schema_of_other_types_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.avsc");
    std::fs::write(
        &path,
        r#"{"type":"record","name":"Out","fields":[
            {"name":"id","type":"double"},
            {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"user","type":["null","string"]}]}"#,
    )
    .unwrap();
    let err = AvroEncoder::open(&config(Some(path)), "t", &rows().schema())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`id`: the schema says \"double\""), "{err}");
    assert!(
        err.contains("`at`") && err.contains("timestamp-millis"),
        "{err}"
    );
    assert!(!err.contains("`user`"), "{err}");
}

/// Nulls the schema has no null for, inside records (under a nullable union too) and
/// among array items, refuse their rows, named by path; the others are written.
#[tokio::test]
async fn nested_nulls_the_schema_cannot_hold_refuse_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.avsc");
    std::fs::write(
        &path,
        r#"{"type":"record","name":"Out","fields":[
            {"name":"id","type":"long"},
            {"name":"point","type":["null",{"type":"record","name":"P","fields":[
                {"name":"x","type":"long"},{"name":"label","type":"string"}]}]},
            {"name":"tags","type":{"type":"array","items":"long"}}]}"#,
    )
    .unwrap();
    let point = Fields::from(vec![
        Field::new("x", DataType::Int64, false),
        Field::new("label", DataType::Utf8, true),
    ]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("point", DataType::Struct(point.clone()), true),
        Field::new(
            "tags",
            DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true))),
            false,
        ),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
            Arc::new(StructArray::new(
                point,
                vec![
                    Arc::new(Int64Array::from(vec![7, 8, 9, 10])),
                    Arc::new(StringArray::from(vec![Some("a"), None, None, Some("d")])),
                ],
                // Row 2's point is null: its null label is not written.
                Some(vec![true, true, false, true].into()),
            )),
            Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
                Some(vec![Some(1)]),
                Some(vec![Some(2)]),
                Some(vec![Some(3)]),
                Some(vec![Some(4), None]),
            ])),
        ],
    )
    .unwrap();
    // Counts are per process: an id no other test uses.
    let mut encoder = encoder(&config(Some(path)), &schema, 31);
    let (mut out, mut ends, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    encoder
        .encode(&batch, &mut out, &mut ends, &mut refused)
        .await
        .unwrap();
    let named: Vec<(u32, bool)> = refused
        .iter()
        .map(|(row, why)| {
            (
                *row,
                why.contains(if *row == 1 {
                    "`point.label`"
                } else {
                    "`tags[]`"
                }),
            )
        })
        .collect();
    assert_eq!(named, [(1, true), (3, true)], "{refused:?}");
    assert_eq!(ends.len(), 4);
    assert_eq!(
        stats()
            .by_id()
            .iter()
            .find(|(id, _)| *id == Some(31))
            .unwrap()
            .1
            .encoded,
        2
    );
}

/// A dictionary column is written as its values.
#[tokio::test]
async fn a_dictionary_column_is_written_as_its_values() {
    use arrow::array::DictionaryArray;
    use arrow::datatypes::Int32Type;
    let dict: DictionaryArray<Int32Type> = vec!["tv", "phone", "tv"].into_iter().collect();
    let schema = Arc::new(Schema::new(vec![Field::new(
        "device",
        dict.data_type().clone(),
        false,
    )]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(dict)]).unwrap();
    let mut encoder = encoder(&config(None), &schema, 4);
    assert!(encoder.schema_json().unwrap().contains("\"string\""));
    let (mut out, mut ends, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    encoder
        .encode(&batch, &mut out, &mut ends, &mut refused)
        .await
        .unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(&out[ends[0]..ends[1]], b"\x00\x00\x00\x00\x04\x0aphone");
}

/// A pinned id whose registered schema is not the sink's file is refused before a
/// message is written with it.
#[tokio::test]
async fn a_pinned_id_of_another_schema_than_the_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.avsc");
    std::fs::write(
        &path,
        r#"{"type":"record","name":"Out","fields":[{"name":"id","type":"long"}]}"#,
    )
    .unwrap();
    let (registry, _) = crate::avro::registry::tests::scripted(vec![(
        200,
        r#"{"schema":"{\"type\":\"record\",\"name\":\"Out\",\"fields\":[{\"name\":\"id\",\"type\":\"int\"}]}"}"#,
    )])
    .await;
    let mut config = config(Some(path));
    config.schema_id = Some(12);
    let batch = rows();
    let mut encoder = AvroEncoder::open(&config, "t", &batch.schema()).unwrap();
    encoder.registry = registry;
    let err = encoder
        .encode(&batch, &mut Vec::new(), &mut Vec::new(), &mut Vec::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("schema id 12 is not the schema of the sink's"),
        "{err}"
    );
}

/// Derived nullable fields default to null: adding a nullable column is a compatible
/// change for a registry that checks.
#[test]
fn derived_nullable_fields_default_to_null() {
    let encoder = AvroEncoder::open(&config(None), "t", &rows().schema()).unwrap();
    let json: serde_json::Value = serde_json::from_str(encoder.schema_json().unwrap()).unwrap();
    let user = &json["fields"][1];
    assert_eq!(user["name"], "user");
    assert_eq!(user["default"], serde_json::Value::Null);
    assert!(user.get("default").is_some(), "{user}");
    assert!(json["fields"][0].get("default").is_none());
}

/// The subject a writer schema registers under, by each strategy: the topic's, the
/// record's full name (namespace and name of a given `.avsc`), or both.
#[test]
fn subject_strategies_name_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("order.avsc");
    std::fs::write(
        &path,
        r#"{"type":"record","name":"Order","namespace":"shop","fields":[{"name":"id","type":"long"}]}"#,
    )
    .unwrap();
    let input = Schema::new(vec![Field::new("id", DataType::Int64, false)]);
    for (strategy, want) in [
        (SubjectStrategy::Topic, "orders-value"),
        (SubjectStrategy::Record, "shop.Order"),
        (SubjectStrategy::TopicRecord, "orders-shop.Order"),
    ] {
        let mut config = config(Some(path.clone()));
        config.subject_strategy = strategy;
        let encoder = AvroEncoder::open(&config, "orders", &input).unwrap();
        assert_eq!(encoder.subject, want, "{strategy:?}");
    }
    // Derived from the columns, the record is named after the topic.
    let mut derived = config(None);
    derived.subject_strategy = SubjectStrategy::Record;
    let encoder = AvroEncoder::open(&derived, "orders", &input).unwrap();
    assert_eq!(encoder.subject, "orders");
    // A given subject is used as it is.
    let mut given = config(None);
    given.subject = Some("mine".into());
    assert_eq!(
        AvroEncoder::open(&given, "orders", &input).unwrap().subject,
        "mine"
    );
}
