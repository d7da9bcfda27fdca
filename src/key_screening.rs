//! Screening of stored encapsulation keys against the key parser's current rules.
//!
//! A key that entered the database before a parser rule existed may fail it now: until
//! 2026-12 the X-Wing parser let through an X25519 part of u = p − 1 (a point of order 4 on
//! the twist), with which every wrap fails, so one device could make every session of its user
//! impossible to create. [`screen_stored_keys`] reads every stored device key that is not
//! revoked and every prekey, parses each with [`EncapsulationKey::from_slice`], and takes
//! each refused one out of use — a device key is revoked (the device must publish a new one),
//! a prekey is deleted — with an audit event per key (`device_key.revoke_unusable`,
//! `prekey.delete_unusable`, actor `keyhold`, reason the parser's refusal) in the same
//! transaction as the change.
//!
//! It runs once per database for each version of the rules ([`SCREENING_JOB`]): `serve`
//! calls it at start, and its completion is recorded in `maintenance_runs`, so later starts
//! cost one read. Replicas starting together may both screen; each key's change and its audit
//! event are written once (the change is conditional), the completion record once.

use crate::crypto::xwing::EncapsulationKey;
use crate::store::audit::NewAuditEvent;
use crate::store::screening::{KeyRecord, StoredEncapsulationKey};
use crate::store::{Store, StoreError};

/// The job's name in `maintenance_runs`; a new parser rule gets a new version, and the job
/// runs again.
pub const SCREENING_JOB: &str = "screen-encapsulation-keys-v1";

/// Keys read per page.
const PAGE: i64 = 500;

/// What a screening did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScreeningReport {
    /// False when an earlier run had completed and nothing was read.
    pub ran: bool,
    /// Device keys read.
    pub device_keys_checked: u64,
    /// Prekeys read.
    pub prekeys_checked: u64,
    /// Device keys revoked by this run.
    pub device_keys_revoked: u64,
    /// Prekeys deleted by this run.
    pub prekeys_deleted: u64,
}

/// Screens every stored device key and prekey once per database; see the module docs.
pub async fn screen_stored_keys(store: &Store) -> Result<ScreeningReport, StoreError> {
    let mut report = ScreeningReport::default();
    if store
        .conn()
        .await?
        .maintenance_completed_at(SCREENING_JOB)
        .await?
        .is_some()
    {
        return Ok(report);
    }
    report.ran = true;

    let mut after = None;
    loop {
        let page = store
            .conn()
            .await?
            .unrevoked_device_keys_after(after.as_ref(), PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        if let KeyRecord::DeviceKey(id) = last.record {
            after = Some(id);
        }
        report.device_keys_checked += page.len() as u64;
        for key in page.iter().filter_map(refusal) {
            if take_out_of_use(store, key).await? {
                report.device_keys_revoked += 1;
            }
        }
    }

    let mut after = 0;
    loop {
        let page = store.conn().await?.prekeys_after(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        if let KeyRecord::Prekey(id) = last.record {
            after = id;
        }
        report.prekeys_checked += page.len() as u64;
        for key in page.iter().filter_map(refusal) {
            if take_out_of_use(store, key).await? {
                report.prekeys_deleted += 1;
            }
        }
    }

    let details = format!(
        "{} device keys and {} prekeys checked; {} device keys revoked, {} prekeys deleted",
        report.device_keys_checked,
        report.prekeys_checked,
        report.device_keys_revoked,
        report.prekeys_deleted
    );
    store
        .transaction(async |tx| {
            tx.record_maintenance_completed(SCREENING_JOB, &details)
                .await
        })
        .await?;
    Ok(report)
}

/// A stored key the parser refuses, with the refusal.
struct Refused<'a> {
    key: &'a StoredEncapsulationKey,
    reason: String,
}

fn refusal(key: &StoredEncapsulationKey) -> Option<Refused<'_>> {
    EncapsulationKey::from_slice(&key.encapsulation_key)
        .err()
        .map(|e| Refused {
            key,
            reason: format!("the key parser refuses it: {e}"),
        })
}

/// Revokes or deletes one refused key with its audit event, in one transaction; false if
/// another writer already took it out.
async fn take_out_of_use(store: &Store, refused: Refused<'_>) -> Result<bool, StoreError> {
    let Refused { key, reason } = refused;
    let (action, target) = match key.record {
        KeyRecord::DeviceKey(id) => (
            "device_key.revoke_unusable",
            format!("device:{}/{} key:{id}", key.user, key.device),
        ),
        KeyRecord::Prekey(id) => (
            "prekey.delete_unusable",
            format!("device:{}/{} prekey:{id}", key.user, key.device),
        ),
    };
    let event = NewAuditEvent::new("keyhold", action, target.clone()).with_reason(reason.clone());
    let changed = store
        .transaction(async |tx| {
            if !tx.take_key_out_of_use(key.record).await? {
                return Ok(false);
            }
            tx.append_audit_event(&event).await?;
            Ok::<_, StoreError>(true)
        })
        .await?;
    if changed {
        tracing::warn!(%target, %reason, "{action}: a stored key is unusable and was taken out of use");
    }
    Ok(changed)
}
