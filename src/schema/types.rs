//! The warehouse-neutral type system: what a column of a DMS Parquet file holds.
//!
//! Both warehouses map these to their own SQL types (see `warehouse::*::sql_type`), and the
//! schema history in S3 stores them in their text form (`int32`, `decimal(15,2)`,
//! `timestamptz`), so the history stays readable whatever the warehouse.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A column type. Timestamps keep only whether they are UTC-adjusted: both warehouses
/// store microseconds, so the Parquet unit (ms, us, ns) is not a schema difference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ColumnType {
    Boolean,
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Float32,
    Float64,
    Decimal {
        precision: u8,
        scale: u8,
    },
    String,
    Binary,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    /// Anything else (nested groups, intervals, geometry): kept by name so the change can
    /// be reported; it cannot be loaded.
    Unsupported(std::string::String),
}

impl ColumnType {
    /// Whether this is an integer type, and its (signed, bits).
    pub fn integer(&self) -> Option<(bool, u32)> {
        use ColumnType::*;
        Some(match self {
            Int8 => (true, 8),
            Int16 => (true, 16),
            Int32 => (true, 32),
            Int64 => (true, 64),
            UInt8 => (false, 8),
            UInt16 => (false, 16),
            UInt32 => (false, 32),
            UInt64 => (false, 64),
            _ => return None,
        })
    }

    /// Decimal digits needed to the left of the point for every value of an integer type.
    pub fn integer_digits(&self) -> Option<u8> {
        let (signed, bits) = self.integer()?;
        Some(match (signed, bits) {
            (_, 8) => 3,
            (_, 16) => 5,
            (true, 32) | (false, 32) => 10,
            (true, 64) => 19,
            (false, 64) => 20,
            _ => return None,
        })
    }

    pub fn is_float(&self) -> bool {
        matches!(self, ColumnType::Float32 | ColumnType::Float64)
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ColumnType::*;
        match self {
            Boolean => f.write_str("boolean"),
            Int8 => f.write_str("int8"),
            Int16 => f.write_str("int16"),
            Int32 => f.write_str("int32"),
            Int64 => f.write_str("int64"),
            UInt8 => f.write_str("uint8"),
            UInt16 => f.write_str("uint16"),
            UInt32 => f.write_str("uint32"),
            UInt64 => f.write_str("uint64"),
            Float32 => f.write_str("float32"),
            Float64 => f.write_str("float64"),
            Decimal { precision, scale } => write!(f, "decimal({precision},{scale})"),
            String => f.write_str("string"),
            Binary => f.write_str("binary"),
            Date => f.write_str("date"),
            Time => f.write_str("time"),
            Timestamp => f.write_str("timestamp"),
            TimestampTz => f.write_str("timestamptz"),
            Unsupported(what) => write!(f, "unsupported({what})"),
        }
    }
}

impl FromStr for ColumnType {
    type Err = std::string::String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use ColumnType::*;
        let lower = s.trim().to_ascii_lowercase();
        Ok(match lower.as_str() {
            "boolean" | "bool" => Boolean,
            "int8" => Int8,
            "int16" => Int16,
            "int32" => Int32,
            "int64" => Int64,
            "uint8" => UInt8,
            "uint16" => UInt16,
            "uint32" => UInt32,
            "uint64" => UInt64,
            "float32" | "float" => Float32,
            "float64" | "double" => Float64,
            "string" => String,
            "binary" => Binary,
            "date" => Date,
            "time" => Time,
            "timestamp" => Timestamp,
            "timestamptz" => TimestampTz,
            other => {
                if let Some(inner) = other
                    .strip_prefix("decimal(")
                    .and_then(|r| r.strip_suffix(')'))
                {
                    let (p, sc) = inner
                        .split_once(',')
                        .ok_or_else(|| format!("bad decimal type `{s}`"))?;
                    let precision = p.trim().parse().map_err(|_| format!("bad decimal `{s}`"))?;
                    let scale = sc
                        .trim()
                        .parse()
                        .map_err(|_| format!("bad decimal `{s}`"))?;
                    Decimal { precision, scale }
                } else if let Some(inner) = other
                    .strip_prefix("unsupported(")
                    .and_then(|r| r.strip_suffix(')'))
                {
                    Unsupported(inner.to_string())
                } else {
                    return Err(format!("unknown column type `{s}`"));
                }
            }
        })
    }
}

impl Serialize for ColumnType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ColumnType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::string::String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One column of a source file or a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ColumnType,
    #[serde(default = "yes")]
    pub nullable: bool,
}

fn yes() -> bool {
    true
}

impl Column {
    pub fn new(name: impl Into<String>, ty: ColumnType) -> Self {
        Self {
            name: name.into(),
            ty,
            nullable: true,
        }
    }
}

/// The data columns of a file or table, in order. DMS's `Op` column is not among them:
/// it is bookkeeping, tracked by [`FileSchema::op`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    pub columns: Vec<Column>,
}

impl TableSchema {
    pub fn new(columns: Vec<Column>) -> Self {
        Self { columns }
    }

    /// The column with this exact name.
    pub fn get(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    /// Same column names and types, in the same order; nullability aside. Parquet writers
    /// mark a column REQUIRED or OPTIONAL from file to file, and every target column is
    /// nullable, so nullability alone never needs an action.
    pub fn same_shape(&self, other: &TableSchema) -> bool {
        self.columns.len() == other.columns.len()
            && self
                .columns
                .iter()
                .zip(&other.columns)
                .all(|(a, b)| a.name == b.name && a.ty == b.ty)
    }
}

/// The schema of one Parquet file as the apply engine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSchema {
    pub table: TableSchema,
    /// The DMS operation column as this file spells it, when it has one (CDC files do
    /// unless `CdcInsertsOnly`; full-load files only with `IncludeOpForFullLoad`). Found
    /// case-insensitively: a writer that lower-cases names must not turn deletes into rows.
    pub op: Option<String>,
    pub rows: u64,
    /// The largest value of each timestamp column, where the file's statistics say: the
    /// newest change it holds when the ordering column is a timestamp (freshness).
    pub timestamp_max: Vec<(String, std::time::SystemTime)>,
}

impl FileSchema {
    /// The largest value of timestamp column `column` (its name in the file, any case).
    pub fn newest_timestamp(&self, column: &str) -> Option<std::time::SystemTime> {
        let exact = self.timestamp_max.iter().find(|(c, _)| c == column);
        exact
            .or_else(|| {
                self.timestamp_max
                    .iter()
                    .find(|(c, _)| c.eq_ignore_ascii_case(column))
            })
            .map(|(_, at)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        for ty in [
            ColumnType::Int32,
            ColumnType::UInt64,
            ColumnType::Decimal {
                precision: 15,
                scale: 2,
            },
            ColumnType::TimestampTz,
            ColumnType::Unsupported("list".into()),
        ] {
            assert_eq!(ty.to_string().parse::<ColumnType>().unwrap(), ty);
        }
        assert!("varchar2".parse::<ColumnType>().is_err());
    }
}
