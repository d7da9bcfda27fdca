//! The Sessions wire: requests parsed into domain types (INVALID_ARGUMENT naming the field,
//! and the caller checks that belong to a request's shape), and domain results back into
//! response messages; the sync cursor.

use std::collections::BTreeSet;

use tonic::Status;

use super::key_set::ParsedKeySet;
use super::workflow::{CreatedSession, SessionChange, StoredKeys};
use crate::auth::Principal;
use crate::crypto::envelope::DekEnvelope;
use crate::crypto::ids::{DeviceId, Epoch, KeyId, SessionId, UserId};
use crate::crypto::sign::{ClientWrap, EscrowWrap, Signature};
use crate::crypto::Suite;
use crate::proto::keyhold::v1 as pb;
use crate::service::cursor::{self, Cursor, CursorKind};
use crate::service::key_directory::parse_suite;
use crate::service::{check_list_len, invalid, parse_field};
use crate::store::sessions::{NewSessionKey, SessionKeyRecord};

use super::MAX_KEYS_PER_CALL;

/// Page size of SyncSessionKeys when the caller gives none.
pub(crate) const DEFAULT_SYNC_PAGE: u32 = 100;
/// Largest SyncSessionKeys page.
pub(crate) const MAX_SYNC_PAGE: u32 = 500;

/// A list of user ids, each valid, duplicates dropped (first kept), at most `max`.
pub(crate) fn parse_user_list(
    field: &str,
    ids: &[String],
    max: usize,
) -> Result<Vec<UserId>, Status> {
    check_list_len(field, ids.len(), max, false)?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(ids.len());
    for (i, u) in ids.iter().enumerate() {
        let user = parse_field(&format!("{field}[{i}]"), UserId::new(u.clone()))?;
        if seen.insert(user.clone()) {
            out.push(user);
        }
    }
    Ok(out)
}

/// A non-empty `user_ids` list (AddRecipients, RemoveRecipients).
pub(crate) fn parse_changed_users(ids: &[String], max: usize) -> Result<Vec<UserId>, Status> {
    let users = parse_user_list("user_ids", ids, max)?;
    if users.is_empty() {
        return Err(invalid("user_ids", "must not be empty"));
    }
    Ok(users)
}

/// The `session_id` of a request.
pub(crate) fn parse_session_id(id: &str) -> Result<SessionId, Status> {
    parse_field("session_id", SessionId::parse(id))
}

/// AddRecipients, RemoveRecipients (`user_ids` given: a non-empty list of at most `max`) and
/// RotateSession (`user_ids` none), in that order of fields.
pub(crate) fn parse_change(
    session_id: &str,
    user_ids: Option<&[String]>,
    key_set: &Option<pb::ClientWrappedKeySet>,
    max: usize,
) -> Result<SessionChange, Status> {
    let session_id = parse_session_id(session_id)?;
    let users = match user_ids {
        Some(ids) => parse_changed_users(ids, max)?,
        None => Vec::new(),
    };
    let key_set = key_set.as_ref().map(parse_key_set).transpose()?;
    Ok(SessionChange {
        session_id,
        users,
        key_set,
    })
}

/// Who a CreateSession names as recipients, before the author's trusted users are looked up.
pub(crate) enum RecipientsSpec {
    /// These users.
    Listed(Vec<UserId>),
    /// The author's trusted users as they stand now.
    TrustedUsersOfAuthor,
}

/// The mode-independent head of a CreateSession: suite (the default when unset), author and
/// recipients.
pub(crate) fn parse_create_head(
    req: &pb::CreateSessionRequest,
    max_list_len: usize,
) -> Result<(Suite, UserId, RecipientsSpec), Status> {
    let suite = match req.suite {
        0 => Suite::XWingAes256GcmV1,
        v => parse_suite("suite", v)?,
    };
    let author = parse_field("author_user_id", UserId::new(req.author_user_id.clone()))?;
    let recipients = match &req.recipients {
        Some(pb::create_session_request::Recipients::UserIds(list)) => RecipientsSpec::Listed(
            parse_user_list("user_ids.user_ids", &list.user_ids, max_list_len)?,
        ),
        Some(pb::create_session_request::Recipients::TrustedUsersOfAuthor(true)) => {
            RecipientsSpec::TrustedUsersOfAuthor
        }
        Some(pb::create_session_request::Recipients::TrustedUsersOfAuthor(false)) => {
            return Err(invalid(
                "trusted_users_of_author",
                "set it to true, or name the recipients in user_ids",
            ))
        }
        None => return Err(invalid("recipients", "name the recipient users (user_ids)")),
    };
    Ok((suite, author, recipients))
}

