//! Running the `keyhold` binary the way an operator does, for tests that check the command
//! line itself (its flags, its exit status, what it writes to stdout and stderr).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `keyhold` with nothing from the caller's `KEYHOLD_*` environment, logging warnings only
/// unless the test asks for more.
pub fn keyhold() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyhold"));
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYHOLD_") {
            c.env_remove(k);
        }
    }
    c.env("KEYHOLD_LOG", "warn");
    c
}

/// [`keyhold`] run in `dir`.
pub fn keyhold_in(dir: &Path) -> Command {
    let mut c = keyhold();
    c.current_dir(dir);
    c
}

/// A new empty directory.
pub fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyhold-cli-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Bytes as text, lossily.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Waits until the server at `endpoint` says SERVING, or fails after 30 s.
pub async fn wait_until_serving(endpoint: &str) {
    wait_until_serving_within(endpoint, Duration::from_secs(30)).await
}

/// Waits until the server at `endpoint` says SERVING, or fails after `limit`.
pub async fn wait_until_serving_within(endpoint: &str, limit: Duration) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .expect("endpoint")
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            if let Ok(r) = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                if r.into_inner().status == ServingStatus::Serving as i32 {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
