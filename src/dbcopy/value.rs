//! One column value as the copy carries it, and its canonical encoding for the digests.
//!
//! # The canonical row encoding
//!
//! Validation hashes every row of a table with SHA-256, on the SQLite source and on the
//! PostgreSQL target alike, in primary-key order. A row is its values in the target's column
//! order (`information_schema.columns.ordinal_position`), each encoded as
//!
//! | value | tag | length (u64, big-endian) | bytes |
//! | --- | --- | --- | --- |
//! | NULL | `N` | 0 | — |
//! | integer (SMALLINT, INTEGER, BIGINT, BOOLEAN as 0/1) | `I` | 8 | the value as an i64, big-endian |
//! | floating point | `R` | 8 | the IEEE 754 bits, big-endian |
//! | text | `T` | byte length | the UTF-8 bytes |
//! | bytes (BLOB, BYTEA) | `B` | byte length | the bytes |
//!
//! and a table's digest is SHA-256 over the concatenation of its rows' encodings. SQLite
//! keeps a BOOLEAN as the integer 0 or 1, so both sides encode it as an integer.

use std::cmp::Ordering;
use std::fmt;

use bytes::BytesMut;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

/// The PostgreSQL column types the copy carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ColType {
    Int2,
    Int4,
    Int8,
    Bool,
    Float8,
    Text,
    Bytea,
}

impl ColType {
    /// The type `information_schema.columns.data_type` names, or `None` if the copy cannot
    /// carry it.
    pub(crate) fn from_information_schema(data_type: &str) -> Option<ColType> {
        Some(match data_type {
            "smallint" => ColType::Int2,
            "integer" => ColType::Int4,
            "bigint" => ColType::Int8,
            "boolean" => ColType::Bool,
            "double precision" => ColType::Float8,
            "text" | "character varying" => ColType::Text,
            "bytea" => ColType::Bytea,
            _ => return None,
        })
    }

    /// Whether ordering this column in PostgreSQL needs `COLLATE "C"` to match SQLite's
    /// binary order.
    pub(crate) fn is_text(self) -> bool {
        self == ColType::Text
    }

    pub(crate) fn pg_type(self) -> Type {
        match self {
            ColType::Int2 => Type::INT2,
            ColType::Int4 => Type::INT4,
            ColType::Int8 => Type::INT8,
            ColType::Bool => Type::BOOL,
            ColType::Float8 => Type::FLOAT8,
            ColType::Text => Type::TEXT,
            ColType::Bytea => Type::BYTEA,
        }
    }
}

/// One column value, from either side.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    /// Appends the canonical encoding (module docs).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let (tag, bytes): (u8, &[u8]) = match self {
            Value::Null => (b'N', &[]),
            Value::Int(i) => {
                out.push(b'I');
                out.extend_from_slice(&8u64.to_be_bytes());
                out.extend_from_slice(&i.to_be_bytes());
                return;
            }
            Value::Real(f) => {
                out.push(b'R');
                out.extend_from_slice(&8u64.to_be_bytes());
                out.extend_from_slice(&f.to_bits().to_be_bytes());
                return;
            }
            Value::Text(s) => (b'T', s.as_bytes()),
            Value::Blob(b) => (b'B', b),
        };
        out.push(tag);
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    }

    /// Whether this value can be written to a column of type `ty` unchanged in meaning;
    /// `Err` says why not.
    pub(crate) fn fits(&self, ty: ColType) -> Result<(), String> {
        let ok = match (self, ty) {
            (Value::Null, _) => true,
            (Value::Int(i), ColType::Int2) => i16::try_from(*i).is_ok(),
            (Value::Int(i), ColType::Int4) => i32::try_from(*i).is_ok(),
            (Value::Int(_), ColType::Int8) => true,
            (Value::Int(i), ColType::Bool) => *i == 0 || *i == 1,
            (Value::Real(_), ColType::Float8) => true,
            (Value::Text(_), ColType::Text) => true,
            (Value::Blob(_), ColType::Bytea) => true,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(format!("the value {self} does not fit a {ty:?} column"))
        }
    }

    /// The order of primary-key values: SQLite's order, which `COLLATE "C"` gives PostgreSQL
    /// (integers by value, text and bytes bytewise).
    pub(crate) fn key_cmp(&self, other: &Value) -> Ordering {
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Real(a), Value::Real(b)) => a.total_cmp(b),
            (Value::Text(a), Value::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            (Value::Blob(a), Value::Blob(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Int(_) | Value::Real(_) => 1,
            Value::Text(_) => 2,
            Value::Blob(_) => 3,
        }
    }
}

