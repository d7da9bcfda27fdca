//! Prekey claims and uploads over gRPC, with 32 concurrent callers, on SQLite and PostgreSQL.
//!
//! Run: `cargo bench --bench prekeys` (PostgreSQL too when `KEYHOLD_TEST_DATABASE_URL` names a
//! server the bench may create a database on; it drops it afterwards). A fixed load on
//! loopback only, about a minute; it stops by itself.
//!
//! For each backend it starts a Keyhold server in this process on a fresh database and
//! measures, each with 32 concurrent callers:
//!
//! - `upload`: UploadPrekeys calls of 100 signed one-time prekeys (64 devices x 10 calls, each
//!   caller uploading for two devices);
//! - `claim`: ClaimPrekeys calls of one device's prekey (32 claimers x 250 claims, spread over
//!   32 of the devices, every one a one-time prekey);
//! - `reference: GetUserKeys`: the reference in the same run, a lookup of one user's keys
//!   (authentication plus one indexed SELECT) over the same gRPC stack;
//! - `reference: store claim`: the same claims straight on the store, without gRPC, on the
//!   other 32 devices (so that neither claim phase runs over the rows the other deleted).
//!
//! It prints per-call p50 and p99 latency and throughput, then the ratios of claims to the
//! references. The machine is shared, so compare ratios of one run, not absolute times.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhold::auth::Role;
use keyhold::client::Client;
use keyhold::config::Limits;
use keyhold::crypto::ids::{DeviceId, UserId};
use keyhold::crypto::sign::{IdentityKeyPair, Prekey, PrekeyKind};
use keyhold::crypto::xwing::DecapsulationKey;
use keyhold::crypto::Suite;
use keyhold::keyfiles;
use keyhold::proto::keyhold::v1 as pb;
use keyhold::service::{issue_token, TokenRequest};
use keyhold::store::idempotency::Recorder;
use keyhold::store::prekeys::{ClaimRateLimit, ClaimTarget};
use keyhold::store::Store;
use tokio::sync::oneshot;

/// Concurrent callers in every phase.
const CALLERS: usize = 32;
/// Prekeys per UploadPrekeys call.
const PREKEYS_PER_UPLOAD: usize = 100;
/// Upload calls per device.
const UPLOADS_PER_DEVICE: usize = 10;
/// Claims per claimer, in each claim phase.
const CLAIMS_PER_CALLER: usize = 250;

use common::BoxError;

/// Latencies of one phase, and how long the whole phase took.
struct Phase {
    name: &'static str,
    unit: &'static str,
    items_per_call: usize,
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Phase {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted.get(i).copied().unwrap_or_default()
    }

    fn per_second(&self) -> f64 {
        (self.latencies.len() * self.items_per_call) as f64 / self.wall.as_secs_f64()
    }
}

