//! The validation of one table: both sides read in key order side by side, each row's
//! canonical encoding ([`super::value`]) compared and hashed into the side's SHA-256. The
//! first row that differs fails the validation with the table and its key.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use tokio_postgres::Client;

use super::schema::Table;
use super::source::{Batches, Source};
use super::value::{key_cmp, show_key, Value};
use super::{target, DbCopyError};
use crate::progress::Progress;

/// What validating one table found (when it matched).
#[derive(Clone, Debug)]
pub(crate) struct ValidateOutcome {
    pub(crate) rows: u64,
    pub(crate) source_sha256: String,
    pub(crate) target_sha256: String,
    pub(crate) elapsed: Duration,
}

struct Compare<'a> {
    table: &'a Table,
    source: Batches,
    pending: VecDeque<Vec<Value>>,
    source_digest: digest::Context,
    target_digest: digest::Context,
    rows: u64,
    progress: Progress,
    src_buf: Vec<u8>,
    tgt_buf: Vec<u8>,
}

impl Compare<'_> {
    async fn next_source(&mut self) -> Result<Option<Vec<Value>>, DbCopyError> {
        if self.pending.is_empty() {
            match self.source.recv().await {
                Some(rows) => self.pending.extend(rows?),
                None => return Ok(None),
            }
        }
        Ok(self.pending.pop_front())
    }

    fn key(&self, row: &[Value]) -> String {
        let key: Vec<Value> = self.table.key.iter().map(|&i| row[i].clone()).collect();
        show_key(&self.table.key_names(), &key)
    }

    fn mismatch(&self, row: &[Value], what: impl Into<String>) -> DbCopyError {
        DbCopyError::Mismatch {
            table: self.table.name.clone(),
            key: self.key(row),
            what: what.into(),
        }
    }

    async fn target_row(&mut self, target: Vec<Value>) -> Result<(), DbCopyError> {
        let Some(source) = self.next_source().await? else {
            return Err(self.mismatch(&target, "the row is in the target but not in the source"));
        };
        self.src_buf.clear();
        self.tgt_buf.clear();
        source.iter().for_each(|v| v.encode(&mut self.src_buf));
        target.iter().for_each(|v| v.encode(&mut self.tgt_buf));
        if self.src_buf != self.tgt_buf {
            let sk: Vec<Value> = self.table.key.iter().map(|&i| source[i].clone()).collect();
            let tk: Vec<Value> = self.table.key.iter().map(|&i| target[i].clone()).collect();
            return Err(match key_cmp(&sk, &tk) {
                Ordering::Less => self.mismatch(&source, "the row is missing from the target"),
                Ordering::Greater => {
                    self.mismatch(&target, "the row is in the target but not in the source")
                }
                Ordering::Equal => {
                    let column = source
                        .iter()
                        .zip(&target)
                        .position(|(a, b)| a != b)
                        .map(|i| self.table.columns[i].name.clone())
                        .unwrap_or_default();
                    self.mismatch(&source, format!("the column {column} differs"))
                }
            });
        }
        self.source_digest.update(&self.src_buf);
        self.target_digest.update(&self.tgt_buf);
        self.rows += 1;
        Ok(())
    }
}

/// Validates `table`: same rows, same values, same order on both sides.
pub(crate) async fn table(
    source: &Source,
    client: &mut Client,
    table: &Table,
    batch: usize,
) -> Result<ValidateOutcome, DbCopyError> {
    let started = Instant::now();
    let total = source.count(table).await?;
    let mut cmp = Compare {
        table,
        source: source.rows_after(table, None, batch),
        pending: VecDeque::new(),
        source_digest: digest::Context::new(&digest::SHA256),
        target_digest: digest::Context::new(&digest::SHA256),
        rows: 0,
        progress: Progress::start(format!("validate {}", table.name), "rows", Some(total)),
        src_buf: Vec::new(),
        tgt_buf: Vec::new(),
    };
    target::scan(client, table, batch, async |rows: Vec<Vec<Value>>| {
        let n = rows.len() as u64;
        for row in rows {
            cmp.target_row(row).await?;
        }
        cmp.progress.inc(n);
        Ok(())
    })
    .await?;
    if let Some(missing) = cmp.next_source().await? {
        return Err(cmp.mismatch(&missing, "the row is missing from the target"));
    }
    let Compare {
        rows,
        progress,
        source_digest,
        target_digest,
        ..
    } = cmp;
    progress.finish();
    Ok(ValidateOutcome {
        rows,
        source_sha256: hex::encode(source_digest.finish()),
        target_sha256: hex::encode(target_digest.finish()),
        elapsed: started.elapsed(),
    })
}
