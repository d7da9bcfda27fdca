//! gRPC over TLS through a real tonic client: TLS and mutual TLS calls succeed; a client
//! without a certificate (when one is required), with a certificate from another CA, trusting
//! another CA, expecting another server name, or speaking plaintext fails; a reload puts new
//! certificates in force for new handshakes, and a bad new certificate keeps the old one.

mod common;

use keyhold::client::{Client, ClientTls};
use keyhold::proto::keyhold::v1 as pb;
use keyhold::tls::{ServerTls, TlsFiles};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use zeroize::Zeroizing;

use common::pki::{Leaf, PemDir, TestCa};
use common::server::TestServer;

/// A server CA, a client CA, their PEM files, and a server over TLS using them.
struct Setup {
    server_ca: TestCa,
    client_ca: TestCa,
    dir: PemDir,
    tls: ServerTls,
    server: TestServer,
}

async fn setup(mutual: bool) -> Setup {
    let server_ca = TestCa::new("keyhold test server CA");
    let client_ca = TestCa::new("keyhold test client CA");
    let dir = PemDir::new();
    let leaf = server_ca.server(&["localhost", "127.0.0.1"]);
    let files = TlsFiles {
        cert_file: dir.write("server.pem", &leaf.cert_pem),
        key_file: dir.write("server.key", &leaf.key_pem),
        client_ca_file: mutual.then(|| dir.write("clients.pem", &client_ca.pem())),
    };
    let tls = ServerTls::load(files).expect("load the server's TLS files");
    let server = TestServer::start_tls(common::sqlite_db(), tls.clone()).await;
    assert!(server.endpoint.starts_with("https://127.0.0.1:"));
    Setup {
        server_ca,
        client_ca,
        dir,
        tls,
        server,
    }
}

fn trusting(ca: &TestCa) -> ClientTls {
    ClientTls {
        ca_pem: Some(ca.pem().into_bytes()),
        ..Default::default()
    }
}

fn with_identity(mut tls: ClientTls, leaf: &Leaf) -> ClientTls {
    tls.identity = Some((
        leaf.cert_pem.clone().into_bytes(),
        Zeroizing::new(leaf.key_pem.clone().into_bytes()),
    ));
    tls
}

