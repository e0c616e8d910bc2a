use super::*;

/// A letter of `views/2` that failed at decoding.
fn letter(payload: &[u8]) -> DeadLetter {
    DeadLetter {
        stage: SOURCE_STAGE.into(),
        class: ErrorClass::Decode,
        reason: "not JSON".into(),
        attempts: 1,
        partition: Arc::new(PartitionInfo {
            id: 2,
            name: "views/2".into(),
        }),
        offset: Some(17),
        key: None,
        headers: Vec::new(),
        first_failed_at: 1,
        last_failed_at: 1,
        payload: payload.to_vec(),
    }
}

fn text_at(batch: &RecordBatch, name: &str, row: usize) -> Option<String> {
    let column = batch.column_by_name(name).unwrap().as_string::<i32>();
    column.is_valid(row).then(|| column.value(row).to_string())
}

/// Bytes that are not UTF-8 (payload, key, header values) are base64 in the text form,
/// and a record's headers keep their order, duplicate names and null values.
#[test]
fn letters_become_rows_with_every_byte_of_their_key_and_headers() {
    let binary = DeadLetter {
        key: Some(vec![0xff, 0, 1]),
        headers: vec![
            ("trace".into(), Some(b"abc"[..].into())),
            ("bin".into(), Some(vec![0xff].into())),
            ("trace".into(), None),
        ],
        ..letter(&[0xff, b'x'])
    };
    let text = DeadLetter {
        key: Some(b"u1".to_vec()),
        ..letter(b"{")
    };
    let batch = to_batch("p", &[binary, text]).unwrap();
    let keys = batch.column_by_name("key").unwrap().as_binary::<i32>();
    assert_eq!(
        (keys.value(0), keys.value(1)),
        (&[0xff, 0, 1][..], &b"u1"[..])
    );
    let headers = batch.column_by_name("headers").unwrap().as_map();
    assert_eq!(headers.value(0).len(), 3);
    assert!(headers.is_null(1));

    let text = text_batch(&batch).unwrap();
    assert_eq!(text.schema(), text_schema());
    assert_eq!(text_at(&text, "payload", 0), None);
    assert_eq!(text_at(&text, "payload_base64", 0).as_deref(), Some("/3g="));
    assert_eq!(text_at(&text, "payload", 1).as_deref(), Some("{"));
    assert_eq!(text_at(&text, "key", 0), None);
    assert_eq!(text_at(&text, "key_base64", 0).as_deref(), Some("/wAB"));
    assert_eq!(text_at(&text, "key", 1).as_deref(), Some("u1"));
    assert_eq!(text_at(&text, "key_base64", 1), None);
    let rows: Vec<serde_json::Value> = row_json(&text)
        .unwrap()
        .iter()
        .map(|r| serde_json::from_slice(r).unwrap())
        .collect();
    assert_eq!(
        rows[0]["headers"],
        serde_json::json!([
            {"name": "trace", "value": "abc", "value_base64": null},
            {"name": "bin", "value": null, "value_base64": "/w=="},
            {"name": "trace", "value": null, "value_base64": null},
        ])
    );
    assert!(rows[1]["headers"].is_null(), "{}", rows[1]);
    assert_eq!(decode_base64("/wAB"), Some(vec![0xff, 0, 1]));
}

/// A row that fails in a stage keeps the `_key` and `_headers` it has there.
#[test]
fn a_failed_rows_letter_has_its_key_and_headers() {
    let mut map = crate::batch::headers_builder();
    map.keys().append_value("h");
    map.values().append_value([0xfe]);
    map.append(true).unwrap();
    map.append(true).unwrap();
    let batch = RecordBatch::try_from_iter([
        (
            crate::batch::KEY,
            Arc::new(arrow::array::StringArray::from(vec![Some("k0"), None])) as ArrayRef,
        ),
        (crate::batch::HEADERS, Arc::new(map.finish()) as ArrayRef),
    ])
    .unwrap();
    let stage: Arc<str> = "score".into();
    let failure = RowFailure {
        stage: &stage,
        class: ErrorClass::Permanent,
        reason: "no",
        attempts: 1,
        first_failed_at: 1,
    };
    let partition = letter(b"").partition;
    let letters = letters_of_rows(&batch, &[0, 1], &partition, failure).unwrap();
    assert_eq!(letters[0].key.as_deref(), Some(&b"k0"[..]));
    assert_eq!(
        letters[0].headers,
        vec![("h".into(), Some(vec![0xfe].into()))]
    );
    assert_eq!(
        (letters[1].key.as_ref(), letters[1].headers.len()),
        (None, 0)
    );
}

