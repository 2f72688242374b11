//! The DMS S3 layout: which table a key belongs to, whether it is a full-load or a CDC
//! file, and the order DMS wrote it in.
//!
//! Keys look like `[prefix/]schema/table/[date folders/]file.parquet`. Full-load files are
//! `LOAD00000001.parquet` (a hex counter, optionally `SEGMENTn_`-prefixed or in a partition
//! folder); CDC files are `YYYYMMDD-HHMMSSmmm.parquet`, optionally under date folders. Within a
//! table, DMS order is: full-load files by counter, then CDC files by *file name* (never by
//! the whole key: some date-folder sequences do not sort).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::RoutingConfig;

/// A table of the source database.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceTable {
    pub schema: String,
    pub table: String,
}

impl fmt::Display for SourceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Full load or change data, with what orders the file within its table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FileKind {
    Load { segment: u32, counter: u32 },
    Cdc,
}

/// A key that belongs to the DMS layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DmsKey {
    pub source: SourceTable,
    pub kind: FileKind,
    /// Folders between the table folder and the file (date or partition folders).
    pub folders: String,
    pub file_name: String,
    /// The key prefix of the table's folder, `[prefix/]schema/table/`.
    pub table_prefix: String,
}

/// Sorts files of one table in the order DMS wrote them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DmsOrder {
    kind: FileKind,
    folders: String,
    file_name: String,
}

impl DmsKey {
    pub fn order(&self) -> DmsOrder {
        DmsOrder {
            kind: self.kind.clone(),
            folders: self.folders.clone(),
            file_name: self.file_name.clone(),
        }
    }

    pub fn is_load(&self) -> bool {
        matches!(self.kind, FileKind::Load { .. })
    }

    /// When DMS wrote a CDC file, from its name (`20261124-101500123.parquet`, UTC): the
    /// time of the newest change it can hold, for freshness. None for full-load files.
    pub fn cdc_time(&self) -> Option<std::time::SystemTime> {
        if self.kind != FileKind::Cdc {
            return None;
        }
        cdc_name_time(&self.file_name)
    }
}

/// When DMS wrote the change file a ledger sort key (`DmsOrder::sort_key`) is of; None for
/// a full-load file's.
pub fn change_time_of_sort_key(sort_key: &str) -> Option<std::time::SystemTime> {
    let (file_name, _folders) = sort_key.strip_prefix("1/")?.split_once('/')?;
    cdc_name_time(file_name)
}

/// When DMS wrote the change file at S3 key `key`, from its name; None for any other file.
pub fn change_file_time(key: &str) -> Option<std::time::SystemTime> {
    cdc_name_time(key.rsplit('/').next()?)
}

/// The UTC time a CDC file name spells: the date, the time of day, then a fraction of a
/// second of any length (DMS writes three to six digits after the seconds).
fn cdc_name_time(file_name: &str) -> Option<std::time::SystemTime> {
    let (date, time) = file_name.strip_suffix(".parquet")?.split_once('-')?;
    let day = chrono::NaiveDate::parse_from_str(date, "%Y%m%d").ok()?;
    let (hms, fraction) = time.split_at_checked(6)?;
    let clock = chrono::NaiveTime::parse_from_str(hms, "%H%M%S").ok()?;
    let nanos = if fraction.is_empty() {
        0
    } else {
        // `123` is 0.123 s whatever the number of digits: pad or cut to nine.
        format!("{fraction:0<9}").get(..9)?.parse::<u32>().ok()?
    };
    let at = day.and_time(clock).and_utc() + chrono::Duration::nanoseconds(nanos.into());
    Some(at.into())
}

impl DmsKey {
    /// Whether S3 key order matches DMS order from this key on, so a listing may start
    /// after it: CDC files directly in the table folder or under year-first date folders
    /// (DMS's MMYYYYDD and DDMMYYYY sequences do not sort).
    pub fn key_order_is_dms_order(&self) -> bool {
        self.kind == FileKind::Cdc
            && (self.folders.is_empty()
                || self
                    .folders
                    .split(['/', '-', '_'])
                    .next()
                    .is_some_and(starts_year_first))
    }
}

