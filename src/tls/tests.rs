//! Unit tests of the TLS module: settings, loading, reloading, and the accept loop against a
//! real rustls client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

use super::*;
use crate::config::SettingsArgs;

// The test PKI the integration tests use too (its items are `pub` for them).
#[allow(unreachable_pub)]
#[path = "../../tests/common/pki.rs"]
mod pki;

use pki::{PemDir, TestCa};

fn settings(listen: &str, extra: impl FnOnce(&mut SettingsArgs)) -> Settings {
    let mut args = SettingsArgs {
        listen: Some(listen.into()),
        ..Default::default()
    };
    extra(&mut args);
    args.resolve().expect("settings")
}

#[test]
fn loopback_plaintext_is_the_default() {
    assert_eq!(
        listen_mode(&SettingsArgs::default().resolve().unwrap()).unwrap(),
        ListenMode::Plaintext
    );
    assert_eq!(
        listen_mode(&settings("[::1]:50051", |_| {})).unwrap(),
        ListenMode::Plaintext
    );
}

#[test]
fn plaintext_off_loopback_is_refused_unless_insecure_plaintext() {
    for addr in ["0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051"] {
        let err = listen_mode(&settings(addr, |_| {}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--insecure-plaintext"), "{err}");
        assert!(err.contains("--tls-cert-file"), "{err}");
        let allowed = settings(addr, |a| a.insecure_plaintext = Some("true".into()));
        assert_eq!(listen_mode(&allowed).unwrap(), ListenMode::Plaintext);
    }
}

#[test]
fn tls_needs_both_files_and_client_ca_needs_tls() {
    let cert_only = settings("0.0.0.0:1", |a| a.tls_cert_file = Some("c.pem".into()));
    assert!(listen_mode(&cert_only)
        .unwrap_err()
        .to_string()
        .contains("--tls-key-file"));
    let key_only = settings("0.0.0.0:1", |a| a.tls_key_file = Some("k.pem".into()));
    assert!(listen_mode(&key_only)
        .unwrap_err()
        .to_string()
        .contains("--tls-cert-file"));
    let ca_only = settings("127.0.0.1:1", |a| {
        a.tls_client_ca_file = Some("ca.pem".into())
    });
    assert!(listen_mode(&ca_only)
        .unwrap_err()
        .to_string()
        .contains("--tls-client-ca-file needs"));
    let both = settings("0.0.0.0:1", |a| {
        a.tls_cert_file = Some("c.pem".into());
        a.tls_key_file = Some("k.pem".into());
        a.tls_client_ca_file = Some("ca.pem".into());
    });
    assert_eq!(
        listen_mode(&both).unwrap(),
        ListenMode::Tls(TlsFiles {
            cert_file: "c.pem".into(),
            key_file: "k.pem".into(),
            client_ca_file: Some("ca.pem".into()),
        })
    );
    let contradictory = settings("0.0.0.0:1", |a| {
        a.tls_cert_file = Some("c.pem".into());
        a.tls_key_file = Some("k.pem".into());
        a.insecure_plaintext = Some("true".into());
    });
    assert!(listen_mode(&contradictory).is_err());
}

/// A CA, a server certificate for localhost/127.0.0.1 written to a directory, and the files.
struct Fixture {
    ca: TestCa,
    dir: PemDir,
    files: TlsFiles,
}

fn fixture() -> Fixture {
    let ca = TestCa::new("keyhold test CA");
    let dir = PemDir::new();
    let leaf = ca.server(&["localhost", "127.0.0.1"]);
    let files = TlsFiles {
        cert_file: dir.write("server.pem", &leaf.cert_pem),
        key_file: dir.write("server.key", &leaf.key_pem),
        client_ca_file: None,
    };
    Fixture { ca, dir, files }
}

#[test]
fn load_sets_alpn_h2_and_refuses_bad_files() {
    let f = fixture();
    let tls = ServerTls::load(f.files.clone()).expect("load");
    assert_eq!(tls.current().alpn_protocols, vec![b"h2".to_vec()]);

    let missing = TlsFiles {
        cert_file: f.dir.file("absent.pem"),
        ..f.files.clone()
    };
    let err = ServerTls::load(missing).unwrap_err();
    assert!(
        matches!(err, TlsError::Read { .. }) && err.to_string().contains("absent.pem"),
        "{err}"
    );

    let not_pem = TlsFiles {
        cert_file: f.dir.write("junk.pem", "not a certificate"),
        ..f.files.clone()
    };
    let err = ServerTls::load(not_pem).unwrap_err().to_string();
    assert!(
        err.contains("junk.pem") && err.contains("CERTIFICATE"),
        "{err}"
    );

    let other_key = f.ca.server(&["localhost"]).key_pem;
    let mismatched = TlsFiles {
        key_file: f.dir.write("other.key", &other_key),
        ..f.files.clone()
    };
    let err = ServerTls::load(mismatched).unwrap_err();
    assert!(matches!(err, TlsError::Config { .. }), "{err}");

    let no_key = TlsFiles {
        key_file: f.dir.write("nokey.key", &f.ca.pem()),
        ..f.files.clone()
    };
    let err = ServerTls::load(no_key).unwrap_err().to_string();
    assert!(err.contains("PRIVATE KEY"), "{err}");
}

#[test]
fn reload_if_changed_acts_once_per_change_and_keeps_the_old_config_on_failure() {
    let f = fixture();
    let tls = ServerTls::load(f.files.clone()).expect("load");
    let first = tls.current();
    assert_eq!(tls.reload_if_changed().unwrap(), ReloadOutcome::Unchanged);
    assert!(Arc::ptr_eq(&first, &tls.current()));

    // A certificate whose key has not been written yet: refused once, the old one stays.
    let next = f.ca.server(&["localhost", "127.0.0.1"]);
    f.dir.write("server.pem", &next.cert_pem);
    assert!(tls.reload_if_changed().is_err());
    assert!(Arc::ptr_eq(&first, &tls.current()));
    assert_eq!(tls.reload_if_changed().unwrap(), ReloadOutcome::Unchanged);
    assert!(Arc::ptr_eq(&first, &tls.current()));

    // The key arrives: the pair is taken.
    f.dir.write("server.key", &next.key_pem);
    assert_eq!(tls.reload_if_changed().unwrap(), ReloadOutcome::Reloaded);
    let second = tls.current();
    assert!(!Arc::ptr_eq(&first, &second));

    // A file that vanishes is reported once and changes nothing.
    std::fs::remove_file(&f.files.key_file).unwrap();
    assert!(matches!(
        tls.reload_if_changed(),
        Err(TlsError::Read { .. })
    ));
    assert_eq!(tls.reload_if_changed().unwrap(), ReloadOutcome::Unchanged);
    assert!(tls.reload().is_err(), "an explicit reload reports it again");
    assert!(Arc::ptr_eq(&second, &tls.current()));
}

fn client_config(ca: &TestCa) -> Arc<rustls::ClientConfig> {
    let roots = parse_roots(ca.pem().as_bytes(), Path::new("ca.pem")).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

async fn handshake(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

#[tokio::test]
async fn a_failed_handshake_does_not_stop_the_accept_loop() {
    let f = fixture();
    let tls = ServerTls::load(f.files.clone()).expect("load");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = incoming(listener, tls);

    // Not TLS at all: the server answers with an alert or closes, and yields nothing.
    let mut junk = tokio::net::TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), junk.read_to_end(&mut buf)).await;

    // A client that trusts another CA gives up on the handshake.
    let stranger = TestCa::new("another CA");
    assert!(handshake(addr, client_config(&stranger)).await.is_err());

    // A proper client still gets through, with h2 negotiated and Nagle off.
    let (client, accepted) = tokio::join!(handshake(addr, client_config(&f.ca)), async {
        tokio::time::timeout(Duration::from_secs(10), incoming.next()).await
    });
    let client = client.expect("handshake");
    assert_eq!(client.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let server_side = accepted
        .expect("a connection within 10 s")
        .expect("stream open")
        .expect("accepted");
    assert!(server_side.get_ref().0.nodelay().unwrap());
}

#[tokio::test]
async fn new_handshakes_see_a_reloaded_certificate() {
    let f = fixture();
    let tls = ServerTls::load(f.files.clone()).expect("load");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = incoming(listener, tls.clone());
    let server = tokio::spawn(async move {
        // Keep the accepted sessions open so that the clients' handshakes complete.
        let mut open = Vec::new();
        while let Some(Ok(s)) = incoming.next().await {
            open.push(s);
        }
    });

    let peer_cert = |s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let before = handshake(addr, client_config(&f.ca)).await.unwrap();

    // Rotation to a certificate from a new CA: clients of the old CA now fail, new ones pass.
    let new_ca = TestCa::new("rotated CA");
    let next = new_ca.server(&["localhost"]);
    f.dir.write("server.pem", &next.cert_pem);
    f.dir.write("server.key", &next.key_pem);
    tls.reload().expect("reload");
    let after = handshake(addr, client_config(&new_ca)).await.unwrap();
    assert_ne!(peer_cert(&before), peer_cert(&after));
    assert!(handshake(addr, client_config(&f.ca)).await.is_err());
    server.abort();
}

#[tokio::test]
async fn watch_reloads_when_the_files_change() {
    let f = fixture();
    let tls = ServerTls::load(f.files.clone()).expect("load");
    let first = tls.current();
    let watcher = tls.watch(Some(Duration::from_millis(20)));
    let next = f.ca.server(&["localhost"]);
    f.dir.write("server.pem", &next.cert_pem);
    f.dir.write("server.key", &next.key_pem);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Arc::ptr_eq(&first, &tls.current()) {
        assert!(Instant::now() < deadline, "no reload within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    watcher.abort();
}