/// Runs `calls_per_caller` calls of `call` on each of `CALLERS` tasks at once.
async fn run_phase<F, Fut>(
    name: &'static str,
    unit: &'static str,
    items_per_call: usize,
    calls_per_caller: usize,
    call: F,
) -> Result<Phase, BoxError>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let call = call.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(calls_per_caller);
            for n in 0..calls_per_caller {
                let t = Instant::now();
                call(caller, n).await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, BoxError>(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    Ok(Phase {
        name,
        unit,
        items_per_call,
        latencies,
        wall: start.elapsed(),
    })
}

/// A device of the bench: its identity key and its token.
struct Device {
    user: UserId,
    device: DeviceId,
    identity: IdentityKeyPair,
    token: String,
}

struct Server {
    endpoint: String,
    store: Store,
    shutdown: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
    key_dir: PathBuf,
}

async fn start_server(url: &str) -> Result<(Server, String), BoxError> {
    let key_dir = std::env::temp_dir().join(format!(
        "keyhold-bench-keys-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let (keys, _) = keyfiles::load_or_generate(&key_dir, None, None)?;
    let store = Store::open(url).await?;
    store.migrate().await?;
    let admin = issue_token(
        &store,
        "bench".into(),
        TokenRequest {
            role: Role::Admin,
            binding: None,
            label: None,
        },
    )
    .await?;
    let limits = Limits {
        prekey_claim_limit: u32::MAX,
        ..Limits::default()
    };
    let state = keyhold::server::app_state(store.clone(), keys, 1000, limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        let stopped = keyhold::server::serve(listener, state, async {
            let _ = rx.await;
        })
        .await;
        if let Err(e) = stopped {
            eprintln!("server failed: {e}");
        }
    });
    Ok((
        Server {
            endpoint,
            store,
            shutdown: tx,
            handle,
            key_dir,
        },
        admin.expose_plaintext().to_string(),
    ))
}

async fn enroll(server: &Server, admin: &Client, user: &str) -> Result<Device, BoxError> {
    let token = common::phone_token(admin, user).await?;
    let identity = common::publish_phone_key(&server.endpoint, &token, user).await?;
    Ok(Device {
        user: UserId::new(user)?,
        device: DeviceId::new("phone")?,
        identity,
        token,
    })
}

fn upload_batch(d: &Device) -> Result<pb::UploadPrekeysRequest, BoxError> {
    let mut one_time = Vec::with_capacity(PREKEYS_PER_UPLOAD);
    for _ in 0..PREKEYS_PER_UPLOAD {
        let key = DecapsulationKey::generate()?;
        let prekey = Prekey {
            suite: Suite::XWingAes256GcmV1,
            user: d.user.clone(),
            device: d.device.clone(),
            kind: PrekeyKind::OneTime,
            key: key.encapsulation_key().clone(),
        };
        one_time.push(pb::SignedPrekey {
            suite: pb::Suite::XwingAes256gcmV1 as i32,
            encapsulation_key: prekey.key.to_bytes(),
            signature: d.identity.sign(&prekey).as_bytes().to_vec(),
        });
    }
    Ok(pb::UploadPrekeysRequest {
        user_id: d.user.to_string(),
        device_id: d.device.to_string(),
        one_time_prekeys: one_time,
        last_resort_prekey: None,
    })
}

/// Every phase on one backend.
async fn bench_backend(url: &str) -> Result<Vec<Phase>, BoxError> {
    let (server, admin_token) = start_server(url).await?;
    let admin = Client::connect(&server.endpoint, &admin_token).await?;
    let mut targets = Vec::with_capacity(2 * CALLERS);
    for i in 0..2 * CALLERS {
        targets.push(enroll(&server, &admin, &format!("target{i}")).await?);
    }
    let mut claimers = Vec::with_capacity(CALLERS);
    for i in 0..CALLERS {
        claimers.push(enroll(&server, &admin, &format!("claimer{i}")).await?);
    }
    // Signed beforehand, so that the phase measures the service, not the client's keygen.
    let mut batches = Vec::with_capacity(2 * CALLERS);
    for d in &targets {
        let mut mine = Vec::with_capacity(UPLOADS_PER_DEVICE);
        for _ in 0..UPLOADS_PER_DEVICE {
            mine.push(upload_batch(d)?);
        }
        batches.push(mine);
    }
    let mut phases = Vec::new();

    let mut clients = Vec::with_capacity(CALLERS);
    for d in &targets {
        clients.push(Client::connect(&server.endpoint, &d.token).await?);
    }
    let batches = Arc::new(batches);
    let uploaders = Arc::new(clients);
    // Caller c uploads for devices c and c + 32, alternately.
    phases.push(
        run_phase(
            "upload",
            "prekeys",
            PREKEYS_PER_UPLOAD,
            2 * UPLOADS_PER_DEVICE,
            move |caller, n| {
                let (batches, uploaders) = (batches.clone(), uploaders.clone());
                async move {
                    let device = caller + (n % 2) * CALLERS;
                    uploaders[device]
                        .key_directory()
                        .upload_prekeys(batches[device][n / 2].clone())
                        .await?;
                    Ok(())
                }
            },
        )
        .await?,
    );

    let mut clients = Vec::with_capacity(CALLERS);
    for d in &claimers {
        clients.push(Client::connect(&server.endpoint, &d.token).await?);
    }
    let claimer_clients = Arc::new(clients);
    let target_refs: Arc<Vec<pb::DeviceRef>> = Arc::new(
        targets[..CALLERS]
            .iter()
            .map(|d| pb::DeviceRef {
                user_id: d.user.to_string(),
                device_id: d.device.to_string(),
            })
            .collect(),
    );
    {
        let (clients, refs) = (claimer_clients.clone(), target_refs.clone());
        phases.push(
            run_phase("claim", "claims", 1, CLAIMS_PER_CALLER, move |caller, n| {
                let (clients, refs) = (clients.clone(), refs.clone());
                async move {
                    let resp = clients[caller]
                        .key_directory()
                        .claim_prekeys(pb::ClaimPrekeysRequest {
                            devices: vec![refs[(caller + n) % CALLERS].clone()],
                            user_ids: Vec::new(),
                            idempotency_key: String::new(),
                        })
                        .await?
                        .into_inner();
                    match resp.prekeys.first() {
                        Some(p) if p.kind == pb::PrekeyKind::OneTime as i32 => Ok(()),
                        other => Err(format!("expected a one-time prekey, got {other:?}").into()),
                    }
                }
            })
            .await?,
        );
    }
    {
        let (clients, refs) = (claimer_clients.clone(), target_refs.clone());
        phases.push(
            run_phase(
                "reference: GetUserKeys",
                "lookups",
                1,
                CLAIMS_PER_CALLER,
                move |caller, n| {
                    let (clients, refs) = (clients.clone(), refs.clone());
                    async move {
                        let resp = clients[caller]
                            .key_directory()
                            .get_user_keys(pb::GetUserKeysRequest {
                                user_ids: vec![refs[(caller + n) % CALLERS].user_id.clone()],
                            })
                            .await?
                            .into_inner();
                        if resp.users.first().map_or(0, |u| u.devices.len()) != 1 {
                            return Err("expected one device".into());
                        }
                        Ok(())
                    }
                },
            )
            .await?,
        );
    }
    {
        let store = server.store.clone();
        let claim_targets: Arc<Vec<ClaimTarget>> = Arc::new(
            targets[CALLERS..]
                .iter()
                .map(|d| ClaimTarget {
                    user: d.user.clone(),
                    device: d.device.clone(),
                    identity_key: d.identity.public_key().as_bytes().to_vec(),
                })
                .collect(),
        );
        let claimer_names: Arc<Vec<String>> = Arc::new(
            claimers
                .iter()
                .map(|d| format!("device {} {}", d.user, d.device))
                .collect(),
        );
        let limit = ClaimRateLimit {
            claims: u32::MAX,
            window: Duration::from_secs(60),
        };
        phases.push(
            run_phase(
                "reference: store claim",
                "claims",
                1,
                CLAIMS_PER_CALLER,
                move |caller, n| {
                    let (store, targets, names) =
                        (store.clone(), claim_targets.clone(), claimer_names.clone());
                    async move {
                        let claimed = store
                            .claim_prekeys(
                                &names[caller],
                                std::slice::from_ref(&targets[(caller + n) % CALLERS]),
                                limit,
                                &Recorder::unkeyed(),
                            )
                            .await?;
                        match claimed.first() {
                            Some(Some(p)) if p.kind == PrekeyKind::OneTime => Ok(()),
                            other => {
                                Err(format!("expected a one-time prekey, got {other:?}").into())
                            }
                        }
                    }
                },
            )
            .await?,
        );
    }

    let _ = server.shutdown.send(());
    let _ = server.handle.await;
    server.store.close();
    let _ = std::fs::remove_dir_all(&server.key_dir);
    Ok(phases)
}

fn report(backend: &str, phases: &[Phase]) {
    println!("\n{backend}: {CALLERS} concurrent callers");
    println!(
        "| {:<24} | {:>7} | {:>10} | {:>10} | {:>20} |",
        "phase", "calls", "p50", "p99", "throughput"
    );
    println!(
        "|{:-<26}|{:->9}|{:->12}|{:->12}|{:->22}|",
        "", "", "", "", ""
    );
    for p in phases {
        let throughput = format!("{:.0} {}/s", p.per_second(), p.unit);
        println!(
            "| {:<24} | {:>7} | {:>8.2}ms | {:>8.2}ms | {:>20} |",
            p.name,
            p.latencies.len(),
            p.percentile(0.50).as_secs_f64() * 1e3,
            p.percentile(0.99).as_secs_f64() * 1e3,
            throughput,
        );
    }
    let find = |name: &str| phases.iter().find(|p| p.name == name);
    if let (Some(claim), Some(lookup), Some(raw)) = (
        find("claim"),
        find("reference: GetUserKeys"),
        find("reference: store claim"),
    ) {
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
        println!(
            "claim / GetUserKeys: p50 x{:.2}, p99 x{:.2}, throughput x{:.2}",
            ratio(claim.percentile(0.5), lookup.percentile(0.5)),
            ratio(claim.percentile(0.99), lookup.percentile(0.99)),
            claim.per_second() / lookup.per_second()
        );
        println!(
            "claim over gRPC / store claim: p50 x{:.2}, throughput x{:.2}",
            ratio(claim.percentile(0.5), raw.percentile(0.5)),
            claim.per_second() / raw.per_second()
        );
    }
}

async fn run() -> Result<(), BoxError> {
    common::each_backend(
        |url| async move { bench_backend(&url).await },
        |backend, r: &Vec<Phase>| report(backend, r),
    )
    .await
}

fn main() -> Result<(), BoxError> {
    common::main_with(run)
}