/// Compares two keys (tuples of primary-key values) in key order.
pub(crate) fn key_cmp(a: &[Value], b: &[Value]) -> Ordering {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.key_cmp(y))
        .find(|o| o.is_ne())
        .unwrap_or_else(|| a.len().cmp(&b.len()))
}

/// Shows a key for an operator: `(col=value, …)`.
pub(crate) fn show_key(columns: &[String], key: &[Value]) -> String {
    let parts: Vec<String> = columns
        .iter()
        .zip(key)
        .map(|(c, v)| format!("{c}={v}"))
        .collect();
    format!("({})", parts.join(", "))
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Real(r) => write!(f, "{r}"),
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Blob(b) => write!(f, "x'{}'", hex::encode(b)),
        }
    }
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            Value::Real(r) => r.to_sql(ty, out),
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT2
                | Type::INT4
                | Type::INT8
                | Type::BOOL
                | Type::FLOAT8
                | Type::TEXT
                | Type::VARCHAR
                | Type::BYTEA
        )
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(match *ty {
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::BYTEA => Value::Blob(<Vec<u8>>::from_sql(ty, raw)?),
            _ => Value::Text(String::from_sql(ty, raw)?),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Value::Null)
    }

    fn accepts(ty: &Type) -> bool {
        <Value as ToSql>::accepts(ty)
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl Value {
    /// The value SQLite holds, or `Err` for text that is not UTF-8.
    pub(crate) fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Result<Value, String> {
        use rusqlite::types::ValueRef;
        Ok(match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Int(i),
            ValueRef::Real(r) => Value::Real(r),
            ValueRef::Text(t) => Value::Text(
                String::from_utf8(t.to_vec()).map_err(|_| "text that is not UTF-8".to_string())?,
            ),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_tag_length_bytes_and_integers_are_i64() {
        let mut out = Vec::new();
        Value::Int(1).encode(&mut out);
        Value::Null.encode(&mut out);
        Value::Text("ab".into()).encode(&mut out);
        Value::Blob(vec![7]).encode(&mut out);
        let mut want = vec![b'I', 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1];
        want.extend_from_slice(&[b'N', 0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[b'T', 0, 0, 0, 0, 0, 0, 0, 2, b'a', b'b']);
        want.extend_from_slice(&[b'B', 0, 0, 0, 0, 0, 0, 0, 1, 7]);
        assert_eq!(out, want);
    }

    #[test]
    fn text_and_bytes_of_the_same_content_encode_differently() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        Value::Text("x".into()).encode(&mut a);
        Value::Blob(b"x".to_vec()).encode(&mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn values_that_do_not_fit_are_named() {
        assert!(Value::Int(70_000).fits(ColType::Int2).is_err());
        assert!(Value::Int(2).fits(ColType::Bool).is_err());
        assert!(Value::Text("a".into()).fits(ColType::Bytea).is_err());
        assert!(Value::Int(1).fits(ColType::Bool).is_ok());
        assert!(Value::Null.fits(ColType::Text).is_ok());
    }

    #[test]
    fn keys_order_bytewise_like_sqlite() {
        let a = [Value::Text("B".into())];
        let b = [Value::Text("a".into())];
        assert_eq!(key_cmp(&a, &b), Ordering::Less);
        let c = [Value::Text("é".into())];
        assert_eq!(key_cmp(&b, &c), Ordering::Less);
    }
}