/// The recipients of a new session: the author's user first, then the others in order.
pub(crate) fn with_author_first(author: &UserId, listed: Vec<UserId>) -> Vec<UserId> {
    let mut users = vec![author.clone()];
    users.extend(listed.into_iter().filter(|u| u != author));
    users
}

/// What the mode of a CreateSession asks for.
pub(crate) enum CreateMode {
    /// The service draws and wraps the DEK.
    ServiceWrapped {
        /// Whether the response carries the plaintext DEK.
        return_plaintext_dek: bool,
    },
    /// The author device uploads the wraps.
    ClientWrapped {
        /// The session id the device chose (its wraps are bound to it).
        session_id: SessionId,
        /// The author device.
        author_device: DeviceId,
        /// The uploaded wraps, not yet checked.
        key_set: ParsedKeySet,
    },
}

/// The mode-specific fields of a CreateSession, and who may create a session of that mode:
/// app servers SERVICE_WRAPPED ones, the author device itself CLIENT_WRAPPED ones.
pub(crate) fn parse_create_mode(
    caller: &Principal,
    author: &UserId,
    req: &pb::CreateSessionRequest,
) -> Result<CreateMode, Status> {
    match pb::SessionMode::try_from(req.mode) {
        Ok(pb::SessionMode::ServiceWrapped) => {
            if !matches!(caller, Principal::App { .. }) {
                return Err(Status::permission_denied(
                    "SERVICE_WRAPPED sessions are created by app servers",
                ));
            }
            if !req.session_id.is_empty() {
                return Err(invalid(
                    "session_id",
                    "chosen by the service for SERVICE_WRAPPED sessions",
                ));
            }
            if !req.author_device_id.is_empty() {
                return Err(invalid(
                    "author_device_id",
                    "only for CLIENT_WRAPPED sessions",
                ));
            }
            if req.key_set.is_some() {
                return Err(invalid("key_set", "only for CLIENT_WRAPPED sessions"));
            }
            Ok(CreateMode::ServiceWrapped {
                return_plaintext_dek: req.return_plaintext_dek,
            })
        }
        Ok(pb::SessionMode::ClientWrapped) => {
            if req.return_plaintext_dek {
                return Err(invalid(
                    "return_plaintext_dek",
                    "the service never holds a CLIENT_WRAPPED DEK",
                ));
            }
            let session_id = parse_session_id(&req.session_id)?;
            let author_device = parse_field(
                "author_device_id",
                DeviceId::new(req.author_device_id.clone()),
            )?;
            let key_set = req
                .key_set
                .as_ref()
                .ok_or_else(|| invalid("key_set", "required for CLIENT_WRAPPED sessions"))?;
            let key_set = parse_key_set(key_set)?;
            match caller {
                Principal::Device { user, device, .. }
                    if user == author && device == &author_device => {}
                _ => {
                    return Err(Status::permission_denied(
                        "CLIENT_WRAPPED sessions are created by their author device",
                    ))
                }
            }
            Ok(CreateMode::ClientWrapped {
                session_id,
                author_device,
                key_set,
            })
        }
        Ok(pb::SessionMode::Unspecified) => Err(invalid("mode", "must be set")),
        Err(_) => Err(invalid("mode", format!("unknown value {}", req.mode))),
    }
}

