//! Accumulators: the running value of one aggregate for one key and window, how a row
//! updates it, how two partial values merge (partitions of one key), and how it is stored.

use std::collections::HashSet;

use arrow::array::{
    Array, ArrayRef, Float64Array, Float64Builder, Int64Array, Int64Builder, StringArray,
    StringBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use sluice_engine::{Error, Result};
use xxhash_rust::xxh3::xxh3_64;

mod encoding;
mod hll;

pub use encoding::{decode, encode};
use hll::HLL_REGISTERS;
pub use hll::Hll;

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    /// `count()`: rows.
    CountRows,
    /// `count(col)`: rows where `col` is not null.
    Count,
    Sum,
    Min,
    Max,
    Avg,
    CountDistinct,
    ApproxCountDistinct,
    First,
    Last,
    /// `max_by(col, by)`: `col` of the row with the largest `by` (ties: the earliest row).
    MaxBy,
    /// `min_by(col, by)`: `col` of the row with the smallest `by` (ties: the earliest row).
    MinBy,
}

impl Func {
    pub const NAMES: &[&str] = &[
        "count",
        "sum",
        "min",
        "max",
        "avg",
        "count_distinct",
        "approx_count_distinct",
        "first",
        "last",
        "max_by",
        "min_by",
    ];

    pub fn parse(name: &str, has_column: bool) -> Option<Func> {
        Some(match name {
            "count" if has_column => Func::Count,
            "count" => Func::CountRows,
            "sum" => Func::Sum,
            "min" => Func::Min,
            "max" => Func::Max,
            "avg" => Func::Avg,
            "count_distinct" => Func::CountDistinct,
            "approx_count_distinct" => Func::ApproxCountDistinct,
            "first" => Func::First,
            "last" => Func::Last,
            "max_by" => Func::MaxBy,
            "min_by" => Func::MinBy,
            _ => return None,
        })
    }
}

/// How an input column is read: every supported type is one of three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Integers, booleans, timestamps, dates: read as Int64.
    Int,
    /// Floats and decimals: read as Float64.
    Float,
    /// Strings: read as Utf8.
    Text,
}

impl Kind {
    pub fn of(ty: &DataType) -> Option<Kind> {
        use DataType::*;
        Some(match ty {
            Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 | Boolean
            | Timestamp(..) | Date32 | Date64 | Duration(_) => Kind::Int,
            Float16 | Float32 | Float64 | Decimal128(..) | Decimal256(..) => Kind::Float,
            Utf8 | LargeUtf8 | Utf8View => Kind::Text,
            _ => return None,
        })
    }

    fn arrow(self) -> DataType {
        match self {
            Kind::Int => DataType::Int64,
            Kind::Float => DataType::Float64,
            Kind::Text => DataType::Utf8,
        }
    }
}

/// One aggregate of the stage, planned against the input schema.
#[derive(Debug, Clone)]
pub struct AggDef {
    pub name: String,
    pub func: Func,
    /// The input column and how it is read (none for `count()`).
    pub input: Option<(usize, Kind)>,
    /// The column that picks the row, for `max_by`/`min_by`.
    pub by: Option<(usize, Kind)>,
    pub output: DataType,
}

impl AggDef {
    /// The output type of `func` over a column of type `input`.
    pub fn output_type(func: Func, input: Option<(&DataType, Kind)>) -> DataType {
        match (func, input) {
            (
                Func::CountRows | Func::Count | Func::CountDistinct | Func::ApproxCountDistinct,
                _,
            ) => DataType::Int64,
            (Func::Avg, _) => DataType::Float64,
            (Func::Sum, Some((_, Kind::Int))) => DataType::Int64,
            (Func::Sum, _) => DataType::Float64,
            (
                Func::Min | Func::Max | Func::First | Func::Last | Func::MaxBy | Func::MinBy,
                Some((ty, _)),
            ) => ty.clone(),
            (
                Func::Min | Func::Max | Func::First | Func::Last | Func::MaxBy | Func::MinBy,
                None,
            ) => DataType::Null,
        }
    }

    /// Whether the accumulator's size changes with the values it sees: distinct sets, and
    /// kept values that are text.
    pub fn variable_size(&self) -> bool {
        let text = |c: Option<(usize, Kind)>| matches!(c, Some((_, Kind::Text)));
        match self.func {
            Func::CountDistinct => true,
            Func::Min | Func::Max | Func::First | Func::Last => text(self.input),
            Func::MaxBy | Func::MinBy => text(self.input) || text(self.by),
            _ => false,
        }
    }

