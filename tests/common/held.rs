//! A message writer that holds its transaction open on purpose, as a slow or paused replica
//! does: it inserts its messages, then waits uncommitted until the test lets it commit.

use keyhold::store::messages::{Author, NewMessage, PutOutcome, Writer};
use keyhold::store::{Store, StoreError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An open PutMessages transaction whose rows are inserted and not yet committed.
pub struct HeldWriter {
    release: oneshot::Sender<()>,
    join: JoinHandle<Result<PutOutcome, StoreError>>,
}

impl HeldWriter {
    /// Opens a transaction on `store` that stores `messages` as the device `author`, and
    /// returns once they are inserted.
    pub async fn start(store: &Store, author: &Author, messages: Vec<NewMessage>) -> HeldWriter {
        let (inserted_tx, inserted_rx) = oneshot::channel();
        let (release, release_rx) = oneshot::channel::<()>();
        let (store, author) = (store.clone(), author.clone());
        let join = tokio::spawn(async move {
            store
                .transaction(async move |tx| -> Result<_, StoreError> {
                    let outcome = tx.put_messages(Writer::Device, &author, &messages).await?;
                    let _ = inserted_tx.send(());
                    let _ = release_rx.await;
                    Ok(outcome)
                })
                .await
        });
        inserted_rx.await.expect("the held writer inserted");
        HeldWriter { release, join }
    }

    /// Lets the transaction commit, and returns how it ended.
    pub async fn commit(self) -> Result<PutOutcome, StoreError> {
        let _ = self.release.send(());
        self.join.await.expect("join the held writer")
    }
}
