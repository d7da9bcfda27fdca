//! The Escrow service: audited staff reads of escrowed DEKs, and the audit log itself.
//! Staff role only.

use tonic::Status;

use super::error::{into_status, DomainError, ErrorClass};
use super::{check_list_len, invalid, parse_field, AppState};
use crate::auth::Principal;
use crate::crypto::ids::{Epoch, SessionId};
use crate::proto::keyhold::v1 as pb;
use crate::proto::keyhold::v1::escrow_server::Escrow;
use crate::store::audit::NewAuditEvent;
use crate::store::StoreError;

/// Longest reason accepted, in characters.
pub(crate) const MAX_REASON_CHARS: usize = 1000;
/// Page size when the caller gives none.
pub(crate) const DEFAULT_PAGE: u32 = 100;
/// Largest page.
pub(crate) const MAX_PAGE: u32 = 500;

/// Counter: escrow reads that returned keys to staff (each one audited first).
pub(crate) const ESCROW_READS: &str = "keyhold_escrow_reads_total";

/// What an escrow read refuses.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EscrowError {
    /// The session does not exist, or an epoch asked for is past its current epoch: both are
    /// unknown records, refused before anything is recorded or read.
    #[error("not found")]
    NotFound,
    /// The store failed; an audit event that cannot be written fails the read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DomainError for EscrowError {
    fn class(&self) -> ErrorClass {
        match self {
            EscrowError::NotFound => ErrorClass::NotFound,
            EscrowError::Store(e) => e.class(),
        }
    }

    fn public_message(&self) -> String {
        match self {
            EscrowError::Store(e) => e.public_message(),
            other => other.to_string(),
        }
    }
}

into_status!(EscrowError);

/// The page size a request asks for: 0 means the default, more than the maximum is capped.
pub(crate) fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

rpc_service! {
    /// The Escrow gRPC service.
    EscrowService: Escrow {
        fn get_escrowed_keys(pb::GetEscrowedKeysRequest) -> pb::GetEscrowedKeysResponse, by [Staff];
        fn list_audit_events(pb::ListAuditEventsRequest) -> pb::ListAuditEventsResponse, by [Staff];
        fn verify_audit_log(pb::VerifyAuditLogRequest) -> pb::VerifyAuditLogResponse, by [Staff];
    }
}

async fn get_escrowed_keys(
    state: &AppState,
    caller: &Principal,
    req: pb::GetEscrowedKeysRequest,
) -> Result<pb::GetEscrowedKeysResponse, Status> {
    let session_id = parse_field("session_id", SessionId::parse(&req.session_id))?;
    // Stored as given; it must say something, and be text every database column holds.
    let reason = req.reason.clone();
    if reason.trim().is_empty() {
        return Err(invalid(
            "reason",
            "a reason is required for every escrow read",
        ));
    }
    if reason
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(invalid(
            "reason",
            "control characters other than newline and tab are not allowed",
        ));
    }
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(invalid(
            "reason",
            format!("at most {MAX_REASON_CHARS} characters"),
        ));
    }
    check_list_len("epochs", req.epochs.len(), 1000, false)?;
    let mut epochs = Vec::with_capacity(req.epochs.len());
    for (i, e) in req.epochs.iter().enumerate() {
        epochs.push(parse_field(&format!("epochs[{i}]"), Epoch::new(*e))?);
    }
    let target = if epochs.is_empty() {
        format!("session:{session_id} epochs:all")
    } else {
        let list: Vec<String> = epochs.iter().map(ToString::to_string).collect();
        format!("session:{session_id} epochs:{}", list.join(","))
    };
    let event = NewAuditEvent::new(caller.actor(), "escrow.read", target).with_reason(reason);
    // The audit event is written first, in the same transaction as the read: if it
    // cannot be written, nothing is returned.
    let (seq, keys) = state
        .store
        .transaction(async move |tx| {
            let Some(session) = tx.session(&session_id).await? else {
                return Err(EscrowError::NotFound);
            };
            // An epoch the session never reached is unknown: refused before anything is
            // recorded or read.
            if epochs.iter().any(|e| *e > session.current_epoch) {
                return Err(EscrowError::NotFound);
            }
            let recorded = tx.append_audit_event(&event).await?;
            let keys = tx.staff_keys(&session_id, &epochs).await?;
            Ok((recorded.seq, keys))
        })
        .await?;
    metrics::counter!(ESCROW_READS).increment(1);
    Ok(pb::GetEscrowedKeysResponse {
        staff_keys: keys
            .into_iter()
            .map(|k| pb::StaffKey {
                epoch: k.epoch.get(),
                escrow_key_id: k.escrow_key_id.as_bytes().to_vec(),
                envelope: k.envelope,
            })
            .collect(),
        audit_seq: seq,
    })
}

async fn list_audit_events(
    state: &AppState,
    _caller: &Principal,
    req: pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse, Status> {
    let events = (state.store.conn().await?)
        .list_audit_events(req.after_seq, page_size(req.page_size))
        .await?;
    Ok(pb::ListAuditEventsResponse {
        events: events
            .into_iter()
            .map(|e| pb::AuditEvent {
                seq: e.seq,
                time: e.at.unix_micros(),
                actor: e.actor,
                action: e.action,
                target: e.target,
                reason: e.reason.unwrap_or_default(),
                prev_hash: e.prev_hash.to_vec(),
                hash: e.hash.to_vec(),
            })
            .collect(),
    })
}

async fn verify_audit_log(
    state: &AppState,
    _caller: &Principal,
    _req: pb::VerifyAuditLogRequest,
) -> Result<pb::VerifyAuditLogResponse, Status> {
    let check = state.store.verify_audit_chain().await?;
    Ok(pb::VerifyAuditLogResponse {
        ok: check.first_broken.is_none(),
        events_checked: check.intact,
        first_broken_seq: check.first_broken,
    })
}
