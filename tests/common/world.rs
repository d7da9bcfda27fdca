//! The people most end-to-end tests need, enrolled on a running server: alice (phone, laptop)
//! authors; bob (phone, laptop) and carol (phone) are the users she shares with or trusts;
//! erin (phone) is in nothing; an app server client drives sessions.

use keyhold::client::Client;
use keyhold::proto::keyhold::v1 as pb;

use super::requests::role_client;
use super::server::{TestDevice, TestServer};

/// The enrolled devices, each with its keys published and a device token, and an app client.
pub struct World {
    /// A client holding an app server token.
    pub app: Client,
    /// alice's phone.
    pub alice_phone: TestDevice,
    /// alice's laptop.
    pub alice_laptop: TestDevice,
    /// bob's phone.
    pub bob_phone: TestDevice,
    /// bob's laptop.
    pub bob_laptop: TestDevice,
    /// carol's phone.
    pub carol_phone: TestDevice,
    /// erin's phone.
    pub erin_phone: TestDevice,
}

impl World {
    /// Enrolls every device and makes the app client.
    pub async fn new(server: &TestServer) -> World {
        World {
            app: role_client(server, pb::Role::App).await,
            alice_phone: TestDevice::enroll(server, "alice", "phone").await,
            alice_laptop: TestDevice::enroll(server, "alice", "laptop").await,
            bob_phone: TestDevice::enroll(server, "bob", "phone").await,
            bob_laptop: TestDevice::enroll(server, "bob", "laptop").await,
            carol_phone: TestDevice::enroll(server, "carol", "phone").await,
            erin_phone: TestDevice::enroll(server, "erin", "phone").await,
        }
    }
}
