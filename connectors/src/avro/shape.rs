//! A writer schema's shape against the output's columns. arrow-avro writes each value by
//! its Arrow type and checks only names, decimals and nesting against the Avro schema: a
//! `float` column under `"double"`, or a null under a type without null, would be written
//! wrong without a word. These checks say so first: types at open, nulls per row.

use std::collections::HashMap;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::DataType;
use serde_json::{Map, Value, json};

/// An Avro schema's JSON, with its named types (records, enums, fixed) by name.
pub(super) struct Shape {
    root: Value,
    named: HashMap<String, Value>,
}

const PRIMITIVES: &[&str] = &[
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

impl Shape {
    pub(super) fn parse(json: &str) -> Result<Shape, String> {
        let root: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let mut named = HashMap::new();
        collect_named(&root, None, &mut named);
        Ok(Shape { root, named })
    }

    /// The type `ty` stands for: a named type's definition for its name.
    fn resolve<'a>(&'a self, ty: &'a Value) -> &'a Value {
        match ty.as_str() {
            Some(name) if !PRIMITIVES.contains(&name) => self.named.get(name).unwrap_or(ty),
            _ => ty,
        }
    }

    /// `ty` without its null branch: whether null is allowed, and the one other branch
    /// (`None` for a union of several).
    fn without_null<'a>(&'a self, ty: &'a Value) -> (bool, Option<&'a Value>) {
        match ty.as_array() {
            Some(branches) => {
                let nullable = branches.iter().any(|b| b == "null");
                let others: Vec<&Value> = branches.iter().filter(|b| *b != "null").collect();
                match others.as_slice() {
                    [one] => (nullable, Some(self.resolve(one))),
                    _ => (nullable, None),
                }
            }
            None if ty == "null" => (true, None),
            None => (false, Some(self.resolve(ty))),
        }
    }

    /// What a value of `ty` is written as, to compare: the type with its logical type,
    /// precision, scale and size; records, arrays and maps by their parts.
    fn kind(&self, ty: &Value) -> Value {
        let (_, Some(ty)) = self.without_null(ty) else {
            return json!("union");
        };
        match ty {
            Value::String(s) => json!(s),
            Value::Object(o) => {
                let t = &o["type"];
                if t.is_object() || t.is_array() {
                    return self.kind(t);
                }
                let mut kind = Map::new();
                for key in ["type", "logicalType", "precision", "scale", "size"] {
                    if let Some(v) = o.get(key) {
                        kind.insert(key.into(), v.clone());
                    }
                }
                match t.as_str() {
                    Some("record") => {
                        kind.insert("name".into(), json!("record"));
                    }
                    Some("array") => {
                        kind.insert("items".into(), self.kind(&o["items"]));
                    }
                    Some("map") => {
                        kind.insert("values".into(), self.kind(&o["values"]));
                    }
                    _ => {}
                }
                if kind.len() == 1 {
                    return kind.remove("type").unwrap_or_default();
                }
                Value::Object(kind)
            }
            other => other.clone(),
        }
    }

    /// Where this (given) schema's field types differ from `columns`' (the schema the
    /// output's columns derive to), each said for a person.
    pub(super) fn mismatches(&self, columns: &Shape) -> Vec<String> {
        let mut out = Vec::new();
        self.compare(&self.root, columns, &columns.root, "", &mut out);
        out
    }

    fn compare(
        &self,
        given: &Value,
        columns: &Shape,
        derived: &Value,
        path: &str,
        out: &mut Vec<String>,
    ) {
        let (_, Some(g)) = self.without_null(given) else {
            return;
        };
        let (_, Some(d)) = columns.without_null(derived) else {
            return;
        };
        let (gk, dk) = (self.kind(g), columns.kind(d));
        let widened = gk == "long" && dk == "int"; // the same varint on the wire
        if gk != dk && !widened {
            out.push(format!(
                "`{}`: the schema says {gk}, the column is written as {dk} (CAST it in SQL)",
                path.trim_end_matches('.')
            ));
            return;
        }
        match (g.get("type").and_then(Value::as_str), g, d) {
            (Some("record"), _, _) => {
                let fields = |v: &Value| v["fields"].as_array().cloned().unwrap_or_default();
                let derived_fields = fields(d);
                for f in fields(g) {
                    let name = f["name"].as_str().unwrap_or_default();
                    if let Some(df) = derived_fields.iter().find(|df| df["name"] == name) {
                        self.compare(
                            &f["type"],
                            columns,
                            &df["type"],
                            &format!("{path}{name}."),
                            out,
                        );
                    }
                }
            }
            (Some("array"), _, _) => self.compare(
                &g["items"],
                columns,
                &d["items"],
                &format!("{path}[]."),
                out,
            ),
            (Some("map"), _, _) => self.compare(
                &g["values"],
                columns,
                &d["values"],
                &format!("{path}{{}}."),
                out,
            ),
            _ => {}
        }
    }

    /// For each row, the first field (by path) that is null where the schema has no null,
    /// at any depth (in records, array items, map values); `None` for a row that fits.
    pub(super) fn forbidden_nulls(
        &self,
        columns: &[ArrayRef],
        names: &[&str],
    ) -> Vec<Option<String>> {
        let rows = columns.first().map_or(0, |c| c.len());
        let mut out = vec![None; rows];
        for field in self.root["fields"].as_array().into_iter().flatten() {
            let name = field["name"].as_str().unwrap_or_default();
            if let Some(i) = names.iter().position(|n| *n == name) {
                self.mark(columns[i].as_ref(), &field["type"], name, &mut out);
            }
        }
        out
    }

    /// Marks in `out` (one per position of `array`) the positions holding a null where
    /// `ty` has none, naming the field.
    fn mark(&self, array: &dyn Array, ty: &Value, path: &str, out: &mut [Option<String>]) {
        let (nullable, inner) = self.without_null(ty);
        if !nullable && array.logical_null_count() > 0 {
            for (i, slot) in out.iter_mut().enumerate() {
                if slot.is_none() && array.is_null(i) {
                    *slot = Some(path.to_string());
                }
            }
        }
        let Some(inner) = inner else {
            return;
        };
        match (inner.get("type").and_then(Value::as_str), array.data_type()) {
            (Some("record"), DataType::Struct(_)) => {
                let record = array.as_struct();
                for f in inner["fields"].as_array().into_iter().flatten() {
                    let name = f["name"].as_str().unwrap_or_default();
                    if let Some(child) = record.column_by_name(name) {
                        let mut inside = vec![None; out.len()];
                        self.mark(
                            child.as_ref(),
                            &f["type"],
                            &format!("{path}.{name}"),
                            &mut inside,
                        );
                        // A child of a null record is not written.
                        lift(
                            out,
                            inside
                                .into_iter()
                                .enumerate()
                                .map(|(i, s)| s.filter(|_| array.is_valid(i))),
                        );
                    }
                }
            }
            (Some("array"), DataType::List(_)) => {
                let list = array.as_list::<i32>();
                self.mark_items(
                    array,
                    list.values(),
                    list.offsets(),
                    &inner["items"],
                    &format!("{path}[]"),
                    out,
                );
            }
            (Some("array"), DataType::LargeList(_)) => {
                let list = array.as_list::<i64>();
                let offsets = OffsetBuffer::new(list.offsets().iter().map(|o| *o as i32).collect());
                self.mark_items(
                    array,
                    list.values(),
                    &offsets,
                    &inner["items"],
                    &format!("{path}[]"),
                    out,
                );
            }
            (Some("map"), DataType::Map(_, _)) => {
                let map = array.as_map();
                self.mark_items(
                    array,
                    map.values(),
                    map.offsets(),
                    &inner["values"],
                    &format!("{path}{{}}"),
                    out,
                );
            }
            _ => {}
        }
    }

    /// Marks the positions of `array` (a list or map) with an item that is null where
    /// `ty` has no null.
    fn mark_items(
        &self,
        array: &dyn Array,
        items: &ArrayRef,
        offsets: &OffsetBuffer<i32>,
        ty: &Value,
        path: &str,
        out: &mut [Option<String>],
    ) {
        let mut inside = vec![None; items.len()];
        self.mark(items.as_ref(), ty, path, &mut inside);
        if inside.iter().all(Option::is_none) {
            return;
        }
        let per_row = offsets.windows(2).enumerate().map(|(i, w)| {
            if array.is_null(i) {
                return None;
            }
            inside[w[0] as usize..w[1] as usize]
                .iter()
                .flatten()
                .next()
                .cloned()
        });
        lift(out, per_row);
    }
}

