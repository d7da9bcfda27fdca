//! The Messages wire: requests parsed into the store's types (naming the field on failure),
//! pages and their cursors back onto the wire.

use std::collections::BTreeMap;

use tonic::Status;

use crate::auth::Principal;
use crate::config::Limits;
use crate::crypto::ids::{DeviceId, Epoch, MessageId, SessionId, UserId};
use crate::crypto::message::{MESSAGE_NONCE_LEN, MESSAGE_TAG_LEN};
use crate::proto::keyhold::v1 as pb;
use crate::service::cursor::{self, Cursor, CursorKind};
use crate::service::{check_list_len, invalid, parse_field, require_acts_for};
use crate::store::messages::{Author, Message, NewMessage, Page, PageLimit, Position, Reader};
use crate::store::Timestamp;

/// Page size of the listings when the caller gives none.
pub(crate) const DEFAULT_PAGE: u32 = 50;
/// Largest page of the listings.
pub(crate) const MAX_PAGE: u32 = 200;
/// Most message bytes (nonce, ciphertext, associated data) in one page: under the 4 MiB a
/// gRPC client accepts by default. The store reads no more than this per page (plus one
/// message when a single message is larger), however many rows the page may hold.
pub(crate) const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// The page size a request asks for: 0 means the default, more than the maximum is capped.
pub(crate) fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// The bounds of a listing's page: the page size a request asks for ([`page_size`]) and
/// [`MAX_PAGE_BYTES`].
pub(super) fn page_limit(requested: u32) -> PageLimit {
    PageLimit {
        rows: page_size(requested),
        bytes: MAX_PAGE_BYTES,
    }
}

/// The cursor after a listed message: its time (8 bytes, big-endian) and its id (16 bytes).
/// The cursors before the one codec, `m1.` and the hex of the same 24 bytes, still parse.
impl Cursor for Position {
    const KIND: CursorKind = CursorKind::Messages;
    const LEGACY_PREFIX: Option<&'static str> = Some("m1.");

