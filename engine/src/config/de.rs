//! A serde deserializer over a [`Node`] tree that reports where a value went wrong.
//!
//! Errors carry the YAML path and the line:column of the offending node. Unknown fields of a
//! struct are all recorded before it is read and then skipped, so a struct with three
//! misspelled keys yields three problems, and a missing field or a wrong value in it a fourth. Any other error ends the read of the component being deserialized
//! (serde cannot produce a value of a type it failed to read) and is recorded too.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

use super::yaml::{Node, Plain, Value};
use super::{Location, Mark, Problem, Problems};

/// Deserializes `node` into `T`, recording every problem. `extra_fields` are keys that the
/// caller read itself from the same mapping (such as `type`); they are listed in "unknown
/// field" messages as valid.
pub fn from_node<T: DeserializeOwned>(
    node: &Node,
    path: &Location,
    extra_fields: &[&str],
    problems: &mut Problems,
) -> Option<T> {
    let sink = RefCell::new(Vec::new());
    let de = NodeDe {
        node,
        path: path.clone(),
        extra: extra_fields,
        sink: &sink,
    };
    let result = T::deserialize(de);
    let recorded = sink.into_inner();
    let had_recorded = !recorded.is_empty();
    for p in recorded {
        problems.push(p);
    }
    match result {
        Ok(v) if !had_recorded => Some(v),
        Ok(_) => None,
        Err(e) => {
            problems.push(e.into_problem());
            None
        }
    }
}

#[derive(Debug)]
pub struct DeError {
    path: Option<Location>,
    mark: Option<Mark>,
    message: String,
    /// Set for "missing field": the path gets the field's name.
    missing: Option<&'static str>,
}

impl DeError {
    fn new(message: String) -> Self {
        DeError {
            path: None,
            mark: None,
            message,
            missing: None,
        }
    }

    fn at(mut self, path: &Location, mark: Mark) -> Self {
        if self.path.is_none() {
            self.path = Some(match self.missing {
                Some(field) => path.key(field),
                None => path.clone(),
            });
            self.mark = Some(mark);
        }
        self
    }

    fn into_problem(self) -> Problem {
        Problem {
            path: self.path.unwrap_or_default(),
            mark: self.mark,
            message: self.message,
        }
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError::new(msg.to_string())
    }

    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DeError::new(format!("expected {exp}, found {}", describe(unexp)))
    }

    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DeError::new(format!("expected {exp}, found {}", describe(unexp)))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(format!(
            "unknown value `{variant}`, expected one of {}",
            expected.join(", ")
        ))
    }

    fn unknown_field(_field: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(format!(
            "unknown field, expected one of {}",
            expected.join(", ")
        ))
    }

    fn missing_field(field: &'static str) -> Self {
        let mut e = DeError::new("missing required field".to_string());
        e.missing = Some(field);
        e
    }
}

fn describe(unexp: de::Unexpected<'_>) -> String {
    use de::Unexpected as U;
    match unexp {
        U::Str("") => "an empty value".to_string(),
        U::Str(s) => format!("`{s}`"),
        U::Signed(i) => format!("`{i}`"),
        U::Unsigned(i) => format!("`{i}`"),
        U::Float(f) => format!("`{f}`"),
        U::Bool(b) => format!("`{b}`"),
        U::Unit => "nothing (null)".to_string(),
        U::Seq => "a list".to_string(),
        U::Map => "a mapping".to_string(),
        other => other.to_string(),
    }
}

type Sink = RefCell<Vec<Problem>>;

struct NodeDe<'a> {
    node: &'a Node,
    path: Location,
    extra: &'a [&'a str],
    sink: &'a Sink,
}

impl<'a> NodeDe<'a> {
    fn child(&self, node: &'a Node, path: Location) -> NodeDe<'a> {
        NodeDe {
            node,
            path,
            extra: &[],
            sink: self.sink,
        }
    }

    fn locate(&self, e: DeError) -> DeError {
        e.at(&self.path, self.node.mark)
    }

    fn unexpected(&self) -> DeError {
        DeError::new(format!("unexpected {}", self.node.describe()))
    }

    fn wrong(&self, expected: &str) -> DeError {
        self.locate(DeError::new(format!(
            "expected {expected}, found {}",
            self.node.describe()
        )))
    }

    fn scalar(&self, expected: &str) -> Result<&'a str, DeError> {
        match &self.node.value {
            Value::Scalar { text, .. } => Ok(text),
            _ => Err(self.wrong(expected)),
        }
    }

