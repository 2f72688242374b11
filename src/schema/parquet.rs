//! Reading a Parquet footer into a [`FileSchema`], from a local file or from the tail bytes
//! of an S3 object (so that a batch's schema is known before the warehouse is touched).

use std::path::Path;
use std::time::{Duration, SystemTime};

use parquet::basic::{ConvertedType, LogicalType, Repetition, TimeUnit, Type as Physical};
use parquet::file::metadata::{FooterTail, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::statistics::Statistics;
use parquet::schema::types::{ColumnDescriptor, Type};

use super::types::{Column, ColumnType, FileSchema, TableSchema};

/// Size of the fixed Parquet trailer: metadata length (4 bytes) and `PAR1`.
pub const TRAILER_LEN: usize = 8;

/// Why a file's schema could not be read. These are properties of the file: retrying
/// does not help.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ParquetError {
    #[error("the object is empty (0 bytes)")]
    Empty,
    #[error("not a Parquet file: {0}")]
    NotParquet(String),
    #[error("corrupt Parquet footer: {0}")]
    Corrupt(String),
    #[error("column `{0}` appears twice in the file")]
    DuplicateColumn(String),
}

/// Reads the footer of a local file.
pub fn read_local(path: &Path, op_column: &str) -> Result<FileSchema, ParquetError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ParquetError::Corrupt(format!("cannot open {}: {e}", path.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        return Err(ParquetError::Empty);
    }
    let metadata = ParquetMetaDataReader::new()
        .parse_and_finish(&file)
        .map_err(classify)?;
    file_schema(&metadata, op_column)
}

/// What [`decode_tail`] needs to finish: the footer may be longer than the bytes fetched.
#[derive(Debug)]
pub enum Tail {
    Decoded(FileSchema),
    /// Fetch this many bytes from the end of the object and call again.
    NeedBytes(u64),
}

/// Decodes the schema from the last bytes of an object of `object_size` bytes.
pub fn decode_tail(tail: &[u8], object_size: u64, op_column: &str) -> Result<Tail, ParquetError> {
    if object_size == 0 {
        return Err(ParquetError::Empty);
    }
    if tail.len() < TRAILER_LEN || object_size < (TRAILER_LEN as u64 + 4) {
        return Err(ParquetError::NotParquet(format!(
            "{object_size} bytes is too short for a Parquet file"
        )));
    }
    let trailer: &[u8; TRAILER_LEN] = tail[tail.len() - TRAILER_LEN..]
        .try_into()
        .expect("slice of trailer length");
    let footer = FooterTail::try_new(trailer).map_err(classify)?;
    let needed = (footer.metadata_length() + TRAILER_LEN) as u64;
    if needed > object_size {
        return Err(ParquetError::Corrupt(format!(
            "footer claims {needed} bytes in an object of {object_size}"
        )));
    }
    if (tail.len() as u64) < needed {
        return Ok(Tail::NeedBytes(needed));
    }
    let start = tail.len() - needed as usize;
    let metadata = ParquetMetaDataReader::decode_metadata(&tail[start..tail.len() - TRAILER_LEN])
        .map_err(classify)?;
    Ok(Tail::Decoded(file_schema(&metadata, op_column)?))
}

fn classify(e: parquet::errors::ParquetError) -> ParquetError {
    let text = e.to_string();
    if text.contains("magic") || text.contains("Invalid Parquet file") {
        ParquetError::NotParquet(text)
    } else {
        ParquetError::Corrupt(text)
    }
}

