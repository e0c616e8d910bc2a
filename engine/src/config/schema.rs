//! Record schemas declared in YAML, turned into Arrow fields.
//!
//! ```yaml
//! schema:
//!   - { name: user_id, type: int64, nullable: false }
//!   - { name: event_time, type: timestamp, unit: ms, timezone: UTC }
//!   - { name: tags, type: list, items: { type: utf8 } }
//!   - name: device
//!     type: struct
//!     fields:
//!       - { name: os, type: utf8 }
//!       - { name: version, type: int32 }
//! ```
//!
//! A field is nullable unless it says `nullable: false`; a record where such a field is
//! missing or null is a failure with a reason, never a silent null.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use serde::Deserialize;

/// One declared field; deserializes straight into an Arrow [`Field`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "FieldConfig")]
pub struct FieldSpec(pub Field);

/// A declared schema: the fields of a record, in order.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(transparent)]
pub struct SchemaSpec(pub Vec<FieldSpec>);

impl SchemaSpec {
    pub fn to_arrow(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.0.iter().map(|f| f.0.clone()).collect::<Vec<_>>(),
        ))
    }
}

/// The YAML form of a field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldConfig {
    /// The column name. Required except for list `items`.
    name: Option<String>,
    /// bool, int8, int16, int32, int64, uint8, uint16, uint32, uint64, float32, float64,
    /// utf8 (or string), binary, date32 (or date), timestamp, decimal128, list, struct.
    #[serde(rename = "type")]
    data_type: String,
    /// Whether the value may be missing or null (default true).
    #[serde(default = "default_nullable")]
    nullable: bool,
    /// timestamp: s, ms, us or ns (default ms).
    unit: Option<String>,
    /// timestamp: a time zone such as UTC or +02:00 (default: none).
    timezone: Option<String>,
    /// decimal128: total digits.
    precision: Option<u8>,
    /// decimal128: digits after the point.
    scale: Option<i8>,
    /// list: the type of the items.
    items: Option<Box<FieldConfig>>,
    /// struct: the fields.
    fields: Option<Vec<FieldConfig>>,
}

fn default_nullable() -> bool {
    true
}

const TYPES: &str = "bool, int8, int16, int32, int64, uint8, uint16, uint32, uint64, float32, \
                     float64, utf8, binary, date32, timestamp, decimal128, list, struct";

impl TryFrom<FieldConfig> for FieldSpec {
    type Error = String;

    fn try_from(c: FieldConfig) -> Result<Self, String> {
        let name = c
            .name
            .clone()
            .ok_or_else(|| "missing field `name`".to_string())?;
        let data_type = c.arrow_type()?;
        Ok(FieldSpec(Field::new(name, data_type, c.nullable)))
    }
}

impl FieldConfig {
    fn arrow_type(&self) -> Result<DataType, String> {
        let only = |allowed: &[&str]| -> Result<(), String> {
            let given = [
                ("unit", self.unit.is_some()),
                ("timezone", self.timezone.is_some()),
                ("precision", self.precision.is_some()),
                ("scale", self.scale.is_some()),
                ("items", self.items.is_some()),
                ("fields", self.fields.is_some()),
            ];
            for (key, present) in given {
                if present && !allowed.contains(&key) {
                    return Err(format!("`{key}` does not apply to type {}", self.data_type));
                }
            }
            Ok(())
        };
        let t = match self.data_type.as_str() {
            "bool" | "boolean" => DataType::Boolean,
            "int8" => DataType::Int8,
            "int16" => DataType::Int16,
            "int32" => DataType::Int32,
            "int64" => DataType::Int64,
            "uint8" => DataType::UInt8,
            "uint16" => DataType::UInt16,
            "uint32" => DataType::UInt32,
            "uint64" => DataType::UInt64,
            "float32" | "float" => DataType::Float32,
            "float64" | "double" => DataType::Float64,
            "utf8" | "string" => DataType::Utf8,
            "binary" => DataType::Binary,
            "date32" | "date" => DataType::Date32,
            "timestamp" => {
                only(&["unit", "timezone"])?;
                let unit = match self.unit.as_deref().unwrap_or("ms") {
                    "s" => TimeUnit::Second,
                    "ms" => TimeUnit::Millisecond,
                    "us" => TimeUnit::Microsecond,
                    "ns" => TimeUnit::Nanosecond,
                    other => {
                        return Err(format!(
                            "unknown unit `{other}`, expected one of s, ms, us, ns"
                        ));
                    }
                };
                return Ok(DataType::Timestamp(
                    unit,
                    self.timezone.as_deref().map(Into::into),
                ));
            }
            "decimal128" | "decimal" => {
                only(&["precision", "scale"])?;
                let precision = self
                    .precision
                    .ok_or("decimal128 needs `precision` (1 to 38)")?;
                if !(1..=38).contains(&precision) {
                    return Err(format!("precision {precision} is out of range 1 to 38"));
                }
                return Ok(DataType::Decimal128(precision, self.scale.unwrap_or(0)));
            }
            "list" => {
                only(&["items"])?;
                let items = self
                    .items
                    .as_ref()
                    .ok_or("a list needs `items`, e.g. items: { type: utf8 }")?;
                let item = Field::new("item", items.arrow_type()?, items.nullable);
                return Ok(DataType::List(Arc::new(item)));
            }
            "struct" => {
                only(&["fields"])?;
                let fields = self
                    .fields
                    .as_ref()
                    .ok_or("a struct needs `fields`, a list of fields")?;
                let mut out = Vec::with_capacity(fields.len());
                for f in fields {
                    let name = f.name.clone().ok_or("every struct field needs a `name`")?;
                    out.push(Field::new(name, f.arrow_type()?, f.nullable));
                }
                return Ok(DataType::Struct(Fields::from(out)));
            }
            other => return Err(format!("unknown type `{other}`, expected one of {TYPES}")),
        };
        only(&[])?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Location, Problems, from_node, yaml};

    fn parse(text: &str) -> Result<SchemaRef, String> {
        let mut p = Problems::new("s.yaml");
        let node = yaml::parse(text, &yaml::ProcessEnv, &mut p).unwrap();
        let spec: Option<SchemaSpec> = from_node(&node, &Location::new("schema"), &[], &mut p);
        match spec {
            Some(s) if p.is_empty() => Ok(s.to_arrow()),
            _ => Err(p.sorted().to_string()),
        }
    }

    #[test]
    fn nested_types() {
        let s = parse(
            "- { name: id, type: int64, nullable: false }\n\
             - { name: tags, type: list, items: { type: utf8 } }\n\
             - name: dev\n  type: struct\n  fields:\n    - { name: os, type: string }\n\
             - { name: t, type: timestamp, unit: us, timezone: UTC }\n",
        )
        .unwrap();
        assert!(!s.field(0).is_nullable());
        assert_eq!(
            s.field(1).data_type(),
            &DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
        );
        assert!(matches!(s.field(2).data_type(), DataType::Struct(f) if f.len() == 1));
        assert_eq!(
            s.field(3).data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
    }

    #[test]
    fn errors_point_at_the_field() {
        let e = parse("- { name: a, type: int64 }\n- { name: b, type: lst }\n").unwrap_err();
        assert!(e.starts_with("schema[1]: unknown type `lst`"), "{e}");
        assert!(e.ends_with("(s.yaml:2:3)"), "{e}");
        let e = parse("- { name: a, type: list }\n").unwrap_err();
        assert!(e.contains("a list needs `items`"), "{e}");
    }
}
