//! A table's generations as plain data: which one the lane applies to, the next one a DMS
//! reload builds beside the live table, and when that one is complete. No IO and no clock
//! of its own: `promote.rs` reads the warehouse, swaps the tables and alerts.
//!
//! Each full load of a table starts a generation: 1 for the first, one more per reload.
//! A reload's full-load files and the change files after them build the next generation in
//! its own table (`generation_table`), and the live table is replaced by it in one
//! transaction once it is complete: at the first change file of the generation (DMS writes
//! a table's changes, its cached ones first, only after its full load), or after
//! `dms.reload_settle` without a new file of the table (a table without changes gets no
//! change file). What the warehouse holds says where a reload stands after a crash: the
//! generation of the newest ledger entry, and whether a generation's table exists.

use std::time::{Duration, Instant, SystemTime};

use crate::batch::is_change_order_key;
use crate::warehouse::generation_table;

/// The generations of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generations {
    /// The generation the lane applies to: the live table's, or the one a reload builds.
    pub current: u32,
    /// The next generation while a reload builds it.
    pub building: Option<Building>,
    /// Files announced but deleted by a reload whose full load is not announced yet (its
    /// notifications come later): they go to that reload's alert when it starts.
    pub gone_before_start: Vec<String>,
}

impl Default for Generations {
    fn default() -> Self {
        Self {
            current: 1,
            building: None,
            gone_before_start: Vec::new(),
        }
    }
}

/// Whether a file announced but missing from S3 was deleted by a reload: it was uploaded
/// before the table's newest full-load file was written, and DMS writes a table's full
/// load again only when it reloads it, after deleting the table's files. Compared in whole
/// seconds (S3 keeps no more); a file uploaded in the same second is not.
pub fn deleted_by_full_load(uploaded: SystemTime, newest_load_written: SystemTime) -> bool {
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    secs(newest_load_written) > secs(uploaded)
}

/// A reload in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Building {
    pub generation: u32,
    /// Where the generation is built.
    pub table: String,
    /// A change file of the generation is applied, or the settle time passed: the
    /// generation may replace the live table.
    pub complete: bool,
    /// The last commit to the generation (or when the lane learnt of it).
    pub last_commit: Instant,
    /// When this process saw the reload start (None when it found it in progress).
    pub started: Option<SystemTime>,
    /// Files applied to the generation by this process.
    pub files: usize,
    /// Files announced but gone from S3: the old generation's, deleted by DMS.
    pub gone: Vec<String>,
    /// Schema changes the new full load brought, for the reload's alert.
    pub schema_changes: Vec<String>,
    /// After a failed swap, not before this.
    pub retry_at: Option<Instant>,
}

impl Building {
    pub fn new(table: &str, generation: u32, now: Instant, started: Option<SystemTime>) -> Self {
        Self {
            generation,
            table: generation_table(table, generation),
            complete: false,
            last_commit: now,
            started,
            files: 0,
            gone: Vec::new(),
            schema_changes: Vec::new(),
            retry_at: None,
        }
    }
}

/// What the warehouse says of a table's generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// The generation of the newest applied ledger entry (1 without one).
    pub ledger_generation: u32,
    /// The DMS order key of that entry is a change file's.
    pub ledger_has_changes: bool,
    /// The table of generation `ledger_generation + 1` exists: a reload started and
    /// crashed before its first commit (Firebolt creates tables outside the transaction).
    pub next_exists: bool,
    /// The table of generation `ledger_generation` exists: that generation is being built.
    pub this_exists: bool,
}

impl Generations {
    /// Where a table's reload stands, from what the warehouse holds. The second value says
    /// whether the ledger's last applied file belongs to the current generation (else the
    /// current generation has nothing applied yet).
    pub fn found(table: &str, found: Found, now: Instant) -> (Self, bool) {
        let g = found.ledger_generation.max(1);
        if found.next_exists {
            let building = Building::new(table, g + 1, now, None);
            return (
                Self {
                    current: g + 1,
                    building: Some(building),
                    ..Self::default()
                },
                false,
            );
        }
        if g >= 2 && found.this_exists {
            let mut building = Building::new(table, g, now, None);
            building.complete = found.ledger_has_changes;
            return (
                Self {
                    current: g,
                    building: Some(building),
                    ..Self::default()
                },
                true,
            );
        }
        (
            Self {
                current: g,
                building: None,
                ..Self::default()
            },
            true,
        )
    }

    /// A reload starts: the next generation, built beside the live table. A reload that
    /// starts while one is being built abandons it (its table is dropped by the caller).
    pub fn start_reload(&mut self, table: &str, now: Instant, at: SystemTime) -> Option<String> {
        let abandoned = self.building.take().map(|b| b.table);
        self.current += 1;
        let mut building = Building::new(table, self.current, now, Some(at));
        building.gone = std::mem::take(&mut self.gone_before_start);
        self.building = Some(building);
        abandoned
    }