/// Sets each empty slot of `out` to its mark in `marks`.
fn lift(out: &mut [Option<String>], marks: impl Iterator<Item = Option<String>>) {
    for (slot, mark) in out.iter_mut().zip(marks) {
        if slot.is_none() {
            *slot = mark;
        }
    }
}

/// Every named type of `ty` (records, enums, fixed), by name and full name.
fn collect_named(ty: &Value, namespace: Option<&str>, named: &mut HashMap<String, Value>) {
    match ty {
        Value::Array(branches) => {
            for b in branches {
                collect_named(b, namespace, named);
            }
        }
        Value::Object(o) => {
            let ns = o.get("namespace").and_then(Value::as_str).or(namespace);
            if let (Some(name), Some("record" | "enum" | "fixed")) = (
                o.get("name").and_then(Value::as_str),
                o.get("type").and_then(Value::as_str),
            ) {
                named.insert(name.to_string(), ty.clone());
                if let Some(ns) = ns.filter(|_| !name.contains('.')) {
                    named.insert(format!("{ns}.{name}"), ty.clone());
                }
            }
            for f in o
                .get("fields")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                collect_named(&f["type"], ns, named);
            }
            for key in ["type", "items", "values"] {
                if let Some(inner) = o.get(key).filter(|v| v.is_object() || v.is_array()) {
                    collect_named(inner, ns, named);
                }
            }
        }
        _ => {}
    }
}
