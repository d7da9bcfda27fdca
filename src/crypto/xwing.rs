//! X-Wing, the hybrid post-quantum KEM: X25519 + ML-KEM-768 with a SHA3-256 combiner.
//!
//! This is X-Wing exactly as **draft-connolly-cfrg-xwing-kem-06** specifies it, and it passes
//! that draft's published test vectors (`tests/vectors/xwing-draft-06.json`):
//!
//! - the decapsulation key is a 32-byte seed; `SHAKE256(seed, 96)` expands it into the
//!   ML-KEM-768 key-generation seed `d || z` (64 bytes) and the X25519 private key (32 bytes);
//! - the encapsulation key is `pk_M (1184) || pk_X (32)`, 1,216 bytes;
//! - the ciphertext is `ct_M (1088) || ct_X (32)`, 1,120 bytes;
//! - the shared secret is `SHA3-256(ss_M || ss_X || ct_X || pk_X || "\.//^\")`, 32 bytes.
//!
//! # Which implementation does what
//!
//! No single crate is both conformant and fast here, so each step uses the one that is:
//!
//! - key generation from the seed uses `libcrux-ml-kem` (formally verified, derives a key pair
//!   from `d || z` as FIPS 203 `ML-KEM.KeyGen_internal`), once per key load;
//! - encapsulation and decapsulation use `pqcrypto-mlkem` (PQClean's AVX2 ML-KEM-768, about
//!   1.7x faster than libcrux here) on the *same* FIPS 203 key bytes;
//! - X25519 uses `aws-lc-rs` (about 1.9x faster than `x25519-dalek` here).
//!
//! Unit tests prove the implementations agree: libcrux decapsulates what pqcrypto
//! encapsulates and back, and the vectors pass through the fast path.
//!
//! # Secrets in memory
//!
//! [`DecapsulationKey`] keeps the seed and the expanded ML-KEM key in buffers that zeroize on
//! drop; the X25519 private key lives inside AWS-LC, which cleanses it when freed. The C
//! implementations keep short-lived secret temporaries on their own stacks, which no safe Rust
//! caller can reach to clear.

use std::fmt;

use aws_lc_rs::agreement::{self, UnparsedPublicKey, X25519};
use pqcrypto_mlkem::mlkem768;
use pqcrypto_traits::kem::{Ciphertext as _, PublicKey as _, SecretKey as _, SharedSecret as _};
use sha3::digest::{ExtendableOutput, Update, XofReader};
use sha3::{Digest, Sha3_256, Shake256};
use zeroize::Zeroizing;

use super::error::{exact, CryptoError};
use super::ids::{KeyId, KEY_ID_LEN};
use super::keys::random_bytes;

/// Length of an X-Wing encapsulation (public) key.
pub const ENCAPSULATION_KEY_LEN: usize = 1216;
/// Length of an X-Wing decapsulation (private) key: the seed.
pub const DECAPSULATION_KEY_LEN: usize = 32;
/// Length of an X-Wing ciphertext.
pub const CIPHERTEXT_LEN: usize = 1120;
/// Length of an X-Wing shared secret.
pub const SHARED_SECRET_LEN: usize = 32;

const MLKEM_EK_LEN: usize = 1184;
const MLKEM_DK_LEN: usize = 2400;
const MLKEM_CT_LEN: usize = 1088;
const X25519_LEN: usize = 32;
/// The draft's combiner label, `\.//^\`.
const XWING_LABEL: &[u8; 6] = b"\\.//^\\";
const KEY_ID_LABEL: &[u8] = b"keyhold/v1/key-id";

/// An X-Wing shared secret. Zeroizes on drop, prints nothing in `Debug`.
pub struct SharedSecret(Zeroizing<[u8; SHARED_SECRET_LEN]>);

impl SharedSecret {
    /// The raw secret.
    pub fn expose_secret(&self) -> &[u8; SHARED_SECRET_LEN] {
        &self.0
    }
}

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSecret(<redacted>)")
    }
}

