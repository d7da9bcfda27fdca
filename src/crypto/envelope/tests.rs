use super::*;

fn device_ctx(user: &str, device: &str) -> WrapContext {
    WrapContext {
        session_id: SessionId::generate(),
        epoch: Epoch::FIRST,
        recipient: Recipient::Device {
            user: UserId::new(user).unwrap(),
            device: DeviceId::new(device).unwrap(),
        },
    }
}

#[test]
fn wrap_then_open_returns_the_dek() {
    let dk = DecapsulationKey::generate().unwrap();
    let dek = Dek::generate().unwrap();
    let ctx = device_ctx("alice", "phone");
    let env = wrap_dek(&dek, dk.encapsulation_key(), &ctx).unwrap();
    assert_eq!(env.as_bytes().len(), DEK_ENVELOPE_LEN);
    assert_eq!(open_dek(&env, &dk, &ctx).unwrap(), dek);
    let escrow = WrapContext {
        recipient: Recipient::Escrow,
        ..ctx
    };
    let env = wrap_dek(&dek, dk.encapsulation_key(), &escrow).unwrap();
    assert_eq!(open_dek(&env, &dk, &escrow).unwrap(), dek);
}

#[test]
fn every_single_byte_flip_fails_to_open() {
    let dk = DecapsulationKey::generate().unwrap();
    let dek = Dek::generate().unwrap();
    let ctx = device_ctx("alice", "phone");
    let env = wrap_dek(&dek, dk.encapsulation_key(), &ctx).unwrap();
    for i in 0..env.as_bytes().len() {
        let mut bytes = env.as_bytes().to_vec();
        bytes[i] ^= 0x01;
        let result = DekEnvelope::from_bytes(&bytes).and_then(|e| open_dek(&e, &dk, &ctx));
        assert!(result.is_err(), "flipping byte {i} still opened");
    }
}

#[test]
fn every_context_field_is_bound() {
    let dk = DecapsulationKey::generate().unwrap();
    let dek = Dek::generate().unwrap();
    let ctx = device_ctx("alice", "phone");
    let env = wrap_dek(&dek, dk.encapsulation_key(), &ctx).unwrap();
    let variants = [
        WrapContext {
            session_id: SessionId::generate(),
            ..ctx.clone()
        },
        WrapContext {
            epoch: Epoch::new(2).unwrap(),
            ..ctx.clone()
        },
        WrapContext {
            recipient: Recipient::Device {
                user: UserId::new("mallory").unwrap(),
                device: DeviceId::new("phone").unwrap(),
            },
            ..ctx.clone()
        },
        WrapContext {
            recipient: Recipient::Device {
                user: UserId::new("alice").unwrap(),
                device: DeviceId::new("laptop").unwrap(),
            },
            ..ctx.clone()
        },
        WrapContext {
            recipient: Recipient::Escrow,
            ..ctx.clone()
        },
    ];
    for other in variants {
        assert_eq!(
            open_dek(&env, &dk, &other),
            Err(CryptoError::OpenFailed),
            "{other:?}"
        );
    }
    // The key id is the last context field: another key of the same device fails too.
    let other_key = DecapsulationKey::generate().unwrap();
    assert_eq!(
        open_dek(&env, &other_key, &ctx),
        Err(CryptoError::OpenFailed)
    );
}

#[test]
fn user_and_device_boundaries_are_not_ambiguous() {
    let dk = DecapsulationKey::generate().unwrap();
    let dek = Dek::generate().unwrap();
    let ctx = device_ctx("ab", "c");
    let env = wrap_dek(&dek, dk.encapsulation_key(), &ctx).unwrap();
    let shifted = WrapContext {
        recipient: Recipient::Device {
            user: UserId::new("a").unwrap(),
            device: DeviceId::new("bc").unwrap(),
        },
        ..ctx
    };
    assert!(open_dek(&env, &dk, &shifted).is_err());
}

#[test]
fn envelope_parse_rejects_wrong_suite_and_length() {
    assert_eq!(
        DekEnvelope::from_bytes(&[]),
        Err(CryptoError::TooShort {
            what: "DEK envelope",
            min: 1,
            actual: 0
        })
    );
    assert_eq!(
        DekEnvelope::from_bytes(&[0x07; DEK_ENVELOPE_LEN]),
        Err(CryptoError::UnknownSuite(7))
    );
    assert!(matches!(
        DekEnvelope::from_bytes(&[0x01; 100]),
        Err(CryptoError::InvalidLength { .. })
    ));
}

/// Wraps for the recipients at epoch 1 on `threads` threads.
fn wrap_on(
    threads: usize,
    dek: &Dek,
    session: SessionId,
    recipients: &[(Recipient, &EncapsulationKey)],
) -> Result<Vec<DekEnvelope>, RecipientWrapError> {
    let threads = NonZeroUsize::new(threads).unwrap();
    wrap_dek_for_recipients(dek, session, Epoch::FIRST, recipients, threads)
}