/// A client-wrapped key set, each field parsed; what it must match is checked later
/// ([`super::key_set::check_key_set`]).
pub(crate) fn parse_key_set(ks: &pb::ClientWrappedKeySet) -> Result<ParsedKeySet, Status> {
    let epoch = parse_field("key_set.epoch", Epoch::new(ks.epoch))?;
    check_list_len("key_set.wraps", ks.wraps.len(), MAX_KEYS_PER_CALL, false)?;
    let mut wraps = Vec::with_capacity(ks.wraps.len());
    for (i, w) in ks.wraps.iter().enumerate() {
        wraps.push(ClientWrap {
            user: parse_field(
                &format!("key_set.wraps[{i}].user_id"),
                UserId::new(w.user_id.clone()),
            )?,
            device: parse_field(
                &format!("key_set.wraps[{i}].device_id"),
                DeviceId::new(w.device_id.clone()),
            )?,
            key_id: parse_field(
                &format!("key_set.wraps[{i}].key_id"),
                KeyId::from_slice(&w.key_id),
            )?,
            envelope: parse_field(
                &format!("key_set.wraps[{i}].envelope"),
                DekEnvelope::from_bytes(&w.envelope),
            )?,
        });
    }
    let escrow = ks
        .escrow
        .as_ref()
        .map(|e| {
            Ok::<_, Status>(EscrowWrap {
                key_id: parse_field(
                    "key_set.escrow.escrow_key_id",
                    KeyId::from_slice(&e.escrow_key_id),
                )?,
                envelope: parse_field(
                    "key_set.escrow.envelope",
                    DekEnvelope::from_bytes(&e.envelope),
                )?,
            })
        })
        .transpose()?;
    let signature = parse_field("key_set.signature", Signature::from_slice(&ks.signature))?;
    Ok(ParsedKeySet {
        epoch,
        wraps,
        escrow,
        signature,
    })
}

/// The `epoch` of a GetSessionKeys, when given.
pub(crate) fn parse_optional_epoch(epoch: Option<u32>) -> Result<Option<Epoch>, Status> {
    epoch
        .map(|e| parse_field("epoch", Epoch::new(e)))
        .transpose()
}

/// The page size of a SyncSessionKeys: the default for 0, at most [`MAX_SYNC_PAGE`].
pub(crate) fn sync_page(page_size: u32) -> u32 {
    match page_size {
        0 => DEFAULT_SYNC_PAGE,
        n => n.min(MAX_SYNC_PAGE),
    }
}

/// A position in a device's session-key sync: the last delivered key's store sequence
/// ([`SessionKeyRecord::seq`]); 0 is the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SyncPosition(pub(crate) i64);

/// The sync cursor. Devices persist it, so the codec before this one (`sk1.` and the
/// position in lowercase or uppercase hex) still parses.
impl Cursor for SyncPosition {
    const KIND: CursorKind = CursorKind::SessionKeys;
    const LEGACY_PREFIX: Option<&'static str> = Some("sk1.");

    fn encode(&self, out: &mut Vec<u8>) {
        cursor::encode_i64(self.0, out);
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        cursor::decode_i64(bytes).map(SyncPosition)
    }

    fn decode_legacy(text: &str) -> Option<Self> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        i64::from_str_radix(text, 16)
            .ok()
            .filter(|v| *v >= 0)
            .map(SyncPosition)
    }
}

/// The sync position a `cursor` field names: the start when empty.
pub(crate) fn parse_sync_cursor(text: &str) -> Result<SyncPosition, Status> {
    Ok(cursor::parse::<SyncPosition>("cursor", text)?.unwrap_or(SyncPosition(0)))
}

/// The wire form of the keys a call just stored.
pub(crate) fn new_keys_to_wire(
    session_id: SessionId,
    epoch: Epoch,
    keys: &[NewSessionKey],
) -> Vec<pb::SessionKey> {
    keys.iter()
        .map(|k| pb::SessionKey {
            session_id: session_id.to_string(),
            epoch: epoch.get(),
            user_id: k.user.to_string(),
            device_id: k.device.to_string(),
            key_id: k.key_id.as_bytes().to_vec(),
            envelope: k.envelope.clone(),
        })
        .collect()
}

/// The answer of a CreateSession, without the plaintext DEK (the handler adds it: it is
/// never recorded).
pub(crate) fn created_to_wire(created: &CreatedSession) -> pb::CreateSessionResponse {
    pb::CreateSessionResponse {
        session_id: created.session_id.to_string(),
        epoch: created.epoch.get(),
        session_keys: new_keys_to_wire(created.session_id, created.epoch, &created.session_keys),
        plaintext_dek: None,
    }
}

/// The epoch and wire keys of what a change to a session stored.
fn stored_keys_to_wire(stored: &StoredKeys) -> (u32, Vec<pb::SessionKey>) {
    let keys = new_keys_to_wire(stored.session_id, stored.epoch, &stored.session_keys);
    (stored.epoch.get(), keys)
}