/// An X-Wing ciphertext, 1,120 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Ciphertext(Box<[u8; CIPHERTEXT_LEN]>);

impl Ciphertext {
    /// Parses a ciphertext of exactly 1,120 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        Ok(Self(Box::new(exact::<CIPHERTEXT_LEN>(
            "X-Wing ciphertext",
            bytes,
        )?)))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; CIPHERTEXT_LEN] {
        &self.0
    }

    fn mlkem_part(&self) -> &[u8] {
        &self.0[..MLKEM_CT_LEN]
    }

    fn x25519_part(&self) -> &[u8; X25519_LEN] {
        // The slice is exactly 32 bytes by construction of the split.
        let (_, x) = self.0.split_at(MLKEM_CT_LEN);
        x.try_into().unwrap_or(&[0u8; X25519_LEN])
    }
}

impl fmt::Debug for Ciphertext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ciphertext({} bytes)", CIPHERTEXT_LEN)
    }
}

/// An X-Wing encapsulation (public) key, validated when parsed.
#[derive(Clone)]
pub struct EncapsulationKey {
    mlkem: mlkem768::PublicKey,
    x25519: [u8; X25519_LEN],
    id: KeyId,
}

impl EncapsulationKey {
    /// Parses and validates a 1,216-byte encapsulation key.
    ///
    /// The ML-KEM part must pass FIPS 203's modulus check (every coefficient reduced mod q);
    /// the X25519 part is any 32 bytes RFC 7748 accepts except a point of order dividing 8
    /// (on the curve or its twist), whose shared secret is all zero for every private key.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let bytes = exact::<ENCAPSULATION_KEY_LEN>("X-Wing encapsulation key", bytes)?;
        let (m, x) = bytes.split_at(MLKEM_EK_LEN);
        let m_arr = exact::<MLKEM_EK_LEN>("ML-KEM-768 encapsulation key", m)?;
        if !libcrux_ml_kem::mlkem768::validate_public_key(&m_arr.into()) {
            return Err(CryptoError::InvalidKey(
                "X-Wing encapsulation key (ML-KEM part fails the modulus check)",
            ));
        }
        let mlkem = mlkem768::PublicKey::from_bytes(m)
            .map_err(|_| CryptoError::InvalidKey("X-Wing encapsulation key"))?;
        let x25519 = exact::<X25519_LEN>("X25519 public key", x)?;
        if x25519_yields_zero_secret(&x25519) {
            // Every encapsulation to such a key would give an all-zero Diffie-Hellman secret,
            // which AWS-LC refuses: one such device key would make every wrap to its sessions
            // fail. Refused here, where the key enters.
            return Err(CryptoError::InvalidKey(
                "X-Wing encapsulation key (X25519 part is a low-order point)",
            ));
        }
        Ok(Self {
            mlkem,
            x25519,
            id: key_id_of(&bytes),
        })
    }

    /// The 1,216 bytes of the key.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCAPSULATION_KEY_LEN);
        out.extend_from_slice(self.mlkem.as_bytes());
        out.extend_from_slice(&self.x25519);
        out
    }

    /// The key's fingerprint ([`KeyId`]).
    pub fn key_id(&self) -> KeyId {
        self.id
    }

    /// Encapsulates a fresh shared secret to this key.
    pub fn encapsulate(&self) -> Result<(Ciphertext, SharedSecret), CryptoError> {
        let (ss_m, ct_m) = mlkem768::encapsulate(&self.mlkem);
        let ss_m = Zeroizing::new(exact::<32>("ML-KEM shared secret", ss_m.as_bytes())?);

        let ephemeral = agreement::PrivateKey::generate(&X25519)?;
        let ct_x = exact::<X25519_LEN>(
            "X25519 public key",
            ephemeral.compute_public_key()?.as_ref(),
        )?;
        let ss_x = x25519_agree(&ephemeral, &self.x25519)?;

        let mut ct = Box::new([0u8; CIPHERTEXT_LEN]);
        ct[..MLKEM_CT_LEN].copy_from_slice(ct_m.as_bytes());
        ct[MLKEM_CT_LEN..].copy_from_slice(&ct_x);
        let ss = combiner(&ss_m, &ss_x, &ct_x, &self.x25519);
        Ok((Ciphertext(ct), ss))
    }

    /// Encapsulates with caller-chosen randomness `eseed` (64 bytes: the ML-KEM message, then
    /// the X25519 ephemeral key), as the draft's test vectors do. Test-only: real
    /// encapsulations draw their randomness inside [`EncapsulationKey::encapsulate`].
    #[cfg(test)]
    pub(crate) fn encapsulate_deterministic(
        &self,
        eseed: &[u8; 64],
    ) -> Result<(Ciphertext, SharedSecret), CryptoError> {
        let m_seed: [u8; 32] = exact("ML-KEM randomness", &eseed[..32])?;
        let pk: [u8; MLKEM_EK_LEN] = exact("ML-KEM-768 encapsulation key", self.mlkem.as_bytes())?;
        let (ct_m, ss_m) = libcrux_ml_kem::mlkem768::encapsulate(&pk.into(), m_seed);
        let ss_m = Zeroizing::new(ss_m);

        let ephemeral = agreement::PrivateKey::from_private_key(&X25519, &eseed[32..])
            .map_err(|_| CryptoError::InvalidKey("X25519 private key"))?;
        let ct_x = exact::<X25519_LEN>(
            "X25519 public key",
            ephemeral.compute_public_key()?.as_ref(),
        )?;
        let ss_x = x25519_agree(&ephemeral, &self.x25519)?;

        let mut ct = Box::new([0u8; CIPHERTEXT_LEN]);
        ct[..MLKEM_CT_LEN].copy_from_slice(ct_m.as_slice());
        ct[MLKEM_CT_LEN..].copy_from_slice(&ct_x);
        let ss = combiner(&ss_m, &ss_x, &ct_x, &self.x25519);
        Ok((Ciphertext(ct), ss))
    }
}

