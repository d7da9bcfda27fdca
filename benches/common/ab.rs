//! The harness of the A/B server benches (`limits`, `metrics`): the same GetUserKeys load
//! against `keyhold serve` processes that differ in one setting, in rounds that alternate
//! between them so that the machine's background load falls on all alike.
//!
//! Each variant is a process of its own on a database of its own (a PostgreSQL database when
//! `KEYHOLD_TEST_DATABASE_URL` names a server the bench may create databases on, dropped
//! afterwards; a SQLite file in a scratch directory otherwise). In each round 32 concurrent
//! callers (each with a connection of its own) make 250 GetUserKeys calls (authentication plus
//! one indexed SELECT of one user's one device key); a round records the throughput and the
//! server process's CPU time (user + system, from `/proc`) per call. [`compare`] prints the
//! medians over the rounds and returns them for the bench's ratios.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use keyhold::client::Client;
use keyhold::proto::keyhold::v1 as pb;

/// Concurrent callers.
pub const CALLERS: usize = 32;
/// Calls per caller in one round.
pub const CALLS_PER_CALLER: usize = 250;
/// Measured rounds per server (after one warm-up round each).
pub const ROUNDS: usize = 7;

pub use super::BoxError;

/// One way of running the server.
#[derive(Clone, Copy)]
pub struct Variant {
    pub name: &'static str,
    /// Extra `serve` flags.
    pub flags: &'static [&'static str],
    /// `KEYHOLD_LOG`.
    pub log: &'static str,
    /// Whether `--metrics-listen` is set.
    pub metrics: bool,
}

/// A variant's medians over the measured rounds.
#[derive(Clone, Copy)]
pub struct Medians {
    pub calls_per_second: f64,
    pub cpu_us_per_call: f64,
}

/// A database of the server's own: a PostgreSQL database (dropped at the end) or a SQLite
/// file in a scratch directory.
struct Database {
    url: String,
    admin_url: Option<String>,
    name: String,
}

impl Database {
    async fn create(bench: &str, dir: &Path) -> Result<Database, BoxError> {
        let name = format!("keyhold_bench_{bench}_{}", uuid::Uuid::now_v7().simple());
        match std::env::var("KEYHOLD_TEST_DATABASE_URL") {
            Ok(admin_url) if !admin_url.is_empty() => {
                let mut admin = AsyncPgConnection::establish(&admin_url).await?;
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await?;
                let (base, _) = admin_url.rsplit_once('/').ok_or("no database in the URL")?;
                Ok(Database {
                    url: format!("{base}/{name}"),
                    admin_url: Some(admin_url),
                    name,
                })
            }
            _ => Ok(Database {
                url: format!("sqlite://{}", dir.join("keyhold.db").display()),
                admin_url: None,
                name,
            }),
        }
    }

    async fn drop_it(&self) -> Result<(), BoxError> {
        if let Some(admin_url) = &self.admin_url {
            let mut admin = AsyncPgConnection::establish(admin_url).await?;
            admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await?;
        }
        Ok(())
    }
}

/// A `keyhold serve` process and what the load needs from it.
pub struct Server {
    pub variant: Variant,
    process: Child,
    endpoint: String,
    /// Where its Prometheus metrics are served, when the variant has them.
    pub metrics: Option<std::net::SocketAddr>,
    db: Database,
    dir: PathBuf,
    app_token: String,
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn keyhold(dir: &Path, db: &Database) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyhold"));
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYHOLD_") {
            c.env_remove(k);
        }
    }
    c.current_dir(dir)
        .env("KEYHOLD_DATABASE_URL", &db.url)
        .env("KEYHOLD_LOG", "warn");
    c
}

async fn wait_until_serving(endpoint: &str) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let check = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if check.is_ok_and(|r| {
                r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            }) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{endpoint} did not come up").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn create_token(dir: &Path, db: &Database, args: &[&str]) -> Result<String, BoxError> {
    let out = keyhold(dir, db)
        .args(["token", "create", "--role"])
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Server {
    async fn start(bench: &str, variant: Variant) -> Result<Server, BoxError> {
        let dir = std::env::temp_dir().join(format!(
            "keyhold-bench-{bench}-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let db = Database::create(bench, &dir).await?;
        let port = free_port()?;
        let metrics = match variant.metrics {
            true => Some(std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?))),
            false => None,
        };
        let mut serve = keyhold(&dir, &db);
        serve
            .env("KEYHOLD_LOG", variant.log)
            .args(["serve", "--migrate", "--dev"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(variant.flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(address) = metrics {
            serve.args(["--metrics-listen", &address.to_string()]);
        }
        let process = serve.spawn()?;
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_until_serving(&endpoint).await?;
        let app_token = create_token(&dir, &db, &["app"])?;
        let device_token = create_token(
            &dir,
            &db,
            &["device", "--user", "alice", "--device", "phone"],
        )?;
        super::publish_phone_key(&endpoint, &device_token, "alice").await?;
        Ok(Server {
            variant,
            process,
            endpoint,
            metrics,
            db,
            dir,
            app_token,
        })
    }

    /// The server process's CPU time so far (user + system).
    fn cpu_time(&self, clock_ticks: f64) -> Result<Duration, BoxError> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.process.id()))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let after = stat.rsplit_once(')').ok_or("malformed /proc stat")?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let ticks: f64 = fields.get(11).ok_or("no utime")?.parse::<f64>()?
            + fields.get(12).ok_or("no stime")?.parse::<f64>()?;
        Ok(Duration::from_secs_f64(ticks / clock_ticks))
    }

    pub async fn stop(mut self) -> Result<(), BoxError> {
        self.process.kill().ok();
        self.process.wait().ok();
        self.db.drop_it().await?;
        std::fs::remove_dir_all(&self.dir).ok();
        Ok(())
    }
}

