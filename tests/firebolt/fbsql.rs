//! What the protocol test server knows of Firebolt's SQL: every statement is parsed with a
//! real SQL parser (`sqlparser`, PostgreSQL dialect: "Firebolt's SQL dialect is Postgres
//! compliant", Firebolt Core README), and refused where Firebolt's documentation refuses
//! it. Each rule names its source. The Firebolt-only syntax the parser has no grammar for
//! (`PRIMARY INDEX`, `COPY .. FROM 's3://..' WITH ..`, `USE ENGINE`) is read from the
//! parser's own tokens, by the grammar the docs give.

use sqlparser::ast::{
    AlterTableOperation, BinaryOperator, ColumnOption, DataType, Expr, JoinConstraint,
    JoinOperator, MergeAction, ObjectName, ObjectType, Query, RenameTableNameKind, SetExpr,
    Statement, TableFactor, TableObject, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Token, Tokenizer};
use std::ops::ControlFlow;

/// A table name as Firebolt resolves it: unquoted identifiers fold to lower case (object
/// identifiers reference), no schema means `public`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name {
    pub schema: String,
    pub table: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub name: String,
    /// Upper case, as information_schema.columns.data_type shows it (`NUMERIC(20, 0)`).
    pub ty: String,
    pub nullable: bool,
}

/// What a statement is, with what the server's catalog and transactions need.
#[derive(Debug, Clone)]
pub enum Parsed {
    Begin,
    Commit,
    Rollback,
    UseDatabase(String),
    UseEngine(String),
    CreateSchema(String),
    CreateTable {
        name: Name,
        if_not_exists: bool,
        columns: Vec<ColumnSpec>,
        primary_index: Vec<String>,
        /// CTAS: the columns of the query are not known to the server.
        as_select: bool,
    },
    DropTable {
        name: Name,
        if_exists: bool,
    },
    AddColumn {
        table: Name,
        column: ColumnSpec,
        if_not_exists: bool,
    },
    Rename {
        table: Name,
        to: String,
    },
    /// INSERT, UPDATE, DELETE, MERGE, COPY: a write to `table` naming `columns`.
    Write {
        table: Name,
        columns: Vec<String>,
    },
    Select {
        /// Tables it reads, information_schema excluded.
        reads: Vec<Name>,
        /// The statement, for the server to recognise its own catalog queries.
        text: String,
    },
}