#[cfg(test)]
impl EncapsulationKey {
    /// This key with its X25519 part replaced by `u`, without the parser's checks: a key as
    /// stored before the parser refused low-order parts, for tests of what such a key does.
    pub(crate) fn with_x25519_part_unchecked(&self, u: [u8; X25519_LEN]) -> Self {
        let mut bytes = [0u8; ENCAPSULATION_KEY_LEN];
        bytes[..MLKEM_EK_LEN].copy_from_slice(self.mlkem.as_bytes());
        bytes[MLKEM_EK_LEN..].copy_from_slice(&u);
        Self {
            mlkem: self.mlkem,
            x25519: u,
            id: key_id_of(&bytes),
        }
    }
}

impl PartialEq for EncapsulationKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.to_bytes() == other.to_bytes()
    }
}

impl Eq for EncapsulationKey {}

impl fmt::Debug for EncapsulationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncapsulationKey({})", self.id)
    }
}

/// Whether an X25519 public value gives an all-zero shared secret with some private key: the
/// rule behind every refusal of an X25519 part, applied to every value Keyhold parses (device
/// keys, prekeys, the escrow key).
///
/// RFC 7748 reads `u` with bit 255 ignored and reduced mod p = 2^255 − 19; the value names a
/// point P on Curve25519 (group order 8·ℓ) or on its twist (order 4·ℓ′), ℓ and ℓ′ primes
/// above 2^252. X25519(k, u) is the u-coordinate of \[k\]P, which is 0 exactly when
/// \[k\]P is the identity (or the point (0, 0) of order 2, whose double is the identity).
/// A clamped scalar is k = 8·m with 2^251 ≤ m < 2^252 < ℓ, ℓ′, so \[k\]P is the identity
/// if and only if the order of P divides 8. That is checked directly, with no list of
/// points to keep: compute \[8\]P with the x-only Montgomery ladder (valid on the curve and
/// the twist alike) and refuse when its u-coordinate is 0. Four ladder steps and one
/// inversion, a few microseconds.
pub(crate) fn x25519_yields_zero_secret(u: &[u8; X25519_LEN]) -> bool {
    let point = curve25519_dalek::montgomery::MontgomeryPoint(*u);
    // 8 = 0b1000, most significant bit first.
    let times_eight = point.mul_bits_be([true, false, false, false].into_iter());
    times_eight.to_bytes() == [0u8; X25519_LEN]
}

