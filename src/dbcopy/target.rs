//! The PostgreSQL target: a plain `tokio_postgres` session (TLS as the URL says, like the
//! store's), row-generic reads in key order and batch writes with binary `COPY`.
//!
//! - Key order is SQLite's: text key columns are ordered `COLLATE "C"` (bytewise, as SQLite's
//!   BINARY collation); integers and `bytea` order the same on both sides.
//! - Binary `COPY` writes identity columns (`GENERATED ALWAYS AS IDENTITY`) as given, like
//!   `INSERT … OVERRIDING SYSTEM VALUE`; [`set_sequences`] then moves each column's sequence
//!   past the largest copied id so the server's next insert does not collide.
//! - The session's `application_name` is `keyhold:db-copy`: the message commit-deadline
//!   trigger (migration 2026-12-10) only refuses rows of transactions named
//!   `keyhold:put-messages/…`, so copied messages, however old their batch, are never refused.

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;
use tokio_stream::StreamExt;

use super::schema::{quote, Table};
use super::value::Value;
use super::DbCopyError;

/// Opens the copy's session on the target.
pub(crate) async fn connect(url: &str) -> Result<Client, DbCopyError> {
    let client = crate::store::pg_tls::connect_client(url)
        .await
        .map_err(|e| DbCopyError::Target(format!("cannot connect: {e}")))?;
    client
        .batch_execute("SET application_name = 'keyhold:db-copy'")
        .await?;
    Ok(client)
}

/// `ORDER BY` of a table's key in SQLite's order, ascending or descending.
pub(crate) fn order_by(table: &Table, desc: bool) -> String {
    let parts: Vec<String> = table
        .key
        .iter()
        .map(|&i| {
            let c = &table.columns[i];
            let collate = if c.ty.is_text() { " COLLATE \"C\"" } else { "" };
            let dir = if desc { " DESC" } else { "" };
            format!("{}{collate}{dir}", quote(&c.name))
        })
        .collect();
    parts.join(", ")
}

fn row_values(table: &Table, row: &tokio_postgres::Row) -> Result<Vec<Value>, DbCopyError> {
    (0..table.columns.len())
        .map(|i| {
            row.try_get::<_, Value>(i).map_err(|e| {
                DbCopyError::Target(format!("{}.{}: {e}", table.name, table.columns[i].name))
            })
        })
        .collect()
}

/// The largest key the target holds of `table`, in key order: where a resumed copy goes on.
pub(crate) async fn max_key(
    client: &Client,
    table: &Table,
) -> Result<Option<Vec<Value>>, DbCopyError> {
    let key: Vec<String> = table.key_names().iter().map(|k| quote(k)).collect();
    let sql = format!(
        "SELECT {} FROM {} ORDER BY {} LIMIT 1",
        key.join(", "),
        quote(&table.name),
        order_by(table, true)
    );
    let row = client.query_opt(&sql, &[]).await?;
    Ok(match row {
        None => None,
        Some(row) => Some(
            (0..key.len())
                .map(|i| row.try_get::<_, Value>(i))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    })
}

/// How many rows `table` holds on the target.
pub(crate) async fn count(client: &Client, table: &str) -> Result<u64, DbCopyError> {
    let row = client
        .query_one(&format!("SELECT count(*) FROM {}", quote(table)), &[])
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Writes one batch of rows in one transaction (binary `COPY`).
pub(crate) async fn write_batch(
    client: &mut Client,
    table: &Table,
    rows: &[Vec<Value>],
) -> Result<(), DbCopyError> {
    let types: Vec<Type> = table.columns.iter().map(|c| c.ty.pg_type()).collect();
    let tx = client.transaction().await?;
    let sink = tx
        .copy_in(&format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            quote(&table.name),
            table.column_list()
        ))
        .await?;
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
    let mut refs: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(types.len());
    for row in rows {
        refs.clear();
        refs.extend(row.iter().map(|v| v as &(dyn ToSql + Sync)));
        writer.as_mut().write(&refs).await?;
    }
    writer.finish().await?;
    tx.commit().await?;
    Ok(())
}

/// Moves the sequence behind every identity or serial column of `table` past its largest
/// value, so the server's next insert draws a fresh id.
pub(crate) async fn set_sequences(client: &Client, table: &Table) -> Result<(), DbCopyError> {
    for c in &table.columns {
        let seq: Option<String> = client
            .query_one(
                "SELECT pg_get_serial_sequence($1, $2)",
                &[&quote(&table.name), &c.name],
            )
            .await?
            .get(0);
        let Some(seq) = seq else { continue };
        client
            .execute(
                &format!(
                    "SELECT setval($1::text::regclass, m) FROM (SELECT max({}) AS m FROM {}) x \
                     WHERE m IS NOT NULL",
                    quote(&c.name),
                    quote(&table.name)
                ),
                &[&seq],
            )
            .await?;
    }
    Ok(())
}

/// Reads every row of `table` in key order from inside a read-only transaction, `batch`
/// rows at a time, handing each batch to `each`.
pub(crate) async fn scan(
    client: &mut Client,
    table: &Table,
    batch: usize,
    mut each: impl AsyncFnMut(Vec<Vec<Value>>) -> Result<(), DbCopyError>,
) -> Result<(), DbCopyError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let sql = format!(
        "SELECT {} FROM {} ORDER BY {}",
        table.column_list(),
        quote(&table.name),
        order_by(table, false)
    );
    let portal = tx.bind(&sql, &[]).await?;
    let limit = i32::try_from(batch).unwrap_or(i32::MAX);
    loop {
        let mut stream = std::pin::pin!(tx.query_portal_raw(&portal, limit).await?);
        let mut rows = Vec::with_capacity(batch);
        while let Some(row) = stream.next().await.transpose()? {
            rows.push(row_values(table, &row)?);
        }
        if rows.is_empty() {
            break;
        }
        let last = rows.len() < batch;
        each(rows).await?;
        if last {
            break;
        }
    }
    tx.commit().await?;
    Ok(())
}
