use super::*;

#[derive(serde::Deserialize)]
struct Vector {
    seed: String,
    eseed: String,
    ss: String,
    sk: String,
    pk: String,
    ct: String,
}

fn vectors() -> Vec<Vector> {
    serde_json::from_str(include_str!("../../../tests/vectors/xwing-draft-06.json"))
        .expect("vector file parses")
}

#[test]
fn draft_06_test_vectors_pass() {
    let vs = vectors();
    assert!(!vs.is_empty());
    for v in vs {
        let seed: [u8; 32] = hex::decode(&v.seed).unwrap().try_into().unwrap();
        let dk = DecapsulationKey::from_seed(&seed).unwrap();
        assert_eq!(hex::encode(dk.expose_seed()), v.sk, "sk is the seed");
        assert_eq!(
            hex::encode(dk.encapsulation_key().to_bytes()),
            v.pk,
            "key generation"
        );

        let ek = EncapsulationKey::from_slice(&hex::decode(&v.pk).unwrap()).unwrap();
        let eseed: [u8; 64] = hex::decode(&v.eseed).unwrap().try_into().unwrap();
        let (ct, ss) = ek.encapsulate_deterministic(&eseed).unwrap();
        assert_eq!(hex::encode(ct.as_bytes()), v.ct, "encapsulation");
        assert_eq!(hex::encode(ss.expose_secret()), v.ss, "encapsulated secret");

        let ct = Ciphertext::from_slice(&hex::decode(&v.ct).unwrap()).unwrap();
        assert_eq!(
            hex::encode(dk.decapsulate(&ct).unwrap().expose_secret()),
            v.ss,
            "fast decapsulation"
        );
        assert_eq!(
            hex::encode(dk.decapsulate_reference(&ct).unwrap().expose_secret()),
            v.ss,
            "reference decapsulation"
        );
    }
}

#[test]
fn fast_and_reference_implementations_agree() {
    for _ in 0..20 {
        let dk = DecapsulationKey::generate().unwrap();
        let (ct, ss) = dk.encapsulation_key().encapsulate().unwrap();
        assert_eq!(
            dk.decapsulate(&ct).unwrap().expose_secret(),
            ss.expose_secret()
        );
        assert_eq!(
            dk.decapsulate_reference(&ct).unwrap().expose_secret(),
            ss.expose_secret()
        );

        let eseed = *random_bytes::<64>().unwrap();
        let (ct, ss) = dk
            .encapsulation_key()
            .encapsulate_deterministic(&eseed)
            .unwrap();
        assert_eq!(
            dk.decapsulate(&ct).unwrap().expose_secret(),
            ss.expose_secret()
        );
    }
}

#[test]
fn agrees_with_the_x_wing_crate() {
    use x_wing::{Decapsulate, Encapsulate, KeyExport, KeyInit};
    let seed = *random_bytes::<32>().unwrap();
    let theirs = x_wing::DecapsulationKey::new(&seed.into());
    let ours = DecapsulationKey::from_seed(&seed).unwrap();
    use x_wing::Decapsulator;
    assert_eq!(
        theirs.encapsulation_key().to_bytes().as_slice(),
        ours.encapsulation_key().to_bytes().as_slice()
    );
    let (ct, ss) = ours.encapsulation_key().encapsulate().unwrap();
    let their_ct = x_wing::Ciphertext::try_from(ct.as_bytes().as_slice()).unwrap();
    assert_eq!(theirs.decapsulate(&their_ct).as_slice(), ss.expose_secret());
    let (their_ct, their_ss) = theirs.encapsulation_key().encapsulate();
    let ct = Ciphertext::from_slice(their_ct.as_slice()).unwrap();
    assert_eq!(
        ours.decapsulate(&ct).unwrap().expose_secret(),
        their_ss.as_slice()
    );
}

#[test]
fn unreduced_mlkem_key_is_refused() {
    let dk = DecapsulationKey::generate().unwrap();
    let mut bytes = dk.encapsulation_key().to_bytes();
    // Coefficient 0 is 12 bits little-endian in the first 1.5 bytes: 0xFFF >= q = 3329.
    bytes[0] = 0xFF;
    bytes[1] |= 0x0F;
    assert!(matches!(
        EncapsulationKey::from_slice(&bytes),
        Err(CryptoError::InvalidKey(_))
    ));
    assert!(matches!(
        EncapsulationKey::from_slice(&bytes[..100]),
        Err(CryptoError::InvalidLength { .. })
    ));
}

