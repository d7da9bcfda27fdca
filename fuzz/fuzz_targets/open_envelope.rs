//! Feeds arbitrary bytes to everything in the crypto core that parses or opens bytes from
//! outside: DEK envelopes, KEK envelopes, X-Wing keys and ciphertexts, Ed25519 identity keys
//! and signatures.
//!
//! Nothing may panic, and nothing the fuzzer builds may open or verify: that would be a forgery.
//! Each input is tried as it is and also forced into the exact shape a parser wants (suite
//! byte, length, KEK header), so the decapsulation and AEAD paths run on every input instead of
//! only when the fuzzer happens to hit an exact length.

#![no_main]

use std::sync::OnceLock;

use keyhold::crypto::envelope::{
    self, open_dek, open_under_kek, wrap_dek, DekEnvelope, KekContext, Recipient, WrapContext,
    DEK_ENVELOPE_LEN,
};
use keyhold::crypto::ids::{ConversationId, DeviceId, Epoch, SessionId, UserId};
use keyhold::crypto::keys::{Dek, Kek, KekVersion};
use keyhold::crypto::sign::{
    DeviceKeyBundle, IdentityPublicKey, Signature, IDENTITY_KEY_LEN, SIGNATURE_LEN,
};
use keyhold::crypto::xwing::{
    Ciphertext, DecapsulationKey, EncapsulationKey, ENCAPSULATION_KEY_LEN,
};
use keyhold::crypto::{CryptoError, Suite};
use libfuzzer_sys::fuzz_target;

const KEK_VERSION: u32 = 7;

/// Keys and contexts shared by every run: building them costs far more than one run.
struct Fixtures {
    key: DecapsulationKey,
    wrap_context: WrapContext,
    kek: Kek,
    kek_contexts: [KekContext; 2],
    dek: Dek,
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let session_id =
            SessionId::parse("0190f3a4-5b6c-7d8e-9fa0-b1c2d3e4f506").expect("fixed session id");
        let user = UserId::new("alice").expect("fixed user id");
        let device = DeviceId::new("phone").expect("fixed device id");
        Fixtures {
            key: DecapsulationKey::from_seed(&[0x5a; 32]).expect("fixed seed derives a key"),
            wrap_context: WrapContext {
                session_id,
                epoch: Epoch::FIRST,
                recipient: Recipient::Device {
                    user: user.clone(),
                    device: device.clone(),
                },
            },
            kek: Kek::from_bytes(KekVersion(KEK_VERSION), [0x4b; 32]),
            kek_contexts: [
                KekContext::ServiceDek {
                    session_id,
                    epoch: Epoch::FIRST,
                },
                KekContext::RatchetState {
                    user,
                    device,
                    conversation: ConversationId::new("c1").expect("fixed conversation id"),
                },
            ],
            dek: Dek::from_bytes([0x44; 32]),
        }
    })
}

/// `prefix`, then `data` repeated (or cut) up to exactly `len` bytes; zeros if `data` is empty.
fn shaped(prefix: &[u8], data: &[u8], len: usize) -> Vec<u8> {
    let mut out = prefix.to_vec();
    out.extend(data.iter().copied().cycle().take(len - prefix.len()));
    out.resize(len, 0);
    out
}

fn fuzz_dek_envelope(f: &Fixtures, data: &[u8]) {
    if let Ok(env) = DekEnvelope::from_bytes(data) {
        assert_eq!(env.as_bytes(), data);
        assert!(
            open_dek(&env, &f.key, &f.wrap_context).is_err(),
            "a fuzzed DEK envelope opened"
        );
    }
    let env = DekEnvelope::from_bytes(&shaped(
        &[Suite::XWingAes256GcmV1 as u8],
        data,
        DEK_ENVELOPE_LEN,
    ))
    .expect("suite byte and length are those of a DEK envelope");
    assert_eq!(
        open_dek(&env, &f.key, &f.wrap_context),
        Err(CryptoError::OpenFailed)
    );
}

fn fuzz_kek_envelope(f: &Fixtures, data: &[u8]) {
    let mut with_header = vec![0x01];
    with_header.extend_from_slice(&KEK_VERSION.to_be_bytes());
    with_header.extend_from_slice(data);
    for env in [data, with_header.as_slice()] {
        if let Ok(version) = envelope::kek_version_of(env) {
            assert_eq!(env[0], 0x01);
            assert_eq!(version.0.to_be_bytes(), env[1..5]);
        }
        for context in &f.kek_contexts {
            assert!(
                open_under_kek(&f.kek, env, context).is_err(),
                "a fuzzed KEK envelope opened"
            );
        }
    }
}

fn fuzz_xwing(f: &Fixtures, data: &[u8]) {
    let shaped_key = shaped(&[], data, ENCAPSULATION_KEY_LEN);
    for bytes in [data, shaped_key.as_slice()] {
        if let Ok(ek) = EncapsulationKey::from_slice(bytes) {
            assert_eq!(ek.to_bytes(), bytes);
            // The service wraps to keys that devices upload: any key that parses must either
            // take a wrap or refuse it with an error, never panic.
            let _ = wrap_dek(&f.dek, &ek, &f.wrap_context);
        }
    }
    if let Ok(ct) = Ciphertext::from_slice(data) {
        assert_eq!(ct.as_bytes().as_slice(), data);
        // Implicit rejection gives some secret; a low-order X25519 part gives OpenFailed.
        if let Err(e) = f.key.decapsulate(&ct) {
            assert_eq!(e, CryptoError::OpenFailed);
        }
    }
}

fn fuzz_identity_key(f: &Fixtures, data: &[u8]) {
    let shaped_key = shaped(&[], data, IDENTITY_KEY_LEN);
    for bytes in [data, shaped_key.as_slice()] {
        let Ok(identity_key) = IdentityPublicKey::from_slice(bytes) else {
            continue;
        };
        assert_eq!(identity_key.as_bytes().as_slice(), bytes);
        // A key the parser accepts is of prime order, so no fuzzed signature verifies on it.
        let signature = Signature::from_slice(&shaped(&[], data, SIGNATURE_LEN))
            .expect("a signature is any 64 bytes");
        let bundle = DeviceKeyBundle {
            suite: Suite::XWingAes256GcmV1,
            user: UserId::new("alice").expect("fixed user id"),
            device: DeviceId::new("phone").expect("fixed device id"),
            identity_key,
            encapsulation_key: f.key.encapsulation_key().clone(),
        };
        assert_eq!(
            identity_key.verify(&bundle, &signature),
            Err(CryptoError::BadSignature)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixtures();
    fuzz_dek_envelope(f, data);
    fuzz_kek_envelope(f, data);
    fuzz_xwing(f, data);
    fuzz_identity_key(f, data);
});
