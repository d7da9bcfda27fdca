//! The `keyhold` binary with TLS, as an operator runs it: plaintext off loopback refused at
//! start, `serve` over mutual TLS, staff `escrow open` over it with `--ca-file` and a client
//! certificate, and certificates rotated with SIGHUP (a bad one refused and logged, the old
//! one kept).

mod common;

use common::requests::service_wrapped_request;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyhold::client::{Client, ClientTls};
use keyhold::proto::keyhold::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use zeroize::Zeroizing;

use common::cli::{free_port, keyhold_in, text};
use common::pki::{Leaf, PemDir, TestCa};

fn client_tls(ca: &TestCa, identity: &Leaf) -> ClientTls {
    ClientTls {
        ca_pem: Some(ca.pem().into_bytes()),
        identity: Some((
            identity.cert_pem.clone().into_bytes(),
            Zeroizing::new(identity.key_pem.clone().into_bytes()),
        )),
        server_name: None,
    }
}

/// Whether a health check over `tls` answers SERVING.
async fn serving(endpoint: &str, tls: &ClientTls) -> bool {
    let Ok(client) = Client::connect_with(endpoint, "unused", tls).await else {
        return false;
    };
    HealthClient::new(client.channel())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

/// Polls until `serving` answers `want`, for at most 30 s.
async fn wait_serving(endpoint: &str, tls: &ClientTls, want: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while serving(endpoint, tls).await != want {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until the log file holds `needle`, for at most 30 s.
async fn wait_logged(log: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not logged within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{name}");
}

#[test]
fn plaintext_on_a_public_address_is_refused_unless_insecure_plaintext() {
    let dir = PemDir::new();
    let out = keyhold_in(&dir.path)
        .args(["serve", "--listen", "0.0.0.0:0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("--insecure-plaintext") && stderr.contains("0.0.0.0:0"),
        "{stderr}"
    );
    // Nothing was created: the refusal comes before the database is opened.
    assert!(!dir.path.join("data").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_over_mutual_tls_escrow_open_and_rotate_with_sighup() {
    let work = PemDir::new();
    let dir: PathBuf = work.path.clone();
    let (server_ca, client_ca) = (TestCa::new("server CA"), TestCa::new("client CA"));
    let leaf = server_ca.server(&["localhost", "127.0.0.1"]);
    let cert = work.write("server.pem", &leaf.cert_pem);
    let key = work.write("server.key", &leaf.key_pem);
    let clients = work.write("clients.pem", &client_ca.pem());
    let staff_cert = client_ca.client("staff-tool");
    work.write("server-ca.pem", &server_ca.pem());
    work.write("staff.pem", &staff_cert.cert_pem);
    work.write("staff.key", &staff_cert.key_pem);
    let log = dir.join("serve.log");

    let port = free_port();
    let endpoint = format!("https://127.0.0.1:{port}");
    let mut server = keyhold_in(&dir)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-client-ca-file")
        .arg(&clients)
        // SIGHUP only: the rotation below is the signal's doing, not the poll's.
        .args(["--tls-reload-interval-secs", "0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn serve");
    let good = client_tls(&server_ca, &client_ca.client("app"));
    wait_serving(&endpoint, &good, true, "serve over TLS").await;
    let no_cert = ClientTls {
        identity: None,
        ..good.clone()
    };
    assert!(!serving(&endpoint, &no_cert).await, "no client certificate");

    // A device and a session, made over mutual TLS.
    let token = |args: &[&str]| {
        let out = keyhold_in(&dir)
            .args(["token", "create"])
            .args(args)
            .output()
            .expect("token create");
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let (app, staff) = (token(&["--role", "app"]), token(&["--role", "staff"]));
    let device_token = token(&["--role", "device", "--user", "alice", "--device", "phone"]);
    let device = common::server::TestDevice::new("alice", "phone", device_token.clone());
    Client::connect_with(&endpoint, &device_token, &good)
        .await
        .expect("connect")
        .key_directory()
        .publish_device_key(device.publish_request())
        .await
        .expect("publish");
    let created = Client::connect_with(&endpoint, &app, &good)
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

    // Staff tooling over mutual TLS: with its certificate it reads; without, it is refused.
    let escrow_open = |tls_args: &[&str]| {
        let mut cmd = keyhold_in(&dir);
        cmd.args(["escrow", "open", "--endpoint", &endpoint])
            .args(["--session", &created.session_id, "--reason", "case 42"])
            .args(["--private-key", "data/dev-escrow.key"])
            .args(tls_args)
            .env("KEYHOLD_TOKEN", &staff);
        cmd.output().expect("escrow open")
    };
    let tls_flags = [
        "--ca-file",
        "server-ca.pem",
        "--client-cert-file",
        "staff.pem",
        "--client-key-file",
        "staff.key",
    ];
    let out = escrow_open(&tls_flags);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("epoch 1 dek {dek_hex}"));
    let out = escrow_open(&tls_flags[..2]);
    assert!(
        !out.status.success(),
        "escrow open without a client certificate"
    );
    assert!(!text(&out.stdout).contains(&dek_hex));

    // A bad certificate and SIGHUP: refused and logged; the old one keeps serving.
    work.write("server.pem", "not a certificate");
    signal(&server, "HUP");
    wait_logged(&log, "TLS reload failed").await;
    assert!(
        serving(&endpoint, &good).await,
        "old certificate still served"
    );

    // A rotation to a new server CA and SIGHUP: new handshakes see it.
    let new_ca = TestCa::new("rotated server CA");
    let next = new_ca.server(&["127.0.0.1"]);
    work.write("server.key", &next.key_pem);
    work.write("server.pem", &next.cert_pem);
    signal(&server, "HUP");
    let rotated = client_tls(&new_ca, &client_ca.client("app"));
    wait_serving(&endpoint, &rotated, true, "the rotated certificate").await;
    assert!(
        !serving(&endpoint, &good).await,
        "the old CA no longer works"
    );

    signal(&server, "TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = server.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    let logged = std::fs::read_to_string(&log).expect("log");
    for secret in [&app, &staff, &device_token, &dek_hex] {
        assert!(!logged.contains(secret.as_str()));
    }
    assert!(!logged.contains("PRIVATE KEY"));
}
