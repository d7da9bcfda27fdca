//! X-Wing keys whose X25519 part is a low-order point, in requests that are valid in every
//! other respect: signed by the device over the canonical encoding a client signs.
//!
//! The crate's `DeviceKeyBundle` and `Prekey` hold a parsed `EncapsulationKey`, which such a
//! key never becomes, so the encodings are written out here by the rules of
//! `src/crypto/canon.rs`; each signing helper first checks that, for the device's own valid
//! key, its bytes are exactly the crate's encoding. A refusal of these requests is therefore
//! the key check, not the signature.

use keyhold::crypto::sign::{DeviceKeyBundle, Prekey, PrekeyKind, Signable};
use keyhold::crypto::xwing::EncapsulationKey;
use keyhold::crypto::Suite;
use keyhold::proto::keyhold::v1 as pb;

use super::server::TestDevice;

/// X25519 public values of low order (the shared secret with any private key is all zero),
/// by name: the last 32 bytes of an X-Wing encapsulation key.
pub const LOW_ORDER_X25519: [(&str, &str); 5] = [
    (
        "u = 0",
        "0000000000000000000000000000000000000000000000000000000000000000",
    ),
    (
        "u = 1",
        "0100000000000000000000000000000000000000000000000000000000000000",
    ),
    (
        "a point of order 8",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    ),
    (
        "u = p - 1",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ),
    (
        "u = p - 1 with the high bit set",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    ),
];

/// `key`'s 1,216 bytes with the X25519 part (the last 32) replaced by `u_hex`.
pub fn with_x25519_part(key: &EncapsulationKey, u_hex: &str) -> Vec<u8> {
    let mut bytes = key.to_bytes();
    let u = hex::decode(u_hex).expect("hex");
    let at = bytes.len() - u.len();
    bytes[at..].copy_from_slice(&u);
    bytes
}

/// Bytes to sign, as they are.
struct Encoded(Vec<u8>);

impl Signable for Encoded {
    fn canonical_encoding(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// A label, then fields: the canonical encoding's rules.
fn label(label: &str) -> Vec<u8> {
    let mut out = (label.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(label.as_bytes());
    out
}

fn var(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The device key bundle encoding of `d` with these encapsulation key bytes.
fn bundle_encoding(d: &TestDevice, encapsulation_key: &[u8]) -> Vec<u8> {
    let mut out = label("keyhold/v1/device-key-bundle");
    out.push(Suite::XWingAes256GcmV1 as u8);
    var(&mut out, d.user.as_str().as_bytes());
    var(&mut out, d.device.as_str().as_bytes());
    out.extend_from_slice(d.identity.public_key().as_bytes());
    var(&mut out, encapsulation_key);
    out
}

/// The prekey encoding of `d` with these encapsulation key bytes.
fn prekey_encoding(d: &TestDevice, kind: PrekeyKind, encapsulation_key: &[u8]) -> Vec<u8> {
    let mut out = label("keyhold/v1/prekey");
    out.push(Suite::XWingAes256GcmV1 as u8);
    var(&mut out, d.user.as_str().as_bytes());
    var(&mut out, d.device.as_str().as_bytes());
    out.push(kind as u8);
    var(&mut out, encapsulation_key);
    out
}

/// A PublishDeviceKey request for `d` carrying `encapsulation_key`, self-signed by `d`'s
/// identity key.
pub fn publish_request(d: &TestDevice, encapsulation_key: &[u8]) -> pb::PublishDeviceKeyRequest {
    let own = DeviceKeyBundle {
        suite: Suite::XWingAes256GcmV1,
        user: d.user.clone(),
        device: d.device.clone(),
        identity_key: d.identity.public_key(),
        encapsulation_key: d.xwing.encapsulation_key().clone(),
    };
    assert_eq!(
        bundle_encoding(d, &d.xwing.encapsulation_key().to_bytes()),
        own.canonical_encoding(),
        "the bundle encoding written here is the crate's"
    );
    let signature = d
        .identity
        .sign(&Encoded(bundle_encoding(d, encapsulation_key)));
    pb::PublishDeviceKeyRequest {
        user_id: d.user.to_string(),
        device_id: d.device.to_string(),
        suite: pb::Suite::XwingAes256gcmV1 as i32,
        encapsulation_key: encapsulation_key.to_vec(),
        identity_key: d.identity.public_key().as_bytes().to_vec(),
        signature: signature.as_bytes().to_vec(),
    }
}

/// A prekey of `d` as `kind` carrying `encapsulation_key`, signed by `d`'s identity key.
pub fn signed_prekey(
    d: &TestDevice,
    kind: PrekeyKind,
    encapsulation_key: &[u8],
) -> pb::SignedPrekey {
    let own = Prekey {
        suite: Suite::XWingAes256GcmV1,
        user: d.user.clone(),
        device: d.device.clone(),
        kind,
        key: d.xwing.encapsulation_key().clone(),
    };
    assert_eq!(
        prekey_encoding(d, kind, &d.xwing.encapsulation_key().to_bytes()),
        own.canonical_encoding(),
        "the prekey encoding written here is the crate's"
    );
    let signature = d
        .identity
        .sign(&Encoded(prekey_encoding(d, kind, encapsulation_key)));
    pb::SignedPrekey {
        suite: pb::Suite::XwingAes256gcmV1 as i32,
        encapsulation_key: encapsulation_key.to_vec(),
        signature: signature.as_bytes().to_vec(),
    }
}

/// Asserts that a request carrying a low-order key (`name`) was refused as INVALID_ARGUMENT
/// whose message names `field` first and says the key is low-order.
pub fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    name: &str,
    field: &str,
) {
    let err = result.expect_err(name);
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err:?}");
    assert!(
        err.message().starts_with(&format!("{field}:")),
        "{name}: {field}: {}",
        err.message()
    );
    assert!(
        err.message().contains("low-order"),
        "{name}: {}",
        err.message()
    );
}