    pub fn new_acc(&self) -> Acc {
        let kind = self.input.map(|(_, k)| k);
        match self.func {
            Func::CountRows | Func::Count => Acc::Count(0),
            Func::Sum if kind == Some(Kind::Int) => Acc::SumInt(None),
            Func::Sum => Acc::SumFloat(None),
            Func::Min => Acc::Min(Value::Null),
            Func::Max => Acc::Max(Value::Null),
            Func::Avg => Acc::Avg { sum: 0.0, count: 0 },
            Func::CountDistinct => Acc::Distinct(Box::default()),
            Func::ApproxCountDistinct => Acc::Approx(Box::default()),
            Func::First => Acc::First(Box::new((Order::MAX, Value::Null))),
            Func::Last => Acc::Last(Box::new((Order::MIN, Value::Null))),
            Func::MaxBy => Acc::MaxBy(Box::default()),
            Func::MinBy => Acc::MinBy(Box::default()),
        }
    }
}

/// A value of a min/max/first/last.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Float(f64),
    Text(Box<str>),
}

impl Value {
    fn less(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => a < b,
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b).is_lt(),
            (Value::Text(a), Value::Text(b)) => a < b,
            _ => false,
        }
    }

    fn heap_size(&self) -> usize {
        match self {
            Value::Text(t) => t.len(),
            _ => 0,
        }
    }
}

/// Where a row stands in event time, to pick first and last: event time, then partition,
/// then the row's sequence number in its partition. Total, so merging partial results of
/// several partitions in any order gives the same answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Order {
    pub time: i64,
    pub partition: u32,
    pub seq: u64,
}

impl Order {
    const MIN: Order = Order {
        time: i64::MIN,
        partition: 0,
        seq: 0,
    };
    const MAX: Order = Order {
        time: i64::MAX,
        partition: u32::MAX,
        seq: u64::MAX,
    };
}

/// The column an aggregate reads, downcast once per batch.
pub enum Input<'a> {
    Rows,
    Int(&'a Int64Array),
    Float(&'a Float64Array),
    Text(&'a StringArray),
    /// `max_by`/`min_by`: the column whose value is kept, and the one that picks the row.
    By(Box<Input<'a>>, Box<Input<'a>>),
}

impl Input<'_> {
    fn value(&self, row: usize) -> Value {
        match self {
            Input::Rows => Value::Null,
            Input::Int(a) if a.is_valid(row) => Value::Int(a.value(row)),
            Input::Float(a) if a.is_valid(row) => Value::Float(a.value(row)),
            Input::Text(a) if a.is_valid(row) => Value::Text(a.value(row).into()),
            Input::By(value, _) => value.value(row),
            _ => Value::Null,
        }
    }

    fn is_valid(&self, row: usize) -> bool {
        match self {
            Input::Rows => true,
            Input::Int(a) => a.is_valid(row),
            Input::Float(a) => a.is_valid(row),
            Input::Text(a) => a.is_valid(row),
            Input::By(value, _) => value.is_valid(row),
        }
    }

    /// The value's bytes, for distinct counts.
    fn bytes(&self, row: usize) -> Option<Vec<u8>> {
        match self {
            Input::Int(a) if a.is_valid(row) => Some(a.value(row).to_le_bytes().to_vec()),
            Input::Float(a) if a.is_valid(row) => {
                Some(a.value(row).to_bits().to_le_bytes().to_vec())
            }
            Input::Text(a) if a.is_valid(row) => Some(a.value(row).as_bytes().to_vec()),
            _ => None,
        }
    }

    fn hash(&self, row: usize) -> Option<u64> {
        match self {
            Input::Int(a) if a.is_valid(row) => Some(xxh3_64(&a.value(row).to_le_bytes())),
            Input::Float(a) if a.is_valid(row) => {
                Some(xxh3_64(&a.value(row).to_bits().to_le_bytes()))
            }
            Input::Text(a) if a.is_valid(row) => Some(xxh3_64(a.value(row).as_bytes())),
            _ => None,
        }
    }
}

/// The columns one aggregate reads, cast to their reading type (Int64, Float64, Utf8).
pub struct Cast {
    value: Option<ArrayRef>,
    by: Option<ArrayRef>,
}

/// The input columns of every aggregate, cast once per batch.
pub fn cast_inputs(aggs: &[AggDef], columns: &[ArrayRef]) -> Result<Vec<Cast>> {
    let read = |a: &AggDef, input: Option<(usize, Kind)>| {
        input
            .map(|(i, kind)| {
                cast(&columns[i], &kind.arrow())
                    .map_err(|e| Error::arrow(format!("reading the input of `{}`", a.name), e))
            })
            .transpose()
    };
    aggs.iter()
        .map(|a| {
            Ok(Cast {
                value: read(a, a.input)?,
                by: read(a, a.by)?,
            })
        })
        .collect()
}

pub fn input_view(cast: &Cast) -> Input<'_> {
    match &cast.by {
        Some(_) => Input::By(Box::new(view(&cast.value)), Box::new(view(&cast.by))),
        None => view(&cast.value),
    }
}