    fn integer(&self, expected: &str) -> Result<i128, DeError> {
        match self.node.typed() {
            Some(Plain::Int(i)) => Ok(i),
            // Quoted numbers are accepted where a number is expected: `"8192"` is what
            // `${VAR}` interpolation inside quotes produces.
            Some(Plain::Str(s)) => s.trim().parse().map_err(|_| self.wrong(expected)),
            _ => Err(self.wrong(expected)),
        }
    }

    fn visit_mapping<'de, V: Visitor<'de>>(
        self,
        fields: Option<&'static [&'static str]>,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let Value::Map(entries) = &self.node.value else {
            return Err(self.wrong("a mapping"));
        };
        if let Some(fields) = fields {
            for (k, _) in entries {
                let key = k.scalar().unwrap_or_default();
                if !fields.contains(&key) && !self.extra.contains(&key) {
                    let mut expected: Vec<&str> = self.extra.to_vec();
                    expected.extend(fields);
                    self.sink.borrow_mut().push(Problem {
                        path: self.path.key(key),
                        mark: Some(k.mark),
                        message: format!("unknown field, expected one of {}", expected.join(", ")),
                    });
                }
            }
        }
        let access = MapAccess {
            parent: &self,
            entries,
            fields,
            next: 0,
            value: None,
        };
        visitor.visit_map(access).map_err(|e| self.locate(e))
    }

    fn float(&self) -> Result<f64, DeError> {
        match self.node.typed() {
            Some(Plain::Int(i)) => Ok(i as f64),
            Some(Plain::Float(f)) => Ok(f),
            Some(Plain::Str(s)) => s.trim().parse().map_err(|_| self.wrong("a number")),
            _ => Err(self.wrong("a number")),
        }
    }
}

macro_rules! int_method {
    ($method:ident, $visit:ident, $ty:ty, $what:expr) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let i = self.integer($what)?;
            let v = <$ty>::try_from(i).map_err(|_| {
                self.locate(DeError::new(format!(
                    "{i} is out of range: expected {} from {} to {}",
                    $what,
                    <$ty>::MIN,
                    <$ty>::MAX
                )))
            })?;
            visitor.$visit(v).map_err(|e| self.locate(e))
        }
    };
}