/// Device recipients `u0/d`, `u1/d`, ... with these keys.
fn numbered_devices<'k>(
    keys: impl Iterator<Item = &'k EncapsulationKey>,
) -> Vec<(Recipient, &'k EncapsulationKey)> {
    keys.enumerate()
        .map(|(i, key)| {
            let recipient = Recipient::Device {
                user: UserId::new(format!("u{i}")).unwrap(),
                device: DeviceId::new("d").unwrap(),
            };
            (recipient, key)
        })
        .collect()
}

#[test]
fn many_recipients_in_parallel_match_order_and_open() {
    let keys: Vec<_> = (0..9)
        .map(|_| DecapsulationKey::generate().unwrap())
        .collect();
    let dek = Dek::generate().unwrap();
    let session = SessionId::generate();
    let recipients = numbered_devices(keys.iter().map(|k| k.encapsulation_key()));
    for threads in [1, 2, 4, 16] {
        let envs = wrap_on(threads, &dek, session, &recipients).unwrap();
        assert_eq!(envs.len(), keys.len());
        for ((recipient, _), (env, key)) in recipients.iter().zip(envs.iter().zip(&keys)) {
            let ctx = WrapContext {
                session_id: session,
                epoch: Epoch::FIRST,
                recipient: recipient.clone(),
            };
            assert_eq!(open_dek(env, key, &ctx).unwrap(), dek);
        }
    }
    let none =
        wrap_dek_for_recipients(&dek, session, Epoch::FIRST, &[], NonZeroUsize::MIN).unwrap();
    assert!(none.is_empty());
}

#[test]
fn a_failed_wrap_names_its_recipient() {
    // A key whose X25519 part is a low-order point (as stored before the parser refused
    // them) cannot be wrapped to: the error says which recipient it was, whatever the
    // split over threads.
    let mut u = [0xffu8; 32];
    u[0] = 0xec;
    u[31] = 0x7f;
    let good: Vec<_> = (0..6)
        .map(|_| DecapsulationKey::generate().unwrap())
        .collect();
    let bad = good[0].encapsulation_key().with_x25519_part_unchecked(u);
    let dek = Dek::generate().unwrap();
    let session = SessionId::generate();
    for bad_at in [0, 3, 5] {
        let recipients = numbered_devices(good.iter().enumerate().map(|(i, k)| {
            if i == bad_at {
                &bad
            } else {
                k.encapsulation_key()
            }
        }));
        for threads in [1, 2, 4, 16] {
            let err = wrap_on(threads, &dek, session, &recipients).unwrap_err();
            assert_eq!(
                err,
                RecipientWrapError {
                    index: bad_at,
                    error: CryptoError::OpenFailed
                },
                "bad at {bad_at}, {threads} threads"
            );
            assert_eq!(
                err.to_string(),
                format!("recipient {bad_at}: decryption failed")
            );
        }
    }
}

fn ratchet_ctx(conv: &str) -> KekContext {
    KekContext::RatchetState {
        user: UserId::new("alice").unwrap(),
        device: DeviceId::new("phone").unwrap(),
        conversation: ConversationId::new(conv).unwrap(),
    }
}

#[test]
fn kek_envelope_round_trip_and_version() {
    let kek = Kek::generate(KekVersion(3)).unwrap();
    let ctx = ratchet_ctx("c1");
    for payload in [&b""[..], b"x", &[7u8; 5000]] {
        let env = seal_under_kek(&kek, payload, &ctx).unwrap();
        assert_eq!(kek_version_of(&env).unwrap(), KekVersion(3));
        assert_eq!(
            open_under_kek(&kek, &env, &ctx).unwrap().as_slice(),
            payload
        );
    }
}

#[test]
fn kek_envelope_binds_context_key_and_bytes() {
    let kek = Kek::generate(KekVersion(1)).unwrap();
    let ctx = ratchet_ctx("c1");
    let env = seal_under_kek(&kek, b"ratchet state", &ctx).unwrap();
    assert_eq!(
        open_under_kek(&kek, &env, &ratchet_ctx("c2")),
        Err(CryptoError::OpenFailed)
    );
    let service = KekContext::ServiceDek {
        session_id: SessionId::generate(),
        epoch: Epoch::FIRST,
    };
    assert_eq!(
        open_under_kek(&kek, &env, &service),
        Err(CryptoError::OpenFailed)
    );
    let other = Kek::generate(KekVersion(1)).unwrap();
    assert_eq!(
        open_under_kek(&other, &env, &ctx),
        Err(CryptoError::OpenFailed)
    );
    let newer = Kek::generate(KekVersion(2)).unwrap();
    assert_eq!(
        open_under_kek(&newer, &env, &ctx),
        Err(CryptoError::KekVersionMismatch {
            expected: 2,
            found: 1
        })
    );
    for i in 0..env.len() {
        let mut bytes = env.clone();
        bytes[i] ^= 0x80;
        assert!(
            open_under_kek(&kek, &bytes, &ctx).is_err(),
            "flipping byte {i} still opened"
        );
    }
    for len in 0..env.len() {
        assert!(open_under_kek(&kek, &env[..len], &ctx).is_err());
    }
}