/// `2026` (a delimited year) or `20261124`, `202611`, `2026112415` (year then month).
/// DDMMYYYY without delimiters can start like a year (`20112026`), but its third pair is
/// `19` or `20`, never a month.
fn starts_year_first(segment: &str) -> bool {
    let pair = |i: usize| segment.get(i..i + 2).and_then(|p| p.parse::<u8>().ok());
    let year_first = matches!(pair(0), Some(19 | 20)) && pair(2).is_some();
    match segment.len() {
        4 => year_first,
        n if n > 4 => year_first && pair(4).is_some_and(|m| (1..=12).contains(&m)),
        _ => false,
    }
}

impl DmsOrder {
    /// A string that sorts like the order itself, for the ledger (`max()` of it is the
    /// last applied file of a table).
    pub fn sort_key(&self) -> String {
        match &self.kind {
            FileKind::Load { segment, counter } => {
                format!("0/{counter:08x}/{segment:08x}/{}", self.folders)
            }
            FileKind::Cdc => format!("1/{}/{}", self.file_name, self.folders),
        }
    }
}

impl DmsOrder {
    /// Whether this file comes after `other` by counter or file name alone, whatever
    /// folders either is in: for a file given by its name only (`replay --since`).
    pub fn after_by_name(&self, other: &DmsOrder) -> bool {
        match (&self.kind, &other.kind) {
            (
                FileKind::Load { segment, counter },
                FileKind::Load {
                    segment: s2,
                    counter: c2,
                },
            ) => (counter, segment) > (c2, s2),
            (FileKind::Load { .. }, FileKind::Cdc) => false,
            (FileKind::Cdc, FileKind::Load { .. }) => true,
            (FileKind::Cdc, FileKind::Cdc) => self.file_name > other.file_name,
        }
    }

    /// The file name, for messages.
    pub fn file_name(&self) -> &str {
        &self.file_name
    }
}

impl Ord for DmsOrder {
    fn cmp(&self, other: &Self) -> Ordering {
        match (&self.kind, &other.kind) {
            (
                FileKind::Load { segment, counter },
                FileKind::Load {
                    segment: s2,
                    counter: c2,
                },
            ) => counter
                .cmp(c2)
                .then(segment.cmp(s2))
                .then(self.folders.cmp(&other.folders)),
            (FileKind::Load { .. }, FileKind::Cdc) => Ordering::Less,
            (FileKind::Cdc, FileKind::Load { .. }) => Ordering::Greater,
            (FileKind::Cdc, FileKind::Cdc) => self
                .file_name
                .cmp(&other.file_name)
                .then(self.folders.cmp(&other.folders)),
        }
    }
}

impl PartialOrd for DmsOrder {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Why a key inside the prefix is not a DMS file the worker can apply.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("key `{0}` has an empty, `.` or `..` path segment")]
    UnsafeSegment(String),
    #[error("key `{0}` is not schema/table/file under the prefix")]
    TooShallow(String),
    #[error("key `{key}`: folder `{folder}` between table and file is not a date folder")]
    UnexpectedFolder { key: String, folder: String },
    #[error("key `{0}` contains a NUL or control character")]
    ControlCharacter(String),
    /// In a table's folder, but named neither as DMS names full-load files nor as it names
    /// CDC files: applying it would put it in an order DMS never wrote (a stray upload).
    #[error(
        "`{file_name}` is not a DMS file name (full load: LOAD00000001.parquet, optionally SEGMENTn_; CDC: 20261124-101500123.parquet); files of other names are never applied"
    )]
    NotDmsName {
        key: String,
        file_name: String,
        table: SourceTable,
    },
}

impl LayoutError {
    /// The source table whose folder holds the key, when the key got that far.
    pub fn source(&self) -> Option<&SourceTable> {
        match self {
            LayoutError::NotDmsName { table, .. } => Some(table),
            _ => None,
        }
    }
}

/// Where a key stands relative to the DMS layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyClass {
    Dms(DmsKey),
    /// Outside the prefix, or not a `.parquet` file: none of the worker's business.
    Ignored(KeyIgnored),
}

/// Why a key is none of the worker's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyIgnored {
    OutsidePrefix,
    NotParquet,
}