/// The answer of an AddRecipients.
pub(crate) fn added_to_wire(stored: &StoredKeys) -> pb::AddRecipientsResponse {
    let (epoch, session_keys) = stored_keys_to_wire(stored);
    pb::AddRecipientsResponse {
        epoch,
        session_keys,
    }
}

/// The answer of a RemoveRecipients.
pub(crate) fn removed_to_wire(stored: &StoredKeys) -> pb::RemoveRecipientsResponse {
    let (epoch, session_keys) = stored_keys_to_wire(stored);
    pb::RemoveRecipientsResponse {
        epoch,
        session_keys,
    }
}

/// The answer of a RotateSession.
pub(crate) fn rotated_to_wire(stored: &StoredKeys) -> pb::RotateSessionResponse {
    let (epoch, session_keys) = stored_keys_to_wire(stored);
    pb::RotateSessionResponse {
        epoch,
        session_keys,
    }
}

/// The wire form of a stored session key.
pub(crate) fn record_to_wire(k: SessionKeyRecord) -> pb::SessionKey {
    pb::SessionKey {
        session_id: k.session_id.to_string(),
        epoch: k.epoch.get(),
        user_id: k.user.to_string(),
        device_id: k.device.to_string(),
        key_id: k.key_id.as_bytes().to_vec(),
        envelope: k.envelope,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_cursors_round_trip_and_the_start_is_empty() {
        for seq in [0, 1, 0x1f, i64::MAX] {
            let text = cursor::format(&SyncPosition(seq));
            assert!(text.starts_with("c1."), "{text}");
            assert_eq!(parse_sync_cursor(&text).unwrap(), SyncPosition(seq));
        }
        assert_eq!(parse_sync_cursor("").unwrap(), SyncPosition(0));
    }

    #[test]
    fn cursors_devices_persisted_before_still_parse() {
        assert_eq!(parse_sync_cursor("sk1.0").unwrap(), SyncPosition(0));
        assert_eq!(parse_sync_cursor("sk1.1f").unwrap(), SyncPosition(0x1f));
        assert_eq!(parse_sync_cursor("sk1.1F").unwrap(), SyncPosition(0x1f));
        assert_eq!(
            parse_sync_cursor("sk1.7fffffffffffffff").unwrap(),
            SyncPosition(i64::MAX)
        );
    }

    #[test]
    fn anything_else_is_invalid_argument_naming_the_cursor() {
        let other_listing = {
            let mut bytes = vec![CursorKind::KeyPackages as u8];
            bytes.extend_from_slice(&5i64.to_be_bytes());
            format!("c1.{}", hex::encode(bytes))
        };
        let bad = [
            "garbage",
            "sk1.",
            "sk1.zz",
            "sk1.-1",
            "sk1.+1",
            "sk1. 1",
            "sk2.10",
            "sk1.10000000000000000",
            "sk1.8000000000000000",
            "10",
            "c1.",
            "c1.01",
            other_listing.as_str(),
        ];
        crate::service::cursor::assert_refused(parse_sync_cursor, bad);
    }

    #[test]
    fn pages_default_and_cap() {
        assert_eq!(sync_page(0), DEFAULT_SYNC_PAGE);
        assert_eq!(sync_page(7), 7);
        assert_eq!(sync_page(u32::MAX), MAX_SYNC_PAGE);
    }

    #[test]
    fn user_lists_drop_duplicates_and_name_the_bad_entry() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let users = parse_user_list("user_ids", &ids(&["bob", "carol", "bob"]), 10).unwrap();
        let names: Vec<&str> = users.iter().map(UserId::as_str).collect();
        assert_eq!(names, ["bob", "carol"]);
        let err = parse_user_list("user_ids", &ids(&["bob", ""]), 10).unwrap_err();
        assert!(
            err.message().starts_with("user_ids[1]:"),
            "{}",
            err.message()
        );
        let err = parse_user_list("user_ids", &ids(&["a", "b", "c"]), 2).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let err = parse_changed_users(&[], 10).unwrap_err();
        assert_eq!(err.message(), "user_ids: must not be empty");
        let author = UserId::new("bob").unwrap();
        let all = with_author_first(
            &author,
            ids(&["carol", "bob"])
                .into_iter()
                .map(|u| UserId::new(u).unwrap())
                .collect(),
        );
        let names: Vec<&str> = all.iter().map(UserId::as_str).collect();
        assert_eq!(names, ["bob", "carol"]);
    }
}
