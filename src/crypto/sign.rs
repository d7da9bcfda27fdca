//! Ed25519 identity keys and what they sign.
//!
//! A device's identity key signs three things, each over its own canonical, domain-separated
//! encoding ([`crate::crypto::canon`] rules):
//!
//! ```text
//! device key bundle:
//!   label "keyhold/v1/device-key-bundle" || suite (1) || var(user id) || var(device id)
//!   || identity public key (32) || var(X-Wing encapsulation key, 1216)
//!
//! prekey:
//!   label "keyhold/v1/prekey" || suite (1) || var(user id) || var(device id)
//!   || kind (1: 0x01 one-time, 0x02 last-resort) || var(X-Wing encapsulation key, 1216)
//!
//! client-wrapped key set:
//!   label "keyhold/v1/client-wrapped-key-set" || suite (1) || session id (16) || epoch (u32)
//!   || var(author user id) || var(author device id) || count (u32)
//!   || count × ( var(user id) || var(device id) || key id (16) || var(envelope) )
//!   || escrow flag (1: 0x00 absent, 0x01 present) [ || escrow key id (16) || var(envelope) ]
//! ```
//!
//! The wraps of a key set are encoded sorted by (user id, device id, key id) as bytes, so the
//! signature does not depend on the order a client lists them in.

use std::fmt;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use zeroize::Zeroizing;

use super::canon::Canon;
use super::envelope::DekEnvelope;
use super::error::{exact, CryptoError};
use super::ids::{DeviceId, Epoch, KeyId, SessionId, UserId};
use super::keys::random_bytes;
use super::xwing::EncapsulationKey;
use super::Suite;

/// Length of an Ed25519 public key.
pub const IDENTITY_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Something an identity key signs, with its canonical encoding.
pub trait Signable {
    /// The exact bytes the signature covers.
    fn canonical_encoding(&self) -> Vec<u8>;
}

/// A device's Ed25519 identity key pair. The seed zeroizes on drop; `Debug` shows only the
/// public key.
pub struct IdentityKeyPair {
    seed: Zeroizing<[u8; 32]>,
    pair: Ed25519KeyPair,
    public: IdentityPublicKey,
}

impl IdentityKeyPair {
    /// Generates a fresh identity key pair.
    pub fn generate() -> Result<Self, CryptoError> {
        let seed = random_bytes::<32>()?;
        Self::from_seed(&seed)
    }

    /// Derives the key pair from its 32-byte seed (RFC 8032 private key).
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, CryptoError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| CryptoError::InvalidKey("Ed25519 seed"))?;
        let public = IdentityPublicKey::from_slice(pair.public_key().as_ref())?;
        Ok(Self {
            seed: Zeroizing::new(*seed),
            pair,
            public,
        })
    }

    /// The seed, for writing the key to a file.
    pub fn expose_seed(&self) -> &[u8; 32] {
        &self.seed
    }

    /// The public half.
    pub fn public_key(&self) -> IdentityPublicKey {
        self.public
    }

    /// Signs the canonical encoding of `item`.
    pub fn sign(&self, item: &impl Signable) -> Signature {
        self.sign_bytes(&item.canonical_encoding())
    }

    fn sign_bytes(&self, msg: &[u8]) -> Signature {
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        Signature(out)
    }
}

impl fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKeyPair({:?}, <redacted>)", self.public)
    }
}

/// An Ed25519 public identity key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityPublicKey([u8; IDENTITY_KEY_LEN]);