/// Parses a decoded object key.
pub fn classify_key(prefix: &str, key: &str) -> Result<KeyClass, LayoutError> {
    let prefix = prefix.trim_end_matches('/');
    let rest = if prefix.is_empty() {
        key
    } else {
        match key.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) {
            Some(rest) => rest,
            None => return Ok(KeyClass::Ignored(KeyIgnored::OutsidePrefix)),
        }
    };
    if !key.ends_with(".parquet") {
        return Ok(KeyClass::Ignored(KeyIgnored::NotParquet));
    }
    if key.chars().any(char::is_control) {
        return Err(LayoutError::ControlCharacter(
            key.escape_debug().to_string(),
        ));
    }
    let segments: Vec<&str> = rest.split('/').collect();
    if segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return Err(LayoutError::UnsafeSegment(key.to_string()));
    }
    if segments.len() < 3 {
        return Err(LayoutError::TooShallow(key.to_string()));
    }
    let file_name = segments[segments.len() - 1].to_string();
    let middle = &segments[2..segments.len() - 1];
    let source = SourceTable {
        schema: segments[0].to_string(),
        table: segments[1].to_string(),
    };
    let kind = match load_kind(&file_name) {
        Some(load) => load,
        None if is_cdc_name(&file_name) => FileKind::Cdc,
        None => {
            return Err(LayoutError::NotDmsName {
                key: key.to_string(),
                file_name,
                table: source,
            });
        }
    };
    if kind == FileKind::Cdc
        && let Some(folder) = middle.iter().find(|f| !is_date_folder(f))
    {
        return Err(LayoutError::UnexpectedFolder {
            key: key.to_string(),
            folder: folder.to_string(),
        });
    }
    let table_prefix = format!(
        "{}{}/{}/",
        if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        },
        segments[0],
        segments[1]
    );
    Ok(KeyClass::Dms(DmsKey {
        source,
        kind,
        folders: middle.join("/"),
        file_name,
        table_prefix,
    }))
}

/// `LOAD0000000A.parquet` or `SEGMENT2_LOAD00000001.parquet`.
fn load_kind(file_name: &str) -> Option<FileKind> {
    let stem = file_name.strip_suffix(".parquet")?;
    let (segment, load) = match stem.split_once('_') {
        Some((seg, load)) => (seg.strip_prefix("SEGMENT")?.parse().ok()?, load),
        None => (0, stem),
    };
    let hex = load.strip_prefix("LOAD")?;
    if hex.is_empty() || hex.len() > 8 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(FileKind::Load {
        segment,
        counter: u32::from_str_radix(hex, 16).ok()?,
    })
}

/// `20261124-101500123.parquet`: the date, a dash, the time of day with its fraction.
/// DMS's documentation shows ten digits after the dash (`20141029-1134010000`), the files
/// it writes with Parquet nine; six to twelve are accepted.
fn is_cdc_name(file_name: &str) -> bool {
    let Some((date, time)) = file_name
        .strip_suffix(".parquet")
        .and_then(|stem| stem.split_once('-'))
    else {
        return false;
    };
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    date.len() == 8 && digits(date) && (6..=12).contains(&time.len()) && digits(time)
}

/// `2021`, `11`, `20211123`, `2021-11-23`, `2021_11_23`, `2021112310`.
fn is_date_folder(folder: &str) -> bool {
    folder.chars().any(|c| c.is_ascii_digit())
        && folder
            .chars()
            .all(|c| c.is_ascii_digit() || c == '-' || c == '_')
}

/// Turns source tables into target table names, and refuses two sources for one target.
#[derive(Debug)]
pub struct TableRouter {
    template: String,
    lowercase: bool,
    claimed: Mutex<HashMap<String, SourceTable>>,
}

/// Two source tables that render to the same target.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "source tables {first} and {second} both map to target table `{target}`; change routing.table_name (for example to \"{{schema}}_{{table}}\")"
)]
pub struct RoutingCollision {
    pub target: String,
    pub first: SourceTable,
    pub second: SourceTable,
}

impl TableRouter {
    pub fn new(config: &RoutingConfig) -> Self {
        Self {
            template: config.table_name.clone(),
            lowercase: config.lowercase,
            claimed: Mutex::new(HashMap::new()),
        }
    }

