//! GetUserKeys over TLS against plaintext, in the same run, with 32 concurrent callers, on
//! SQLite and PostgreSQL.
//!
//! Run: `cargo bench --bench tls` (PostgreSQL too when `KEYHOLD_TEST_DATABASE_URL` names a
//! server the bench may create a database on; it drops it afterwards). A fixed load on
//! loopback, about a minute; it stops by itself.
//!
//! For each backend it opens one store and starts two Keyhold servers on it in this process:
//! one plaintext, one over TLS (a P-256 certificate from a CA made for the run, TLS 1.3 with
//! aws-lc-rs, as a deployment would have). 32 callers, each with a connection of its own to
//! each server, look up one user's keys per call (authentication plus one indexed SELECT);
//! the transports take turns, round by round, so that the machine's load falls on both alike.
//!
//! It prints, per transport: calls, p50 and p99 latency, throughput, and CPU time per call
//! (the whole process, so both ends of each call: client and server), then the ratios of TLS
//! to plaintext. The machine is shared, so compare ratios of one run, not absolute times.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhold::auth::Role;
use keyhold::client::{Client, ClientTls};
use keyhold::config::Limits;
use keyhold::keyfiles;
use keyhold::proto::keyhold::v1 as pb;
use keyhold::server::Transport;
use keyhold::service::{issue_token, TokenRequest};
use keyhold::store::Store;
use keyhold::tls::{ServerTls, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use tokio::sync::oneshot;

/// Concurrent callers.
const CALLERS: usize = 32;
/// Calls per caller in one round.
const CALLS_PER_ROUND: usize = 125;
/// Rounds per transport, taken in turns.
const ROUNDS: usize = 4;

use common::BoxError;

/// What one transport measured over all its rounds.
#[derive(Default)]
struct Measured {
    latencies: Vec<Duration>,
    wall: Duration,
    cpu: Duration,
}

impl Measured {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted.get(i).copied().unwrap_or_default()
    }

    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    fn cpu_per_call(&self) -> Duration {
        self.cpu / self.latencies.len().max(1) as u32
    }
}

/// CPU time this process has used (all threads, user and system), from `/proc/self/stat`.
fn process_cpu(ticks_per_second: u64) -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses: state is field 3, utime 14,
    // stime 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / ticks_per_second as f64)
}

fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// A CA, a server certificate for 127.0.0.1 written to `dir`, and the CA's PEM.
fn make_certificates(dir: &std::path::Path) -> Result<(TlsFiles, String), BoxError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    std::fs::create_dir_all(dir)?;
    let (cert_file, key_file) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_file, cert.pem())?;
    std::fs::write(&key_file, key.serialize_pem())?;
    Ok((
        TlsFiles {
            cert_file,
            key_file,
            client_ca_file: None,
        },
        ca.pem(),
    ))
}

struct Server {
    endpoint: String,
    shutdown: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
}

async fn start_server(
    store: &Store,
    key_dir: &std::path::Path,
    tls: Option<ServerTls>,
) -> Result<Server, BoxError> {
    let (keys, _) = keyfiles::load_or_generate(key_dir, None, None)?;
    let state = keyhold::server::app_state(store.clone(), keys, 1000, Limits::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = format!("{scheme}://{}", listener.local_addr()?);
    let transport = match tls {
        Some(tls) => Transport::Tls(listener, tls),
        None => Transport::Plaintext(listener),
    };
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        let stopped = keyhold::server::serve(transport, state, async {
            let _ = rx.await;
        })
        .await;
        if let Err(e) = stopped {
            eprintln!("server failed: {e}");
        }
    });
    Ok(Server {
        endpoint,
        shutdown: tx,
        handle,
    })
}

/// Publishes a device key for `user` through the Admin and KeyDirectory services.
async fn enroll(endpoint: &str, admin: &Client, user: &str) -> Result<(), BoxError> {
    let token = common::phone_token(admin, user).await?;
    common::publish_phone_key(endpoint, &token, user).await?;
    Ok(())
}

/// One round: `CALLS_PER_ROUND` GetUserKeys calls on each of the callers' clients at once.
async fn round(
    clients: &Arc<Vec<Client>>,
    into: &mut Measured,
    ticks: u64,
) -> Result<(), BoxError> {
    let (start, cpu_start) = (Instant::now(), process_cpu(ticks));
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let clients = clients.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(CALLS_PER_ROUND);
            let mut directory = clients[caller].key_directory();
            for n in 0..CALLS_PER_ROUND {
                let t = Instant::now();
                let resp = directory
                    .get_user_keys(pb::GetUserKeysRequest {
                        user_ids: vec![format!("user{}", (caller + n) % CALLERS)],
                    })
                    .await?
                    .into_inner();
                if resp.users.first().map_or(0, |u| u.devices.len()) != 1 {
                    return Err::<_, BoxError>("expected one device".into());
                }
                latencies.push(t.elapsed());
            }
            Ok(latencies)
        });
    }
    while let Some(done) = tasks.join_next().await {
        into.latencies.extend(done??);
    }
    into.wall += start.elapsed();
    into.cpu += process_cpu(ticks).saturating_sub(cpu_start);
    Ok(())
}

struct Report {
    plain: Measured,
    tls: Measured,
    connect_plain: Duration,
    connect_tls: Duration,
}

