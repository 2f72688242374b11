//! Freshness per table: the time of the newest change the worker applied to it, recorded
//! when a batch commits, and the table's objective (`alerts.freshness_objective`,
//! `tables.T.freshness_objective`). Freshness is now minus that time, so it grows while
//! nothing arrives: `/metrics` computes it at scrape time, and the engine checks the
//! objectives at every commit and on a periodic tick. Breaking an objective and meeting it
//! again are each alerted once ([`Objective`] is the pure state machine that decides).
//! A table that never applied anything has no freshness; at startup the ledger's last
//! applied files seed it, and with leases (several tasks) every check reads them again,
//! so what another task applied counts.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::alerts::{Alert, AlertKind, Severity};

/// How often the engine checks the objectives while no file arrives.
pub const CHECK_EVERY: Duration = Duration::from_secs(15);

/// A table's standing against its objective: whether it is in breach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Objective {
    missed: bool,
}

/// A change of standing, alerted once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Missed,
    Recovered,
}

impl Objective {
    /// Compares `age` with the objective (None: no objective, never missed). Returns a
    /// transition only when the standing changes, so a breach is reported once however
    /// many checks see it.
    pub fn check(&mut self, age: Duration, objective: Option<Duration>) -> Option<Transition> {
        let over = objective.is_some_and(|o| age > o);
        if over == self.missed {
            return None;
        }
        self.missed = over;
        Some(if over {
            Transition::Missed
        } else {
            Transition::Recovered
        })
    }

    pub fn missed(self) -> bool {
        self.missed
    }
}

/// What a check found for one table, with what its alert says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub table: String,
    pub transition: Transition,
    pub age: Duration,
    pub newest: SystemTime,
    pub objective: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct Table {
    newest: SystemTime,
    objective: Objective,
    /// Whether this worker alerts for the table: it made the newest commit (or it is the
    /// only worker). With several tasks, the one that committed last alerts, once.
    ours: bool,
}

/// Every table's newest applied change and standing, shared by the lanes, the engine's
/// tick and `/metrics`.
#[derive(Debug, Default)]
pub struct Freshness {
    tables: Mutex<BTreeMap<String, Table>>,
}

/// `now - newest`, zero when the change is in the future (clocks differ).
fn age(now: SystemTime, newest: SystemTime) -> Duration {
    now.duration_since(newest).unwrap_or_default()
}

impl Freshness {
    /// Records that `newest` was applied to `table` (a late, older change never moves it
    /// back) and checks the objective.
    pub fn applied(
        &self,
        table: &str,
        newest: SystemTime,
        now: SystemTime,
        objective: Option<Duration>,
    ) -> Option<Verdict> {
        // A change from the future (a skewed source clock, a sentinel value) would keep
        // the table fresh for good: it counts as now.
        let newest = newest.min(now);
        let mut tables = self.tables.lock().expect("freshness");
        let entry = tables.entry(table.to_string()).or_insert(Table {
            newest,
            objective: Objective::default(),
            ours: true,
        });
        entry.newest = entry.newest.max(newest);
        entry.ours = true;
        check(table, entry, now, objective)
    }

    /// Records that `at` is known to be applied to `table` (by the ledger: another
    /// worker, or before a restart), without a check: the next one sees it.
    /// `ours`: whether this worker is to alert for it (true when it is the only worker).
    pub fn observed(&self, table: &str, at: SystemTime, now: SystemTime, ours: bool) {
        let at = at.min(now);
        let mut tables = self.tables.lock().expect("freshness");
        let entry = tables.entry(table.to_string()).or_insert(Table {
            newest: at,
            objective: Objective::default(),
            ours,
        });
        if at > entry.newest {
            entry.newest = at;
            entry.ours = ours;
        }
    }

    /// Checks every table's objective at `now`.
    pub fn check_all(
        &self,
        now: SystemTime,
        objective_of: impl Fn(&str) -> Option<Duration>,
    ) -> Vec<Verdict> {
        let mut tables = self.tables.lock().expect("freshness");
        tables
            .iter_mut()
            // Another task's table is checked only to announce the recovery of a breach
            // this worker announced.
            .filter(|(_, t)| t.ours || t.objective.missed())
            .filter_map(|(name, t)| check(name, t, now, objective_of(name)))
            .collect()
    }

    /// Each table's newest applied change and its age at `now`.
    pub fn snapshot(&self, now: SystemTime) -> Vec<(String, SystemTime, Duration)> {
        let tables = self.tables.lock().expect("freshness");
        tables
            .iter()
            .map(|(name, t)| (name.clone(), t.newest, age(now, t.newest)))
            .collect()
    }
}

fn check(
    table: &str,
    t: &mut Table,
    now: SystemTime,
    objective: Option<Duration>,
) -> Option<Verdict> {
    let age = age(now, t.newest);
    let transition = t.objective.check(age, objective)?;
    Some(Verdict {
        table: table.to_string(),
        transition,
        age,
        newest: t.newest,
        objective,
    })
}

/// `2h 5m`, `4m 10s`, `12s`: a lag as a person says it.
pub fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, s % 3600 / 60),
    }
}

/// RFC 3339 in UTC with milliseconds, as alerts write times.
pub fn rfc3339(at: SystemTime) -> String {
    // chrono's From<SystemTime> panics beyond its range; a file's statistics can hold
    // anything.
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_secs())
        .ok()
        .and_then(|s| chrono::DateTime::<chrono::Utc>::from_timestamp(s, since.subsec_nanos()))
        .map_or_else(
            || "(out of range)".to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
}

