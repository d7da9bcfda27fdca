//! The PostgreSQL visibility horizon: the time below which every message that will ever exist
//! is already visible, so that a listing that stops there never has a message appear below
//! one it has shown (the base proof and its conditions are in the module docs of
//! [`super`](crate::store::messages)). SQLite, one writer at a time, needs none.
//!
//! # Bounded under stalls
//!
//! The base horizon waits for the oldest running message writer, however long it runs: one
//! replica paused (a VM freeze, SIGSTOP, a partition TCP keepalive does not catch) while it
//! holds a PutMessages transaction open would hide every new message on every replica for as
//! long as the pause lasts. So a writer is bounded, and the horizon stops waiting for a writer
//! past its bound that can no longer commit.
//!
//! **The bound.** A PutMessages transaction names itself `keyhold:put-messages/<B>` (B its
//! bound in milliseconds, [`StoreOptions::message_write_timeout`](crate::store::StoreOptions))
//! and a deferred constraint trigger (migration `message_commit_deadline`) runs at its commit,
//! after everything else it does, including any wait for its client: if the transaction
//! began more than B ago (`clock_timestamp() > transaction_timestamp() + B`), the commit is
//! refused and none of its rows ever becomes visible (the caller gets UNAVAILABLE and retries
//! by message id, which PutMessages makes idempotent). The check runs in the database, at the
//! commit itself, so it holds whatever the client does: paused between statements, between
//! the Execute and the Sync of one statement (where PostgreSQL 15 arms no timeout, and where
//! the implicit transaction of a one-message batch commits), or anywhere else.
//!
//! The server-side timeouts only make stalled writers go away sooner; the proof does not rest
//! on them: `idle_in_transaction_session_timeout` closes a connection idle inside a
//! transaction ([`StoreOptions::idle_in_transaction_timeout`](crate::store::StoreOptions)),
//! and a writer transaction runs its statements with `statement_timeout` B. Neither fires
//! while PostgreSQL waits for the next message of a half-sent pipeline or writes to a client
//! that does not read, and PostgreSQL 15 has no `transaction_timeout` (17 has).
//!
//! **What the horizon skips.** Reading the horizon at time `t` (its statement time), a
//! running writer that started at `s` is not waited for when either
//!
//! 1. its state is `idle in transaction (aborted)`: an aborted transaction can only roll back;
//!    or
//! 2. it names a bound B, `s < t - (B + M)` (M = [`HORIZON_MARGIN_MS`]), and it is waiting
//!    for its client (`wait_event` `ClientRead` or `ClientWrite`).
//!
//! **Why a skipped writer never makes a message visible below the horizon.** Case 1 is
//! immediate. In case 2 the writer is, at the moment the horizon's statement reads its
//! state (at or after `t`), waiting for its client. Its commit check comes after that wait:
//! PostgreSQL reads from the client only between commands and writes to it only while it
//! sends results or messages, never between the commit check and the end of the commit (a
//! commit's CommandComplete and ReadyForQuery follow it; the one exception, a warning when an
//! operator cancels a synchronous-replication wait, goes into the backend's empty send
//! buffer, not to the socket). So the check runs at a time `k ≥ t - ε`, where ε is how stale
//! the shared-memory read of `wait_event` can be (nanoseconds, well below M). Then
//! `k ≥ t - ε > s + B + M - ε > s + B`, and the check refuses the commit. Nothing the
//! skipped writer inserted becomes visible, so skipping it cannot let a message appear below
//! a listed one, and the base proof holds for every writer that is still waited for.
//!
//! Both times come from the database server's clock (`xact_start` is the
//! `transaction_timestamp()` the check reads), which must not step backwards, as the base
//! proof already needs. A writer that names no bound (an older Keyhold during a rolling
//! upgrade, or B = 0) is waited for as before. Every replica sets its own B: the horizon
//! reads each writer's B from its name, so replicas with different bounds stay correct.
//!
//! **What a listing waits for, then.** A running writer is waited for while it works (a
//! statement, bounded by `statement_timeout` B on the transaction's statements, or the lock
//! timeout for the one statement of a one-message batch) or commits (a commit stalled on a
//! disk or a synchronous standby is waited for: it may still become visible), and for at
//! most B + M while it waits for its client. A paused replica therefore hides new messages
//! for about B + M (6 s by default), or until its idle connection is closed
//! (`idle_in_transaction_timeout`, 5 s by default), whichever comes first.

use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use crate::store::{db_run, Conn, StoreError};

/// The `application_name` a PutMessages transaction carries on PostgreSQL while it runs, or
/// the prefix of it, followed by `/` and its bound in milliseconds
/// ([`message_writer_name`]): the listings' visibility horizon waits for transactions that
/// carry it (see the module docs).
pub const MESSAGE_WRITER_APPLICATION_NAME: &str = "keyhold:put-messages";

/// How far past its bound, in milliseconds, a writer waiting for its client must be before
/// the horizon stops waiting for it: the `M` of the module docs' proof, a margin far above
/// the staleness of a read of another backend's state.
pub(crate) const HORIZON_MARGIN_MS: i64 = 1000;

/// The `application_name` a message writer with bound `bound_ms` carries:
/// `keyhold:put-messages/<bound_ms>`, or the plain name (no bound, waited for however long it
/// runs) when the bound is zero.
pub(crate) fn message_writer_name(bound_ms: u64) -> String {
    if bound_ms == 0 {
        MESSAGE_WRITER_APPLICATION_NAME.to_owned()
    } else {
        // The trigger and the horizon read at most nine digits.
        format!(
            "{MESSAGE_WRITER_APPLICATION_NAME}/{}",
            bound_ms.min(999_999_999)
        )
    }
}

/// The horizon: the earlier of the statement's time and the start of the oldest other
/// transaction marked as a message writer in this database that may still commit (`$1`:
/// [`MESSAGE_WRITER_APPLICATION_NAME`], `$2`: [`HORIZON_MARGIN_MS`]).
const HORIZON_SQL: &str = include_str!("horizon.sql");

#[derive(QueryableByName)]
struct Micros {
    #[diesel(sql_type = BigInt)]
    micros: i64,
}

impl Conn {
    /// The visibility horizon of a listing, in unix microseconds: only messages older than it
    /// are listed. Read it on the listing's own connection, outside any transaction, in a
    /// statement before the listing's, so that the listing's snapshot is the later one.
    pub(super) async fn horizon(&mut self) -> Result<i64, StoreError> {
        let conn = &mut self.db;
        db_run!(conn: sqlite {
            Ok(i64::MAX)
        } postgres {
            let row: Micros = diesel::sql_query(HORIZON_SQL)
                .bind::<Text, _>(MESSAGE_WRITER_APPLICATION_NAME)
                .bind::<BigInt, _>(HORIZON_MARGIN_MS)
                .get_result(conn)
                .await?;
            Ok(row.micros)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_names_carry_their_bound_within_application_name_limits() {
        assert_eq!(message_writer_name(5000), "keyhold:put-messages/5000");
        assert_eq!(message_writer_name(0), "keyhold:put-messages");
        let longest = message_writer_name(u64::MAX);
        assert_eq!(longest, "keyhold:put-messages/999999999");
        // PostgreSQL keeps 63 bytes of an application_name.
        assert!(longest.len() <= 63);
    }
}