/// A health check and an authenticated call (the admin creates an app token, the app looks a
/// user up), all over `tls`.
async fn calls_succeed(server: &TestServer, tls: &ClientTls) {
    let admin = Client::connect_with(&server.endpoint, &server.admin_token, tls)
        .await
        .expect("connect over TLS");
    let health = HealthClient::new(admin.channel())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health over TLS")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    let mut created = admin
        .admin()
        .create_token(pb::CreateTokenRequest {
            role: pb::Role::App as i32,
            user_id: String::new(),
            device_id: String::new(),
            label: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .expect("create a token over TLS")
        .into_inner();
    let app = admin
        .with_token(&std::mem::take(&mut created.token))
        .unwrap();
    let keys = app
        .key_directory()
        .get_user_keys(pb::GetUserKeysRequest {
            user_ids: vec!["alice".into()],
        })
        .await
        .expect("GetUserKeys over TLS")
        .into_inner();
    assert_eq!(keys.users.len(), 1);
}

/// Connecting or the first call fails; returns what the client saw. (With TLS 1.3 the server
/// refuses a client certificate after the client's side of the handshake is done, so the
/// refusal may surface at the first call rather than at connect.)
async fn calls_fail(server: &TestServer, tls: &ClientTls) -> String {
    match Client::connect_with(&server.endpoint, &server.admin_token, tls).await {
        Err(e) => format!("{e:?}"),
        Ok(client) => match HealthClient::new(client.channel())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Err(status) => format!("{status:?}"),
            Ok(_) => panic!("the call succeeded over {tls:?}"),
        },
    }
}

#[tokio::test]
async fn a_tls_call_succeeds_and_wrong_trust_or_name_fails() {
    let s = setup(false).await;
    calls_succeed(&s.server, &trusting(&s.server_ca)).await;
    // The name in the certificate is also fine when asked for explicitly.
    let by_name = ClientTls {
        server_name: Some("localhost".into()),
        ..trusting(&s.server_ca)
    };
    calls_succeed(&s.server, &by_name).await;

    let err = calls_fail(&s.server, &trusting(&TestCa::new("a stranger's CA"))).await;
    assert!(err.contains("UnknownIssuer"), "{err}");
    let other_name = ClientTls {
        server_name: Some("keyhold.other.example".into()),
        ..trusting(&s.server_ca)
    };
    let err = calls_fail(&s.server, &other_name).await;
    assert!(err.contains("NotValidForName"), "{err}");
    // A plaintext client gets nothing from a TLS port.
    let plain = s.server.endpoint.replace("https://", "http://");
    match Client::connect(&plain, &s.server.admin_token).await {
        Err(_) => {}
        Ok(client) => assert!(HealthClient::new(client.channel())
            .check(HealthCheckRequest {
                service: String::new()
            })
            .await
            .is_err()),
    }
    // TLS options with an http:// endpoint are refused, not ignored.
    let err = Client::connect_with(&plain, "t", &trusting(&s.server_ca))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("https://"), "{err}");
    s.server.stop().await;
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_client_ca() {
    let s = setup(true).await;
    let good = with_identity(trusting(&s.server_ca), &s.client_ca.client("app-server-1"));
    calls_succeed(&s.server, &good).await;

    let err = calls_fail(&s.server, &trusting(&s.server_ca)).await;
    assert!(err.contains("CertificateRequired"), "{err}");
    let stranger = TestCa::new("a stranger's client CA");
    let foreign = with_identity(trusting(&s.server_ca), &stranger.client("intruder"));
    let err = calls_fail(&s.server, &foreign).await;
    assert!(err.contains("UnknownCA"), "{err}");
    // A server certificate of the right CA is no client certificate either.
    let wrong_usage = with_identity(
        trusting(&s.server_ca),
        &s.client_ca.server(&["app-server-1"]),
    );
    let err = calls_fail(&s.server, &wrong_usage).await;
    assert!(err.contains("UnsupportedCertificate"), "{err}");

    // The server keeps serving good clients after the refusals.
    calls_succeed(&s.server, &good).await;
    s.server.stop().await;
}

#[tokio::test]
async fn a_reload_serves_new_certificates_and_a_bad_one_keeps_the_old() {
    let s = setup(true).await;
    let client_cert = s.client_ca.client("app-server-1");
    let old_trust = with_identity(trusting(&s.server_ca), &client_cert);
    calls_succeed(&s.server, &old_trust).await;

    // A bad new certificate (not PEM) and a key that is not the certificate's: refused, and
    // the old configuration keeps serving.
    s.dir
        .write("server.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n");
    assert!(s.tls.reload().is_err());
    calls_succeed(&s.server, &old_trust).await;
    let unmatched = s.server_ca.server(&["127.0.0.1"]);
    s.dir.write("server.pem", &unmatched.cert_pem);
    assert!(s.tls.reload().is_err());
    calls_succeed(&s.server, &old_trust).await;

    // Rotation: a server certificate from a new CA, and a new client CA.
    let new_server_ca = TestCa::new("rotated server CA");
    let new_client_ca = TestCa::new("rotated client CA");
    let leaf = new_server_ca.server(&["127.0.0.1"]);
    s.dir.write("server.pem", &leaf.cert_pem);
    s.dir.write("server.key", &leaf.key_pem);
    s.dir.write("clients.pem", &new_client_ca.pem());
    s.tls.reload().expect("reload the rotated files");

    let new_trust = with_identity(
        trusting(&new_server_ca),
        &new_client_ca.client("app-server-1"),
    );
    calls_succeed(&s.server, &new_trust).await;
    // New handshakes no longer see the old certificate, nor accept the old client CA.
    let err = calls_fail(&s.server, &old_trust).await;
    assert!(err.contains("UnknownIssuer"), "{err}");
    let old_client_new_trust = with_identity(trusting(&new_server_ca), &client_cert);
    let err = calls_fail(&s.server, &old_client_new_trust).await;
    assert!(err.contains("UnknownCA"), "{err}");
    s.server.stop().await;
}