impl IdentityPublicKey {
    /// Parses 32 bytes: a canonically encoded point of the prime-order subgroup.
    ///
    /// Small-order and mixed-order keys are refused: with a small-order key a single forged
    /// signature verifies for every message, and AWS-LC's verification does not check this.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let raw = exact::<IDENTITY_KEY_LEN>("Ed25519 identity key", bytes)?;
        let compressed = curve25519_dalek::edwards::CompressedEdwardsY(raw);
        let point = compressed.decompress().ok_or(CryptoError::InvalidKey(
            "Ed25519 identity key (not a curve point)",
        ))?;
        if point.compress() != compressed {
            return Err(CryptoError::InvalidKey(
                "Ed25519 identity key (non-canonical encoding)",
            ));
        }
        if !point.is_torsion_free() || point.is_small_order() {
            return Err(CryptoError::InvalidKey(
                "Ed25519 identity key (not of prime order)",
            ));
        }
        Ok(Self(raw))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; IDENTITY_KEY_LEN] {
        &self.0
    }

    /// Checks `signature` over the canonical encoding of `item`.
    pub fn verify(&self, item: &impl Signable, signature: &Signature) -> Result<(), CryptoError> {
        self.verify_bytes(&item.canonical_encoding(), signature)
    }

    fn verify_bytes(&self, msg: &[u8], signature: &Signature) -> Result<(), CryptoError> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(msg, &signature.0)
            .map_err(|_| CryptoError::BadSignature)
    }
}

impl fmt::Debug for IdentityPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityPublicKey(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; SIGNATURE_LEN]);

impl Signature {
    /// Parses 64 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        Ok(Self(exact::<SIGNATURE_LEN>("Ed25519 signature", bytes)?))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.0
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({} bytes)", SIGNATURE_LEN)
    }
}

/// A device's public key bundle, self-signed with its identity key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceKeyBundle {
    /// The bundle's suite.
    pub suite: Suite,
    /// The owning user.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
    /// The device's Ed25519 identity key (the key that signs the bundle).
    pub identity_key: IdentityPublicKey,
    /// The device's X-Wing encapsulation key.
    pub encapsulation_key: EncapsulationKey,
}

impl Signable for DeviceKeyBundle {
    fn canonical_encoding(&self) -> Vec<u8> {
        Canon::new("keyhold/v1/device-key-bundle")
            .u8(self.suite as u8)
            .var(self.user.as_str().as_bytes())
            .var(self.device.as_str().as_bytes())
            .fixed(self.identity_key.as_bytes())
            .var(&self.encapsulation_key.to_bytes())
            .finish()
    }
}

/// Whether a prekey is handed out once or is the fallback when none is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PrekeyKind {
    /// Claimed exactly once.
    OneTime = 0x01,
    /// Returned when no one-time prekey is left.
    LastResort = 0x02,
}

/// A device's X-Wing prekey, signed with its identity key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prekey {
    /// The prekey's suite.
    pub suite: Suite,
    /// The owning user.
    pub user: UserId,
    /// The owning device.
    pub device: DeviceId,
    /// One-time or last-resort.
    pub kind: PrekeyKind,
    /// The prekey itself (its id is its fingerprint).
    pub key: EncapsulationKey,
}

impl Signable for Prekey {
    fn canonical_encoding(&self) -> Vec<u8> {
        Canon::new("keyhold/v1/prekey")
            .u8(self.suite as u8)
            .var(self.user.as_str().as_bytes())
            .var(self.device.as_str().as_bytes())
            .u8(self.kind as u8)
            .var(&self.key.to_bytes())
            .finish()
    }
}

/// One recipient device's wrap in a client-wrapped key set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientWrap {
    /// The recipient user.
    pub user: UserId,
    /// The recipient device.
    pub device: DeviceId,
    /// The recipient key the envelope was wrapped to.
    pub key_id: KeyId,
    /// The envelope.
    pub envelope: DekEnvelope,
}

/// The escrow wrap of a client-wrapped key set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EscrowWrap {
    /// The staff escrow key the envelope was wrapped to.
    pub key_id: KeyId,
    /// The envelope.
    pub envelope: DekEnvelope,
}

