//! The JSON report of a `keyhold db copy` run.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::copy::CopyOutcome;
use super::validate::ValidateOutcome;
use super::DbCopyError;

/// One table's line of the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TableReport {
    /// The table.
    pub name: String,
    /// Rows in the table on both sides (after validation).
    pub rows: u64,
    /// Rows this run copied.
    pub copied: u64,
    /// Rows an earlier, interrupted run had copied.
    pub already_copied: u64,
    /// SHA-256 of the source's rows in the canonical encoding, hex.
    pub source_sha256: String,
    /// The same over the target's rows.
    pub target_sha256: String,
    /// Seconds spent copying.
    pub copy_seconds: f64,
    /// Seconds spent validating.
    pub validate_seconds: f64,
}

/// The report of one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyReport {
    /// `copy`, `validate-only` is a copy report without copied rows, or `rollback`.
    pub operation: String,
    /// The source URL.
    pub source: String,
    /// Per table, in copy order.
    pub tables: Vec<TableReport>,
    /// Events of the target's audit chain, all verified intact.
    pub audit_events: u64,
    /// The hash of the last audit event, hex.
    pub audit_head: Option<String>,
    /// (phase, seconds) in the order they ran.
    pub phases: Vec<(String, f64)>,
    /// Seconds for the whole run.
    pub total_seconds: f64,
}

impl CopyReport {
    pub(crate) fn new(source: &str) -> Self {
        CopyReport {
            operation: "copy".into(),
            source: source.into(),
            ..Default::default()
        }
    }

    pub(crate) fn rollback(elapsed: Duration) -> Self {
        CopyReport {
            operation: "rollback".into(),
            total_seconds: elapsed.as_secs_f64(),
            ..Default::default()
        }
    }

    fn entry(&mut self, name: &str) -> &mut TableReport {
        if let Some(i) = self.tables.iter().position(|t| t.name == name) {
            &mut self.tables[i]
        } else {
            self.tables.push(TableReport {
                name: name.into(),
                ..Default::default()
            });
            let last = self.tables.len() - 1;
            &mut self.tables[last]
        }
    }

    pub(crate) fn phase(&mut self, name: &str, elapsed: Duration) {
        self.phases.push((name.into(), elapsed.as_secs_f64()));
    }

    pub(crate) fn copied(&mut self, name: &str, outcome: CopyOutcome) {
        let t = self.entry(name);
        t.copied = outcome.copied;
        t.already_copied = outcome.already;
        t.copy_seconds = outcome.elapsed.as_secs_f64();
    }

    pub(crate) fn validated(&mut self, name: &str, outcome: ValidateOutcome) {
        let t = self.entry(name);
        t.rows = outcome.rows;
        t.source_sha256 = outcome.source_sha256;
        t.target_sha256 = outcome.target_sha256;
        t.validate_seconds = outcome.elapsed.as_secs_f64();
    }

    pub(crate) fn audit_chain(&mut self, events: u64, head: Option<String>) {
        self.audit_events = events;
        self.audit_head = head;
    }

    pub(crate) fn finish(&mut self, elapsed: Duration) {
        self.total_seconds = elapsed.as_secs_f64();
    }

    /// The line printed at the end of a run.
    pub fn summary_line(&self) -> String {
        let rows: u64 = self.tables.iter().map(|t| t.rows).sum();
        let copied: u64 = self.tables.iter().map(|t| t.copied).sum();
        format!(
            "db copy: {} tables, {rows} rows validated ({copied} copied by this run), \
             audit chain intact ({} events), {:.1} s",
            self.tables.len(),
            self.audit_events,
            self.total_seconds
        )
    }

    /// Writes the report as JSON to `path` (temporary name, then rename), if given.
    pub(crate) fn write(&self, path: Option<&Path>) -> Result<(), DbCopyError> {
        let Some(path) = path else { return Ok(()) };
        let fail = |e: std::io::Error| DbCopyError::Report {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let json = serde_json::to_vec_pretty(self).map_err(|e| DbCopyError::Report {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&json).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)?;
        Ok(())
    }
}