async fn bench_backend(url: &str) -> Result<Report, BoxError> {
    let scratch = std::env::temp_dir().join(format!(
        "keyhold-bench-tls-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let key_dir: PathBuf = scratch.join("keys");
    let store = Store::open(url).await?;
    store.migrate().await?;
    let admin_token = issue_token(
        &store,
        "bench".into(),
        TokenRequest {
            role: Role::Admin,
            binding: None,
            label: None,
        },
    )
    .await?;
    let (files, ca_pem) = make_certificates(&scratch.join("tls"))?;
    let plain_server = start_server(&store, &key_dir, None).await?;
    let tls_server = start_server(&store, &key_dir, Some(ServerTls::load(files)?)).await?;

    let admin = Client::connect(&plain_server.endpoint, admin_token.expose_plaintext()).await?;
    for i in 0..CALLERS {
        enroll(&plain_server.endpoint, &admin, &format!("user{i}")).await?;
    }
    let mut app = admin
        .admin()
        .create_token(pb::CreateTokenRequest {
            role: pb::Role::App as i32,
            user_id: String::new(),
            device_id: String::new(),
            label: String::new(),
            idempotency_key: String::new(),
        })
        .await?
        .into_inner();
    let app_token = std::mem::take(&mut app.token);

    let client_tls = ClientTls {
        ca_pem: Some(ca_pem.into_bytes()),
        ..Default::default()
    };
    let connect_all = |endpoint: String, tls: ClientTls, token: String| async move {
        let start = Instant::now();
        let mut clients = Vec::with_capacity(CALLERS);
        for _ in 0..CALLERS {
            clients.push(Client::connect_with(&endpoint, &token, &tls).await?);
        }
        Ok::<_, BoxError>((Arc::new(clients), start.elapsed()))
    };
    let (plain_clients, connect_plain) = connect_all(
        plain_server.endpoint.clone(),
        ClientTls::default(),
        app_token.clone(),
    )
    .await?;
    let (tls_clients, connect_tls) =
        connect_all(tls_server.endpoint.clone(), client_tls, app_token).await?;

    let ticks = clock_ticks_per_second();
    let (mut plain, mut tls) = (Measured::default(), Measured::default());
    // One warm-up round each, not counted.
    round(&plain_clients, &mut Measured::default(), ticks).await?;
    round(&tls_clients, &mut Measured::default(), ticks).await?;
    for r in 0..ROUNDS {
        // Alternate which goes first, so neither always follows the other.
        if r % 2 == 0 {
            round(&plain_clients, &mut plain, ticks).await?;
            round(&tls_clients, &mut tls, ticks).await?;
        } else {
            round(&tls_clients, &mut tls, ticks).await?;
            round(&plain_clients, &mut plain, ticks).await?;
        }
    }

    for server in [plain_server, tls_server] {
        let _ = server.shutdown.send(());
        let _ = server.handle.await;
    }
    store.close();
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(Report {
        plain,
        tls,
        connect_plain,
        connect_tls,
    })
}

fn report(backend: &str, r: &Report) {
    println!("\n{backend}: GetUserKeys, {CALLERS} concurrent callers, {ROUNDS} rounds of {CALLS_PER_ROUND} calls each per transport");
    println!(
        "| {:<10} | {:>6} | {:>9} | {:>9} | {:>14} | {:>13} |",
        "transport", "calls", "p50", "p99", "throughput", "CPU per call"
    );
    println!(
        "|{:-<12}|{:->8}|{:->11}|{:->11}|{:->16}|{:->15}|",
        "", "", "", "", "", ""
    );
    for (name, m) in [("plaintext", &r.plain), ("TLS", &r.tls)] {
        println!(
            "| {:<10} | {:>6} | {:>7.2}ms | {:>7.2}ms | {:>10.0} /s | {:>10.1} us |",
            name,
            m.latencies.len(),
            m.percentile(0.5).as_secs_f64() * 1e3,
            m.percentile(0.99).as_secs_f64() * 1e3,
            m.per_second(),
            m.cpu_per_call().as_secs_f64() * 1e6,
        );
    }
    let throughput = r.tls.per_second() / r.plain.per_second();
    println!(
        "TLS / plaintext: throughput x{throughput:.2} (target >= 0.80: {}), p50 x{:.2}, p99 x{:.2}, CPU per call x{:.2}",
        if throughput >= 0.8 { "met" } else { "NOT met" },
        r.tls.percentile(0.5).as_secs_f64() / r.plain.percentile(0.5).as_secs_f64(),
        r.tls.percentile(0.99).as_secs_f64() / r.plain.percentile(0.99).as_secs_f64(),
        r.tls.cpu_per_call().as_secs_f64() / r.plain.cpu_per_call().as_secs_f64(),
    );
    println!(
        "connecting {CALLERS} clients one after another: plaintext {:.1} ms, TLS {:.1} ms (handshakes included)",
        r.connect_plain.as_secs_f64() * 1e3,
        r.connect_tls.as_secs_f64() * 1e3,
    );
}

async fn run() -> Result<(), BoxError> {
    common::each_backend(
        |url| async move { bench_backend(&url).await },
        |backend, r: &Report| report(backend, r),
    )
    .await
}

fn main() -> Result<(), BoxError> {
    common::main_with(run)
}