#[test]
fn letters_larger_than_the_sink_takes_are_cut_with_their_size_and_checksum() {
    let big = vec![b'x'; 1_000_500];
    let batch = to_batch_within("p", &[letter(b"small"), letter(&big)], 1_000_000).unwrap();
    let payload = batch.column(0).as_binary::<i32>();
    assert_eq!(payload.value(0), b"small");
    assert!(payload.value(1).len() < 1_000_000 - 1024);
    assert!(big.starts_with(payload.value(1)));
    let column = |name: &str| batch.column_by_name(name).unwrap().clone();
    let sizes = column("payload_size");
    let sizes = sizes.as_primitive::<arrow::datatypes::Int64Type>();
    assert_eq!((sizes.value(0), sizes.value(1)), (5, 1_000_500));
    let cut = column("payload_cut");
    let cut = cut.as_boolean();
    assert_eq!((cut.value(0), cut.value(1)), (false, true));
    let checksum = column("payload_checksum");
    let checksum = checksum.as_string::<i32>();
    assert!(checksum.is_null(0));
    assert_eq!(
        checksum.value(1),
        format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(&big))
    );
    // Text sinks get the same provenance.
    let text = text_batch(&batch).unwrap();
    assert!(text.column_by_name("payload_cut").is_some());
}

#[test]
fn a_provenance_too_large_for_the_sink_is_cut_too() {
    let letter = DeadLetter {
        reason: "é".repeat(300_000),
        key: Some(b"k".repeat(999_900)),
        headers: vec![("h".into(), Some(vec![b'v'; 100_000].into()))],
        ..letter(b"x")
    };
    let batch = to_batch_within("p", &[letter], 1_000_000).unwrap();
    let key = batch.column_by_name("key").unwrap().as_binary::<i32>();
    assert_eq!(key.value(0).len(), SHORT_PROVENANCE);
    let error = text_at(&batch, "error", 0).unwrap();
    assert!(error.contains("the error was 600000 bytes"), "{error}");
    assert!(error.contains("the key was cut to 4096 of 999900 bytes"));
    assert!(error.contains("its 1 headers, 100011 bytes, were left out"));
    assert!(batch.column_by_name("headers").unwrap().is_null(0));
    // Its payload is whole, but it no longer holds the record as it came.
    assert!(
        batch
            .column_by_name("payload_cut")
            .unwrap()
            .as_boolean()
            .value(0)
    );
    assert_eq!(text_at(&batch, "payload_checksum", 0), None);
    let total: usize = batch
        .columns()
        .iter()
        .map(|c| c.get_array_memory_size())
        .sum();
    assert!(total < 1_000_000, "{total}");
}

/// A sink that takes text letters of at most `max` bytes of payload and refuses larger
/// ones, as a Kinesis stream refuses records over 1 MiB.
struct Refusing {
    max: usize,
    /// The reason of every refusal; by default one naming the size.
    reason: Option<&'static str>,
    written: Arc<std::sync::Mutex<Vec<RecordBatch>>>,
    refused: Vec<(u32, String)>,
}

#[async_trait::async_trait]
impl crate::sink::Sink for Refusing {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        let size = |column: &str, row| text_at(&batch, column, row).map_or(0, |t| t.len());
        let mut kept = Vec::new();
        for row in 0..batch.num_rows() {
            let bytes = size("payload", row) + size("payload_base64", row);
            if bytes > self.max {
                let why = self.reason.map_or_else(
                    || format!("{bytes} bytes, more than {}", self.max),
                    str::to_string,
                );
                self.refused.push((row as u32, why));
            } else {
                kept.push(row as u32);
            }
        }
        let kept = arrow::array::UInt32Array::from(kept);
        let kept = arrow::compute::take_record_batch(&batch, &kept).unwrap();
        self.written.lock().unwrap().push(kept);
        Ok(())
    }
    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    async fn close(&mut self) -> Result<()> {
        Ok(())
    }
    fn summary(&self) -> String {
        String::new()
    }
    fn take_refused(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.refused)
    }
}

/// A letter the sink refuses is written again, cut, instead of being dropped; one it
/// refuses at any size stops the run naming it.
#[tokio::test]
async fn a_letter_the_sink_refuses_is_cut_until_it_is_taken() {
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = |max, reason| DeadLetterSink {
        sink: Box::new(Refusing {
            max,
            reason,
            written: written.clone(),
            refused: Vec::new(),
        }),
        text: true,
    };
    let letters = [letter(b"small"), letter(&vec![0xfe; 200_000]), letter(b"x")];
    sink(100_000, None).write("p", &letters).await.unwrap();
    let batches = written.lock().unwrap().clone();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 3, "every letter written");
    let last = batches.last().unwrap();
    assert_eq!(last.num_rows(), 1);
    assert!(
        last.column_by_name("payload_cut")
            .unwrap()
            .as_boolean()
            .value(0)
    );
    assert_eq!(
        last.column_by_name("payload_size")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0),
        200_000
    );

    let err = sink(0, None).write("p", &letters[..1]).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("refuses the dead letter of views/2 offset 17"),
        "{err}"
    );

    // Refused again for the same reason once cut: not its size; the run stops at once.
    written.lock().unwrap().clear();
    let err = sink(100_000, Some("the partition key is empty"))
        .write("p", &letters[1..2])
        .await
        .unwrap_err();
    assert!(
        err.to_string().ends_with(": the partition key is empty"),
        "{err}"
    );
    assert_eq!(
        written.lock().unwrap().len(),
        2,
        "written once, and once cut"
    );
}