/// Maps the footer's top-level fields to columns, setting the operation column apart.
pub fn file_schema(
    metadata: &ParquetMetaData,
    op_column: &str,
) -> Result<FileSchema, ParquetError> {
    let root = metadata.file_metadata().schema_descr().root_schema();
    let fields = root.get_fields();
    // The exact name first. Another spelling stands in only as the first field, where DMS
    // writes `Op`: elsewhere an `op` or `OP` is a source column (full-load files and
    // `CdcInsertsOnly` files have no operation column at all).
    let op = fields
        .iter()
        .map(|f| f.name())
        .find(|n| *n == op_column)
        .or_else(|| {
            fields
                .first()
                .map(|f| f.name())
                .filter(|n| n.eq_ignore_ascii_case(op_column))
        })
        .map(str::to_string);
    let mut columns = Vec::new();
    for field in fields {
        let name = field.name();
        if op.as_deref() == Some(name) {
            continue;
        }
        if columns.iter().any(|c: &Column| c.name == name) {
            return Err(ParquetError::DuplicateColumn(name.to_string()));
        }
        let info = field.get_basic_info();
        let nullable = !info.has_repetition() || info.repetition() != Repetition::REQUIRED;
        columns.push(Column {
            name: name.to_string(),
            ty: column_type(field),
            nullable,
        });
    }
    Ok(FileSchema {
        table: TableSchema::new(columns),
        op,
        rows: metadata.file_metadata().num_rows().max(0) as u64,
        timestamp_max: timestamp_maxima(metadata),
    })
}

/// The largest value of each top-level INT64 timestamp column, from the row groups'
/// statistics (a column without them is left out): the newest change a file holds when
/// the ordering column is DMS's TimestampColumnName. Values are taken as UTC.
fn timestamp_maxima(metadata: &ParquetMetaData) -> Vec<(String, SystemTime)> {
    let descr = metadata.file_metadata().schema_descr();
    let mut out = Vec::new();
    for (i, column) in descr.columns().iter().enumerate() {
        let top_level = column.path().parts().len() == 1;
        let Some(per_second) = timestamp_ticks(column).filter(|_| top_level) else {
            continue;
        };
        let max = metadata
            .row_groups()
            .iter()
            .filter_map(|rg| match rg.column(i).statistics()? {
                Statistics::Int64(s) => s.max_opt().copied(),
                _ => None,
            })
            .max();
        if let Some(at) = max.and_then(|v| ticks_to_time(v, per_second)) {
            out.push((column.name().to_string(), at));
        }
    }
    out
}

/// Ticks per second of an INT64 timestamp column; None for any other column.
fn timestamp_ticks(column: &ColumnDescriptor) -> Option<i64> {
    if column.physical_type() != Physical::INT64 {
        return None;
    }
    match (column.logical_type_ref(), column.converted_type()) {
        // A local-time column's ticks are not an instant: the file name's time is used.
        (Some(LogicalType::Timestamp(t)), _) if t.is_adjusted_to_u_t_c => Some(match t.unit {
            TimeUnit::MILLIS => 1_000,
            TimeUnit::MICROS => 1_000_000,
            TimeUnit::NANOS => 1_000_000_000,
        }),
        (None, ConvertedType::TIMESTAMP_MILLIS) => Some(1_000),
        (None, ConvertedType::TIMESTAMP_MICROS) => Some(1_000_000),
        _ => None,
    }
}

fn ticks_to_time(ticks: i64, per_second: i64) -> Option<SystemTime> {
    let seconds = u64::try_from(ticks.div_euclid(per_second)).ok()?;
    let nanos = ticks.rem_euclid(per_second) * (1_000_000_000 / per_second);
    Some(SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos as u32))
}

