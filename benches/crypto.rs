//! The crypto core against the primitives it is made of, and against the `x-wing` crate.
//!
//! Run: `cargo bench --bench crypto`. After criterion's own report, the bench prints the ratios
//! the targets are stated in (see BENCHMARKS.md), each computed from medians of this same run,
//! so a busy machine shifts both sides alike.

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use aws_lc_rs::agreement::{self, UnparsedPublicKey, X25519};
use criterion::{BenchmarkId, Criterion, Throughput};
use keyhold::crypto::envelope::{
    open_dek, wrap_dek, wrap_dek_for_recipients, Recipient, WrapContext,
};
use keyhold::crypto::ids::{DeviceId, Epoch, MessageId, SessionId, UserId};
use keyhold::crypto::keys::Dek;
use keyhold::crypto::message::{message_key, MessageContext};
use keyhold::crypto::sign::{DeviceKeyBundle, IdentityKeyPair};
use keyhold::crypto::xwing::DecapsulationKey;
use keyhold::crypto::Suite;
use pqcrypto_traits::kem::{Ciphertext as _, PublicKey as _, SecretKey as _};
use sha3::{Digest, Sha3_256};

const RECIPIENTS: usize = 1000;

fn device_context(session_id: SessionId, i: usize) -> WrapContext {
    WrapContext {
        session_id,
        epoch: Epoch::FIRST,
        recipient: Recipient::Device {
            user: UserId::new(format!("user-{i}")).expect("valid id"),
            device: DeviceId::new("phone").expect("valid id"),
        },
    }
}

fn primitives(c: &mut Criterion) {
    let mut g = c.benchmark_group("primitive");
    let (pk, sk) = pqcrypto_mlkem::mlkem768::keypair();
    g.bench_function("mlkem768_encapsulate", |b| {
        b.iter(|| pqcrypto_mlkem::mlkem768::encapsulate(black_box(&pk)))
    });
    let (_, ct) = pqcrypto_mlkem::mlkem768::encapsulate(&pk);
    // Decapsulation as the core does it: the secret key is rebuilt from its bytes each time.
    let sk_bytes = sk.as_bytes().to_vec();
    let ct_bytes = ct.as_bytes().to_vec();
    g.bench_function("mlkem768_decapsulate", |b| {
        b.iter(|| {
            let sk =
                pqcrypto_mlkem::mlkem768::SecretKey::from_bytes(black_box(&sk_bytes)).expect("sk");
            let ct = pqcrypto_mlkem::mlkem768::Ciphertext::from_bytes(&ct_bytes).expect("ct");
            pqcrypto_mlkem::mlkem768::decapsulate(&ct, &sk)
        })
    });
    let _ = pk.as_bytes();

    g.bench_function("x25519_keygen", |b| {
        b.iter(|| {
            let k = agreement::PrivateKey::generate(&X25519).expect("keygen");
            k.compute_public_key().expect("public")
        })
    });
    let me = agreement::PrivateKey::generate(&X25519).expect("keygen");
    let peer_key = agreement::PrivateKey::generate(&X25519).expect("keygen");
    let peer = peer_key.compute_public_key().expect("public");
    let peer_bytes: [u8; 32] = peer.as_ref().try_into().expect("32 bytes");
    g.bench_function("x25519_dh", |b| {
        b.iter(|| {
            agreement::agree(
                &me,
                UnparsedPublicKey::new(&X25519, black_box(&peer_bytes)),
                (),
                |s| Ok(s[0]),
            )
        })
    });

    let combiner_input = [7u8; 134];
    g.bench_function("sha3_combiner", |b| {
        b.iter(|| Sha3_256::digest(black_box(&combiner_input)))
    });

    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[1u8; 32]).expect("key"));
    let mut block = [0u8; 32];
    g.bench_function("aes256gcm_seal_32B", |b| {
        b.iter(|| {
            key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(black_box(&[0u8; 64][..])),
                &mut block,
            )
        })
    });
    let mut sealed = [5u8; 32].to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(&[0u8; 64][..]),
            &mut sealed,
        )
        .expect("seal");
    sealed.extend_from_slice(tag.as_ref());
    g.bench_function("aes256gcm_open_32B", |b| {
        b.iter(|| {
            let mut buf = sealed.clone();
            key.open_in_place(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(&[0u8; 64][..]),
                &mut buf,
            )
            .map(|p| p.len())
        })
    });
    g.finish();
}