fn view(array: &Option<ArrayRef>) -> Input<'_> {
    match array {
        None => Input::Rows,
        Some(a) => match a.data_type() {
            DataType::Int64 => Input::Int(a.as_any().downcast_ref().expect("cast to Int64")),
            DataType::Float64 => Input::Float(a.as_any().downcast_ref().expect("cast to Float64")),
            _ => Input::Text(a.as_any().downcast_ref().expect("cast to Utf8")),
        },
    }
}

/// The running value of one aggregate for one key and window.
#[derive(Debug, Clone, PartialEq)]
pub enum Acc {
    Count(i64),
    SumInt(Option<i64>),
    SumFloat(Option<f64>),
    Min(Value),
    Max(Value),
    Avg {
        sum: f64,
        count: i64,
    },
    /// Boxed, as the variants below: the largest variant sets every accumulator's size,
    /// and a table holds millions of them (a `count()` is 32 bytes rather than 56).
    #[allow(clippy::box_collection)] // the set's 48 bytes would be every accumulator's
    Distinct(Box<HashSet<Box<[u8]>>>),
    Approx(Box<Hll>),
    /// Where the value stands (the smallest order so far), and the value.
    First(Box<(Order, Value)>),
    Last(Box<(Order, Value)>),
    MaxBy(Box<Pick>),
    MinBy(Box<Pick>),
}

/// The row `max_by`/`min_by` picked so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    /// Its picking value, where it stands, and the value kept.
    by: Value,
    at: Order,
    value: Value,
}

impl Default for Pick {
    fn default() -> Self {
        Pick {
            by: Value::Null,
            at: Order::MAX,
            value: Value::Null,
        }
    }
}

/// `max_by`/`min_by` of one row.
fn pick_row(max: bool, pick: &mut Pick, input: &Input, row: usize, order: Order) {
    if let Input::By(value, by) = input {
        let b = by.value(row);
        if picks(max, &pick.by, pick.at, &b, order) {
            *pick = Pick {
                by: b,
                at: order,
                value: value.value(row),
            };
        }
    }
}

/// Whether a row whose picking value is `by` at `order` replaces the current pick.
fn picks(max: bool, current: &Value, at: Order, by: &Value, order: Order) -> bool {
    match (current, by) {
        (_, Value::Null) => false,
        (Value::Null, _) => true,
        _ if current == by => order < at,
        _ if max => current.less(by),
        _ => by.less(current),
    }
}

/// A placeholder left where an accumulator was moved out (a pane's last window takes its
/// entries).
impl Default for Acc {
    fn default() -> Self {
        Acc::Count(0)
    }
}

