use super::*;
use arrow::datatypes::{Field, Schema};

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("score", DataType::Float64, true),
        Field::new("ok", DataType::Boolean, true),
        Field::new("small", DataType::UInt8, true),
        Field::new(
            "at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
    ]))
}

/// The fast path against arrow-json on the same records: same batch, or both fail.
fn same_as_arrow(records: &[&str]) {
    let schema = schema();
    let mut fast = JsonDecoder::new(schema.clone());
    assert!(fast.is_fast());
    let got = fast.decode(records.iter().map(|r| r.as_bytes()));
    let mut slow = JsonDecoder::arrow_only(schema);
    let want = slow.decode(records.iter().map(|r| r.as_bytes()));
    match (got, want) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "records {records:?}"),
        (Err(a), Err(b)) => assert_eq!(a, b, "records {records:?}"),
        (a, b) => panic!("fast {a:?} but arrow-json {b:?} for {records:?}"),
    }
}

#[test]
fn fast_path_matches_arrow_json() {
    same_as_arrow(&[
        r#"{"id": 1, "name": "a\"b\u00e9", "score": 1.5, "ok": true, "small": 7, "at": 1700000000000}"#,
        r#"{"id": -2, "extra": {"x": [1, 2]}, "name": null}"#,
        r#"{"at": 5, "id": 3, "score": 2, "small": 255}"#,
        r#"{"score": 1e300, "id": 9223372036854775807}"#,
    ]);
    // Beyond the fast path: arrow-json decides (coercions or errors).
    same_as_arrow(&[r#"{"id": "12"}"#, r#"{"id": 1}"#]);
    same_as_arrow(&[r#"{"id": 1, "small": 256}"#]);
    same_as_arrow(&[r#"{"id": 1.5}"#]);
    same_as_arrow(&[r#"{"id": 1, "name": 5}"#]);
    same_as_arrow(&[r#"{"id": 1, "ok": "true"}"#]);
    same_as_arrow(&[r#"{"id": 1, "id": 2}"#]);
    same_as_arrow(&[r#"{"name": "no id"}"#]);
    same_as_arrow(&[r#"{"id": null}"#]);
    same_as_arrow(&[
        r#"{"id": 1, "at": "2024-01-01T00:00:00Z"}"#,
        r#"{"id": 2, "at": "2024-01-01T10:15:42.123456+02:00"}"#,
        r#"{"id": 3, "at": "2024-01-01 10:15:42"}"#,
        r#"{"id": 4, "at": "1969-12-31T23:59:59.9995Z"}"#,
    ]);
    same_as_arrow(&[r#"{"id": 1, "at": "yesterday"}"#]);
    same_as_arrow(&[r#"{"id": 1, "at": "2024-02-30T00:00:00Z"}"#]);
}

#[test]
fn the_short_timestamp_path_agrees_with_arrow() {
    use arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
    for t in [
        "1970-01-01T00:00:00Z",
        "2026-01-01T10:15:42Z",
        "2024-02-29T23:59:59.5Z",
        "2000-03-01T00:00:00.123456789Z",
        "1969-12-31T23:59:59.999Z",
        "1900-02-28T12:00:00Z",
        "2262-04-11T23:47:16Z",
    ] {
        assert_eq!(
            utc_nanos(t.as_bytes()),
            string_to_timestamp_nanos(t).ok(),
            "{t}"
        );
    }
    for t in [
        "2024-02-30T00:00:00Z",
        "2024-01-01T00:00:00+01:00",
        "2024-01-01T24:00:00Z",
        "2024-01-01T00:00:00.Z",
    ] {
        assert_eq!(utc_nanos(t.as_bytes()), None, "{t}");
    }
    same_as_arrow(&[r#"{"id": 1, "score": [1]}"#]);
}

#[test]
fn every_record_is_one_value() {
    let mut d = JsonDecoder::new(schema());
    for (records, index, reason) in [
        (vec![r#"{"id": 1}"#, ""], 1, "empty record"),
        (
            vec![r#"{"id": 1}{"id": 2}"#, r#"{"id": 3}"#],
            0,
            "more than one",
        ),
        (vec![r#"{"id": 1"#, r#", "name": "x"}"#], 0, ""),
        (vec![r#"{"id": 1}"#, "not json"], 1, ""),
        (vec!["[1, 2]"], 0, ""),
    ] {
        let err = d
            .decode(records.iter().map(|r| r.as_bytes()))
            .expect_err("must fail");
        assert_eq!(err.index, Some(index), "{records:?}: {err:?}");
        assert!(err.reason.contains(reason), "{records:?}: {err:?}");
    }
    // Still usable after errors.
    let batch = d.decode([br#"{"id": 4}"#.as_slice()]).unwrap();
    assert_eq!(batch.num_rows(), 1);
}

#[test]
fn nested_schemas_use_arrow_json() {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "tags",
        DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        true,
    )]));
    let mut d = JsonDecoder::new(schema);
    assert!(!d.is_fast());
    let batch = d
        .decode([br#"{"tags": ["a"]}"#.as_slice(), br#"{}"#.as_slice()])
        .unwrap();
    assert_eq!(batch.num_rows(), 2);
    let err = d
        .decode([br#"{"tags": ["a"]}"#.as_slice(), b"{".as_slice()])
        .unwrap_err();
    assert_eq!(err.index, Some(1));
}