/// The wraps a device uploads for a CLIENT_WRAPPED session epoch, signed with its identity key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientWrappedKeySet {
    /// The suite of the envelopes.
    pub suite: Suite,
    /// The session.
    pub session_id: SessionId,
    /// The epoch the DEK belongs to.
    pub epoch: Epoch,
    /// The author's user.
    pub author_user: UserId,
    /// The author's device (whose identity key signs).
    pub author_device: DeviceId,
    /// One wrap per recipient device.
    pub wraps: Vec<ClientWrap>,
    /// The escrow wrap, when escrow is on.
    pub escrow: Option<EscrowWrap>,
}

impl Signable for ClientWrappedKeySet {
    fn canonical_encoding(&self) -> Vec<u8> {
        let mut wraps: Vec<&ClientWrap> = self.wraps.iter().collect();
        wraps.sort_by(|a, b| {
            (
                a.user.as_str().as_bytes(),
                a.device.as_str().as_bytes(),
                a.key_id.as_bytes(),
            )
                .cmp(&(
                    b.user.as_str().as_bytes(),
                    b.device.as_str().as_bytes(),
                    b.key_id.as_bytes(),
                ))
        });
        let mut c = Canon::new("keyhold/v1/client-wrapped-key-set")
            .u8(self.suite as u8)
            .fixed(self.session_id.as_bytes())
            .u32(self.epoch.get())
            .var(self.author_user.as_str().as_bytes())
            .var(self.author_device.as_str().as_bytes())
            .u32(u32::try_from(wraps.len()).unwrap_or(u32::MAX));
        for w in wraps {
            c = c
                .var(w.user.as_str().as_bytes())
                .var(w.device.as_str().as_bytes())
                .fixed(w.key_id.as_bytes())
                .var(w.envelope.as_bytes());
        }
        match &self.escrow {
            None => c.u8(0x00),
            Some(e) => c
                .u8(0x01)
                .fixed(e.key_id.as_bytes())
                .var(e.envelope.as_bytes()),
        }
        .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::envelope::{wrap_dek, Recipient, WrapContext};
    use crate::crypto::keys::Dek;
    use crate::crypto::xwing::DecapsulationKey;

    fn bundle(identity: &IdentityKeyPair) -> DeviceKeyBundle {
        DeviceKeyBundle {
            suite: Suite::XWingAes256GcmV1,
            user: UserId::new("alice").unwrap(),
            device: DeviceId::new("phone").unwrap(),
            identity_key: identity.public_key(),
            encapsulation_key: DecapsulationKey::generate()
                .unwrap()
                .encapsulation_key()
                .clone(),
        }
    }

    #[test]
    fn bundle_signature_verifies_and_rejects_each_changed_field() {
        let id = IdentityKeyPair::generate().unwrap();
        let b = bundle(&id);
        let s = id.sign(&b);
        id.public_key().verify(&b, &s).unwrap();

        let other_id = IdentityKeyPair::generate().unwrap();
        let changed = [
            DeviceKeyBundle {
                user: UserId::new("bob").unwrap(),
                ..b.clone()
            },
            DeviceKeyBundle {
                device: DeviceId::new("laptop").unwrap(),
                ..b.clone()
            },
            DeviceKeyBundle {
                identity_key: other_id.public_key(),
                ..b.clone()
            },
            DeviceKeyBundle {
                encapsulation_key: DecapsulationKey::generate()
                    .unwrap()
                    .encapsulation_key()
                    .clone(),
                ..b.clone()
            },
        ];
        for c in &changed {
            assert_eq!(
                id.public_key().verify(c, &s),
                Err(CryptoError::BadSignature),
                "{c:?}"
            );
        }
        assert_eq!(
            other_id.public_key().verify(&b, &s),
            Err(CryptoError::BadSignature)
        );
        let mut bad = *s.as_bytes();
        bad[10] ^= 1;
        assert!(id
            .public_key()
            .verify(&b, &Signature::from_slice(&bad).unwrap())
            .is_err());
    }

    #[test]
    fn prekey_signature_binds_kind_and_key() {
        let id = IdentityKeyPair::generate().unwrap();
        let p = Prekey {
            suite: Suite::XWingAes256GcmV1,
            user: UserId::new("alice").unwrap(),
            device: DeviceId::new("phone").unwrap(),
            kind: PrekeyKind::OneTime,
            key: DecapsulationKey::generate()
                .unwrap()
                .encapsulation_key()
                .clone(),
        };
        let s = id.sign(&p);
        id.public_key().verify(&p, &s).unwrap();
        let as_last_resort = Prekey {
            kind: PrekeyKind::LastResort,
            ..p.clone()
        };
        assert!(id.public_key().verify(&as_last_resort, &s).is_err());
        let other_device = Prekey {
            device: DeviceId::new("tablet").unwrap(),
            ..p.clone()
        };
        assert!(id.public_key().verify(&other_device, &s).is_err());
        // A prekey signature is not a bundle signature, even over the same key bytes.
        let b = DeviceKeyBundle {
            suite: p.suite,
            user: p.user.clone(),
            device: p.device.clone(),
            identity_key: id.public_key(),
            encapsulation_key: p.key.clone(),
        };
        assert!(id.public_key().verify(&b, &s).is_err());
    }

    fn key_set(author: &IdentityKeyPair) -> ClientWrappedKeySet {
        let _ = author;
        let dek = Dek::generate().unwrap();
        let session_id = SessionId::generate();
        let mut wraps = Vec::new();
        for (u, d) in [("bob", "phone"), ("carol", "laptop")] {
            let dk = DecapsulationKey::generate().unwrap();
            let user = UserId::new(u).unwrap();
            let device = DeviceId::new(d).unwrap();
            let ctx = WrapContext {
                session_id,
                epoch: Epoch::FIRST,
                recipient: Recipient::Device {
                    user: user.clone(),
                    device: device.clone(),
                },
            };
            let envelope = wrap_dek(&dek, dk.encapsulation_key(), &ctx).unwrap();
            wraps.push(ClientWrap {
                user,
                device,
                key_id: dk.encapsulation_key().key_id(),
                envelope,
            });
        }
        let escrow_key = DecapsulationKey::generate().unwrap();
        let escrow_ctx = WrapContext {
            session_id,
            epoch: Epoch::FIRST,
            recipient: Recipient::Escrow,
        };
        ClientWrappedKeySet {
            suite: Suite::XWingAes256GcmV1,
            session_id,
            epoch: Epoch::FIRST,
            author_user: UserId::new("alice").unwrap(),
            author_device: DeviceId::new("phone").unwrap(),
            escrow: Some(EscrowWrap {
                key_id: escrow_key.encapsulation_key().key_id(),
                envelope: wrap_dek(&dek, escrow_key.encapsulation_key(), &escrow_ctx).unwrap(),
            }),
            wraps,
        }
    }

    #[test]
    fn key_set_signature_is_order_independent_and_binds_every_field() {
        let id = IdentityKeyPair::generate().unwrap();
        let set = key_set(&id);
        let s = id.sign(&set);
        let mut reordered = set.clone();
        reordered.wraps.reverse();
        id.public_key().verify(&reordered, &s).unwrap();

        let mut changed = vec![ClientWrappedKeySet {
            session_id: SessionId::generate(),
            ..set.clone()
        }];
        changed.push(ClientWrappedKeySet {
            epoch: Epoch::new(2).unwrap(),
            ..set.clone()
        });
        changed.push(ClientWrappedKeySet {
            author_device: DeviceId::new("x").unwrap(),
            ..set.clone()
        });
        changed.push(ClientWrappedKeySet {
            escrow: None,
            ..set.clone()
        });
        let mut dropped = set.clone();
        dropped.wraps.pop();
        changed.push(dropped);
        let mut swapped = set.clone();
        let (a, b) = (
            swapped.wraps[0].envelope.clone(),
            swapped.wraps[1].envelope.clone(),
        );
        swapped.wraps[0].envelope = b;
        swapped.wraps[1].envelope = a;
        changed.push(swapped);
        let mut rekeyed = set.clone();
        rekeyed.wraps[0].key_id = KeyId::from_bytes([9; 16]);
        changed.push(rekeyed);
        let mut redirected = set.clone();
        redirected.wraps[0].user = UserId::new("mallory").unwrap();
        changed.push(redirected);
        for c in &changed {
            assert_eq!(
                id.public_key().verify(c, &s),
                Err(CryptoError::BadSignature)
            );
        }
    }

    #[test]
    fn malformed_keys_and_signatures_are_typed_errors() {
        assert!(matches!(
            IdentityPublicKey::from_slice(&[0; 31]),
            Err(CryptoError::InvalidLength { .. })
        ));
        assert!(matches!(
            Signature::from_slice(&[0; 65]),
            Err(CryptoError::InvalidLength { .. })
        ));
        let id = IdentityKeyPair::generate().unwrap();
        // Small-order keys are refused at parse: with one, an all-zero "signature" verifies
        // for every message under AWS-LC (this test caught that).
        let mut identity_point = [0u8; 32];
        identity_point[0] = 1;
        for small in [[0u8; 32], identity_point, [0xff; 32]] {
            assert!(matches!(
                IdentityPublicKey::from_slice(&small),
                Err(CryptoError::InvalidKey(_))
            ));
        }
        assert!(!format!("{id:?}").contains(&format!("{:?}", id.expose_seed())));
    }

    #[derive(serde::Deserialize)]
    struct EddsaGroup {
        #[serde(rename = "publicKey")]
        public_key: EddsaKey,
        tests: Vec<EddsaCase>,
    }

    #[derive(serde::Deserialize)]
    struct EddsaKey {
        curve: String,
        pk: String,
    }

    #[derive(serde::Deserialize)]
    struct EddsaCase {
        #[serde(rename = "tcId")]
        tc_id: u32,
        msg: String,
        sig: String,
        result: String,
    }

    #[derive(serde::Deserialize)]
    struct EddsaFile {
        #[serde(rename = "numberOfTests")]
        number_of_tests: usize,
        #[serde(rename = "testGroups")]
        test_groups: Vec<EddsaGroup>,
    }

    /// Project Wycheproof's Ed25519 cases through identity-key parsing, signature parsing
    /// and verification: every valid case verifies, every invalid one is refused at one of
    /// the three steps.
    #[test]
    fn wycheproof_ed25519_cases() {
        let file: EddsaFile = serde_json::from_str(include_str!(
            "../../tests/vectors/wycheproof-ed25519_test.json"
        ))
        .unwrap();
        let (mut valid, mut invalid) = (0, 0);
        for group in &file.test_groups {
            assert_eq!(group.public_key.curve, "edwards25519");
            let key = IdentityPublicKey::from_slice(&hex::decode(&group.public_key.pk).unwrap());
            for case in &group.tests {
                let msg = hex::decode(&case.msg).unwrap();
                let verdict = key.as_ref().map_err(Clone::clone).and_then(|key| {
                    let sig = Signature::from_slice(&hex::decode(&case.sig).unwrap())?;
                    key.verify_bytes(&msg, &sig)
                });
                match case.result.as_str() {
                    "valid" => {
                        assert_eq!(verdict, Ok(()), "tcId {}", case.tc_id);
                        valid += 1;
                    }
                    "invalid" => {
                        assert!(verdict.is_err(), "tcId {} must be refused", case.tc_id);
                        invalid += 1;
                    }
                    other => panic!("tcId {}: unexpected result {other}", case.tc_id),
                }
            }
        }
        assert_eq!(valid + invalid, file.number_of_tests);
        assert!(valid > 0 && invalid > 0);
    }
}