impl Acc {
    /// Adds row `row` of `input`; nulls count only for `count()`.
    #[inline]
    pub fn update(&mut self, input: &Input, row: usize, order: Order) {
        match self {
            Acc::Count(n) => *n += input.is_valid(row) as i64,
            Acc::SumInt(s) => {
                if let Input::Int(a) = input
                    && a.is_valid(row)
                {
                    *s = Some(s.unwrap_or(0).wrapping_add(a.value(row)));
                }
            }
            Acc::SumFloat(s) => {
                if let Input::Float(a) = input
                    && a.is_valid(row)
                {
                    *s = Some(s.unwrap_or(0.0) + a.value(row));
                }
            }
            Acc::Avg { sum, count } => {
                if let Input::Float(a) = input
                    && a.is_valid(row)
                {
                    *sum += a.value(row);
                    *count += 1;
                } else if let Input::Int(a) = input
                    && a.is_valid(row)
                {
                    *sum += a.value(row) as f64;
                    *count += 1;
                }
            }
            Acc::Min(v) => {
                if input.is_valid(row) {
                    let x = input.value(row);
                    if *v == Value::Null || x.less(v) {
                        *v = x;
                    }
                }
            }
            Acc::Max(v) => {
                if input.is_valid(row) {
                    let x = input.value(row);
                    if *v == Value::Null || v.less(&x) {
                        *v = x;
                    }
                }
            }
            Acc::Distinct(set) => {
                if let Some(bytes) = input.bytes(row)
                    && !set.contains(bytes.as_slice())
                {
                    set.insert(bytes.into_boxed_slice());
                }
            }
            Acc::Approx(hll) => {
                if let Some(h) = input.hash(row) {
                    hll.add(h);
                }
            }
            Acc::First(first) => {
                if input.is_valid(row) && order < first.0 {
                    **first = (order, input.value(row));
                }
            }
            Acc::Last(last) => {
                if input.is_valid(row) && order > last.0 {
                    **last = (order, input.value(row));
                }
            }
            Acc::MaxBy(pick) => pick_row(true, pick, input, row, order),
            Acc::MinBy(pick) => pick_row(false, pick, input, row, order),
        }
    }

    /// Adds another partial value of the same aggregate (another partition's).
    pub fn merge(&mut self, other: Acc) {
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::SumInt(a), Acc::SumInt(b)) => {
                if let Some(b) = b {
                    *a = Some(a.unwrap_or(0).wrapping_add(b));
                }
            }
            (Acc::SumFloat(a), Acc::SumFloat(b)) => {
                if let Some(b) = b {
                    *a = Some(a.unwrap_or(0.0) + b);
                }
            }
            (Acc::Avg { sum, count }, Acc::Avg { sum: s, count: c }) => {
                *sum += s;
                *count += c;
            }
            (Acc::Min(a), Acc::Min(b)) => {
                if *a == Value::Null || (b != Value::Null && b.less(a)) {
                    *a = b;
                }
            }
            (Acc::Max(a), Acc::Max(b)) => {
                if *a == Value::Null || (b != Value::Null && a.less(&b)) {
                    *a = b;
                }
            }
            (Acc::Distinct(a), Acc::Distinct(b)) => a.extend(*b),
            (Acc::Approx(a), Acc::Approx(b)) => a.merge(&b),
            (Acc::First(a), Acc::First(b)) => {
                if b.0 < a.0 {
                    *a = b;
                }
            }
            (Acc::Last(a), Acc::Last(b)) => {
                if b.0 > a.0 {
                    *a = b;
                }
            }
            (Acc::MaxBy(a), Acc::MaxBy(b)) => {
                if picks(true, &a.by, a.at, &b.by, b.at) {
                    *a = b;
                }
            }
            (Acc::MinBy(a), Acc::MinBy(b)) => {
                if picks(false, &a.by, a.at, &b.by, b.at) {
                    *a = b;
                }
            }
            (a, b) => debug_assert!(false, "merging {a:?} with {b:?}"),
        }
    }

    /// As [`Acc::merge`], reading the other value where it is (copied only where kept):
    /// what a window merges from a pane that later windows still hold.
    pub fn merge_ref(&mut self, other: &Acc) {
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::SumInt(a), Acc::SumInt(Some(b))) => *a = Some(a.unwrap_or(0).wrapping_add(*b)),
            (Acc::SumFloat(a), Acc::SumFloat(Some(b))) => *a = Some(a.unwrap_or(0.0) + b),
            (Acc::Avg { sum, count }, Acc::Avg { sum: s, count: c }) => {
                *sum += s;
                *count += c;
            }
            (a, b) => a.merge(b.clone()),
        }
    }

    /// Bytes this accumulator holds beyond its own size, for the memory budget.
    pub fn heap_size(&self) -> usize {
        match self {
            Acc::Min(v) | Acc::Max(v) => v.heap_size(),
            Acc::First(p) | Acc::Last(p) => std::mem::size_of::<(Order, Value)>() + p.1.heap_size(),
            Acc::MaxBy(p) | Acc::MinBy(p) => {
                std::mem::size_of::<Pick>() + p.by.heap_size() + p.value.heap_size()
            }
            Acc::Distinct(set) => {
                std::mem::size_of::<HashSet<Box<[u8]>>>()
                    + set.iter().map(|b| b.len() + 24).sum::<usize>()
            }
            Acc::Approx(_) => HLL_REGISTERS,
            _ => 0,
        }
    }
}