    /// After a commit of `files` (DMS order keys) to the current generation.
    pub fn committed<'a>(&mut self, order_keys: impl IntoIterator<Item = &'a str>, now: Instant) {
        if let Some(b) = &mut self.building {
            for key in order_keys {
                b.files += 1;
                b.complete |= is_change_order_key(key);
            }
            b.last_commit = now;
        }
    }

    /// Whether the reload is complete now: a change file of it was applied, or nothing
    /// came for `settle` with no file waiting.
    pub fn settled(&mut self, now: Instant, settle: Duration, files_waiting: bool) -> bool {
        let Some(b) = &mut self.building else {
            return false;
        };
        if !b.complete && !files_waiting && now >= b.last_commit + settle {
            b.complete = true;
        }
        b.complete
    }

    /// When the reload becomes complete by its quiet period, if nothing else happens.
    pub fn settles_at(&self, settle: Duration) -> Option<Instant> {
        self.building
            .as_ref()
            .filter(|b| !b.complete)
            .map(|b| b.last_commit + settle)
    }

    /// The generation replaced the live table.
    pub fn promoted(&mut self) -> Option<Building> {
        self.building.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(g: u32, changes: bool, next: bool, this: bool) -> Found {
        Found {
            ledger_generation: g,
            ledger_has_changes: changes,
            next_exists: next,
            this_exists: this,
        }
    }

    #[test]
    fn the_warehouse_says_where_a_reload_stands_after_a_crash() {
        let now = Instant::now();
        // No reload ever: generation 1, live.
        let (g, own) = Generations::found("t", found(1, true, false, false), now);
        assert_eq!((g.current, g.building.is_none(), own), (1, true, true));
        // A reload's table exists but nothing was committed to it yet.
        let (g, own) = Generations::found("t", found(1, true, true, false), now);
        let b = g.building.as_ref().unwrap();
        assert_eq!((g.current, b.generation, own), (2, 2, false));
        assert_eq!(b.table, "_cdc_worker_g00000002__t");
        // Generation 2 is being built and has its full load only: not complete.
        let (g, own) = Generations::found("t", found(2, false, false, true), now);
        assert_eq!((g.current, own), (2, true));
        assert!(!g.building.as_ref().unwrap().complete);
        // ... and with a change file: complete, the swap is due.
        let (g, _) = Generations::found("t", found(2, true, false, true), now);
        assert!(g.building.unwrap().complete);
        // Generation 2 was swapped in: its table is gone, it is live.
        let (g, _) = Generations::found("t", found(2, true, false, false), now);
        assert_eq!((g.current, g.building), (2, None));
    }

    #[test]
    fn a_reload_is_complete_at_its_first_change_file_or_after_a_quiet_period() {
        let t0 = Instant::now();
        let settle = Duration::from_secs(60);
        let mut g = Generations::default();
        assert_eq!(g.start_reload("t", t0, SystemTime::now()), None);
        assert_eq!(g.current, 2);
        g.committed(["0/00000001/00000000/"], t0);
        assert!(!g.settled(t0 + Duration::from_secs(30), settle, false));
        assert_eq!(g.settles_at(settle), Some(t0 + settle));
        // Files waiting keep it open however long it is quiet.
        assert!(!g.settled(t0 + Duration::from_secs(90), settle, true));
        assert!(g.settled(t0 + Duration::from_secs(90), settle, false));

        let mut g = Generations::default();
        g.start_reload("t", t0, SystemTime::now());
        g.committed(
            ["0/00000001/00000000/", "1/20261202-101500000.parquet/"],
            t0,
        );
        assert!(g.settled(t0, settle, true));
        assert_eq!(g.building.as_ref().unwrap().files, 2);
        assert_eq!(g.promoted().unwrap().generation, 2);
        assert_eq!((g.current, g.building), (2, None));
    }

    #[test]
    fn a_file_uploaded_before_the_newest_full_load_was_deleted_by_a_reload() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_500);
        assert!(deleted_by_full_load(t, t + Duration::from_secs(1)));
        assert!(deleted_by_full_load(t, t + Duration::from_secs(600)));
        // The same second, or the full load first (its own change files): not.
        assert!(!deleted_by_full_load(t, t + Duration::from_millis(400)));
        assert!(!deleted_by_full_load(t, t - Duration::from_secs(60)));
    }

    #[test]
    fn files_gone_before_a_reload_was_announced_go_to_its_alert() {
        let t0 = Instant::now();
        let mut g = Generations::default();
        g.gone_before_start
            .push("s/t/20261202-100200000.parquet".into());
        g.start_reload("t", t0, SystemTime::now());
        let b = g.building.as_ref().unwrap();
        assert_eq!(b.gone, ["s/t/20261202-100200000.parquet"]);
        assert!(g.gone_before_start.is_empty());
    }

    #[test]
    fn a_reload_during_a_reload_abandons_the_first() {
        let t0 = Instant::now();
        let mut g = Generations::default();
        g.start_reload("t", t0, SystemTime::now());
        let abandoned = g.start_reload("t", t0, SystemTime::now());
        assert_eq!(abandoned.as_deref(), Some("_cdc_worker_g00000002__t"));
        assert_eq!(g.current, 3);
        assert_eq!(g.building.unwrap().table, "_cdc_worker_g00000003__t");
    }
}