/// The fingerprint of a 1,216-byte encapsulation key.
fn key_id_of(ek: &[u8; ENCAPSULATION_KEY_LEN]) -> KeyId {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &[KEY_ID_LABEL, ek.as_slice()].concat(),
    );
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
    KeyId::from_bytes(id)
}

/// An X-Wing decapsulation (private) key: the 32-byte seed, with its expanded form kept in
/// memory so that decapsulation does not redo key generation.
pub struct DecapsulationKey {
    seed: Zeroizing<[u8; DECAPSULATION_KEY_LEN]>,
    mlkem_dk: Zeroizing<Vec<u8>>,
    x25519: agreement::PrivateKey,
    ek: EncapsulationKey,
}

impl DecapsulationKey {
    /// Generates a key pair from fresh randomness.
    pub fn generate() -> Result<Self, CryptoError> {
        let seed = random_bytes::<DECAPSULATION_KEY_LEN>()?;
        Self::from_seed(&seed)
    }

    /// Derives the key pair from its 32-byte seed, as the draft's key generation does.
    pub fn from_seed(seed: &[u8; DECAPSULATION_KEY_LEN]) -> Result<Self, CryptoError> {
        let mut expanded = Zeroizing::new([0u8; 96]);
        let mut shake = Shake256::default();
        shake.update(seed);
        shake.finalize_xof().read(expanded.as_mut());

        let d_z: Zeroizing<[u8; 64]> = Zeroizing::new(exact("ML-KEM seed", &expanded[..64])?);
        let pair = libcrux_ml_kem::mlkem768::generate_key_pair(*d_z);
        let mlkem_dk = Zeroizing::new(pair.private_key().as_slice().to_vec());
        debug_assert_eq!(mlkem_dk.len(), MLKEM_DK_LEN);
        let mlkem = mlkem768::PublicKey::from_bytes(pair.public_key().as_slice())
            .map_err(|_| CryptoError::Backend)?;

        let x25519 = agreement::PrivateKey::from_private_key(&X25519, &expanded[64..96])
            .map_err(|_| CryptoError::InvalidKey("X25519 private key"))?;
        let pk_x = exact::<X25519_LEN>("X25519 public key", x25519.compute_public_key()?.as_ref())?;

        let mut ek_bytes = [0u8; ENCAPSULATION_KEY_LEN];
        ek_bytes[..MLKEM_EK_LEN].copy_from_slice(mlkem.as_bytes());
        ek_bytes[MLKEM_EK_LEN..].copy_from_slice(&pk_x);
        let ek = EncapsulationKey {
            mlkem,
            x25519: pk_x,
            id: key_id_of(&ek_bytes),
        };
        Ok(Self {
            seed: Zeroizing::new(*seed),
            mlkem_dk,
            x25519,
            ek,
        })
    }

    /// Parses a 32-byte seed.
    pub fn from_slice(seed: &[u8]) -> Result<Self, CryptoError> {
        let seed = Zeroizing::new(exact::<DECAPSULATION_KEY_LEN>(
            "X-Wing decapsulation key",
            seed,
        )?);
        Self::from_seed(&seed)
    }

    /// The seed, for writing the key to its private key file.
    pub fn expose_seed(&self) -> &[u8; DECAPSULATION_KEY_LEN] {
        &self.seed
    }