impl Verdict {
    /// The alert that reports it.
    pub fn alert(&self) -> Alert {
        let objective = self
            .objective
            .map(|o| humantime::format_duration(o).to_string())
            .unwrap_or_else(|| "none".into());
        let (table, age) = (&self.table, short(self.age));
        match self.transition {
            Transition::Missed => Alert::new(
                AlertKind::FreshnessObjectiveMissed,
                Severity::Warning,
                table,
                format!(
                    "{table} is {age} behind its source: its newest applied change is from {} (objective {objective})",
                    rfc3339(self.newest)
                ),
            ),
            Transition::Recovered => Alert::new(
                AlertKind::FreshnessRecovered,
                Severity::Info,
                table,
                format!(
                    "{table} is within its freshness objective again: {age} behind its source (objective {objective})"
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_breach_and_its_recovery_are_reported_once_each() {
        let mut o = Objective::default();
        let five = Some(5 * MIN);
        assert_eq!(o.check(MIN, five), None, "within");
        assert_eq!(o.check(6 * MIN, five), Some(Transition::Missed));
        assert_eq!(o.check(7 * MIN, five), None, "still missed: not again");
        assert_eq!(o.check(120 * MIN, five), None);
        assert_eq!(
            o.check(5 * MIN, five),
            Some(Transition::Recovered),
            "at the objective is within"
        );
        assert_eq!(o.check(MIN, five), None);
        assert_eq!(
            o.check(6 * MIN, five),
            Some(Transition::Missed),
            "a new breach"
        );
    }

    #[test]
    fn with_several_tasks_the_one_that_committed_last_alerts() {
        let f = Freshness::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let objective = |_: &str| Some(30 * MIN);
        let transitions = |v: Vec<Verdict>| v.into_iter().map(|v| v.transition).collect::<Vec<_>>();
        f.observed("orders", t0, t0, false);
        assert_eq!(
            f.check_all(t0 + 60 * MIN, objective),
            vec![],
            "another task's table"
        );
        assert_eq!(
            f.applied("orders", t0 + 61 * MIN, t0 + 61 * MIN, Some(30 * MIN)),
            None
        );
        assert_eq!(
            transitions(f.check_all(t0 + 100 * MIN, objective)),
            [Transition::Missed],
            "committed here last: this task alerts"
        );
        f.observed("orders", t0 + 101 * MIN, t0 + 101 * MIN, false);
        assert_eq!(
            transitions(f.check_all(t0 + 102 * MIN, objective)),
            [Transition::Recovered],
            "the breach this task announced is announced over"
        );
        assert_eq!(
            f.check_all(t0 + 200 * MIN, objective),
            vec![],
            "then it is the other's"
        );
    }

    #[test]
    fn a_change_from_the_future_counts_as_now() {
        let f = Freshness::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        f.applied("orders", now + 1000 * MIN, now, Some(30 * MIN));
        let missed = f.check_all(now + 31 * MIN, |_| Some(30 * MIN));
        assert_eq!(missed.len(), 1, "the table ages from now on");
        assert!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 4)).contains("range")
        );
    }

    #[test]
    fn without_an_objective_nothing_is_missed() {
        let mut o = Objective::default();
        assert_eq!(o.check(1000 * MIN, None), None);
        let mut missed = Objective::default();
        missed.check(10 * MIN, Some(MIN));
        assert_eq!(
            missed.check(10 * MIN, None),
            Some(Transition::Recovered),
            "an objective taken away ends the breach"
        );
    }

    #[test]
    fn freshness_grows_while_nothing_arrives_and_a_late_file_does_not_rewind_it() {
        let f = Freshness::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let objective = |_: &str| Some(30 * MIN);
        assert!(f.snapshot(t0).is_empty(), "nothing applied: no freshness");
        assert_eq!(f.applied("orders", t0, t0 + MIN, Some(30 * MIN)), None);
        assert_eq!(f.check_all(t0 + 10 * MIN, objective), vec![]);
        // Nothing arrives: the tick finds the breach, once.
        let missed = f.check_all(t0 + 31 * MIN, objective);
        assert_eq!(missed.len(), 1);
        assert_eq!(missed[0].transition, Transition::Missed);
        assert_eq!(missed[0].age, 31 * MIN);
        assert_eq!(f.check_all(t0 + 40 * MIN, objective), vec![]);
        // A late file with an older change: the newest stays.
        let late = f.applied("orders", t0 - 60 * MIN, t0 + 41 * MIN, Some(30 * MIN));
        assert_eq!(late, None);
        assert_eq!(f.snapshot(t0 + 41 * MIN)[0].2, 41 * MIN);
        // A current change: recovered, once.
        let now = t0 + 42 * MIN;
        let back = f.applied("orders", now - MIN, now, Some(30 * MIN)).unwrap();
        assert_eq!((back.transition, back.age), (Transition::Recovered, MIN));
        assert_eq!(f.check_all(now, objective), vec![]);
    }

    #[test]
    fn alerts_say_how_far_behind_in_words() {
        let v = Verdict {
            table: "orders".into(),
            transition: Transition::Missed,
            age: Duration::from_secs(7205),
            newest: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_500_000),
            objective: Some(30 * MIN),
        };
        let a = v.alert();
        assert_eq!(a.alert, AlertKind::FreshnessObjectiveMissed);
        assert_eq!(
            a.message,
            "orders is 2h 0m behind its source: its newest applied change is from 2026-11-24T06:00:00.000Z (objective 30m)"
        );
        assert_eq!(short(Duration::from_secs(250)), "4m 10s");
        assert_eq!(short(Duration::from_secs(12)), "12s");
    }
}