    /// The target name the template gives, without claiming it.
    pub fn render(&self, source: &SourceTable) -> String {
        let name = self
            .template
            .replace("{schema}", &source.schema)
            .replace("{table}", &source.table);
        if self.lowercase {
            name.to_lowercase()
        } else {
            name
        }
    }

    /// The target for `source`, claiming it; a target already claimed by another source
    /// is an error. (The schema store also records the source, so the claim survives
    /// restarts and holds across worker tasks.)
    pub fn route(&self, source: &SourceTable) -> Result<String, RoutingCollision> {
        let target = self.render(source);
        let mut claimed = self.claimed.lock().expect("router lock");
        match claimed.get(&target) {
            Some(first) if first != source => Err(RoutingCollision {
                target,
                first: first.clone(),
                second: source.clone(),
            }),
            Some(_) => Ok(target),
            None => {
                claimed.insert(target.clone(), source.clone());
                Ok(target)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdc_names_spell_their_utc_time() {
        let at = |name: &str| cdc_name_time(name).map(chrono::DateTime::<chrono::Utc>::from);
        assert_eq!(
            at("20261124-101500123.parquet").unwrap().to_rfc3339(),
            "2026-11-24T10:15:00.123+00:00"
        );
        assert_eq!(
            at("20141029-1134010000.parquet").unwrap().to_rfc3339(),
            "2014-10-29T11:34:01+00:00"
        );
        assert_eq!(
            at("20261124-101500.parquet").unwrap().to_rfc3339(),
            "2026-11-24T10:15:00+00:00"
        );
        assert_eq!(at("20261324-101500123.parquet"), None, "month 13");
        assert_eq!(at("LOAD00000001.parquet"), None);
    }

    fn dms(prefix: &str, key: &str) -> DmsKey {
        match classify_key(prefix, key).unwrap() {
            KeyClass::Dms(k) => k,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn load_and_cdc_files() {
        let k = dms("dms", "dms/public/orders/LOAD0000000A.parquet");
        assert_eq!(k.source.to_string(), "public.orders");
        assert_eq!(
            k.kind,
            FileKind::Load {
                segment: 0,
                counter: 10
            }
        );
        let k = dms("", "hr/emp/SEGMENT2_LOAD00000001.parquet");
        assert_eq!(
            k.kind,
            FileKind::Load {
                segment: 2,
                counter: 1
            }
        );
        let k = dms(
            "dms/",
            "dms/public/orders/2021/11/23/20211123-013830913.parquet",
        );
        assert_eq!(k.kind, FileKind::Cdc);
        assert_eq!(k.folders, "2021/11/23");
        assert_eq!(k.table_prefix, "dms/public/orders/");
    }

    #[test]
    fn listings_may_start_after_keys_only_in_sortable_layouts() {
        let sortable = |folders: &str| {
            let key = format!("dms/public/t/{folders}20261124-013830913.parquet");
            dms("dms", &key).key_order_is_dms_order()
        };
        assert!(sortable(""));
        assert!(sortable("2026/11/24/"));
        assert!(sortable("20261124/"));
        assert!(sortable("2026-11-24/"));
        assert!(sortable("2026112415/"));
        assert!(!sortable("11/2026/24/"), "MMYYYYDD");
        assert!(!sortable("11202624/"), "MMYYYYDD without delimiter");
        assert!(!sortable("24/11/2026/"), "DDMMYYYY");
        assert!(
            !sortable("20112026/"),
            "DDMMYYYY on the 20th looks year-first"
        );
        assert!(
            !sortable("19112026/"),
            "DDMMYYYY on the 19th looks year-first"
        );
        assert!(!dms("dms", "dms/public/t/LOAD00000001.parquet").key_order_is_dms_order());
    }

    #[test]
    fn dms_order_is_load_counter_then_cdc_file_name() {
        let keys = [
            "p/s/t/20211123-013830913.parquet",
            "p/s/t/LOAD00000010.parquet",
            "p/s/t/2021/11/22/20211122-235959000.parquet",
            "p/s/t/LOAD0000000F.parquet",
            "p/s/t/LOAD00000002.parquet",
        ];
        let mut parsed: Vec<DmsKey> = keys.iter().map(|k| dms("p", k)).collect();
        parsed.sort_by_key(|k| k.order());
        let names: Vec<&str> = parsed.iter().map(|k| k.file_name.as_str()).collect();
        let sort_keys: Vec<String> = parsed.iter().map(|k| k.order().sort_key()).collect();
        let mut sorted = sort_keys.clone();
        sorted.sort();
        assert_eq!(sort_keys, sorted, "sort keys sort like the order");
        assert_eq!(
            names,
            [
                "LOAD00000002.parquet",
                "LOAD0000000F.parquet",
                "LOAD00000010.parquet",
                "20211122-235959000.parquet",
                "20211123-013830913.parquet"
            ]
        );
    }

    #[test]
    fn ignored_and_bad_keys() {
        assert!(matches!(
            classify_key("dms", "other/s/t/x.parquet").unwrap(),
            KeyClass::Ignored(_)
        ));
        assert!(matches!(
            classify_key("dms", "dmsx/s/t/x.parquet").unwrap(),
            KeyClass::Ignored(_)
        ));
        assert!(matches!(
            classify_key("dms", "dms/s/t/x.csv").unwrap(),
            KeyClass::Ignored(_)
        ));
        assert!(matches!(
            classify_key("dms", "dms/s/../t/x.parquet"),
            Err(LayoutError::UnsafeSegment(_))
        ));
        assert!(matches!(
            classify_key("", "/s/t/x.parquet"),
            Err(LayoutError::UnsafeSegment(_))
        ));
        assert!(matches!(
            classify_key("dms", "dms/t/x.parquet"),
            Err(LayoutError::TooShallow(_))
        ));
        assert!(matches!(
            classify_key("", "dms/public/orders/20211123-013830913.parquet"),
            Err(LayoutError::UnexpectedFolder { .. })
        ));
        assert!(matches!(
            classify_key("", "s/t\n/x.parquet"),
            Err(LayoutError::ControlCharacter(_))
        ));
    }

    #[test]
    fn only_dms_file_names_belong_to_a_table() {
        let err = classify_key("dms", "dms/public/customers/part-0001.parquet").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`part-0001.parquet` is not a DMS file name (full load: LOAD00000001.parquet, optionally SEGMENTn_; CDC: 20261124-101500123.parquet); files of other names are never applied"
        );
        assert_eq!(
            err.source().map(|s| s.to_string()).as_deref(),
            Some("public.customers")
        );
        for stray in [
            "dms/public/t/LOAD.parquet",
            "dms/public/t/LOAD000000001.parquet",
            "dms/public/t/load00000001.parquet",
            "dms/public/t/20261124.parquet",
            "dms/public/t/20261124-10150.parquet",
            "dms/public/t/2026-11-24-101500123.parquet",
            "dms/public/t/20261124-101500123 (1).parquet",
            "dms/public/t/2026/11/24/export.parquet",
        ] {
            assert!(
                matches!(
                    classify_key("dms", stray),
                    Err(LayoutError::NotDmsName { .. })
                ),
                "{stray}"
            );
        }
        for name in [
            "20141029-1134010000.parquet",
            "20261124-101500123.parquet",
            "SEGMENT3_LOAD0000000F.parquet",
        ] {
            assert!(
                matches!(
                    classify_key("", &format!("s/t/{name}")),
                    Ok(KeyClass::Dms(_))
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn routing_refuses_two_sources_for_one_target() {
        let router = TableRouter::new(&RoutingConfig::default());
        let a = SourceTable {
            schema: "sales".into(),
            table: "Orders".into(),
        };
        let b = SourceTable {
            schema: "archive".into(),
            table: "orders".into(),
        };
        assert_eq!(router.route(&a).unwrap(), "orders");
        assert_eq!(router.route(&a).unwrap(), "orders");
        let err = router.route(&b).unwrap_err();
        assert_eq!(err.first, a);
        let prefixed = TableRouter::new(&RoutingConfig {
            table_name: "{schema}_{table}".into(),
            lowercase: false,
        });
        assert_eq!(prefixed.route(&a).unwrap(), "sales_Orders");
    }
}
