//! The open watch streams of one server process: at most
//! [`crate::config::Limits::max_watch_streams_per_device`] per device, and each ended within
//! seconds of its token's revocation, whichever replica revoked it.
//!
//! A stream holds a [`StreamSlot`] from the moment its call is accepted until its task ends
//! (the client went away, the server stops, the stream failed or its token was revoked); the
//! slot's drop frees its place, however the task ends.
//!
//! **Revocation.** Replicas share nothing but the database, so a revocation is learnt from it:
//! while any stream is open, one task per process reads, every [`REVOCATION_CHECK_INTERVAL`],
//! which of the open streams' tokens no longer authenticate (one statement by primary key for
//! all of them, not one per stream), and ends their streams with UNAUTHENTICATED. A revocation
//! thus ends a stream within the interval plus one query, on every replica, whether it was
//! made through RevokeToken on any replica or in the database directly. The task stops when the
//! last stream ends and starts again with the next one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;

use crate::crypto::ids::{DeviceId, UserId};
use crate::store::tokens::TokenId;
use crate::store::{Store, StoreError};

/// How often the open streams' tokens are checked for revocation, while any stream is open.
pub(crate) const REVOCATION_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Gauge: watch streams open now, of either kind.
pub(crate) const WATCH_STREAMS_OPEN: &str = "keyhold_watch_streams_open";

/// The stream status a revoked token's streams end with.
pub(crate) fn revoked_status() -> Status {
    Status::unauthenticated("token revoked: the stream ended; authenticate with another token")
}

/// The open streams of one server process (clones share them).
#[derive(Clone, Debug, Default)]
pub(crate) struct StreamSlots(Arc<Mutex<Registry>>);

#[derive(Debug, Default)]
struct Registry {
    /// Open streams per device.
    per_device: HashMap<(UserId, DeviceId), usize>,
    /// Open streams per token, and the signal that ends them.
    per_token: HashMap<TokenId, TokenStreams>,
    /// Whether the revocation check task runs.
    checking: bool,
}

#[derive(Debug)]
struct TokenStreams {
    open: usize,
    revoked: watch::Sender<bool>,
}

impl StreamSlots {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // The registry holds counts only, each update a few statements that cannot panic,
        // so a poisoned lock still holds consistent counts.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for a new stream of `device` (user, device) authenticated by `token`, or
    /// RESOURCE_EXHAUSTED naming the cap when the device already has `cap` streams open on
    /// this server. Starts the revocation check if it is not running.
    pub(crate) fn claim(
        &self,
        store: &Store,
        token: &TokenId,
        user: &UserId,
        device: &DeviceId,
        cap: usize,
    ) -> Result<StreamSlot, Status> {
        let mut registry = self.lock();
        let key = (user.clone(), device.clone());
        let open = registry.per_device.get(&key).copied().unwrap_or(0);
        if open >= cap {
            return Err(Status::resource_exhausted(format!(
                "device {user}/{device} has {open} watch streams open on this server, the most \
                 allowed (max-watch-streams-per-device = {cap}); close one first"
            )));
        }
        registry.per_device.insert(key.clone(), open + 1);
        let streams = registry
            .per_token
            .entry(*token)
            .or_insert_with(|| TokenStreams {
                open: 0,
                revoked: watch::channel(false).0,
            });
        streams.open += 1;
        let revoked = streams.revoked.subscribe();
        if !registry.checking {
            registry.checking = true;
            tokio::spawn(check_revocations(store.clone(), self.clone()));
        }
        drop(registry);
        metrics::gauge!(WATCH_STREAMS_OPEN).increment(1.0);
        Ok(StreamSlot {
            slots: self.clone(),
            device: key,
            token: *token,
            revoked,
        })
    }

    /// The open streams of `user`/`device` on this server.
    #[cfg(test)]
    fn open_for(&self, user: &UserId, device: &DeviceId) -> usize {
        let key = (user.clone(), device.clone());
        self.lock().per_device.get(&key).copied().unwrap_or(0)
    }

    /// The tokens of the open streams; `None`, and the check marked stopped, when there are
    /// none (under the lock [`StreamSlots::claim`] starts it under, so no stream is missed).
    fn tokens_or_stop(&self) -> Option<Vec<TokenId>> {
        let mut registry = self.lock();
        if registry.per_token.is_empty() {
            registry.checking = false;
            return None;
        }
        Some(registry.per_token.keys().copied().collect())
    }