impl<'de, 'a> de::Deserializer<'de> for NodeDe<'a> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.node.value {
            Value::Scalar { .. } => match self.node.typed().expect("scalar") {
                Plain::Null => visitor.visit_unit(),
                Plain::Bool(b) => visitor.visit_bool(b),
                Plain::Int(i) => match i64::try_from(i) {
                    Ok(i) => visitor.visit_i64(i),
                    Err(_) => visitor.visit_i128(i),
                },
                Plain::Float(f) => visitor.visit_f64(f),
                Plain::Str(s) => visitor.visit_str(s),
            },
            Value::Seq(_) => return self.deserialize_seq(visitor),
            Value::Map(_) => return self.deserialize_map(visitor),
        };
        result.map_err(|e| self.locate(e))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.typed() {
            Some(Plain::Bool(b)) => visitor.visit_bool(b).map_err(|e| self.locate(e)),
            _ => Err(self.wrong("true or false")),
        }
    }

    int_method!(deserialize_i8, visit_i8, i8, "an integer");
    int_method!(deserialize_i16, visit_i16, i16, "an integer");
    int_method!(deserialize_i32, visit_i32, i32, "an integer");
    int_method!(deserialize_i64, visit_i64, i64, "an integer");
    int_method!(deserialize_u8, visit_u8, u8, "a whole number");
    int_method!(deserialize_u16, visit_u16, u16, "a whole number");
    int_method!(deserialize_u32, visit_u32, u32, "a whole number");
    int_method!(deserialize_u64, visit_u64, u64, "a whole number");

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let f = self.float()?;
        visitor.visit_f32(f as f32).map_err(|e| self.locate(e))
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let f = self.float()?;
        visitor.visit_f64(f).map_err(|e| self.locate(e))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let s = self.scalar("a single character")?;
        let mut chars = s.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => visitor.visit_char(c).map_err(|e| self.locate(e)),
            _ => Err(self.wrong("a single character")),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let s = self.scalar("text")?;
        visitor.visit_str(s).map_err(|e| self.locate(e))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let s = self.scalar("text")?;
        visitor
            .visit_bytes(s.as_bytes())
            .map_err(|e| self.locate(e))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            visitor.visit_none().map_err(|e| self.locate(e))
        } else {
            let (path, mark) = (self.path.clone(), self.node.mark);
            visitor.visit_some(self).map_err(|e| e.at(&path, mark))
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            visitor.visit_unit().map_err(|e| self.locate(e))
        } else {
            Err(self.wrong("nothing (null)"))
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let (path, mark) = (self.path.clone(), self.node.mark);
        visitor
            .visit_newtype_struct(self)
            .map_err(|e| e.at(&path, mark))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let Value::Seq(items) = &self.node.value else {
            return Err(self.wrong("a list"));
        };
        let access = SeqAccess {
            parent: &self,
            items: items.iter().enumerate(),
        };
        visitor.visit_seq(access).map_err(|e| self.locate(e))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.visit_mapping(None, visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.visit_mapping(Some(fields), visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Scalar { text, .. } => visitor
                .visit_enum(text.as_str().into_deserializer())
                .map_err(|e: DeError| self.locate(e)),
            Value::Map(entries) if entries.len() == 1 => {
                let (k, v) = &entries[0];
                let access = EnumAccess {
                    parent: &self,
                    key: k,
                    value: v,
                };
                visitor.visit_enum(access).map_err(|e| self.locate(e))
            }
            _ => Err(self.wrong("one of the listed values")),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let i = self.integer("an integer")?;
        visitor.visit_i128(i).map_err(|e| self.locate(e))
    }
}

struct SeqAccess<'p, 'a, I> {
    parent: &'p NodeDe<'a>,
    items: I,
}

impl<'de, 'a, I> de::SeqAccess<'de> for SeqAccess<'_, 'a, I>
where
    I: Iterator<Item = (usize, &'a Node)>,
{
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, node)) => {
                let path = self.parent.path.index(i);
                // Locate errors raised after the node was read, too (`try_from` conversions).
                seed.deserialize(self.parent.child(node, path.clone()))
                    .map(Some)
                    .map_err(|e| e.at(&path, node.mark))
            }
        }
    }
}

struct MapAccess<'p, 'a> {
    parent: &'p NodeDe<'a>,
    entries: &'a [(Node, Node)],
    /// For structs: the field names. Other keys were reported before the visit and are
    /// skipped, so that serde's derived visitor sees only keys it knows and goes on to find
    /// missing fields and wrong values as well.
    fields: Option<&'static [&'static str]>,
    next: usize,
    value: Option<(&'a Node, Location)>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        while let Some((k, v)) = self.entries.get(self.next) {
            self.next += 1;
            let key = k.scalar().unwrap_or_default();
            if let Some(fields) = self.fields
                && !fields.contains(&key)
            {
                continue;
            }
            let path = self.parent.path.key(key);
            self.value = Some((v, path.clone()));
            return seed
                .deserialize(self.parent.child(k, path.clone()))
                .map(Some)
                .map_err(|e| e.at(&path, k.mark));
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let (node, path) = self
            .value
            .take()
            .ok_or_else(|| DeError::new("value without a key".to_string()))?;
        seed.deserialize(self.parent.child(node, path.clone()))
            .map_err(|e| e.at(&path, node.mark))
    }
}

struct EnumAccess<'p, 'a> {
    parent: &'p NodeDe<'a>,
    key: &'a Node,
    value: &'a Node,
}

impl<'de, 'p, 'a> de::EnumAccess<'de> for EnumAccess<'p, 'a> {
    type Error = DeError;
    type Variant = NodeDe<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, NodeDe<'a>), DeError> {
        let name = self.key.scalar().unwrap_or_default();
        let path = self.parent.path.key(name);
        let variant = seed
            .deserialize(self.parent.child(self.key, self.parent.path.clone()))
            .map_err(|e| e.at(&self.parent.path, self.key.mark))?;
        Ok((variant, self.parent.child(self.value, path)))
    }
}

impl<'de> de::VariantAccess<'de> for NodeDe<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        if self.node.is_null() {
            Ok(())
        } else {
            Err(self.locate(self.unexpected()))
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_map(self, visitor)
    }
}
