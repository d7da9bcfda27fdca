//! The health check's query: the cheapest statement that proves the database answers.

use diesel_async::SimpleAsyncConnection;

use super::{db_run, Conn, StoreError};

impl Conn {
    /// Runs `SELECT 1`: `Ok` when the database answers on this connection.
    pub async fn ping(&mut self) -> Result<(), StoreError> {
        let conn = &mut self.db;
        db_run!(conn: {
            conn.batch_execute("SELECT 1").await?;
        });
        Ok(())
    }
}