/// The Parquet type of a top-level field as a [`ColumnType`], using the logical type
/// annotation first and the legacy converted type second.
pub fn column_type(field: &Type) -> ColumnType {
    if !field.is_primitive() {
        let what = match field.get_basic_info().logical_type_ref() {
            Some(LogicalType::List) => "list",
            Some(LogicalType::Map) => "map",
            _ => "struct",
        };
        return ColumnType::Unsupported(what.into());
    }
    let info = field.get_basic_info();
    let logical = info.logical_type_ref();
    let converted = info.converted_type();
    let decimal = || ColumnType::Decimal {
        precision: field.get_precision().clamp(1, 76) as u8,
        scale: field.get_scale().clamp(0, 76) as u8,
    };
    match field.get_physical_type() {
        Physical::BOOLEAN => ColumnType::Boolean,
        Physical::INT32 => match logical {
            Some(LogicalType::Integer(i)) => int_type(i.bit_width, i.is_signed),
            Some(LogicalType::Decimal(_)) => decimal(),
            Some(LogicalType::Date) => ColumnType::Date,
            Some(LogicalType::Time(_)) => ColumnType::Time,
            _ => match converted {
                ConvertedType::INT_8 => ColumnType::Int8,
                ConvertedType::INT_16 => ColumnType::Int16,
                ConvertedType::UINT_8 => ColumnType::UInt8,
                ConvertedType::UINT_16 => ColumnType::UInt16,
                ConvertedType::UINT_32 => ColumnType::UInt32,
                ConvertedType::DECIMAL => decimal(),
                ConvertedType::DATE => ColumnType::Date,
                ConvertedType::TIME_MILLIS => ColumnType::Time,
                _ => ColumnType::Int32,
            },
        },
        Physical::INT64 => match logical {
            Some(LogicalType::Integer(i)) => int_type(i.bit_width, i.is_signed),
            Some(LogicalType::Decimal(_)) => decimal(),
            Some(LogicalType::Timestamp(t)) => timestamp(t.is_adjusted_to_u_t_c, &t.unit),
            Some(LogicalType::Time(_)) => ColumnType::Time,
            _ => match converted {
                ConvertedType::UINT_64 => ColumnType::UInt64,
                ConvertedType::DECIMAL => decimal(),
                // Legacy annotations are UTC-adjusted by definition.
                ConvertedType::TIMESTAMP_MILLIS | ConvertedType::TIMESTAMP_MICROS => {
                    ColumnType::TimestampTz
                }
                ConvertedType::TIME_MICROS => ColumnType::Time,
                _ => ColumnType::Int64,
            },
        },
        Physical::INT96 => ColumnType::Timestamp,
        Physical::FLOAT => ColumnType::Float32,
        Physical::DOUBLE => ColumnType::Float64,
        Physical::BYTE_ARRAY => match logical {
            Some(LogicalType::String | LogicalType::Enum | LogicalType::Json) => ColumnType::String,
            Some(LogicalType::Decimal(_)) => decimal(),
            _ => match converted {
                ConvertedType::UTF8 | ConvertedType::ENUM | ConvertedType::JSON => {
                    ColumnType::String
                }
                ConvertedType::DECIMAL => decimal(),
                _ => ColumnType::Binary,
            },
        },
        Physical::FIXED_LEN_BYTE_ARRAY => match logical {
            Some(LogicalType::Decimal(_)) => decimal(),
            Some(LogicalType::Uuid) => ColumnType::String,
            Some(LogicalType::Float16) => ColumnType::Float32,
            _ if converted == ConvertedType::DECIMAL => decimal(),
            _ => ColumnType::Binary,
        },
    }
}

fn int_type(bits: i8, signed: bool) -> ColumnType {
    match (bits, signed) {
        (8, true) => ColumnType::Int8,
        (16, true) => ColumnType::Int16,
        (32, true) => ColumnType::Int32,
        (64, true) => ColumnType::Int64,
        (8, false) => ColumnType::UInt8,
        (16, false) => ColumnType::UInt16,
        (32, false) => ColumnType::UInt32,
        (64, false) => ColumnType::UInt64,
        _ => ColumnType::Unsupported(format!("int({bits},{signed})")),
    }
}