    /// Ends the open streams of `tokens`.
    pub(super) fn revoke(&self, tokens: &[TokenId]) {
        let registry = self.lock();
        for token in tokens {
            if let Some(streams) = registry.per_token.get(token) {
                streams.revoked.send_replace(true);
            }
        }
    }

    fn release(&self, device: &(UserId, DeviceId), token: &TokenId) {
        let mut registry = self.lock();
        if let Some(open) = registry.per_device.get_mut(device) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                registry.per_device.remove(device);
            }
        }
        if let Some(streams) = registry.per_token.get_mut(token) {
            streams.open = streams.open.saturating_sub(1);
            if streams.open == 0 {
                registry.per_token.remove(token);
            }
        }
    }
}

/// One open stream's place among its device's and its token's; freed on drop.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    slots: StreamSlots,
    device: (UserId, DeviceId),
    token: TokenId,
    revoked: watch::Receiver<bool>,
}

impl StreamSlot {
    /// Completes once the stream's token was found revoked.
    pub(crate) async fn revoked(&mut self) {
        // The sender lives while any slot of the token does, so this waits for `true`.
        if self.revoked.wait_for(|revoked| *revoked).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.slots.release(&self.device, &self.token);
        metrics::gauge!(WATCH_STREAMS_OPEN).decrement(1.0);
    }
}

/// The revocation check: while any stream is open, every [`REVOCATION_CHECK_INTERVAL`], ends
/// the streams whose token no longer authenticates. A failed read ends nothing (the database
/// may be away for a moment) and is logged once per run of failures.
async fn check_revocations(store: Store, slots: StreamSlots) {
    let mut failing = false;
    loop {
        tokio::time::sleep(REVOCATION_CHECK_INTERVAL).await;
        let Some(tokens) = slots.tokens_or_stop() else {
            return;
        };
        let inactive = async || -> Result<Vec<TokenId>, StoreError> {
            store.conn().await?.inactive_tokens(&tokens).await
        };
        match inactive().await {
            Ok(revoked) => {
                failing = false;
                if !revoked.is_empty() {
                    tracing::info!(
                        tokens = revoked.len(),
                        "ending the watch streams of revoked tokens"
                    );
                    slots.revoke(&revoked);
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot check open streams' tokens for revocation");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(user: &str, device: &str) -> (UserId, DeviceId) {
        (UserId::new(user).unwrap(), DeviceId::new(device).unwrap())
    }

    #[tokio::test]
    async fn the_cap_counts_per_device_and_a_dropped_slot_frees_its_place() {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let slots = StreamSlots::default();
        let (alice, phone) = ids("alice", "phone");
        let (_, laptop) = ids("alice", "laptop");
        let token = TokenId::from_bytes([1; 16]);
        let first = slots.claim(&store, &token, &alice, &phone, 2).unwrap();
        let _second = slots.claim(&store, &token, &alice, &phone, 2).unwrap();
        let refused = slots.claim(&store, &token, &alice, &phone, 2).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("max-watch-streams-per-device = 2")
                && refused.message().contains("alice/phone"),
            "{}",
            refused.message()
        );
        // Another device of the same user has its own places.
        let _other = slots.claim(&store, &token, &alice, &laptop, 2).unwrap();
        drop(first);
        assert_eq!(slots.open_for(&alice, &phone), 1);
        let _again = slots.claim(&store, &token, &alice, &phone, 2).unwrap();
        assert_eq!(slots.open_for(&alice, &phone), 2);
        assert!(slots.claim(&store, &token, &alice, &phone, 0).is_err());
    }

    #[tokio::test]
    async fn revoking_a_token_wakes_its_slots_only() {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let slots = StreamSlots::default();
        let (alice, phone) = ids("alice", "phone");
        let (revoked, kept) = (TokenId::from_bytes([1; 16]), TokenId::from_bytes([2; 16]));
        let mut a = slots.claim(&store, &revoked, &alice, &phone, 8).unwrap();
        let mut b = slots.claim(&store, &revoked, &alice, &phone, 8).unwrap();
        let mut c = slots.claim(&store, &kept, &alice, &phone, 8).unwrap();
        slots.revoke(&[revoked]);
        a.revoked().await;
        b.revoked().await;
        let still_open = tokio::time::timeout(Duration::from_millis(50), c.revoked()).await;
        assert!(still_open.is_err(), "another token's stream was ended");
    }
}