fn fold(ident: &sqlparser::ast::Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

fn name_of(name: &ObjectName) -> Name {
    let parts: Vec<String> = name
        .0
        .iter()
        .filter_map(|p| p.as_ident())
        .map(fold)
        .collect();
    match parts.as_slice() {
        [table] => Name {
            schema: "public".into(),
            table: table.clone(),
        },
        [.., schema, table] => Name {
            schema: schema.clone(),
            table: table.clone(),
        },
        [] => Name {
            schema: "public".into(),
            table: String::new(),
        },
    }
}

/// The column types Firebolt has (data types reference, 2025 docs): INTEGER (INT, INT4),
/// BIGINT (LONG, INT8), NUMERIC (DECIMAL; precision at most 38), REAL (FLOAT4), DOUBLE
/// PRECISION (DOUBLE, FLOAT8, FLOAT), BOOLEAN, TEXT (VARCHAR, STRING), BYTEA, DATE
/// (PGDATE), TIMESTAMP (TIMESTAMPNTZ), TIMESTAMPTZ. No TINYINT/SMALLINT, no unsigned
/// types, no TIME. Returns the canonical upper-case name.
pub fn firebolt_type(ty: &DataType) -> Result<String, String> {
    let text = ty.to_string().to_ascii_uppercase();
    let compact: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let (base, args) = match compact.split_once('(') {
        Some((b, a)) => (
            b.trim().to_string(),
            Some(a.trim_end_matches(')').to_string()),
        ),
        None => (compact.clone(), None),
    };
    let canonical = match base.as_str() {
        "INT" | "INTEGER" | "INT4" => "INTEGER",
        "BIGINT" | "LONG" | "INT8" => "BIGINT",
        "REAL" | "FLOAT4" => "REAL",
        "DOUBLE PRECISION" | "DOUBLE" | "FLOAT8" | "FLOAT" => "DOUBLE PRECISION",
        "BOOLEAN" | "BOOL" => "BOOLEAN",
        "TEXT" | "VARCHAR" | "STRING" => "TEXT",
        "BYTEA" => "BYTEA",
        "DATE" | "PGDATE" => "DATE",
        "TIMESTAMP" | "TIMESTAMPNTZ" | "TIMESTAMP WITHOUT TIME ZONE" => "TIMESTAMP",
        "TIMESTAMPTZ" | "TIMESTAMP WITH TIME ZONE" => "TIMESTAMPTZ",
        "NUMERIC" | "DECIMAL" => {
            let (p, s) = match args.as_deref() {
                None => (38, 9),
                Some(a) => {
                    let mut it = a.split(',').map(|x| x.trim().parse::<u32>());
                    match (it.next(), it.next()) {
                        (Some(Ok(p)), Some(Ok(s))) => (p, s),
                        (Some(Ok(p)), None) => (p, 0),
                        _ => return Err(format!("invalid NUMERIC arguments `{a}`")),
                    }
                }
            };
            // "NUMERIC(p, s) ... precision ... up to 38" (data types reference).
            if p == 0 || p > 38 || s > p {
                return Err(format!(
                    "NUMERIC precision must be between 1 and 38 and scale at most the precision, got NUMERIC({p}, {s})"
                ));
            }
            return Ok(format!("NUMERIC({p}, {s})"));
        }
        other => return Err(format!("type `{other}` does not exist in Firebolt")),
    };
    if args.is_some() && canonical != "TEXT" {
        return Err(format!("type `{compact}` takes no arguments in Firebolt"));
    }
    Ok(canonical.to_string())
}

fn column_spec(def: &sqlparser::ast::ColumnDef) -> Result<ColumnSpec, String> {
    let ty = firebolt_type(&def.data_type)?;
    let mut nullable = None;
    for option in &def.options {
        match option.option {
            ColumnOption::Null => nullable = Some(true),
            ColumnOption::NotNull => nullable = Some(false),
            ColumnOption::Default(_) => {}
            ref other => return Err(format!("column option `{other}` is not supported")),
        }
    }
    Ok(ColumnSpec {
        name: fold(&def.name),
        ty,
        // The default flipped from NOT NULL (2024-25 docs) to NULL (current docs): take
        // the current one, the stricter for primary indexes.
        nullable: nullable.unwrap_or(true),
    })
}

/// Byte offset of a tokenizer location (1-based line and character column).
fn offset(sql: &str, at: Location) -> usize {
    let mut line = 1;
    let mut col = 1;
    for (i, c) in sql.char_indices() {
        if line == at.line && col == at.column {
            return i;
        }
        if c == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    sql.len()
}

struct Tokens {
    tokens: Vec<(Token, Location)>,
}

impl Tokens {
    fn new(sql: &str) -> Result<Self, String> {
        let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
            .tokenize_with_location()
            .map_err(|e| format!("syntax error: {e}"))?
            .into_iter()
            .filter(|t| !matches!(t.token, Token::Whitespace(_)))
            .map(|t| (t.token, t.span.start))
            .collect();
        Ok(Self { tokens })
    }

    fn keyword(&self, i: usize) -> Option<String> {
        match self.tokens.get(i) {
            Some((Token::Word(w), _)) if w.quote_style.is_none() => {
                Some(w.value.to_ascii_uppercase())
            }
            _ => None,
        }
    }

    /// The index of `words` at parenthesis depth 0, outside quotes.
    fn find_top_level(&self, words: &[&str]) -> Option<usize> {
        let mut depth = 0i32;
        for i in 0..self.tokens.len() {
            match &self.tokens[i].0 {
                Token::LParen => depth += 1,
                Token::RParen => depth -= 1,
                _ if depth == 0
                    && words
                        .iter()
                        .enumerate()
                        .all(|(k, w)| self.keyword(i + k).as_deref() == Some(*w)) =>
                {
                    return Some(i);
                }
                _ => {}
            }
        }
        None
    }

    fn ident(&self, i: usize) -> Option<String> {
        match self.tokens.get(i) {
            Some((Token::Word(w), _)) => Some(if w.quote_style.is_some() {
                w.value.clone()
            } else {
                w.value.to_lowercase()
            }),
            _ => None,
        }
    }
}

/// Parses one request body. One statement per request ("each request can contain only one
/// SQL statement", using the API guide).
pub fn parse(sql: &str) -> Result<Parsed, String> {
    let tokens = Tokens::new(sql)?;
    let first = tokens.keyword(0).unwrap_or_default();
    if first == "USE" {
        return parse_use(&tokens);
    }
    if first == "COPY" {
        return parse_copy(&tokens);
    }
    // CREATE TABLE .. PRIMARY INDEX a, b: Firebolt's clause after the column list.
    let (head, primary_index) = match tokens.find_top_level(&["PRIMARY", "INDEX"]) {
        Some(i) if first == "CREATE" => {
            let cut = offset(sql, tokens.tokens[i].1);
            let mut names = Vec::new();
            let mut k = i + 2;
            loop {
                let Some(n) = tokens.ident(k) else {
                    return Err("PRIMARY INDEX needs a list of column names".into());
                };
                names.push(n);
                match tokens.tokens.get(k + 1).map(|t| &t.0) {
                    Some(Token::Comma) => k += 2,
                    None | Some(Token::SemiColon) | Some(Token::EOF) => break,
                    Some(other) => {
                        return Err(format!("syntax error at `{other}` in PRIMARY INDEX"));
                    }
                }
            }
            (&sql[..cut], Some(names))
        }
        _ => (sql, None),
    };
    let statements =
        Parser::parse_sql(&PostgreSqlDialect {}, head).map_err(|e| format!("syntax error: {e}"))?;
    let [statement] = statements.as_slice() else {
        return Err(format!(
            "one statement per request, got {}",
            statements.len()
        ));
    };
    check_expressions(statement)?;
    check_joins(statement)?;
    classify(statement, primary_index)
}

/// Types named in CAST / TRY_CAST must be Firebolt types too.
fn check_expressions(statement: &Statement) -> Result<(), String> {
    let mut error = None;
    let _ = sqlparser::ast::visit_expressions(statement, |expr: &Expr| {
        if let Expr::Cast { data_type, .. } = expr
            && let Err(e) = firebolt_type(data_type)
        {
            error = Some(e);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    error.map_or(Ok(()), Err)
}

/// Firebolt joins "as long as there is one equality predicate comparing a left column to
/// a right column" (release notes 4.3/4.4): `IS NOT DISTINCT FROM` alone is no such
/// predicate. Applies to every JOIN .. ON and to MERGE .. ON.
fn has_equi_predicate(on: &Expr) -> bool {
    match on {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => has_equi_predicate(left) || has_equi_predicate(right),
        Expr::Nested(inner) => has_equi_predicate(inner),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => is_column(left) && is_column(right),
        _ => false,
    }
}

fn is_column(e: &Expr) -> bool {
    matches!(e, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
}

struct JoinCheck(Option<String>);

impl Visitor for JoinCheck {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        let mut bodies = vec![query.body.as_ref()];
        while let Some(body) = bodies.pop() {
            match body {
                SetExpr::Select(select) => {
                    for from in &select.from {
                        for join in &from.joins {
                            let constraint = match &join.join_operator {
                                JoinOperator::Join(c)
                                | JoinOperator::Inner(c)
                                | JoinOperator::Left(c)
                                | JoinOperator::LeftOuter(c)
                                | JoinOperator::Right(c)
                                | JoinOperator::RightOuter(c)
                                | JoinOperator::FullOuter(c) => Some(c),
                                _ => None,
                            };
                            if let Some(JoinConstraint::On(on)) = constraint
                                && !has_equi_predicate(on)
                            {
                                self.0 = Some(format!(
                                    "join condition `{on}` has no equality predicate between the two sides"
                                ));
                                return ControlFlow::Break(());
                            }
                        }
                    }
                }
                SetExpr::SetOperation { left, right, .. } => {
                    bodies.push(left);
                    bodies.push(right);
                }
                _ => {}
            }
        }
        ControlFlow::Continue(())
    }
}

fn check_joins(statement: &Statement) -> Result<(), String> {
    if let Statement::Merge(merge) = statement
        && !has_equi_predicate(&merge.on)
    {
        return Err(format!(
            "MERGE condition `{}` has no equality predicate between target and source",
            merge.on
        ));
    }
    let mut check = JoinCheck(None);
    let _ = statement.visit(&mut check);
    check.0.map_or(Ok(()), Err)
}

fn reads(statement: &Statement) -> Vec<Name> {
    let mut names = Vec::new();
    let _ = sqlparser::ast::visit_relations(statement, |relation: &ObjectName| {
        let name = name_of(relation);
        if name.schema != "information_schema" {
            names.push(name);
        }
        ControlFlow::<()>::Continue(())
    });
    names
}

/// One arm per statement kind the worker sends, each with the rules of its docs page: long,
/// but a table of rules reads better whole.
fn classify(statement: &Statement, primary_index: Option<Vec<String>>) -> Result<Parsed, String> {
    Ok(match statement {
        Statement::StartTransaction { .. } => Parsed::Begin,
        Statement::Commit { .. } => Parsed::Commit,
        Statement::Rollback { .. } => Parsed::Rollback,
        Statement::CreateSchema { schema_name, .. } => {
            Parsed::CreateSchema(schema_name.to_string().trim_matches('"').to_string())
        }
        Statement::CreateTable(ct) => {
            if ct.temporary {
                // "Temporary tables are not supported" (DLT notes; no docs page).
                return Err("CREATE TEMPORARY TABLE is not supported".into());
            }
            let columns = ct
                .columns
                .iter()
                .map(column_spec)
                .collect::<Result<Vec<_>, _>>()?;
            let primary_index = primary_index.unwrap_or_default();
            if ct.query.is_some() && !primary_index.is_empty() {
                return Err("CREATE TABLE .. AS SELECT takes no PRIMARY INDEX here".into());
            }
            for k in &primary_index {
                match columns.iter().find(|c| &c.name == k) {
                    None => {
                        return Err(format!(
                            "primary index column `{k}` is not a column of the table"
                        ));
                    }
                    // "Nullable columns cannot be used in Firebolt primary or aggregating
                    // indexes" (CREATE TABLE reference, 2024 and April 2025 docs).
                    Some(c) if c.nullable => {
                        return Err(format!(
                            "nullable column `{k}` cannot be used in a primary index; declare it NOT NULL"
                        ));
                    }
                    Some(_) => {}
                }
            }
            Parsed::CreateTable {
                name: name_of(&ct.name),
                if_not_exists: ct.if_not_exists,
                columns,
                primary_index,
                as_select: ct.query.is_some(),
            }
        }
        Statement::Drop {
            object_type: ObjectType::Table,
            if_exists,
            names,
            ..
        } if names.len() == 1 => Parsed::DropTable {
            name: name_of(&names[0]),
            if_exists: *if_exists,
        },
        Statement::AlterTable(alter) => {
            let table = name_of(&alter.name);
            // "ALTER TABLE .. ADD COLUMN" adds one column per statement (ALTER TABLE
            // reference); RENAME TO keeps the schema.
            let [operation] = alter.operations.as_slice() else {
                return Err("one ALTER TABLE operation per statement".into());
            };
            match operation {
                AlterTableOperation::AddColumn {
                    if_not_exists,
                    column_def,
                    ..
                } => Parsed::AddColumn {
                    table,
                    column: column_spec(column_def)?,
                    if_not_exists: *if_not_exists,
                },
                AlterTableOperation::RenameTable { table_name } => {
                    let (RenameTableNameKind::To(to) | RenameTableNameKind::As(to)) = table_name;
                    if to.0.len() != 1 {
                        return Err(
                            "RENAME TO takes an unqualified name (the table stays in its schema)"
                                .into(),
                        );
                    }
                    Parsed::Rename {
                        table,
                        to: name_of(to).table,
                    }
                }
                other => return Err(format!("ALTER TABLE operation `{other}` is not documented")),
            }
        }
        Statement::Insert(insert) => {
            let TableObject::TableName(name) = &insert.table else {
                return Err("INSERT into a table function is not supported".into());
            };
            Parsed::Write {
                table: name_of(name),
                columns: insert
                    .columns
                    .iter()
                    .filter_map(|c| c.0.last().and_then(|p| p.as_ident()).map(fold))
                    .collect(),
            }
        }
        Statement::Update(update) => match &update.table.relation {
            TableFactor::Table { name, .. } => Parsed::Write {
                table: name_of(name),
                columns: Vec::new(),
            },
            _ => return Err("UPDATE of a derived table".into()),
        },
        Statement::Merge(merge) => {
            let TableFactor::Table { name, .. } = &merge.table else {
                return Err("MERGE INTO a derived table".into());
            };
            let mut columns = Vec::new();
            for clause in &merge.clauses {
                if let MergeAction::Insert(insert) = &clause.action {
                    columns.extend(
                        insert
                            .columns
                            .iter()
                            .filter_map(|c| c.0.last().and_then(|p| p.as_ident()).map(fold)),
                    );
                }
            }
            Parsed::Write {
                table: name_of(name),
                columns,
            }
        }
        Statement::Delete(delete) => {
            let tables = match &delete.from {
                sqlparser::ast::FromTable::WithFromKeyword(t)
                | sqlparser::ast::FromTable::WithoutKeyword(t) => t,
            };
            match tables.first().map(|t| &t.relation) {
                Some(TableFactor::Table { name, .. }) => Parsed::Write {
                    table: name_of(name),
                    columns: Vec::new(),
                },
                _ => return Err("DELETE needs a table".into()),
            }
        }
        Statement::Query(_) => Parsed::Select {
            reads: reads(statement),
            text: statement.to_string(),
        },
        other => {
            return Err(format!(
                "statement not supported by the protocol test server: {}",
                other.to_string().chars().take(80).collect::<String>()
            ));
        }
    })
}

fn parse_use(tokens: &Tokens) -> Result<Parsed, String> {
    // `USE DATABASE "db"`, `USE ENGINE "eng"` (connecting over HTTP; the SDKs quote).
    let what = tokens.keyword(1).unwrap_or_default();
    let Some(name) = tokens.ident(2) else {
        return Err("USE needs a name".into());
    };
    if tokens.tokens.len() > 3 && !matches!(tokens.tokens[3].0, Token::SemiColon | Token::EOF) {
        return Err("syntax error after the name in USE".into());
    }
    match what.as_str() {
        "DATABASE" => Ok(Parsed::UseDatabase(name)),
        "ENGINE" => Ok(Parsed::UseEngine(name)),
        other => Err(format!("USE {other} is not supported")),
    }
}

/// The COPY options the 2025 COPY FROM reference documents, with the values they take.
const COPY_OPTIONS: [&str; 14] = [
    "TYPE",
    "AUTO_CREATE",
    "ALLOW_COLUMN_MISMATCH",
    "MAX_ERRORS_PER_FILE",
    "ERROR_FILE",
    "ERROR_FILE_CREDENTIALS",
    "PATTERN",
    "CASE_SENSITIVE_COLUMN_MAPPING",
    "HEADER",
    "DELIMITER",
    "QUOTE",
    "ESCAPE",
    "NULL_STRING",
    "CREDENTIALS",
];

/// The source metadata columns COPY may map (COPY FROM reference).
const COPY_METADATA: [&str; 4] = [
    "$source_file_name",
    "$source_file_timestamp",
    "$source_file_size",
    "$source_file_etag",
];

/// `COPY [INTO] t [(col [DEFAULT v] [$meta], ..)] FROM 's3://..' [, ..] | location
///  [WITH] option = value ..` (COPY FROM reference, 2025 docs). The grammar in one piece,
/// in the order the docs give it.
fn parse_copy(tokens: &Tokens) -> Result<Parsed, String> {
    let t = &tokens.tokens;
    let mut i = 1;
    if tokens.keyword(i).as_deref() == Some("INTO") {
        i += 1;
    }
    // Table name: ident [. ident]
    let mut parts = vec![tokens.ident(i).ok_or("COPY needs a table name")?];
    i += 1;
    while matches!(t.get(i).map(|x| &x.0), Some(Token::Period)) {
        parts.push(
            tokens
                .ident(i + 1)
                .ok_or("syntax error in the table name")?,
        );
        i += 2;
    }
    let table = match parts.as_slice() {
        [table] => Name {
            schema: "public".into(),
            table: table.clone(),
        },
        [schema, table] => Name {
            schema: schema.clone(),
            table: table.clone(),
        },
        _ => return Err("COPY table name has too many parts".into()),
    };
    let mut columns = Vec::new();
    if matches!(t.get(i).map(|x| &x.0), Some(Token::LParen)) {
        i += 1;
        loop {
            let column = tokens
                .ident(i)
                .ok_or("COPY column list needs column names")?;
            i += 1;
            // An optional source: `$source_file_name` (tokenized as a placeholder).
            if let Some((Token::Placeholder(p), _)) = t.get(i) {
                if !COPY_METADATA.contains(&p.to_ascii_lowercase().as_str()) {
                    return Err(format!("unknown COPY metadata column `{p}`"));
                }
                i += 1;
            }
            columns.push(column);
            match t.get(i).map(|x| &x.0) {
                Some(Token::Comma) => i += 1,
                Some(Token::RParen) => {
                    i += 1;
                    break;
                }
                other => return Err(format!("syntax error in the COPY column list at {other:?}")),
            }
        }
    }
    if tokens.keyword(i).as_deref() != Some("FROM") {
        return Err("COPY needs FROM".into());
    }
    i += 1;
    match t.get(i).map(|x| &x.0) {
        Some(Token::SingleQuotedString(_)) => loop {
            let Some((Token::SingleQuotedString(url), _)) = t.get(i) else {
                return Err("COPY FROM needs 's3://..' URLs".into());
            };
            if !url.starts_with("s3://") {
                return Err(format!("COPY source `{url}` is not an s3:// URL"));
            }
            i += 1;
            if matches!(t.get(i).map(|x| &x.0), Some(Token::Comma)) {
                i += 1;
            } else {
                break;
            }
        },
        Some(Token::Word(_)) => i += 1, // a LOCATION
        _ => return Err("COPY FROM needs a URL or a location".into()),
    }
    if tokens.keyword(i).as_deref() == Some("WITH") {
        i += 1;
    }
    let mut seen = Vec::new();
    while i < t.len() && !matches!(t[i].0, Token::SemiColon | Token::EOF) {
        let option = tokens
            .keyword(i)
            .ok_or("syntax error in the COPY options")?;
        if !COPY_OPTIONS.contains(&option.as_str()) {
            return Err(format!("unknown COPY option `{option}`"));
        }
        if seen.contains(&option) {
            return Err(format!("COPY option `{option}` given twice"));
        }
        seen.push(option.clone());
        if !matches!(t.get(i + 1).map(|x| &x.0), Some(Token::Eq)) {
            return Err(format!("COPY option `{option}` needs `= value`"));
        }
        i += 2;
        if option == "CREDENTIALS" {
            i = parse_credentials(tokens, i)?;
            continue;
        }
        let value = t.get(i).map(|x| x.0.to_string()).unwrap_or_default();
        let upper = value.to_ascii_uppercase();
        let ok = match option.as_str() {
            "TYPE" => ["PARQUET", "CSV", "TSV", "AUTO"].contains(&upper.as_str()),
            "AUTO_CREATE"
            | "ALLOW_COLUMN_MISMATCH"
            | "CASE_SENSITIVE_COLUMN_MAPPING"
            | "HEADER" => ["TRUE", "FALSE"].contains(&upper.as_str()),
            "MAX_ERRORS_PER_FILE" => value.parse::<u64>().is_ok() || value.ends_with('%'),
            _ => matches!(t.get(i).map(|x| &x.0), Some(Token::SingleQuotedString(_))),
        };
        if !ok {
            return Err(format!(
                "invalid value `{value}` for COPY option `{option}`"
            ));
        }
        i += 1;
    }
    Ok(Parsed::Write { table, columns })
}

/// `( AWS_ACCESS_KEY_ID = '..' AWS_SECRET_ACCESS_KEY = '..' [ AWS_SESSION_TOKEN = '..' ] |
/// AWS_ROLE_ARN = '..' [ AWS_ROLE_EXTERNAL_ID = '..' ] )` (COPY FROM reference).
fn parse_credentials(tokens: &Tokens, mut i: usize) -> Result<usize, String> {
    let t = &tokens.tokens;
    if !matches!(t.get(i).map(|x| &x.0), Some(Token::LParen)) {
        return Err("CREDENTIALS = ( .. ) needs parentheses".into());
    }
    i += 1;
    let mut keys = Vec::new();
    while !matches!(t.get(i).map(|x| &x.0), Some(Token::RParen) | None) {
        let key = tokens.keyword(i).ok_or("syntax error in CREDENTIALS")?;
        if !matches!(t.get(i + 1).map(|x| &x.0), Some(Token::Eq))
            || !matches!(
                t.get(i + 2).map(|x| &x.0),
                Some(Token::SingleQuotedString(_))
            )
        {
            return Err(format!("CREDENTIALS key `{key}` needs = '..'"));
        }
        keys.push(key);
        i += 3;
    }
    i += 1;
    let has = |k: &str| keys.iter().any(|x| x == k);
    let valid_keys = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ROLE_ARN",
        "AWS_ROLE_EXTERNAL_ID",
    ];
    if let Some(bad) = keys.iter().find(|k| !valid_keys.contains(&k.as_str())) {
        return Err(format!("unknown CREDENTIALS key `{bad}`"));
    }
    let keys_form =
        has("AWS_ACCESS_KEY_ID") && has("AWS_SECRET_ACCESS_KEY") && !has("AWS_ROLE_ARN");
    let role_form = has("AWS_ROLE_ARN")
        && !has("AWS_ACCESS_KEY_ID")
        && !has("AWS_SECRET_ACCESS_KEY")
        && !has("AWS_SESSION_TOKEN");
    if !(keys_form && !has("AWS_ROLE_EXTERNAL_ID") || role_form) {
        return Err(format!("invalid CREDENTIALS combination: {keys:?}"));
    }
    Ok(i)
}