/// One round's numbers.
struct Round {
    calls_per_second: f64,
    cpu_per_call: Duration,
    p50: Duration,
    p99: Duration,
}

/// One round of the load against `server` through `clients`.
async fn round(server: &Server, clients: &[Client], clock_ticks: f64) -> Result<Round, BoxError> {
    let cpu_before = server.cpu_time(clock_ticks)?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let client = client.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(CALLS_PER_CALLER);
            for _ in 0..CALLS_PER_CALLER {
                let t = Instant::now();
                let keys = client
                    .key_directory()
                    .get_user_keys(pb::GetUserKeysRequest {
                        user_ids: vec!["alice".into()],
                    })
                    .await?
                    .into_inner();
                if keys.users.first().map_or(0, |u| u.devices.len()) != 1 {
                    return Err::<_, BoxError>("GetUserKeys did not find alice's phone".into());
                }
                latencies.push(t.elapsed());
            }
            Ok(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(CALLERS * CALLS_PER_CALLER);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    let wall = started.elapsed();
    let cpu = server.cpu_time(clock_ticks)?.saturating_sub(cpu_before);
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let calls = latencies.len() as u32;
    Ok(Round {
        calls_per_second: f64::from(calls) / wall.as_secs_f64(),
        cpu_per_call: cpu / calls,
        p50: at(0.5),
        p99: at(0.99),
    })
}

fn median<T: Copy + PartialOrd>(values: &mut [T]) -> T {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    values[values.len() / 2]
}

/// Starts one server per variant, runs the alternating rounds, prints the table, and returns
/// the servers (still running, for the caller to inspect and [`Server::stop`]) with their
/// medians in the order of `variants`.
pub async fn compare(
    bench: &str,
    variants: &[Variant],
) -> Result<(Vec<Server>, Vec<Medians>), BoxError> {
    let clock_ticks: f64 =
        String::from_utf8(Command::new("getconf").arg("CLK_TCK").output()?.stdout)?
            .trim()
            .parse()?;
    let backend = match std::env::var("KEYHOLD_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => "PostgreSQL",
        _ => "SQLite",
    };
    let mut servers = Vec::new();
    for variant in variants {
        servers.push(Server::start(bench, *variant).await?);
    }
    let mut clients = Vec::new();
    for server in &servers {
        let mut mine = Vec::with_capacity(CALLERS);
        for _ in 0..CALLERS {
            mine.push(Client::connect(&server.endpoint, &server.app_token).await?);
        }
        clients.push(mine);
    }
    println!(
        "== GetUserKeys on {backend}, {CALLERS} callers x {CALLS_PER_CALLER} calls per round, {ROUNDS} rounds per server (after a warm-up) =="
    );
    let mut results: Vec<Vec<Round>> = servers.iter().map(|_| Vec::new()).collect();
    for r in 0..=ROUNDS {
        // Alternate the order too, so that no server always follows the same one.
        let order: Vec<usize> = if r % 2 == 0 {
            (0..servers.len()).collect()
        } else {
            (0..servers.len()).rev().collect()
        };
        for i in order {
            let measured = round(&servers[i], &clients[i], clock_ticks).await?;
            if r > 0 {
                results[i].push(measured);
            }
        }
    }
    println!(
        "{:<26} {:>10} {:>14} {:>9} {:>9}",
        "server", "calls/s", "CPU us/call", "p50 ms", "p99 ms"
    );
    let mut summary = Vec::new();
    for (server, rounds) in servers.iter().zip(&results) {
        let mut rate: Vec<f64> = rounds.iter().map(|r| r.calls_per_second).collect();
        let mut cpu: Vec<f64> = rounds
            .iter()
            .map(|r| r.cpu_per_call.as_secs_f64() * 1e6)
            .collect();
        let mut p50: Vec<f64> = rounds.iter().map(|r| r.p50.as_secs_f64() * 1e3).collect();
        let mut p99: Vec<f64> = rounds.iter().map(|r| r.p99.as_secs_f64() * 1e3).collect();
        let (rate, cpu) = (median(&mut rate), median(&mut cpu));
        println!(
            "{:<26} {:>10.0} {:>14.1} {:>9.2} {:>9.2}",
            server.variant.name,
            rate,
            cpu,
            median(&mut p50),
            median(&mut p99)
        );
        summary.push(Medians {
            calls_per_second: rate,
            cpu_us_per_call: cpu,
        });
    }
    Ok((servers, summary))
}
