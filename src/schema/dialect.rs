//! The SQL type names of each warehouse dialect: what a column of a [`ColumnType`] is
//! created as, and how a type the warehouse reports is read back. It lives with the types
//! it names, so the schema store can read old documents without importing a warehouse.

use super::types::ColumnType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Duckdb,
    Firebolt,
}

impl Dialect {
    /// The SQL type a column of this type gets when the worker creates it.
    pub fn type_name(self, ty: &ColumnType) -> String {
        use ColumnType::*;
        match self {
            Dialect::Duckdb => match ty {
                Boolean => "BOOLEAN".into(),
                Int8 => "TINYINT".into(),
                Int16 => "SMALLINT".into(),
                Int32 => "INTEGER".into(),
                Int64 => "BIGINT".into(),
                UInt8 => "UTINYINT".into(),
                UInt16 => "USMALLINT".into(),
                UInt32 => "UINTEGER".into(),
                UInt64 => "UBIGINT".into(),
                Float32 => "FLOAT".into(),
                Float64 => "DOUBLE".into(),
                Decimal { precision, scale } => {
                    format!("DECIMAL({},{})", (*precision).min(38), (*scale).min(38))
                }
                String | Unsupported(_) => "VARCHAR".into(),
                Binary => "BLOB".into(),
                Date => "DATE".into(),
                Time => "TIME".into(),
                Timestamp => "TIMESTAMP".into(),
                TimestampTz => "TIMESTAMPTZ".into(),
            },
            // The mapping of Firebolt's own ADBC driver (firebolt-protocol.md).
            Dialect::Firebolt => match ty {
                Boolean => "BOOLEAN".into(),
                Int8 | Int16 | Int32 | UInt8 | UInt16 => "INTEGER".into(),
                UInt32 | Int64 => "BIGINT".into(),
                // BIGINT cannot hold the top half of uint64.
                UInt64 => "NUMERIC(20, 0)".into(),
                Float32 => "REAL".into(),
                Float64 => "DOUBLE PRECISION".into(),
                Decimal { precision, scale } => {
                    format!("NUMERIC({}, {})", (*precision).min(38), (*scale).min(38))
                }
                String | Time | Unsupported(_) => "TEXT".into(),
                Binary => "BYTEA".into(),
                Date => "DATE".into(),
                Timestamp => "TIMESTAMP".into(),
                TimestampTz => "TIMESTAMPTZ".into(),
            },
        }
    }

    /// Parses a type as the warehouse reports it (information_schema.columns.data_type).
    pub fn parse_type(self, text: &str) -> ColumnType {
        use ColumnType::*;
        let t = text.trim().to_ascii_lowercase();
        let t = t.strip_suffix(" null").unwrap_or(&t).trim();
        let t = t.strip_suffix(" not null").unwrap_or(t).trim();
        if let Some(inner) = t
            .strip_prefix("decimal(")
            .or_else(|| t.strip_prefix("numeric("))
            .and_then(|r| r.strip_suffix(')'))
        {
            // A Firebolt NUMERIC(20, 0) may hold a uint64 or a decimal(20,0): it is read as
            // what it is, and the planner compares rendered names (both are NUMERIC(20, 0)).
            let mut parts = inner.split(',').map(|p| p.trim().parse::<u8>());
            if let (Some(Ok(precision)), Some(Ok(scale))) = (parts.next(), parts.next()) {
                return Decimal { precision, scale };
            }
        }
        match t {
            "boolean" | "bool" => Boolean,
            "tinyint" | "int1" => Int8,
            "smallint" | "int2" => Int16,
            "integer" | "int" | "int4" => Int32,
            "bigint" | "int8" | "long" => Int64,
            "utinyint" => UInt8,
            "usmallint" => UInt16,
            "uinteger" => UInt32,
            "ubigint" => UInt64,
            // Firebolt's FLOAT is an alias of DOUBLE PRECISION (data types reference);
            // DuckDB's is a 4-byte REAL.
            "float" if self == Dialect::Firebolt => Float64,
            "float" | "real" | "float4" => Float32,
            "double" | "double precision" | "float8" => Float64,
            "numeric" | "decimal" if self == Dialect::Firebolt => Decimal {
                precision: 38,
                scale: 9,
            },
            "varchar" | "text" | "string" => String,
            "blob" | "bytea" => Binary,
            "date" | "pgdate" => Date,
            "time" => Time,
            "timestamp" | "timestampntz" | "timestamp without time zone" => Timestamp,
            "timestamptz" | "timestamp with time zone" => TimestampTz,
            other if other.starts_with("varchar(") => String,
            other => Unsupported(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_round_trip_through_each_dialect() {
        for d in [Dialect::Duckdb, Dialect::Firebolt] {
            for ty in [
                ColumnType::Boolean,
                ColumnType::Int32,
                ColumnType::Int64,
                ColumnType::Float64,
                ColumnType::Decimal {
                    precision: 15,
                    scale: 2,
                },
                ColumnType::String,
                ColumnType::Date,
                ColumnType::Timestamp,
                ColumnType::TimestampTz,
            ] {
                assert_eq!(d.parse_type(&d.type_name(&ty)), ty, "{d:?} {ty}");
            }
        }
        // Where a dialect has fewer types than the files, the name round-trips, not the type.
        for ty in [
            ColumnType::UInt64,
            ColumnType::UInt32,
            ColumnType::Int8,
            ColumnType::Float32,
            ColumnType::Time,
            ColumnType::Decimal {
                precision: 40,
                scale: 2,
            },
        ] {
            let d = Dialect::Firebolt;
            let name = d.type_name(&ty);
            assert_eq!(d.type_name(&d.parse_type(&name)), name, "{ty}");
        }
        assert_eq!(
            Dialect::Firebolt.parse_type("NUMERIC(20, 0)"),
            ColumnType::Decimal {
                precision: 20,
                scale: 0
            },
            "a decimal(20,0) source column is not mistaken for a uint64"
        );
        assert_eq!(Dialect::Firebolt.parse_type("FLOAT"), ColumnType::Float64);
        assert_eq!(Dialect::Duckdb.parse_type("FLOAT"), ColumnType::Float32);
        assert_eq!(
            Dialect::Firebolt.parse_type("Decimal(38, 30) null"),
            ColumnType::Decimal {
                precision: 38,
                scale: 30
            }
        );
        assert_eq!(
            Dialect::Duckdb.parse_type("TIMESTAMP WITH TIME ZONE"),
            ColumnType::TimestampTz
        );
    }
}
