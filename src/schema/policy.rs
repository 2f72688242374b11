//! Schema evolution policies: what the worker does with each kind of change, as a preset
//! refined per change kind, globally and per table.

use serde::{Deserialize, Serialize};

/// A table seen for the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewTablePolicy {
    /// Create it from the first file's schema and load it.
    Create,
    /// Alert and hold its files until `cdc-worker schema accept` releases the table.
    Hold,
    /// Alert once and drop its files.
    Ignore,
}

/// A column the target does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewColumnPolicy {
    /// `ALTER TABLE ADD COLUMN` before the batch, so its values load.
    Add,
    /// Load the other columns; this column's values are dropped (alerted once).
    Ignore,
    /// Hold the table until accepted.
    Fail,
}

/// A column the target has but new files do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovedColumnPolicy {
    /// Keep the column: inserted rows get NULL, updated rows keep their last value.
    Keep,
    /// Hold the table until accepted.
    Fail,
}

/// A type that got wider (int32 -> int64, decimal precision up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WideningPolicy {
    /// Change the target column's type (DuckDB: ALTER COLUMN TYPE; Firebolt: table rebuild).
    Widen,
    /// Hold the table until accepted.
    Fail,
}

/// A type change that is neither widening nor narrowing (int64 -> string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncompatiblePolicy {
    /// Hold the table until accepted.
    Fail,
    /// Add a column `<name>__v_<type>` of the new type for the values the old column
    /// cannot hold; values that cast losslessly still go to the old column.
    Variant,
    /// Cast into the old column's type; values that do not cast become NULL (counted).
    Cast,
    /// Load NULL into the column for files of the new type (counted, alerted).
    Ignore,
}

/// Named sets of policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PolicyPreset {
    /// Follow the source: create, add, keep, widen, variant columns for incompatible types.
    #[default]
    Evolve,
    /// Never hold a table: like evolve, but incompatible types are cast (failures -> NULL).
    Lenient,
    /// Hold the table on any change that would alter the target or drop data.
    Strict,
}

/// The resolved policy for one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaPolicy {
    pub preset: PolicyPreset,
    pub new_table: NewTablePolicy,
    pub new_column: NewColumnPolicy,
    pub removed_column: RemovedColumnPolicy,
    pub widening: WideningPolicy,
    pub incompatible: IncompatiblePolicy,
}

impl PolicyPreset {
    pub fn policy(self) -> SchemaPolicy {
        use IncompatiblePolicy as I;
        let (new_table, new_column, removed_column, widening, incompatible) = match self {
            PolicyPreset::Evolve => (
                NewTablePolicy::Create,
                NewColumnPolicy::Add,
                RemovedColumnPolicy::Keep,
                WideningPolicy::Widen,
                I::Variant,
            ),
            PolicyPreset::Lenient => (
                NewTablePolicy::Create,
                NewColumnPolicy::Add,
                RemovedColumnPolicy::Keep,
                WideningPolicy::Widen,
                I::Cast,
            ),
            PolicyPreset::Strict => (
                NewTablePolicy::Hold,
                NewColumnPolicy::Fail,
                RemovedColumnPolicy::Fail,
                WideningPolicy::Fail,
                I::Fail,
            ),
        };
        SchemaPolicy {
            preset: self,
            new_table,
            new_column,
            removed_column,
            widening,
            incompatible,
        }
    }
}

/// `[schema]`: the global policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaConfig {
    pub preset: PolicyPreset,
    pub new_table: Option<NewTablePolicy>,
    pub new_column: Option<NewColumnPolicy>,
    pub removed_column: Option<RemovedColumnPolicy>,
    pub widening: Option<WideningPolicy>,
    pub incompatible: Option<IncompatiblePolicy>,
}

/// `[tables.NAME.schema]`: a table's refinements. Unset keys inherit the global policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableSchemaConfig {
    pub preset: Option<PolicyPreset>,
    pub new_table: Option<NewTablePolicy>,
    pub new_column: Option<NewColumnPolicy>,
    pub removed_column: Option<RemovedColumnPolicy>,
    pub widening: Option<WideningPolicy>,
    pub incompatible: Option<IncompatiblePolicy>,
}

impl SchemaConfig {
    /// The policy for a table: the global preset and keys, then the table's.
    pub fn resolve(&self, table: Option<&TableSchemaConfig>) -> SchemaPolicy {
        let preset = table.and_then(|t| t.preset).unwrap_or(self.preset);
        let mut policy = preset.policy();
        // Global per-kind keys refine the global preset; a table preset replaces both.
        if table.and_then(|t| t.preset).is_none() {
            apply(
                &mut policy,
                self.new_table,
                self.new_column,
                self.removed_column,
                self.widening,
                self.incompatible,
            );
        }
        if let Some(t) = table {
            apply(
                &mut policy,
                t.new_table,
                t.new_column,
                t.removed_column,
                t.widening,
                t.incompatible,
            );
        }
        policy
    }
}

fn apply(
    policy: &mut SchemaPolicy,
    new_table: Option<NewTablePolicy>,
    new_column: Option<NewColumnPolicy>,
    removed_column: Option<RemovedColumnPolicy>,
    widening: Option<WideningPolicy>,
    incompatible: Option<IncompatiblePolicy>,
) {
    if let Some(v) = new_table {
        policy.new_table = v;
    }
    if let Some(v) = new_column {
        policy.new_column = v;
    }
    if let Some(v) = removed_column {
        policy.removed_column = v;
    }
    if let Some(v) = widening {
        policy.widening = v;
    }
    if let Some(v) = incompatible {
        policy.incompatible = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_keys_refine_the_global_policy() {
        let global = SchemaConfig {
            preset: PolicyPreset::Evolve,
            incompatible: Some(IncompatiblePolicy::Fail),
            ..Default::default()
        };
        assert_eq!(global.resolve(None).incompatible, IncompatiblePolicy::Fail);
        let table = TableSchemaConfig {
            new_column: Some(NewColumnPolicy::Ignore),
            ..Default::default()
        };
        let p = global.resolve(Some(&table));
        assert_eq!(p.new_column, NewColumnPolicy::Ignore);
        assert_eq!(p.incompatible, IncompatiblePolicy::Fail);
        let strict = TableSchemaConfig {
            preset: Some(PolicyPreset::Strict),
            ..Default::default()
        };
        assert_eq!(global.resolve(Some(&strict)), PolicyPreset::Strict.policy());
    }
}
