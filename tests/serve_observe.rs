//! `keyhold serve` as an operator runs it, for what it shows of itself: one log line per call
//! (text or `--log-format json`) with the method, code, latency, caller role and request id,
//! the request id returned to the caller, no colour codes on a pipe, no token in the logs;
//! and, on PostgreSQL, the refusal to start with development keys unless `--dev` is given.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::{free_port, keyhold, temp_dir, text, wait_until_serving};
use keyhold::client::Client;
use keyhold::proto::keyhold::v1 as pb;

/// `serve` on the SQLite default in `dir`, logging at `info` in `format`, stderr to a file.
fn spawn_serve(dir: &Path, port: u16, format: &str) -> Child {
    let stderr = std::fs::File::create(dir.join("stderr.log")).expect("stderr file");
    let stdout = std::fs::File::create(dir.join("stdout.log")).expect("stdout file");
    keyhold()
        .current_dir(dir)
        .env("KEYHOLD_LOG", "info")
        .args(["serve", "--log-format", format])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("spawn serve")
}

fn app_token(dir: &Path) -> String {
    let out = keyhold()
        .current_dir(dir)
        .args(["token", "create", "--role", "app"])
        .output()
        .expect("token create");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// A GetUserKeys call carrying `request_id`; returns the id the response carries.
async fn call_with_request_id(endpoint: &str, token: &str, request_id: &str) -> String {
    let mut request = tonic::Request::new(pb::GetUserKeysRequest {
        user_ids: vec!["alice".into()],
    });
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().expect("ascii"));
    let response = Client::connect(endpoint, token)
        .await
        .expect("connect")
        .key_directory()
        .get_user_keys(request)
        .await
        .expect("lookup");
    response
        .metadata()
        .get("x-request-id")
        .expect("x-request-id in the response")
        .to_str()
        .expect("ascii")
        .to_string()
}

/// Waits until the server's stderr has a line containing `needle`; returns that line.
async fn log_line_with(dir: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, then the exit status; fails if the server does not stop within 20 s.
fn stop(mut server: Child) {
    let pid = server.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status}");
            return;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Everything the process wrote, checked for colour codes and for the token.
fn assert_plain_and_secret_free(dir: &Path, token: &str) {
    for file in ["stderr.log", "stdout.log"] {
        let bytes = std::fs::read(dir.join(file)).expect("output");
        assert!(!bytes.contains(&0x1b), "{file} has an escape byte");
        assert!(!text(&bytes).contains(token), "{file} shows the token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_line_per_call_with_its_request_id() {
    let dir = temp_dir();
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let server = spawn_serve(&dir, port, "json");
    wait_until_serving(&endpoint).await;
    let token = app_token(&dir);
    let returned = call_with_request_id(&endpoint, &token, "cli-json-42").await;
    assert_eq!(returned, "cli-json-42");

    let line = log_line_with(&dir, "cli-json-42").await;
    let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON object");
    assert_eq!(event["target"], "keyhold::call", "{line}");
    assert_eq!(event["level"], "INFO", "{line}");
    assert_eq!(
        event["method"], "keyhold.v1.KeyDirectory/GetUserKeys",
        "{line}"
    );
    assert_eq!(event["code"], "OK", "{line}");
    assert_eq!(event["role"], "app", "{line}");
    assert_eq!(event["request_id"], "cli-json-42", "{line}");
    assert!(
        event["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{line}"
    );
    assert!(event["timestamp"].is_string(), "{line}");
    // One line per call: this call's id appears on exactly one call line.
    let log = std::fs::read_to_string(dir.join("stderr.log")).expect("log");
    let call_lines = log
        .lines()
        .filter(|l| l.contains("\"keyhold::call\"") && l.contains("cli-json-42"))
        .count();
    assert_eq!(call_lines, 1, "{log}");
    // Every line of the process is JSON.
    for l in log.lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
    stop(server);
    assert_plain_and_secret_free(&dir, &token);
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_file_have_no_colour_codes() {
    let dir = temp_dir();
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let server = spawn_serve(&dir, port, "text");
    wait_until_serving(&endpoint).await;
    let token = app_token(&dir);
    call_with_request_id(&endpoint, &token, "cli-text-7").await;
    let line = log_line_with(&dir, "request_id=\"cli-text-7\"").await;
    for field in [
        "method=keyhold.v1.KeyDirectory/GetUserKeys",
        "code=\"OK\"",
        "role=\"app\"",
        "latency_ms=",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
    stop(server);
    assert_plain_and_secret_free(&dir, &token);
    std::fs::remove_dir_all(dir).ok();
}

/// `serve` on PostgreSQL and what it said, run to completion (it fails before listening).
async fn serve_on_postgres(dir: &Path, args: &[&str]) -> std::process::Output {
    let (dir, args): (_, Vec<String>) = (
        dir.to_path_buf(),
        args.iter().map(|a| a.to_string()).collect(),
    );
    tokio::task::spawn_blocking(move || {
        keyhold()
            .current_dir(&dir)
            .arg("serve")
            .args(&args)
            .output()
            .expect("run serve")
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_development_keys_without_dev() {
    let Some(db) = common::postgres_db().await else {
        return;
    };
    let dir = temp_dir();
    let url = db.url.as_str();
    let base = [
        "--migrate",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        url,
    ];

    let out = serve_on_postgres(&dir, &base).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    for flag in ["--kek-file", "--escrow-public-key-file", "--dev"] {
        assert!(err.contains(flag), "{flag} in {err}");
    }
    // Refused before anything was done: no keys generated, no migration applied.
    assert!(!dir.join("data").exists());
    let status = keyhold()
        .args(["migrate", "status", "--database-url", url])
        .output()
        .expect("migrate status");
    assert!(
        !text(&status.stdout).contains("applied"),
        "{}",
        text(&status.stdout)
    );

    // Half the keys is still refused, naming the missing one only.
    let kek = dir.join("kek.key");
    std::fs::write(&kek, format!("3:{}\n", "ab".repeat(32))).expect("kek file");
    let kek_arg = kek.to_str().expect("utf-8 path");
    let mut with_kek = base.to_vec();
    with_kek.extend(["--kek-file", kek_arg]);
    let out = serve_on_postgres(&dir, &with_kek).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("--escrow-public-key-file"), "{err}");
    assert!(!err.contains("--kek-file"), "{err}");

    // With both files it serves, and generates nothing.
    let (private, public) = (dir.join("escrow.key"), dir.join("escrow.pub"));
    let keygen = keyhold()
        .args(["escrow", "keygen", "--private-key"])
        .arg(&private)
        .arg("--public-key")
        .arg(&public)
        .output()
        .expect("keygen");
    assert!(keygen.status.success(), "{}", text(&keygen.stderr));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = keyhold()
        .current_dir(&dir)
        .args([
            "serve",
            "--migrate",
            "--database-url",
            url,
            "--listen",
            &listen,
        ])
        .args(["--kek-file", kek_arg, "--escrow-public-key-file"])
        .arg(&public)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    wait_until_serving(&format!("http://{listen}")).await;
    assert!(!dir.join("data").exists(), "no development keys were made");
    server.kill().ok();
    server.wait().ok();

    // --dev allows the development keys, with their warnings.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = keyhold()
        .current_dir(&dir)
        .args(["serve", "--dev", "--database-url", url, "--listen", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_until_serving(&format!("http://{listen}")).await;
    assert!(dir.join("data/dev-kek.key").exists());
    server.kill().ok();
    let out = server.wait_with_output().expect("output");
    assert!(
        text(&out.stderr).contains("DEVELOPMENT KEK"),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(dir).ok();
}