#[test]
fn low_order_x25519_part_is_refused_at_parse() {
    // Regression: such a key parsed, and then every wrap to it failed with OpenFailed,
    // so one device could break every session it was a recipient of.
    let dk = DecapsulationKey::generate().unwrap();
    let good = dk.encapsulation_key().to_bytes();
    let mut refused = 0;
    for point in curve25519_dalek::constants::EIGHT_TORSION {
        for high_bit in [0u8, 0x80] {
            let mut bytes = good.clone();
            let mut u = point.to_montgomery().to_bytes();
            u[31] |= high_bit;
            bytes[MLKEM_EK_LEN..].copy_from_slice(&u);
            assert!(matches!(
                EncapsulationKey::from_slice(&bytes),
                Err(CryptoError::InvalidKey(_))
            ));
            refused += 1;
        }
    }
    assert_eq!(refused, 16);
    // p and p + 1 are non-canonical spellings of 0 and 1.
    for first in [0xedu8, 0xee] {
        let mut bytes = good.clone();
        bytes[MLKEM_EK_LEN..].fill(0xff);
        bytes[MLKEM_EK_LEN] = first;
        bytes[ENCAPSULATION_KEY_LEN - 1] = 0x7f;
        assert!(matches!(
            EncapsulationKey::from_slice(&bytes),
            Err(CryptoError::InvalidKey(_))
        ));
    }
    // An ordinary key still parses and wraps.
    let ek = EncapsulationKey::from_slice(&good).unwrap();
    assert!(ek.encapsulate().is_ok());
}

#[test]
fn x25519_minus_one_and_its_high_bit_form_are_refused_at_parse() {
    // Regression (u = p − 1, a point of order 4 on the twist): it parsed, then every wrap
    // to it failed, so one device broke every session its user was in.
    let dk = DecapsulationKey::generate().unwrap();
    let good = dk.encapsulation_key().to_bytes();
    for last in [0x7fu8, 0xff] {
        let mut bytes = good.clone();
        bytes[MLKEM_EK_LEN..].fill(0xff);
        bytes[MLKEM_EK_LEN] = 0xec;
        bytes[ENCAPSULATION_KEY_LEN - 1] = last;
        assert_eq!(
            EncapsulationKey::from_slice(&bytes).unwrap_err(),
            CryptoError::InvalidKey("X-Wing encapsulation key (X25519 part is a low-order point)")
        );
    }
}

#[derive(serde::Deserialize)]
struct WycheproofFile<G> {
    #[serde(rename = "numberOfTests")]
    number_of_tests: usize,
    #[serde(rename = "testGroups")]
    test_groups: Vec<G>,
}

#[derive(serde::Deserialize)]
struct X25519Group {
    curve: String,
    tests: Vec<X25519Case>,
}

#[derive(serde::Deserialize)]
struct X25519Case {
    #[serde(rename = "tcId")]
    tc_id: u32,
    flags: Vec<String>,
    public: String,
    private: String,
    shared: String,
    result: String,
}

fn x25519_cases() -> Vec<X25519Case> {
    let file: WycheproofFile<X25519Group> = serde_json::from_str(include_str!(
        "../../../tests/vectors/wycheproof-x25519_test.json"
    ))
    .expect("Wycheproof X25519 file parses");
    let cases: Vec<X25519Case> = file
        .test_groups
        .into_iter()
        .inspect(|g| assert_eq!(g.curve, "curve25519"))
        .flat_map(|g| g.tests)
        .collect();
    assert_eq!(cases.len(), file.number_of_tests);
    cases
}

fn hex32(s: &str) -> [u8; 32] {
    hex::decode(s).unwrap().try_into().unwrap()
}

