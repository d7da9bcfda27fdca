//! The copy phase of one table: the source's rows after the target's largest key, in key
//! order, a batch per target transaction, then the table's sequences past the copied ids.
//!
//! Resuming needs no progress table: every batch commits whole and in key order, so what
//! the target holds of a table is always a prefix of the source's rows in key order, and the
//! largest key it holds says where to go on.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::schema::Table;
use super::source::Source;
use super::value::{show_key, Value};
use super::{target, DbCopyError};
use crate::progress::Progress;

/// What copying one table did.
#[derive(Clone, Debug)]
pub(crate) struct CopyOutcome {
    /// Rows written by this run.
    pub(crate) copied: u64,
    /// Rows the target held already (an interrupted copy's).
    pub(crate) already: u64,
    pub(crate) elapsed: Duration,
}

fn key_of(table: &Table, row: &[Value]) -> Vec<Value> {
    table.key.iter().map(|&i| row[i].clone()).collect()
}

fn check_fits(table: &Table, rows: &[Vec<Value>]) -> Result<(), DbCopyError> {
    for row in rows {
        for (value, column) in row.iter().zip(&table.columns) {
            if let Err(reason) = value.fits(column.ty) {
                return Err(DbCopyError::Unfit {
                    table: table.name.clone(),
                    key: show_key(&table.key_names(), &key_of(table, row)),
                    column: column.name.clone(),
                    reason,
                });
            }
        }
    }
    Ok(())
}

/// Copies what the target does not hold yet of `table`.
pub(crate) async fn table(
    source: &Source,
    client: &mut Client,
    table: &Table,
    batch: usize,
) -> Result<CopyOutcome, DbCopyError> {
    let started = Instant::now();
    let after = target::max_key(client, table).await?;
    let total = source.count(table).await?;
    let already = match after {
        Some(_) => target::count(client, &table.name).await?,
        None => 0,
    };
    let progress = Progress::start(
        format!("copy {}", table.name),
        "rows",
        Some(total.saturating_sub(already)),
    );
    let mut batches = source.rows_after(table, after, batch);
    let mut copied = 0u64;
    while let Some(rows) = batches.recv().await {
        let rows = rows?;
        check_fits(table, &rows)?;
        target::write_batch(client, table, &rows).await?;
        let n = rows.len() as u64;
        copied += n;
        progress.inc(n);
    }
    progress.finish();
    target::set_sequences(client, table).await?;
    Ok(CopyOutcome {
        copied,
        already,
        elapsed: started.elapsed(),
    })
}