    /// The matching encapsulation key.
    pub fn encapsulation_key(&self) -> &EncapsulationKey {
        &self.ek
    }

    /// Recovers the shared secret from a ciphertext.
    ///
    /// ML-KEM's implicit rejection means a changed ciphertext yields an unrelated secret, not
    /// an error; an X25519 part that is a low-order point fails here with
    /// [`CryptoError::OpenFailed`].
    pub fn decapsulate(&self, ct: &Ciphertext) -> Result<SharedSecret, CryptoError> {
        let sk = mlkem768::SecretKey::from_bytes(self.mlkem_dk.as_slice())
            .map_err(|_| CryptoError::Backend)?;
        let ct_m =
            mlkem768::Ciphertext::from_bytes(ct.mlkem_part()).map_err(|_| CryptoError::Backend)?;
        let ss_m = mlkem768::decapsulate(&ct_m, &sk);
        let ss_m = Zeroizing::new(exact::<32>("ML-KEM shared secret", ss_m.as_bytes())?);
        let ct_x = ct.x25519_part();
        let ss_x = x25519_agree(&self.x25519, ct_x)?;
        Ok(combiner(&ss_m, &ss_x, ct_x, &self.ek.x25519))
    }

    /// Decapsulates with libcrux instead of pqcrypto: the reference the fast path is tested
    /// against.
    #[cfg(test)]
    pub(crate) fn decapsulate_reference(
        &self,
        ct: &Ciphertext,
    ) -> Result<SharedSecret, CryptoError> {
        let ct_m: [u8; MLKEM_CT_LEN] = exact("ML-KEM ciphertext", ct.mlkem_part())?;
        let dk_bytes: [u8; MLKEM_DK_LEN] = exact("ML-KEM decapsulation key", &self.mlkem_dk)?;
        let dk: libcrux_ml_kem::mlkem768::MlKem768PrivateKey = dk_bytes.into();
        let ss_m = Zeroizing::new(libcrux_ml_kem::mlkem768::decapsulate(&dk, &ct_m.into()));
        let ct_x = ct.x25519_part();
        let ss_x = x25519_agree(&self.x25519, ct_x)?;
        Ok(combiner(&ss_m, &ss_x, ct_x, &self.ek.x25519))
    }
}

impl fmt::Debug for DecapsulationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DecapsulationKey({}, <redacted>)", self.ek.id)
    }
}

/// X25519 with AWS-LC. AWS-LC refuses an all-zero result (a low-order peer point): that is a
/// bad ciphertext or key, reported as a failure to open.
fn x25519_agree(
    private: &agreement::PrivateKey,
    peer: &[u8; X25519_LEN],
) -> Result<Zeroizing<[u8; X25519_LEN]>, CryptoError> {
    agreement::agree(
        private,
        UnparsedPublicKey::new(&X25519, peer),
        CryptoError::OpenFailed,
        |ss| {
            exact::<X25519_LEN>("X25519 shared secret", ss)
                .map(Zeroizing::new)
                .map_err(|_| CryptoError::OpenFailed)
        },
    )
}

/// The draft's combiner: `SHA3-256(ss_M || ss_X || ct_X || pk_X || label)`.
pub(crate) fn combiner(
    ss_m: &[u8; 32],
    ss_x: &[u8; 32],
    ct_x: &[u8; 32],
    pk_x: &[u8; 32],
) -> SharedSecret {
    let mut h = Sha3_256::new();
    Digest::update(&mut h, ss_m);
    Digest::update(&mut h, ss_x);
    Digest::update(&mut h, ct_x);
    Digest::update(&mut h, pk_x);
    Digest::update(&mut h, XWING_LABEL);
    let mut out = Zeroizing::new([0u8; SHARED_SECRET_LEN]);
    out.copy_from_slice(&h.finalize());
    SharedSecret(out)
}

#[cfg(test)]
mod tests;