/// The value an accumulator outputs, to rank rows by (`top`).
pub fn rank_value(acc: &Acc) -> Value {
    match acc {
        Acc::Count(n) => Value::Int(*n),
        Acc::SumInt(s) => s.map_or(Value::Null, Value::Int),
        Acc::SumFloat(s) => s.map_or(Value::Null, Value::Float),
        Acc::Avg { sum, count } if *count > 0 => Value::Float(sum / *count as f64),
        Acc::Avg { .. } => Value::Null,
        Acc::Distinct(set) => Value::Int(set.len() as i64),
        Acc::Approx(hll) => Value::Int(hll.estimate().round() as i64),
        Acc::Min(v) | Acc::Max(v) => v.clone(),
        Acc::First(p) | Acc::Last(p) => p.1.clone(),
        Acc::MaxBy(p) | Acc::MinBy(p) => p.value.clone(),
    }
}

/// Orders two outputs of one aggregate; null is the smallest.
pub fn rank_cmp(a: &Value, b: &Value) -> std::cmp::Ordering {
    use std::cmp::Ordering::*;
    match (a, b) {
        (Value::Null, Value::Null) => Equal,
        (Value::Null, _) => Less,
        (_, Value::Null) => Greater,
        _ if a.less(b) => Less,
        _ if b.less(a) => Greater,
        _ => Equal,
    }
}

/// The output column of aggregate `def` from one accumulator per row.
pub fn finish<'a>(def: &AggDef, accs: impl ExactSizeIterator<Item = &'a Acc>) -> Result<ArrayRef> {
    let n = accs.len();
    let array: ArrayRef = match def.func {
        Func::CountRows | Func::Count | Func::CountDistinct | Func::ApproxCountDistinct => {
            let mut b = Int64Builder::with_capacity(n);
            for acc in accs {
                b.append_value(match acc {
                    Acc::Count(c) => *c,
                    Acc::Distinct(set) => set.len() as i64,
                    Acc::Approx(hll) => hll.estimate().round() as i64,
                    _ => 0,
                });
            }
            std::sync::Arc::new(b.finish())
        }
        Func::Sum if matches!(def.output, DataType::Int64) => {
            let mut b = Int64Builder::with_capacity(n);
            for acc in accs {
                b.append_option(match acc {
                    Acc::SumInt(s) => *s,
                    _ => None,
                });
            }
            std::sync::Arc::new(b.finish())
        }
        Func::Sum | Func::Avg => {
            let mut b = Float64Builder::with_capacity(n);
            for acc in accs {
                b.append_option(match acc {
                    Acc::SumFloat(s) => *s,
                    Acc::Avg { sum, count } if *count > 0 => Some(sum / *count as f64),
                    _ => None,
                });
            }
            std::sync::Arc::new(b.finish())
        }
        Func::Min | Func::Max | Func::First | Func::Last | Func::MaxBy | Func::MinBy => {
            let values = accs.map(|acc| match acc {
                Acc::Min(v) | Acc::Max(v) => v,
                Acc::First(p) | Acc::Last(p) => &p.1,
                Acc::MaxBy(p) | Acc::MinBy(p) => &p.value,
                _ => &Value::Null,
            });
            let array = values_array(def.input.map(|(_, k)| k), values, n);
            return cast(&array, &def.output)
                .map_err(|e| Error::arrow(format!("writing `{}`", def.name), e));
        }
    };
    Ok(array)
}

fn values_array<'a>(
    kind: Option<Kind>,
    values: impl Iterator<Item = &'a Value>,
    n: usize,
) -> ArrayRef {
    match kind {
        Some(Kind::Int) => {
            let mut b = Int64Builder::with_capacity(n);
            for v in values {
                b.append_option(if let Value::Int(x) = v {
                    Some(*x)
                } else {
                    None
                });
            }
            std::sync::Arc::new(b.finish())
        }
        Some(Kind::Float) => {
            let mut b = Float64Builder::with_capacity(n);
            for v in values {
                b.append_option(if let Value::Float(x) = v {
                    Some(*x)
                } else {
                    None
                });
            }
            std::sync::Arc::new(b.finish())
        }
        _ => {
            let mut b = StringBuilder::with_capacity(n, n * 8);
            for v in values {
                b.append_option(if let Value::Text(x) = v {
                    Some(x)
                } else {
                    None
                });
            }
            std::sync::Arc::new(b.finish())
        }
    }
}

#[cfg(test)]
mod tests;
