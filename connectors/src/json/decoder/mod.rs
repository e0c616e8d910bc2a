//! Decoding JSON records (one object per record, such as Kafka messages) into a batch.
//!
//! # Fast path
//! For flat schemas (booleans, integers, floats, strings, timestamps), each record is parsed
//! with sonic-rs (SIMD) through serde straight into Arrow builders: no intermediate value
//! tree, no allocation per row beyond the builders' own growth. Fields the schema does not
//! name are skipped, missing fields become nulls.
//!
//! The fast path accepts only what arrow-json would accept, with the same values. Anything
//! else (a number given as a string, a float for an integer field, a null in a required
//! field, a duplicate key, a record with more than `limits::FAST_DEPTH` `[` and `{`, which
//! sonic-rs might skip by deep recursion) sends the whole batch to arrow-json, which either decodes it (it
//! coerces more) or says exactly what is wrong. So errors always read the same, whichever
//! path found them.
//!
//! # Record boundaries
//! Each record is parsed on its own and must hold exactly one JSON value, so a record that
//! holds two values, or half of one, can never shift rows against their offsets.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayBuilder, ArrayRef, BooleanBuilder, Float32Builder, Float64Builder, Int8Builder,
    Int16Builder, Int32Builder, Int64Builder, RecordBatch, RecordBatchOptions, StringBuilder,
    UInt8Builder, UInt16Builder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::limits::{FAST_DEPTH, check_depth, shorten};
use super::{DecodeError, decode, decode_records};

/// Decodes records of one schema; keep one per reader and reuse it.
pub struct JsonDecoder {
    schema: SchemaRef,
    fast: Option<FastColumns>,
    /// Records joined as JSON lines, for arrow-json.
    scratch: Vec<u8>,
    starts: Vec<usize>,
    /// The largest record decoded; a larger one fails with the limit named.
    max_record: usize,
}

impl JsonDecoder {
    pub fn new(schema: SchemaRef) -> Self {
        JsonDecoder {
            fast: FastColumns::new(&schema),
            schema,
            scratch: Vec::new(),
            starts: Vec::new(),
            max_record: usize::MAX,
        }
    }

    /// Fails records longer than `bytes` (`max_record_size`) before any parser sees them.
    pub fn with_max_record(mut self, bytes: usize) -> Self {
        self.max_record = bytes;
        self
    }

    /// Whether `record` is within the size and nesting limits, and if not, why.
    fn check(&self, record: &[u8]) -> Result<(), String> {
        if record.len() > self.max_record {
            return Err(format!(
                "the record is {} bytes, larger than max_record_size ({})",
                record.len(),
                sluice_engine::config::ByteSize(self.max_record as u64)
            ));
        }
        check_depth(record).map(drop)
    }

    /// A decoder that always uses arrow-json (to compare the paths).
    pub fn arrow_only(schema: SchemaRef) -> Self {
        JsonDecoder {
            fast: None,
            ..JsonDecoder::new(schema)
        }
    }

    /// Whether this schema takes the fast path.
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// Decodes every record into one row each.
    ///
    /// # Errors
    /// The first record that is not one JSON object of the schema, by index, with
    /// arrow-json's reason.
    pub fn decode<'a, I>(&mut self, records: I) -> Result<RecordBatch, DecodeError>
    where
        I: IntoIterator<Item = &'a [u8]>,
        I::IntoIter: Clone + ExactSizeIterator,
    {
        let records = records.into_iter();
        let max_record = self.max_record;
        if let Some(fast) = &mut self.fast {
            match fast.decode_all(records.clone(), &self.schema, max_record) {
                Ok(batch) => return Ok(batch),
                Err(Fail::Record(i, why)) => {
                    let record = records.clone().nth(i).unwrap_or_default();
                    return Err(report(&self.schema, i, record, &why));
                }
                Err(Fail::Limit(i, reason)) => {
                    return Err(DecodeError {
                        index: Some(i),
                        reason,
                    });
                }
                Err(Fail::Unsupported) => {}
            }
        }
        self.decode_with_arrow(records)
    }

    /// Decodes the records that decode, and says which did not and why: for sources that
    /// send failed records to a dead-letter sink. Costs one extra pass per record only when
    /// some record fails.
    pub fn decode_each(
        &mut self,
        records: &[&[u8]],
    ) -> (Result<RecordBatch, DecodeError>, Vec<(usize, String)>) {
        if let Ok(batch) = self.decode(records.iter().copied()) {
            return (Ok(batch), Vec::new());
        }
        let mut good = Vec::with_capacity(records.len());
        let mut bad = Vec::new();
        for (i, record) in records.iter().enumerate() {
            match self.decode(std::iter::once(*record)) {
                Ok(_) => good.push(*record),
                Err(e) => bad.push((i, e.reason)),
            }
        }
        (self.decode(good.iter().copied()), bad)
    }

