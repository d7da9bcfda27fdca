//! Wrapping an epoch's DEK in a SERVICE_WRAPPED session: to each recipient device's current
//! key, spread over the blocking pool's cores, and for a new epoch also the escrow copy (to
//! the staff escrow key) and the service copy (under the KEK) that lets the service wrap for
//! devices added later.
//!
//! A device key that cannot be wrapped to (it no longer parses, or the wrap fails for it) is
//! the device's problem, not the service's: FAILED_PRECONDITION naming the device
//! ([`SessionError::UnwrappableDeviceKey`]), and the caller writes nothing.

use std::num::NonZeroUsize;

use super::error::SessionError;
use crate::crypto::envelope::{
    open_under_kek, seal_under_kek, wrap_dek, wrap_dek_for_recipients, KekContext, Recipient,
    RecipientWrapError, WrapContext,
};
use crate::crypto::ids::{DeviceId, Epoch, SessionId, UserId};
use crate::crypto::keys::Dek;
use crate::crypto::xwing::EncapsulationKey;
use crate::crypto::CryptoError;
use crate::service::AppState;
use crate::store::sessions::{EpochKeys, Member, NewSessionKey};
use crate::store::user_keys::UserKey;

/// A device a DEK is to be wrapped for: who it is and its current key.
#[derive(Clone)]
pub(crate) struct Target {
    /// The device's user.
    pub(crate) user: UserId,
    /// The device.
    pub(crate) device: DeviceId,
    /// Its current key, parsed.
    pub(crate) key: EncapsulationKey,
}

/// The targets of these current device keys, in the same order. A stored key that no longer
/// parses (one published before the parser refused low-order X25519 parts, say) is
/// FAILED_PRECONDITION naming its device: the session cannot include it until it publishes a
/// new key.
pub(crate) fn targets_from_keys(keys: Vec<UserKey>) -> Result<Vec<Target>, SessionError> {
    keys.into_iter()
        .map(
            |k| match EncapsulationKey::from_slice(&k.encapsulation_key) {
                Ok(key) => Ok(Target {
                    user: k.user,
                    device: k.device,
                    key,
                }),
                Err(reason) => {
                    tracing::warn!(
                        error = %reason,
                        key_id = %k.key_id,
                        user = %k.user,
                        device = %k.device,
                        "a current device key does not parse"
                    );
                    Err(SessionError::UnwrappableDeviceKey {
                        user: k.user,
                        device: k.device,
                        reason,
                    })
                }
            },
        )
        .collect()
}

/// The members the targets become, each with the key it is wrapped to.
pub(crate) fn members_of(targets: &[Target]) -> Vec<Member> {
    targets
        .iter()
        .map(|t| Member {
            user: t.user.clone(),
            device: t.device.clone(),
            key_id: t.key.key_id(),
        })
        .collect()
}

/// Which copies of an epoch's DEK a wrapping makes besides the devices' ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Copies {
    /// A new epoch: seal the escrow copy and the service copy too.
    Seal,
    /// Devices added to an epoch whose copies exist already.
    Existing,
}

/// Opens the service copy of an epoch's DEK (sealed under the KEK by [`wrap_epoch`]).
pub(crate) fn open_service_copy(
    state: &AppState,
    session_id: SessionId,
    epoch: Epoch,
    envelope: &[u8],
) -> Result<Dek, SessionError> {
    open_under_kek(
        &state.kek,
        envelope,
        &KekContext::ServiceDek { session_id, epoch },
    )
    .and_then(|b| Dek::from_slice(&b))
    .map_err(SessionError::ServiceCrypto)
}

