//! The one cursor codec: every listing hands out and takes back cursors of this shape.
//!
//! A cursor is opaque to callers. Its text is `c1.` (the codec's version) followed by the hex
//! of one byte naming the listing ([`CursorKind`]) and the listing's position bytes
//! ([`Cursor::encode`]). The kind byte makes a cursor of one listing INVALID_ARGUMENT in
//! another instead of a silently wrong position; the version lets a later codec change the
//! layout while this one still parses.
//!
//! Cursors of the codecs before this one (`sk1.` for session-key sync, `kp1:` for key-package
//! inboxes — the two a device may have persisted — and `m1.`, `tu1.`) still parse, so that an
//! upgrade does not send a device back to the start of its sync; new cursors are always `c1.`.
//!
//! An empty cursor means "from the start" (or, for newest-first listings, "from the newest").

use tonic::Status;

use super::invalid;

const PREFIX: &str = "c1.";

/// Which listing a cursor belongs to: its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CursorKind {
    /// SyncSessionKeys: the last delivered session-key position.
    SessionKeys = 1,
    /// Message listings (session, author, timeline): the last listed (time, id).
    Messages = 2,
    /// ListTrustedUsers: the last listed trusted user.
    TrustedUsers = 3,
    /// FetchKeyPackages: the last delivered package id.
    KeyPackages = 4,
}

/// A listing position that can travel as a cursor.
pub(crate) trait Cursor: Sized {
    /// The listing this position belongs to.
    const KIND: CursorKind;
    /// Appends the position's bytes.
    fn encode(&self, out: &mut Vec<u8>);
    /// Reads the position from the bytes [`Cursor::encode`] wrote; `None` if they are not.
    fn decode(bytes: &[u8]) -> Option<Self>;
    /// Reads a cursor of the codec this one replaced (the text after its prefix).
    fn decode_legacy(_text: &str) -> Option<Self> {
        None
    }
    /// The prefix of the codec this one replaced, if any.
    const LEGACY_PREFIX: Option<&'static str> = None;
}

/// The cursor text of `position`.
pub(crate) fn format<C: Cursor>(position: &C) -> String {
    let mut bytes = vec![C::KIND as u8];
    position.encode(&mut bytes);
    format!("{PREFIX}{}", hex::encode(bytes))
}

/// Parses the `cursor` field of a request: `None` when empty, INVALID_ARGUMENT naming the
/// field when it is not a cursor this listing handed out.
pub(crate) fn parse<C: Cursor>(field: &str, text: &str) -> Result<Option<C>, Status> {
    if text.is_empty() {
        return Ok(None);
    }
    decode::<C>(text)
        .map(Some)
        .ok_or_else(|| invalid(field, "not a cursor this listing returned"))
}

fn decode<C: Cursor>(text: &str) -> Option<C> {
    if let Some(body) = text.strip_prefix(PREFIX) {
        let bytes = hex::decode(body).ok()?;
        let (&kind, position) = bytes.split_first()?;
        return (kind == C::KIND as u8)
            .then(|| C::decode(position))
            .flatten();
    }
    let legacy = C::LEGACY_PREFIX?;
    C::decode_legacy(text.strip_prefix(legacy)?)
}

/// A non-negative position counted by the database (a row id or sequence), as 8 big-endian
/// bytes.
pub(crate) fn encode_i64(value: i64, out: &mut Vec<u8>) {
    out.extend_from_slice(&value.to_be_bytes());
}

/// Reads what [`encode_i64`] wrote, refusing a negative value.
pub(crate) fn decode_i64(bytes: &[u8]) -> Option<i64> {
    let value = i64::from_be_bytes(bytes.try_into().ok()?);
    (value >= 0).then_some(value)
}

/// Asserts that `parse` refuses every cursor in `bad` as INVALID_ARGUMENT naming the
/// `cursor` field: the refusal tests of every listing.
#[cfg(test)]
pub(crate) fn assert_refused<T: std::fmt::Debug>(
    parse: impl Fn(&str) -> Result<T, Status>,
    bad: impl IntoIterator<Item = impl AsRef<str>>,
) {
    for bad in bad {
        let bad = bad.as_ref();
        let err = parse(bad).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        assert!(
            err.message().starts_with("cursor:"),
            "{bad}: {}",
            err.message()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Pos(i64);

    impl Cursor for Pos {
        const KIND: CursorKind = CursorKind::SessionKeys;
        const LEGACY_PREFIX: Option<&'static str> = Some("old.");
        fn encode(&self, out: &mut Vec<u8>) {
            encode_i64(self.0, out);
        }
        fn decode(bytes: &[u8]) -> Option<Self> {
            decode_i64(bytes).map(Pos)
        }
        fn decode_legacy(text: &str) -> Option<Self> {
            text.parse().ok().filter(|v| *v >= 0).map(Pos)
        }
    }

    #[derive(Debug, PartialEq)]
    struct Other(i64);

    impl Cursor for Other {
        const KIND: CursorKind = CursorKind::KeyPackages;
        fn encode(&self, out: &mut Vec<u8>) {
            encode_i64(self.0, out);
        }
        fn decode(bytes: &[u8]) -> Option<Self> {
            decode_i64(bytes).map(Other)
        }
    }

    #[test]
    fn positions_round_trip_and_empty_is_the_start() {
        for v in [0, 1, 255, i64::MAX] {
            let text = format(&Pos(v));
            assert!(text.starts_with("c1."), "{text}");
            assert_eq!(parse::<Pos>("cursor", &text).unwrap(), Some(Pos(v)));
        }
        assert_eq!(parse::<Pos>("cursor", "").unwrap(), None);
        assert_eq!(parse::<Pos>("cursor", "old.42").unwrap(), Some(Pos(42)));
    }

    #[test]
    fn a_cursor_of_another_listing_or_garbage_is_invalid_argument_naming_the_field() {
        let other = format(&Other(7));
        let mut negative = vec![CursorKind::SessionKeys as u8];
        negative.extend_from_slice(&(-1i64).to_be_bytes());
        let negative = format!("c1.{}", hex::encode(negative));
        super::assert_refused(
            |bad| parse::<Pos>("cursor", bad),
            [
                other.as_str(),
                "c1.",
                "c1.zz",
                "c1.01",
                "c2.010000000000000001",
                "old.-1",
                "old.",
                negative.as_str(),
                "42",
            ],
        );
        // A listing without a legacy codec refuses the old prefix too.
        assert!(parse::<Other>("cursor", "old.1").is_err());
    }
}