    /// The slow path: arrow-json over the records joined as lines, after checking that each
    /// record holds exactly one JSON value (so rows line up with records).
    fn decode_with_arrow<'a>(
        &mut self,
        records: impl Iterator<Item = &'a [u8]> + Clone,
    ) -> Result<RecordBatch, DecodeError> {
        self.scratch.clear();
        self.starts.clear();
        for (i, record) in records.enumerate() {
            if let Err(reason) = self.check(record) {
                return Err(DecodeError {
                    index: Some(i),
                    reason,
                });
            }
            // serde_json skips values with a loop, not recursion (unlike sonic-rs).
            if let Err(e) = serde_json::from_slice::<IgnoredAny>(record) {
                return Err(report(&self.schema, i, record, &e.to_string()));
            }
            self.starts.push(self.scratch.len());
            self.scratch.extend_from_slice(record);
            self.scratch.push(b'\n');
        }
        if self.starts.is_empty() {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        }
        decode_records(&self.schema, &self.scratch, &self.starts)
    }
}

/// Why record `index` failed: arrow-json's words when it rejects the record too.
fn report(schema: &SchemaRef, index: usize, record: &[u8], parser_reason: &str) -> DecodeError {
    let reason = if record.iter().all(u8::is_ascii_whitespace) {
        "empty record: no JSON value".to_string()
    } else {
        match decode(schema, record, 1) {
            Err(reason) => reason,
            Ok(Some(b)) if b.num_rows() == 1 => shorten(format!("not valid JSON: {parser_reason}")),
            Ok(_) => "the record holds more than one JSON value".to_string(),
        }
    };
    DecodeError {
        index: Some(index),
        reason,
    }
}

enum Fail {
    /// Record `index` is not one well-formed JSON value.
    Record(usize, String),
    /// Record `index` is beyond a limit: no parser may see it.
    Limit(usize, String),
    /// Well-formed, but beyond the fast path: arrow-json decides.
    Unsupported,
}

/// Marks a serde error raised by the fast path itself, as opposed to the parser's.
const UNSUPPORTED: &str = "sluice: not on the fast path";

