//! The `keyhold` command line as an operator and staff tooling use it: migrations, tokens,
//! escrow keys, serving with graceful shutdown, the PostgreSQL migration policy, and the staff
//! `escrow open` read.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cli::{free_port, keyhold, temp_dir, text, wait_until_serving};
use common::requests::service_wrapped_request;
use keyhold::client::Client;
use keyhold::proto::keyhold::v1 as pb;

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run keyhold")
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("keyhold.db").display())
}

#[test]
fn migrate_status_and_deploy_on_sqlite() {
    let dir = temp_dir();
    let url = sqlite_url(&dir);
    let status = run(keyhold().args(["migrate", "status", "--database-url", &url]));
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(
        text(&status.stdout).contains("pending"),
        "{}",
        text(&status.stdout)
    );
    let deploy = run(keyhold()
        .args(["migrate", "deploy"])
        .env("KEYHOLD_DATABASE_URL", &url));
    assert!(deploy.status.success(), "{}", text(&deploy.stderr));
    assert!(text(&deploy.stdout).contains("applied"));
    let status = run(keyhold().args(["migrate", "status", "--database-url", &url]));
    let out = text(&status.stdout);
    assert!(out.contains("applied") && !out.contains("pending"), "{out}");
    let again = run(keyhold().args(["migrate", "deploy", "--database-url", &url]));
    assert!(text(&again.stdout).contains("nothing to apply"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_setting_names_its_flag_and_variable() {
    let out = run(keyhold()
        .args(["migrate", "status"])
        .env("KEYHOLD_LISTEN", "nowhere"));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("KEYHOLD_LISTEN") && err.contains("--listen"),
        "{err}"
    );
}

#[test]
fn escrow_keygen_writes_a_private_file_only_its_owner_reads() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir();
    let (private, public) = (dir.join("escrow.key"), dir.join("escrow.pub"));
    let out = run(keyhold()
        .args(["escrow", "keygen", "--private-key"])
        .arg(&private)
        .arg("--public-key")
        .arg(&public));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::metadata(&private)
            .expect("private")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let printed = text(&out.stdout).trim().to_string();
    assert_eq!(printed.len(), 2 * 1216, "prints the public key in hex");
    assert_eq!(
        std::fs::read_to_string(&public).expect("public").trim(),
        printed
    );
    let private_hex = std::fs::read_to_string(&private)
        .expect("private")
        .trim()
        .to_string();
    assert!(!text(&out.stdout).contains(&private_hex) && !text(&out.stderr).contains(&private_hex));
    // It refuses to overwrite a private key.
    let again = run(keyhold()
        .args(["escrow", "keygen", "--private-key"])
        .arg(&private)
        .arg("--public-key")
        .arg(&public));
    assert!(!again.status.success());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn token_create_requires_a_binding_for_device_tokens_only() {
    let dir = temp_dir();
    let url = sqlite_url(&dir);
    let data = dir.join("data");
    let base = |c: &mut Command| {
        c.args(["--database-url", &url])
            .arg("--data-dir")
            .arg(&data);
    };
    let mut c = keyhold();
    base(&mut c);
    let out = run(c.args(["token", "create", "--role", "device"]));
    assert!(!out.status.success());
    let mut c = keyhold();
    base(&mut c);
    let out = run(c.args([
        "token", "create", "--role", "app", "--user", "a", "--device", "b",
    ]));
    assert!(!out.status.success());
    let mut c = keyhold();
    base(&mut c);
    let out = run(c.args([
        "token", "create", "--role", "device", "--user", "alice", "--device", "phone",
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).trim().starts_with("kh_"));
    std::fs::remove_dir_all(dir).ok();
}

/// `serve` on SQLite, a staff read through `keyhold escrow open`, and a clean exit on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_then_staff_opens_escrow_then_sigterm_stops_cleanly() {
    let dir = temp_dir();
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut server = keyhold()
        .current_dir(&dir)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    wait_until_serving(&endpoint).await;
    // Defaults: SQLite and the development keys in ./data.
    for f in [
        "data/keyhold.db",
        "data/dev-kek.key",
        "data/dev-escrow.key",
        "data/dev-escrow.pub",
    ] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let token = |role: &str| {
        let out = run(keyhold()
            .current_dir(&dir)
            .args(["token", "create", "--role", role]));
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let (app, staff) = (token("app"), token("staff"));

    // A device publishes a key; the app creates a session for its user.
    let device_token = {
        let out = run(keyhold().current_dir(&dir).args([
            "token", "create", "--role", "device", "--user", "alice", "--device", "phone",
        ]));
        text(&out.stdout).trim().to_string()
    };
    let device = common::server::TestDevice::new("alice", "phone", device_token.clone());
    Client::connect(&endpoint, &device_token)
        .await
        .expect("connect")
        .key_directory()
        .publish_device_key(device.publish_request())
        .await
        .expect("publish");
    let created = Client::connect(&endpoint, &app)
        .await
        .expect("connect")
        .sessions()
        .create_session(pb::CreateSessionRequest {
            return_plaintext_dek: true,
            ..service_wrapped_request("alice", &[])
        })
        .await
        .expect("create")
        .into_inner();
    let dek_hex = hex::encode(created.plaintext_dek.clone().expect("dek"));

    // Staff tooling: fetch the escrowed envelope with a reason and open it locally.
    let out = tokio::task::spawn_blocking({
        let dir = dir.clone();
        let endpoint = endpoint.clone();
        let session = created.session_id.clone();
        move || {
            run(keyhold()
                .current_dir(&dir)
                .args([
                    "escrow",
                    "open",
                    "--endpoint",
                    &endpoint,
                    "--session",
                    &session,
                ])
                .args([
                    "--reason",
                    "case 42",
                    "--private-key",
                    "data/dev-escrow.key",
                ])
                .env("KEYHOLD_TOKEN", &staff))
        }
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("epoch 1 dek {dek_hex}"));

    // SIGTERM: in-flight work finishes, the process exits 0.
    let pid = server.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = server.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let output = server.wait_with_output().expect("output");
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(stdout.contains("Bootstrap admin token"), "{stdout}");
    // The first start screened the stored keys (there were none yet) and recorded it.
    {
        use diesel::{Connection, RunQueryDsl};
        #[derive(diesel::QueryableByName)]
        struct Job {
            #[diesel(sql_type = diesel::sql_types::Text)]
            name: String,
        }
        let path = dir.join("data/keyhold.db");
        let mut db = diesel::SqliteConnection::establish(&path.to_string_lossy()).expect("open");
        let jobs: Vec<Job> = diesel::sql_query("SELECT name FROM maintenance_runs")
            .load(&mut db)
            .expect("maintenance runs");
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, [keyhold::key_screening::SCREENING_JOB]);
    }
    // Logs carry neither the tokens nor the DEK.
    for secret in [&app, &device_token, &dek_hex] {
        assert!(!stderr.contains(secret.as_str()));
    }
    std::fs::remove_dir_all(dir).ok();
}

/// On PostgreSQL `serve` refuses to start with pending migrations unless told `--migrate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgres_refuses_pending_migrations_without_flag() {
    let Some(db) = common::postgres_db().await else {
        return;
    };
    let dir = temp_dir();
    let out = tokio::task::spawn_blocking({
        let (dir, url) = (dir.clone(), db.url.clone());
        move || {
            run(keyhold().current_dir(&dir).args([
                "serve",
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                &url,
            ]))
        }
    })
    .await
    .expect("join");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("pending migration") && err.contains("--migrate"),
        "{err}"
    );

    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut server = keyhold()
        .current_dir(&dir)
        .args([
            "serve",
            "--migrate",
            "--dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--database-url",
            &db.url,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_until_serving(&endpoint).await;
    let status = run(keyhold().args(["migrate", "status", "--database-url", &db.url]));
    assert!(!text(&status.stdout).contains("pending"));
    server.kill().ok();
    server.wait().ok();
    std::fs::remove_dir_all(dir).ok();
}