    fn encode(&self, out: &mut Vec<u8>) {
        cursor::encode_i64(self.created_at.unix_micros(), out);
        out.extend_from_slice(self.message_id.as_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 24 {
            return None;
        }
        let (at, id) = bytes.split_at(8);
        Some(Position {
            created_at: Timestamp::from_unix_micros(cursor::decode_i64(at)?),
            message_id: MessageId::from_slice(id).ok()?,
        })
    }

    fn decode_legacy(text: &str) -> Option<Self> {
        Self::decode(&hex::decode(text).ok()?)
    }
}

/// Parses a message id: the text form of a UUIDv7, as the author chose it.
pub(crate) fn parse_message_id(field: &str, text: &str) -> Result<MessageId, Status> {
    let id = parse_field(field, MessageId::parse(text))?;
    if id.as_uuid().get_version_num() != 7 {
        return Err(invalid(field, "not a UUIDv7"));
    }
    Ok(id)
}

/// The device a listing reads as: named in the request, and one the caller acts for (a device
/// token only itself, an app server any).
pub(super) fn parse_reader(caller: &Principal, user: &str, device: &str) -> Result<Reader, Status> {
    let user = parse_field("user_id", UserId::new(user))?;
    let device = parse_field("device_id", DeviceId::new(device))?;
    require_acts_for(caller, &user, Some(&device))?;
    Ok(Reader { user, device })
}

fn message_to_wire(m: Message) -> pb::EncryptedMessage {
    pb::EncryptedMessage {
        message_id: m.message_id.to_string(),
        session_id: m.session_id.to_string(),
        epoch: m.epoch.get(),
        author_user_id: m.author.user.to_string(),
        author_device_id: m.author.device.map(|d| d.to_string()).unwrap_or_default(),
        nonce: m.nonce,
        ciphertext: m.ciphertext,
        associated_data: m.associated_data,
        created_at: m.created_at.unix_micros(),
    }
}

/// A page on the wire and the cursor of the next one: empty when the page was not full (the
/// store cut it at neither its rows nor its bytes, [`PageLimit`]).
pub(super) fn page_to_wire(page: Page) -> (Vec<pb::EncryptedMessage>, String) {
    let next = match page.messages.last() {
        Some(m) if page.full => cursor::format(&m.position()),
        _ => String::new(),
    };
    (
        page.messages.into_iter().map(message_to_wire).collect(),
        next,
    )
}

/// Parses and checks one message of a batch, naming `messages[i].<field>` on failure.
fn parse_new_message(i: usize, m: pb::NewMessage, limits: &Limits) -> Result<NewMessage, Status> {
    let field = |name: &str| format!("messages[{i}].{name}");
    let message_id = parse_message_id(&field("message_id"), &m.message_id)?;
    let session_id = parse_field(&field("session_id"), SessionId::parse(&m.session_id))?;
    let epoch = parse_field(&field("epoch"), Epoch::new(m.epoch))?;
    if m.nonce.len() != MESSAGE_NONCE_LEN {
        return Err(invalid(
            &field("nonce"),
            format!("must be {MESSAGE_NONCE_LEN} bytes, got {}", m.nonce.len()),
        ));
    }
    if m.ciphertext.len() < MESSAGE_TAG_LEN {
        return Err(invalid(
            &field("ciphertext"),
            format!(
                "must hold at least the {MESSAGE_TAG_LEN}-byte tag, got {} bytes",
                m.ciphertext.len()
            ),
        ));
    }
    let size = m.ciphertext.len() + m.associated_data.as_ref().map_or(0, Vec::len);
    if size > limits.max_message_bytes {
        return Err(Status::resource_exhausted(format!(
            "{}: {size} bytes of ciphertext and associated data; at most {} per message",
            field("ciphertext"),
            limits.max_message_bytes
        )));
    }
    Ok(NewMessage {
        message_id,
        session_id,
        epoch,
        nonce: m.nonce,
        ciphertext: m.ciphertext,
        associated_data: m.associated_data,
    })
}

/// Parses a whole PutMessages request: the author, the caller's right to write as it, and
/// every message.
pub(super) fn parse_put(
    caller: &Principal,
    req: pb::PutMessagesRequest,
    limits: &Limits,
) -> Result<(Author, Vec<NewMessage>), Status> {
    let user = parse_field("author_user_id", UserId::new(req.author_user_id))?;
    let device = match req.author_device_id.as_str() {
        "" if matches!(caller, Principal::Device { .. }) => {
            return Err(invalid(
                "author_device_id",
                "required: a device stores as itself",
            ))
        }
        "" => None,
        d => Some(parse_field("author_device_id", DeviceId::new(d))?),
    };
    require_acts_for(caller, &user, device.as_ref())?;
    check_list_len(
        "messages",
        req.messages.len(),
        limits.max_message_batch,
        true,
    )?;
    let mut batch = Vec::with_capacity(req.messages.len());
    let mut seen = BTreeMap::new();
    for (i, m) in req.messages.into_iter().enumerate() {
        let m = parse_new_message(i, m, limits)?;
        if let Some(first) = seen.insert(m.message_id, i) {
            return Err(invalid(
                &format!("messages[{i}].message_id"),
                format!("repeats messages[{first}].message_id"),
            ));
        }
        batch.push(m);
    }
    Ok((Author { user, device }, batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let p = Position {
            created_at: Timestamp::from_unix_micros(1_700_000_000_123_456),
            message_id: MessageId::generate(),
        };
        let parse = |c: &str| cursor::parse::<Position>("cursor", c);
        let good = cursor::format(&p);
        assert!(good.starts_with("c1.02"), "{good}");
        assert_eq!(parse(&good).unwrap(), Some(p));
        assert_eq!(parse("").unwrap(), None);
        // A cursor of the codec before, which a client may still hold, parses to the same.
        let legacy = format!(
            "m1.{:016x}{}",
            p.created_at.unix_micros(),
            hex::encode(p.message_id.as_bytes())
        );
        assert_eq!(parse(&legacy).unwrap(), Some(p));
        assert_eq!(
            parse(&legacy.to_uppercase().replace("M1.", "m1.")).unwrap(),
            Some(p)
        );
        let nil_id = format!("c1.02{:016x}{}", 5, "0".repeat(32));
        let bad = [
            "m1.".to_string(),
            "sk1.10".to_string(),
            legacy.replace("m1.", "m2."),
            format!("{legacy}0"),
            format!("{legacy}00"),
            legacy[..legacy.len() - 1].to_string(),
            legacy[..legacy.len() - 2].to_string(),
            format!("m1.{}", "g".repeat(48)),
            format!("m1.{:016x}{}", 5, "0".repeat(32)), // the nil id
            format!(
                "m1.{}{}",
                "f".repeat(16),
                hex::encode(p.message_id.as_bytes())
            ), // time < 0
            format!("{good}00"),
            good[..good.len() - 2].to_string(),
            good.replacen("c1.02", "c1.03", 1), // another listing's kind
            nil_id,
            "c1.".to_string(),
        ];
        crate::service::cursor::assert_refused(parse, bad);
    }

    fn stored(len: usize, at: i64) -> Message {
        Message {
            message_id: MessageId::generate(),
            session_id: SessionId::generate(),
            epoch: Epoch::FIRST,
            author: Author {
                user: UserId::new("alice").unwrap(),
                device: None,
            },
            nonce: vec![0; MESSAGE_NONCE_LEN],
            ciphertext: vec![0; len],
            associated_data: None,
            created_at: Timestamp::from_unix_micros(at),
            deleted_at: None,
        }
    }

    #[test]
    fn a_full_page_has_the_cursor_of_its_last_message_and_the_last_page_none() {
        let messages: Vec<Message> = (0..3).map(|i| stored(32, 10 - i)).collect();
        let full = Page {
            messages: messages.clone(),
            full: true,
        };
        let (wire, next) = page_to_wire(full);
        assert_eq!(wire.len(), 3);
        assert_eq!(next, cursor::format(&messages[2].position()));
        let (wire, next) = page_to_wire(Page {
            messages,
            full: false,
        });
        assert_eq!((wire.len(), next.as_str()), (3, ""));
        let empty = Page {
            messages: Vec::new(),
            full: true,
        };
        assert_eq!(page_to_wire(empty).1, "");
        assert_eq!(page_limit(0).bytes, MAX_PAGE_BYTES);
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(page_size(0), DEFAULT_PAGE);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(u32::MAX), MAX_PAGE);
    }

    fn wire_message(len: usize, ad: Option<usize>) -> pb::NewMessage {
        pb::NewMessage {
            message_id: MessageId::generate().to_string(),
            session_id: SessionId::generate().to_string(),
            epoch: 1,
            nonce: vec![0; MESSAGE_NONCE_LEN],
            ciphertext: vec![0; len],
            associated_data: ad.map(|n| vec![0; n]),
        }
    }

    #[test]
    fn message_size_limit_counts_ciphertext_and_associated_data() {
        let limits = Limits {
            max_message_bytes: 100,
            ..Limits::DEFAULT
        };
        assert!(parse_new_message(0, wire_message(100, None), &limits).is_ok());
        assert!(parse_new_message(0, wire_message(60, Some(40)), &limits).is_ok());
        for m in [wire_message(101, None), wire_message(60, Some(41))] {
            let err = parse_new_message(3, m, &limits).unwrap_err();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted);
            assert!(
                err.message().starts_with("messages[3].ciphertext"),
                "{err:?}"
            );
        }
    }
}