/// Every Wycheproof X25519 public value through the key parser: refused exactly when its
/// shared secret is all zero (the file's `ZeroSharedSecret` cases, which include every
/// low-order point on the curve and the twist, canonical or not), accepted otherwise.
#[test]
fn wycheproof_x25519_publics_through_the_key_parser() {
    let dk = DecapsulationKey::generate().unwrap();
    let good = dk.encapsulation_key().to_bytes();
    let (mut refused, mut accepted) = (0, 0);
    for case in x25519_cases() {
        let zero = case.flags.iter().any(|f| f == "ZeroSharedSecret");
        assert_eq!(zero, case.shared == "00".repeat(32), "tcId {}", case.tc_id);
        let mut bytes = good.clone();
        bytes[MLKEM_EK_LEN..].copy_from_slice(&hex32(&case.public));
        let parsed = EncapsulationKey::from_slice(&bytes);
        if zero {
            assert!(
                matches!(parsed, Err(CryptoError::InvalidKey(_))),
                "tcId {} must be refused",
                case.tc_id
            );
            refused += 1;
        } else {
            let ek = parsed.unwrap_or_else(|e| panic!("tcId {}: {e}", case.tc_id));
            assert!(ek.encapsulate().is_ok(), "tcId {}", case.tc_id);
            accepted += 1;
        }
    }
    // The file's count of all-zero cases (tcIds 32-63, 65, 68, 71, 78, 154 among them).
    assert_eq!(refused, 31);
    assert_eq!(accepted, 518 - 31);
}

/// Every Wycheproof X25519 case through the Diffie-Hellman that decapsulation runs: the
/// expected shared secret for every case whose secret is not all zero, a failure to open
/// otherwise; and the X25519 part of a real ciphertext replaced by the case's public value
/// decapsulates as the `x-wing` crate does (or fails, where the secret would be zero).
#[test]
fn wycheproof_x25519_cases_through_decapsulation() {
    use x_wing::{Decapsulate, KeyInit};
    let seed = *random_bytes::<32>().unwrap();
    let ours = DecapsulationKey::from_seed(&seed).unwrap();
    let theirs = x_wing::DecapsulationKey::new(&seed.into());
    let (ct, _) = ours.encapsulation_key().encapsulate().unwrap();
    for case in x25519_cases() {
        let zero = case.shared == "00".repeat(32);
        let private =
            agreement::PrivateKey::from_private_key(&X25519, &hex32(&case.private)).unwrap();
        match x25519_agree(&private, &hex32(&case.public)) {
            Ok(ss) => {
                assert!(!zero, "tcId {}", case.tc_id);
                assert_ne!(case.result, "invalid", "tcId {}", case.tc_id);
                assert_eq!(hex::encode(*ss), case.shared, "tcId {}", case.tc_id);
            }
            Err(e) => {
                assert!(zero, "tcId {}: {e}", case.tc_id);
                assert_eq!(e, CryptoError::OpenFailed);
            }
        }

        let mut bytes = *ct.as_bytes();
        bytes[MLKEM_CT_LEN..].copy_from_slice(&hex32(&case.public));
        let changed = Ciphertext::from_slice(&bytes).unwrap();
        let their_ct = x_wing::Ciphertext::try_from(bytes.as_slice()).unwrap();
        match ours.decapsulate(&changed) {
            Ok(ss) => assert_eq!(
                ss.expose_secret(),
                theirs.decapsulate(&their_ct).as_slice(),
                "tcId {}",
                case.tc_id
            ),
            Err(e) => {
                assert!(zero, "tcId {}: {e}", case.tc_id);
                assert_eq!(e, CryptoError::OpenFailed);
            }
        }
    }
}

#[test]
fn low_order_x25519_point_fails_to_open() {
    let dk = DecapsulationKey::generate().unwrap();
    let (ct, _) = dk.encapsulation_key().encapsulate().unwrap();
    let mut bytes = *ct.as_bytes();
    bytes[MLKEM_CT_LEN..].fill(0);
    let ct = Ciphertext::from_slice(&bytes).unwrap();
    assert_eq!(dk.decapsulate(&ct).unwrap_err(), CryptoError::OpenFailed);
}

#[test]
fn key_id_is_stable_and_debug_hides_the_seed() {
    let seed = [0x42u8; 32];
    let a = DecapsulationKey::from_seed(&seed).unwrap();
    let b = DecapsulationKey::from_seed(&seed).unwrap();
    assert_eq!(
        a.encapsulation_key().key_id(),
        b.encapsulation_key().key_id()
    );
    let shown = format!("{a:?}");
    assert!(!shown.contains("4242"), "{shown}");
    assert!(!shown.contains("66, 66"), "{shown}");
}