fn peer_xwing(c: &mut Criterion) {
    use x_wing::{Decapsulate, Decapsulator, Encapsulate, KeyInit};
    let mut g = c.benchmark_group("peer");
    let dk = x_wing::DecapsulationKey::new(&[3u8; 32].into());
    let ek = dk.encapsulation_key().clone();
    g.bench_function("x_wing_crate_encapsulate", |b| {
        b.iter(|| black_box(&ek).encapsulate())
    });
    let (ct, _) = ek.encapsulate();
    g.bench_function("x_wing_crate_decapsulate", |b| {
        b.iter(|| dk.decapsulate(black_box(&ct)))
    });

    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[1u8; 32]).expect("key"));
    let mut buf = vec![0u8; 1 << 20];
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("ring_aes256gcm_seal_1MiB", |b| {
        b.iter(|| {
            key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::empty(),
                &mut buf,
            )
        })
    });
    g.finish();
}

fn core(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    let dk = DecapsulationKey::generate().expect("keygen");
    let ek = dk.encapsulation_key().clone();
    g.bench_function("xwing_encapsulate", |b| {
        b.iter(|| black_box(&ek).encapsulate())
    });
    let (ct, _) = ek.encapsulate().expect("encapsulate");
    g.bench_function("xwing_decapsulate", |b| {
        b.iter(|| dk.decapsulate(black_box(&ct)))
    });

    let dek = Dek::generate().expect("dek");
    let ctx = device_context(SessionId::generate(), 0);
    g.bench_function("wrap", |b| b.iter(|| wrap_dek(&dek, black_box(&ek), &ctx)));
    let env = wrap_dek(&dek, &ek, &ctx).expect("wrap");
    g.bench_function("open", |b| b.iter(|| open_dek(black_box(&env), &dk, &ctx)));

    let identity = IdentityKeyPair::generate().expect("identity");
    let bundle = DeviceKeyBundle {
        suite: Suite::XWingAes256GcmV1,
        user: UserId::new("alice").expect("id"),
        device: DeviceId::new("phone").expect("id"),
        identity_key: identity.public_key(),
        encapsulation_key: ek.clone(),
    };
    g.bench_function("ed25519_sign_bundle", |b| {
        b.iter(|| identity.sign(black_box(&bundle)))
    });
    let signature = identity.sign(&bundle);
    g.bench_function("ed25519_verify_bundle", |b| {
        b.iter(|| identity.public_key().verify(black_box(&bundle), &signature))
    });

    let mctx = MessageContext {
        session_id: SessionId::generate(),
        epoch: Epoch::FIRST,
        message_id: MessageId::generate(),
    };
    for (name, len) in [("1KiB", 1usize << 10), ("1MiB", 1 << 20)] {
        g.throughput(Throughput::Bytes(len as u64));
        let mut buf = vec![0u8; len];
        g.bench_with_input(BenchmarkId::new("message_seal", name), &len, |b, &len| {
            b.iter(|| {
                buf.truncate(len);
                let key = message_key(&dek, &mctx).expect("key");
                key.seal_in_place(&mut buf, b"ad").expect("seal")
            })
        });
        let key = message_key(&dek, &mctx).expect("key");
        let mut sealed = vec![0u8; len];
        let nonce = key.seal_in_place(&mut sealed, b"ad").expect("seal");
        g.bench_with_input(BenchmarkId::new("message_open", name), &len, |b, _| {
            b.iter_batched_ref(
                || sealed.clone(),
                |buf| {
                    let key = message_key(&dek, &mctx).expect("key");
                    key.open_in_place(&nonce, buf, b"ad").expect("open")
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();

    let mut g = c.benchmark_group("fanout");
    g.sample_size(10);
    let keys: Vec<DecapsulationKey> = (0..RECIPIENTS)
        .map(|_| DecapsulationKey::generate().expect("keygen"))
        .collect();
    let recipients: Vec<(Recipient, &keyhold::crypto::xwing::EncapsulationKey)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (
                device_context(SessionId::generate(), i).recipient,
                k.encapsulation_key(),
            )
        })
        .collect();
    let cores = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    for (name, threads) in [("1_thread", NonZeroUsize::MIN), ("all_cores", cores)] {
        g.bench_function(BenchmarkId::new("wrap_1000_recipients", name), |b| {
            b.iter(|| {
                wrap_dek_for_recipients(
                    &dek,
                    SessionId::generate(),
                    Epoch::FIRST,
                    &recipients,
                    threads,
                )
            })
        });
    }
    g.finish();
}

/// The median of one benchmark of this run, in nanoseconds, read from criterion's output.
fn median_ns(id: &str) -> Option<f64> {
    let dir = std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("criterion"))
        })
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/criterion"));
    let text = std::fs::read_to_string(dir.join(id).join("new/estimates.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn report() {
    let m = |id: &str| median_ns(id).unwrap_or(f64::NAN);
    let us = |ns: f64| ns / 1000.0;
    let wrap = m("core/wrap");
    let open = m("core/open");
    let enc = m("primitive/mlkem768_encapsulate");
    let dec = m("primitive/mlkem768_decapsulate");
    let kg = m("primitive/x25519_keygen");
    let dh = m("primitive/x25519_dh");
    let sha3 = m("primitive/sha3_combiner");
    let gcm_seal = m("primitive/aes256gcm_seal_32B");
    let gcm_open = m("primitive/aes256gcm_open_32B");
    let wrap_sum = enc + kg + dh + sha3 + gcm_seal;
    let open_sum = dec + dh + sha3 + gcm_open;
    let peer_enc = m("peer/x_wing_crate_encapsulate");
    let peer_dec = m("peer/x_wing_crate_decapsulate");
    let t1 = m("fanout/wrap_1000_recipients/1_thread");
    let tn = m("fanout/wrap_1000_recipients/all_cores");
    let seal_1m = m("core/message_seal/1MiB");
    let ring_1m = m("peer/ring_aes256gcm_seal_1MiB");

    let rows = [
        (
            "wrap / sum of its primitives",
            wrap / wrap_sum,
            "<= 1.15",
            wrap / wrap_sum <= 1.15,
        ),
        (
            "open / sum of its primitives",
            open / open_sum,
            "<= 1.15",
            open / open_sum <= 1.15,
        ),
        (
            "x-wing crate encapsulate / wrap",
            peer_enc / wrap,
            ">= 2.0",
            peer_enc / wrap >= 2.0,
        ),
        (
            "x-wing crate decapsulate / open",
            peer_dec / open,
            ">= 3.0",
            peer_dec / open >= 3.0,
        ),
        (
            "1,000-recipient wrap: 1 thread / all cores",
            t1 / tn,
            ">= 1.8",
            t1 / tn >= 1.8,
        ),
        (
            "ring AES-256-GCM 1 MiB / message seal 1 MiB",
            ring_1m / seal_1m,
            ">= 0.9",
            ring_1m / seal_1m >= 0.9,
        ),
    ];
    println!("\n== keyhold crypto core: ratios from this run's medians ==");
    println!(
        "wrap {:.1} us = {:.2} x (ML-KEM enc {:.1} + X25519 keygen {:.1} + DH {:.1} + SHA3 {:.2} + GCM {:.2} = {:.1} us)",
        us(wrap), wrap / wrap_sum, us(enc), us(kg), us(dh), us(sha3), us(gcm_seal), us(wrap_sum)
    );
    println!(
        "open {:.1} us = {:.2} x (ML-KEM dec {:.1} + DH {:.1} + SHA3 {:.2} + GCM {:.2} = {:.1} us)",
        us(open),
        open / open_sum,
        us(dec),
        us(dh),
        us(sha3),
        us(gcm_open),
        us(open_sum)
    );
    println!(
        "x-wing crate: encapsulate {:.1} us, decapsulate {:.1} us; 1,000 recipients: {:.1} ms on 1 thread, {:.1} ms on {} threads",
        us(peer_enc),
        us(peer_dec),
        t1 / 1e6,
        tn / 1e6,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("{:<48} {:>8} {:>9}  met", "ratio", "value", "target");
    for (name, value, target, met) in rows {
        println!(
            "{name:<48} {value:>8.2} {target:>9}  {}",
            if met { "yes" } else { "NO" }
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    primitives(&mut c);
    peer_xwing(&mut c);
    core(&mut c);
    c.final_summary();
    // `cargo test --benches` runs each routine once without measuring: no ratios then.
    if std::env::args().any(|a| a == "--bench") {
        report();
    }
}
