//! What the benches share: running under `cargo bench` only, and running a bench on SQLite
//! and on PostgreSQL (when `KEYHOLD_TEST_DATABASE_URL` names a server the bench may create a
//! database on, dropped afterwards).

// Each bench that includes this module uses a part of it.
#![allow(dead_code)]

pub mod ab;

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use keyhold::client::Client;
use keyhold::crypto::ids::{DeviceId, UserId};
use keyhold::crypto::sign::{DeviceKeyBundle, IdentityKeyPair};
use keyhold::crypto::xwing::DecapsulationKey;
use keyhold::crypto::Suite;
use keyhold::proto::keyhold::v1 as pb;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs `run` on a multi-threaded runtime when the binary was started by `cargo bench`;
/// `cargo test --benches` runs bench binaries without `--bench`: nothing then.
pub fn main_with<F: std::future::Future<Output = Result<(), BoxError>>>(
    run: impl FnOnce() -> F,
) -> Result<(), BoxError> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    match query {
        Some(q) => format!("{scheme}://{authority}/{name}?{q}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

/// Runs `bench` on a fresh SQLite file, then on a fresh PostgreSQL database when
/// `KEYHOLD_TEST_DATABASE_URL` is set, and hands each result to `report` with the backend's
/// name.
pub async fn each_backend<R, Fut>(
    mut bench: impl FnMut(String) -> Fut,
    mut report: impl FnMut(&str, &R),
) -> Result<(), BoxError>
where
    Fut: std::future::Future<Output = Result<R, BoxError>>,
{
    let dir = std::env::temp_dir().join(format!("keyhold-bench-{}", uuid::Uuid::now_v7().simple()));
    let sqlite = bench(format!("sqlite://{}", dir.join("keyhold.db").display())).await;
    let _ = std::fs::remove_dir_all(&dir);
    report("SQLite", &sqlite?);

    match std::env::var("KEYHOLD_TEST_DATABASE_URL") {
        Ok(admin_url) if !admin_url.is_empty() => {
            let name = format!("keyhold_bench_{}", uuid::Uuid::now_v7().simple());
            let mut admin = AsyncPgConnection::establish(&admin_url).await?;
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await?;
            let result = bench(with_database(&admin_url, &name)).await;
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await?;
            report("PostgreSQL", &result?);
        }
        _ => println!("\nPostgreSQL: skipped (set KEYHOLD_TEST_DATABASE_URL)"),
    }
    Ok(())
}

/// A device token for `user`'s device `phone`, made through the Admin service.
pub async fn phone_token(admin: &Client, user: &str) -> Result<String, BoxError> {
    Ok(admin
        .admin()
        .create_token(pb::CreateTokenRequest {
            role: pb::Role::Device as i32,
            user_id: user.into(),
            device_id: "phone".into(),
            label: String::new(),
            idempotency_key: String::new(),
        })
        .await?
        .into_inner()
        .token
        .clone())
}

/// Publishes a fresh device key for `user`'s device `phone` with its device token; returns the
/// identity key pair it is signed with.
pub async fn publish_phone_key(
    endpoint: &str,
    token: &str,
    user: &str,
) -> Result<IdentityKeyPair, BoxError> {
    let identity = IdentityKeyPair::generate()?;
    let xwing = DecapsulationKey::generate()?;
    let bundle = DeviceKeyBundle {
        suite: Suite::XWingAes256GcmV1,
        user: UserId::new(user)?,
        device: DeviceId::new("phone")?,
        identity_key: identity.public_key(),
        encapsulation_key: xwing.encapsulation_key().clone(),
    };
    Client::connect(endpoint, token)
        .await?
        .key_directory()
        .publish_device_key(pb::PublishDeviceKeyRequest {
            user_id: user.into(),
            device_id: "phone".into(),
            suite: pb::Suite::XwingAes256gcmV1 as i32,
            encapsulation_key: xwing.encapsulation_key().to_bytes(),
            identity_key: identity.public_key().as_bytes().to_vec(),
            signature: identity.sign(&bundle).as_bytes().to_vec(),
        })
        .await?;
    Ok(identity)
}