enum Column {
    Bool(BooleanBuilder),
    I8(Int8Builder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    U8(UInt8Builder),
    U16(UInt16Builder),
    U32(UInt32Builder),
    U64(UInt64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Utf8(StringBuilder),
    /// Numbers are raw values in the field's unit, like arrow-json reads them; strings are
    /// RFC 3339 times (only for fields in UTC or without a zone, where a time without an
    /// offset means UTC for both paths).
    Timestamp(Int64Builder, DataType),
}

impl Column {
    fn new(data_type: &DataType) -> Option<Self> {
        Some(match data_type {
            DataType::Boolean => Column::Bool(BooleanBuilder::new()),
            DataType::Int8 => Column::I8(Int8Builder::new()),
            DataType::Int16 => Column::I16(Int16Builder::new()),
            DataType::Int32 => Column::I32(Int32Builder::new()),
            DataType::Int64 => Column::I64(Int64Builder::new()),
            DataType::UInt8 => Column::U8(UInt8Builder::new()),
            DataType::UInt16 => Column::U16(UInt16Builder::new()),
            DataType::UInt32 => Column::U32(UInt32Builder::new()),
            DataType::UInt64 => Column::U64(UInt64Builder::new()),
            DataType::Float32 => Column::F32(Float32Builder::new()),
            DataType::Float64 => Column::F64(Float64Builder::new()),
            DataType::Utf8 => Column::Utf8(StringBuilder::new()),
            DataType::Timestamp(_, _) => Column::Timestamp(Int64Builder::new(), data_type.clone()),
            _ => return None,
        })
    }

    fn append_null(&mut self) {
        match self {
            Column::Bool(b) => b.append_null(),
            Column::I8(b) => b.append_null(),
            Column::I16(b) => b.append_null(),
            Column::I32(b) => b.append_null(),
            Column::I64(b) | Column::Timestamp(b, _) => b.append_null(),
            Column::U8(b) => b.append_null(),
            Column::U16(b) => b.append_null(),
            Column::U32(b) => b.append_null(),
            Column::U64(b) => b.append_null(),
            Column::F32(b) => b.append_null(),
            Column::F64(b) => b.append_null(),
            Column::Utf8(b) => b.append_null(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Column::Bool(b) => b.len(),
            Column::I8(b) => b.len(),
            Column::I16(b) => b.len(),
            Column::I32(b) => b.len(),
            Column::I64(b) | Column::Timestamp(b, _) => b.len(),
            Column::U8(b) => b.len(),
            Column::U16(b) => b.len(),
            Column::U32(b) => b.len(),
            Column::U64(b) => b.len(),
            Column::F32(b) => b.len(),
            Column::F64(b) => b.len(),
            Column::Utf8(b) => b.len(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Column::Bool(b) => Arc::new(b.finish()),
            Column::I8(b) => Arc::new(b.finish()),
            Column::I16(b) => Arc::new(b.finish()),
            Column::I32(b) => Arc::new(b.finish()),
            Column::I64(b) => Arc::new(b.finish()),
            Column::U8(b) => Arc::new(b.finish()),
            Column::U16(b) => Arc::new(b.finish()),
            Column::U32(b) => Arc::new(b.finish()),
            Column::U64(b) => Arc::new(b.finish()),
            Column::F32(b) => Arc::new(b.finish()),
            Column::F64(b) => Arc::new(b.finish()),
            Column::Utf8(b) => Arc::new(b.finish()),
            Column::Timestamp(b, data_type) => {
                let data = b
                    .finish()
                    .into_data()
                    .into_builder()
                    .data_type(data_type.clone());
                // The buffers of an Int64 array are exactly those of a timestamp array.
                arrow::array::make_array(data.build().expect("timestamp from int64 buffers"))
            }
        }
    }

    /// Appends an integer, when it fits the column.
    fn int<E: de::Error>(&mut self, v: i128) -> Result<(), E> {
        fn fit<T: TryFrom<i128>, E: de::Error>(v: i128) -> Result<T, E> {
            T::try_from(v).map_err(|_| E::custom(UNSUPPORTED))
        }
        match self {
            Column::I8(b) => b.append_value(fit(v)?),
            Column::I16(b) => b.append_value(fit(v)?),
            Column::I32(b) => b.append_value(fit(v)?),
            Column::I64(b) | Column::Timestamp(b, _) => b.append_value(fit(v)?),
            Column::U8(b) => b.append_value(fit(v)?),
            Column::U16(b) => b.append_value(fit(v)?),
            Column::U32(b) => b.append_value(fit(v)?),
            Column::U64(b) => b.append_value(fit(v)?),
            Column::F32(b) => b.append_value(v as f32),
            Column::F64(b) => b.append_value(v as f64),
            _ => return Err(E::custom(UNSUPPORTED)),
        }
        Ok(())
    }
}

struct FastColumns {
    names: Vec<Box<str>>,
    nullable: Vec<bool>,
    columns: Vec<Column>,
    /// The record each column was last set in, to find missing and duplicate fields.
    seen: Vec<u64>,
    record: u64,
    /// Where the next field probably is: objects usually list fields in schema order.
    cursor: usize,
}

impl FastColumns {
    fn new(schema: &SchemaRef) -> Option<Self> {
        let columns = schema
            .fields()
            .iter()
            .map(|f| Column::new(f.data_type()))
            .collect::<Option<Vec<_>>>()?;
        Some(FastColumns {
            names: schema
                .fields()
                .iter()
                .map(|f| f.name().as_str().into())
                .collect(),
            nullable: schema.fields().iter().map(|f| f.is_nullable()).collect(),
            seen: vec![0; columns.len()],
            columns,
            record: 0,
            cursor: 0,
        })
    }

    fn find(&mut self, key: &str) -> Option<usize> {
        let n = self.names.len();
        if self.cursor < n && &*self.names[self.cursor] == key {
            let i = self.cursor;
            self.cursor += 1;
            return Some(i);
        }
        let i = self.names.iter().position(|name| &**name == key)?;
        self.cursor = i + 1;
        Some(i)
    }

    fn decode_all<'a>(
        &mut self,
        records: impl ExactSizeIterator<Item = &'a [u8]>,
        schema: &SchemaRef,
        max_record: usize,
    ) -> Result<RecordBatch, Fail> {
        let rows = records.len();
        let mut failed = None;
        for (i, record) in records.enumerate() {
            if record.len() > max_record {
                // The size check's words are the decoder's: let it say them.
                failed = Some(Fail::Unsupported);
                break;
            }
            match check_depth(record) {
                Err(reason) => {
                    failed = Some(Fail::Limit(i, reason));
                    break;
                }
                Ok(depth) if depth > FAST_DEPTH => {
                    // Deeper than sonic-rs's skip may recurse (see `limits`).
                    failed = Some(Fail::Unsupported);
                    break;
                }
                Ok(_) => {}
            }
            self.record += 1;
            self.cursor = 0;
            let mut de = sonic_rs::Deserializer::from_slice(record);
            let parsed = RecordSeed(self)
                .deserialize(&mut de)
                .and_then(|()| de.end());
            if let Err(e) = parsed {
                let text = e.to_string();
                failed = Some(if text.contains(UNSUPPORTED) {
                    Fail::Unsupported
                } else {
                    Fail::Record(i, text)
                });
                break;
            }
            if let Err(fail) = self.fill_missing() {
                failed = Some(fail);
                break;
            }
        }
        let columns: Vec<ArrayRef> = self.columns.iter_mut().map(Column::finish).collect();
        if let Some(fail) = failed {
            return Err(fail);
        }
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        RecordBatch::try_new_with_options(schema.clone(), columns, &options)
            .map_err(|_| Fail::Unsupported)
    }

    /// Nulls for the fields the record left out.
    fn fill_missing(&mut self) -> Result<(), Fail> {
        for i in 0..self.columns.len() {
            if self.seen[i] != self.record {
                if !self.nullable[i] {
                    return Err(Fail::Unsupported);
                }
                self.columns[i].append_null();
            }
        }
        debug_assert!(
            self.columns
                .iter()
                .all(|c| c.len() == self.columns[0].len())
        );
        Ok(())
    }
}

/// One record: a JSON object whose fields go to their columns.
struct RecordSeed<'a>(&'a mut FastColumns);

impl<'de> DeserializeSeed<'de> for RecordSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let cols = self.0;
        while let Some(index) = map.next_key_seed(KeySeed(cols))? {
            match index {
                Some(i) => {
                    if cols.seen[i] == cols.record {
                        // A duplicate key: arrow-json decides which value counts.
                        return Err(de::Error::custom(UNSUPPORTED));
                    }
                    cols.seen[i] = cols.record;
                    let nullable = cols.nullable[i];
                    map.next_value_seed(ValueSeed {
                        column: &mut cols.columns[i],
                        nullable,
                    })?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A field name: its column, or `None` for a field the schema does not have.
struct KeySeed<'a>(&'a mut FastColumns);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Option<usize>, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.find(key))
    }
}

/// A field's value, appended to its column.
struct ValueSeed<'a> {
    column: &'a mut Column,
    nullable: bool,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a value of the field's type")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        if !self.nullable {
            return Err(E::custom(UNSUPPORTED));
        }
        self.column.append_null();
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        match self.column {
            Column::Bool(b) => b.append_value(v),
            _ => return Err(E::custom(UNSUPPORTED)),
        }
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.column.int(v as i128)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.column.int(v as i128)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        match self.column {
            Column::F64(b) => b.append_value(v),
            // Float text into f32: arrow-json parses the text as f32; a double rounded
            // twice can differ in the last bit, so leave it to arrow-json.
            _ => return Err(E::custom(UNSUPPORTED)),
        }
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        match self.column {
            Column::Utf8(b) => b.append_value(v),
            Column::Timestamp(b, DataType::Timestamp(unit, tz))
                if tz.as_deref().is_none_or(|z| z == "UTC" || z == "+00:00") =>
            {
                let nanos = match utc_nanos(v.as_bytes()) {
                    Some(n) => n,
                    None => arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(v)
                        .map_err(|_| E::custom(UNSUPPORTED))?,
                };
                // Floor, as arrow-json (chrono) does for times before 1970.
                let per_unit: i64 = match unit {
                    TimeUnit::Second => 1_000_000_000,
                    TimeUnit::Millisecond => 1_000_000,
                    TimeUnit::Microsecond => 1_000,
                    TimeUnit::Nanosecond => 1,
                };
                b.append_value(nanos.div_euclid(per_unit));
            }
            _ => return Err(E::custom(UNSUPPORTED)),
        }
        Ok(())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(UNSUPPORTED))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(UNSUPPORTED))
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, the form most JSON producers write, without the
/// general parser's cost; anything else is left to arrow's parser.
fn utc_nanos(t: &[u8]) -> Option<i64> {
    fn digits(t: &[u8], range: std::ops::Range<usize>) -> Option<i64> {
        t.get(range)?.iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    }
    if t.len() < 20
        || t[4] != b'-'
        || t[7] != b'-'
        || t[10] != b'T'
        || t[13] != b':'
        || t[16] != b':'
        || t.last() != Some(&b'Z')
    {
        return None;
    }
    let (year, month, day) = (digits(t, 0..4)?, digits(t, 5..7)?, digits(t, 8..10)?);
    let (hour, minute, second) = (digits(t, 11..13)?, digits(t, 14..16)?, digits(t, 17..19)?);
    if !(1..=12).contains(&month) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days_in_month = match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day < 1 || day > days_in_month {
        return None;
    }
    let mut fraction = 0;
    match &t[19..t.len() - 1] {
        [] => {}
        [b'.', rest @ ..] if (1..=9).contains(&rest.len()) => {
            fraction = digits(rest, 0..rest.len())? * 10i64.pow(9 - rest.len() as u32);
        }
        _ => return None,
    }
    // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    seconds.checked_mul(1_000_000_000)?.checked_add(fraction)
}

#[cfg(test)]
mod tests;