fn timestamp(utc: bool, _unit: &TimeUnit) -> ColumnType {
    // Both warehouses store microseconds; the unit is not part of the schema.
    if utc {
        ColumnType::TimestampTz
    } else {
        ColumnType::Timestamp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Parquet file with an `id` and a millisecond timestamp `at`, one row group per
    /// slice of values.
    fn with_timestamps(groups: &[&[i64]]) -> Vec<u8> {
        use parquet::data_type::Int64Type;
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use std::sync::Arc;
        let schema = parquet::schema::parser::parse_message_type(
            "message m { required int64 id; required int64 at (TIMESTAMP(MILLIS,true)); }",
        )
        .unwrap();
        let mut out = Vec::new();
        let props = Arc::new(WriterProperties::builder().build());
        let mut w = SerializedFileWriter::new(&mut out, Arc::new(schema), props).unwrap();
        for values in groups {
            let mut rg = w.next_row_group().unwrap();
            let ids = vec![1; values.len()];
            for column in [&ids[..], *values] {
                let mut c = rg.next_column().unwrap().unwrap();
                c.typed::<Int64Type>()
                    .write_batch(column, None, None)
                    .unwrap();
                c.close().unwrap();
            }
            rg.close().unwrap();
        }
        w.close().unwrap();
        out
    }

    #[test]
    fn timestamp_columns_carry_their_largest_value() {
        let bytes = with_timestamps(&[&[1_000, 3_500], &[2_000, 2_500]]);
        let Tail::Decoded(schema) = decode_tail(&bytes, bytes.len() as u64, "Op").unwrap() else {
            panic!("the whole file is the tail");
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(3_500);
        assert_eq!(schema.timestamp_max, vec![("at".to_string(), at)]);
        assert_eq!(schema.newest_timestamp("AT"), Some(at), "any case");
        assert_eq!(schema.newest_timestamp("id"), None, "not a timestamp");
    }

    /// The footer of an empty file with these top-level string fields.
    fn schema_of(fields: &[&str]) -> FileSchema {
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use std::sync::Arc;
        let columns: Vec<String> = fields
            .iter()
            .map(|f| format!("optional binary {f} (STRING);"))
            .collect();
        let message = format!("message m {{ {} }}", columns.join(" "));
        let schema = parquet::schema::parser::parse_message_type(&message).unwrap();
        let mut out = Vec::new();
        let props = Arc::new(WriterProperties::builder().build());
        SerializedFileWriter::new(&mut out, Arc::new(schema), props)
            .unwrap()
            .close()
            .unwrap();
        let Tail::Decoded(schema) = decode_tail(&out, out.len() as u64, "Op").unwrap() else {
            panic!("the whole file is the tail");
        };
        schema
    }

    #[test]
    fn the_operation_column_is_the_exact_name_or_another_spelling_in_first_place() {
        let data = |s: &FileSchema| s.table.names().map(str::to_string).collect::<Vec<_>>();
        let lower = schema_of(&["op", "id"]);
        assert_eq!(lower.op.as_deref(), Some("op"), "first, in another case");
        assert_eq!(data(&lower), ["id"]);
        let both = schema_of(&["Op", "id", "op"]);
        assert_eq!(both.op.as_deref(), Some("Op"), "the exact name wins");
        assert_eq!(data(&both), ["id", "op"], "the other spelling is data");
        let later = schema_of(&["id", "OP"]);
        assert_eq!(later.op, None, "a source column OP elsewhere is data");
        assert_eq!(data(&later), ["id", "OP"]);
        let exact_later = schema_of(&["id", "Op"]);
        assert_eq!(
            exact_later.op.as_deref(),
            Some("Op"),
            "the exact name anywhere"
        );
    }

    #[test]
    fn short_or_empty_objects_are_not_parquet() {
        assert_eq!(decode_tail(&[], 0, "Op").unwrap_err(), ParquetError::Empty);
        assert!(matches!(
            decode_tail(b"PAR1", 4, "Op").unwrap_err(),
            ParquetError::NotParquet(_)
        ));
        assert!(matches!(
            decode_tail(b"this is not parquet at all", 26, "Op").unwrap_err(),
            ParquetError::NotParquet(_) | ParquetError::Corrupt(_)
        ));
    }

    #[test]
    fn a_footer_longer_than_the_tail_asks_for_more() {
        // metadata length 1000, then the magic.
        let mut tail = vec![0u8; 16];
        tail.extend_from_slice(&1000u32.to_le_bytes());
        tail.extend_from_slice(b"PAR1");
        match decode_tail(&tail, 5000, "Op").unwrap() {
            Tail::NeedBytes(n) => assert_eq!(n, 1008),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode_tail(&tail, 500, "Op").unwrap_err(),
            ParquetError::Corrupt(_)
        ));
    }
}