/// Wraps `dek` for every target and makes the `copies` asked for, on tokio's blocking pool
/// over all cores (a thousand recipients are a thousand encapsulations).
pub(crate) async fn wrap_epoch(
    state: &AppState,
    session_id: SessionId,
    epoch: Epoch,
    dek: Dek,
    targets: Vec<Target>,
    copies: Copies,
) -> Result<EpochKeys, SessionError> {
    let kek = state.kek.clone();
    let escrow = state.escrow_public_key.clone();
    tokio::task::spawn_blocking(move || {
        let recipients: Vec<(Recipient, &EncapsulationKey)> = targets
            .iter()
            .map(|t| {
                (
                    Recipient::Device {
                        user: t.user.clone(),
                        device: t.device.clone(),
                    },
                    &t.key,
                )
            })
            .collect();
        let parallelism = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        let envelopes = wrap_dek_for_recipients(&dek, session_id, epoch, &recipients, parallelism)
            .map_err(|e| recipient_failure(&targets, e))?;
        let session_keys = targets
            .iter()
            .zip(envelopes)
            .map(|(t, env)| NewSessionKey {
                user: t.user.clone(),
                device: t.device.clone(),
                key_id: t.key.key_id(),
                envelope: env.into_bytes(),
            })
            .collect();
        let (staff_key, service_key) = if copies == Copies::Seal {
            let escrow_ctx = WrapContext {
                session_id,
                epoch,
                recipient: Recipient::Escrow,
            };
            let staff =
                wrap_dek(&dek, &escrow, &escrow_ctx).map_err(SessionError::ServiceCrypto)?;
            let service = seal_under_kek(
                &kek,
                dek.expose_secret(),
                &KekContext::ServiceDek { session_id, epoch },
            )
            .map_err(SessionError::ServiceCrypto)?;
            (
                Some((escrow.key_id(), staff.into_bytes())),
                Some((kek.version().0, service)),
            )
        } else {
            (None, None)
        };
        Ok(EpochKeys {
            epoch,
            session_keys,
            staff_key,
            service_key,
        })
    })
    .await
    .map_err(|e| SessionError::Internal(format!("wrapping task failed: {e}")))?
}

/// A wrap that failed for one recipient names its device; a failure of the service's own
/// machinery (randomness, a panicked thread) is not the device's and stays internal.
fn recipient_failure(targets: &[Target], e: RecipientWrapError) -> SessionError {
    match (targets.get(e.index), e.error) {
        (_, error @ CryptoError::Backend) | (None, error) => SessionError::ServiceCrypto(error),
        (Some(t), reason) => {
            tracing::warn!(
                error = %reason,
                key_id = %t.key.key_id(),
                user = %t.user,
                device = %t.device,
                "a current device key cannot be wrapped to"
            );
            SessionError::UnwrappableDeviceKey {
                user: t.user.clone(),
                device: t.device.clone(),
                reason,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::xwing::DecapsulationKey;

    fn target(user: &str) -> Target {
        Target {
            user: UserId::new(user).unwrap(),
            device: DeviceId::new("phone").unwrap(),
            key: DecapsulationKey::generate()
                .unwrap()
                .encapsulation_key()
                .clone(),
        }
    }

    #[test]
    fn a_recipient_failure_names_the_device_at_its_index() {
        let targets = vec![target("alice"), target("bob"), target("carol")];
        let e = recipient_failure(
            &targets,
            RecipientWrapError {
                index: 1,
                error: CryptoError::OpenFailed,
            },
        );
        match e {
            SessionError::UnwrappableDeviceKey {
                user,
                device,
                reason,
            } => {
                assert_eq!(user.as_str(), "bob");
                assert_eq!(device.as_str(), "phone");
                assert_eq!(reason, CryptoError::OpenFailed);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_stored_key_that_no_longer_parses_names_its_device() {
        use crate::crypto::ids::KeyId;
        use crate::crypto::Suite;
        use crate::store::Timestamp;

        let good = target("alice");
        let mut bytes = good.key.to_bytes();
        // u = p - 1: a low-order X25519 part, refused by the parser since it was stored.
        let len = bytes.len();
        bytes[len - 32..].fill(0xff);
        bytes[len - 32] = 0xec;
        bytes[len - 1] = 0x7f;
        let stored = |user: &str, encapsulation_key: Vec<u8>| UserKey {
            key_id: KeyId::from_slice(&[7; 16]).unwrap(),
            user: UserId::new(user).unwrap(),
            device: DeviceId::new("phone").unwrap(),
            version: 1,
            suite: Suite::XWingAes256GcmV1,
            encapsulation_key,
            identity_key: Vec::new(),
            signature: Vec::new(),
            created_at: Timestamp::now(),
            superseded_at: None,
            revoked_at: None,
        };
        let parsed = targets_from_keys(vec![stored("alice", good.key.to_bytes())]).unwrap();
        assert_eq!(parsed[0].key, good.key);
        let err = targets_from_keys(vec![
            stored("alice", good.key.to_bytes()),
            stored("bob", bytes),
        ])
        .err()
        .unwrap();
        match err {
            SessionError::UnwrappableDeviceKey {
                user,
                device,
                reason,
            } => {
                assert_eq!((user.as_str(), device.as_str()), ("bob", "phone"));
                assert!(matches!(reason, CryptoError::InvalidKey(_)), "{reason:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_backend_failure_or_a_bad_index_stays_internal() {
        let targets = vec![target("alice")];
        for (index, error) in [(0, CryptoError::Backend), (7, CryptoError::OpenFailed)] {
            let e = recipient_failure(&targets, RecipientWrapError { index, error });
            assert!(matches!(e, SessionError::ServiceCrypto(_)), "{e:?}");
        }
    }
}
