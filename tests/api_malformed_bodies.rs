//! Request bodies that are not protobuf, sent to every RPC through a raw gRPC channel, on
//! SQLite and PostgreSQL: each answers INVALID_ARGUMENT to a caller who may call the method
//! and PERMISSION_DENIED to one who may not, whatever the body — never INTERNAL — and nothing
//! is written.
//!
//! The bodies: invalid UTF-8 in the request's first string field (for the requests that have
//! one; a request without a string field has nothing to hold it), wire type 7 (which does not
//! exist), a varint cut off in the middle, and random bytes (which may happen to decode as a
//! message: the call must then still refuse it as bad input, naming a field).

mod common;

use common::raw::RawCodec;
use common::raw_db::RawDb;
use common::server::TestServer;
use keyhold::auth::Role;
use keyhold::proto::keyhold::v1 as pb;
use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::FileDescriptorSet;
use tonic::{Code, Status};

/// A method of the API: its path, whether it streams its answer, and the number of its
/// request's first string field, if the request has one.
struct Method {
    path: String,
    streaming: bool,
    string_field: Option<i32>,
}

fn methods() -> Vec<Method> {
    let set = FileDescriptorSet::decode(keyhold::proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let messages: Vec<_> = set
        .file
        .iter()
        .flat_map(|f| f.message_type.iter().map(move |m| (f.package(), m)))
        .collect();
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                let input = method.input_type().trim_start_matches('.');
                let (_, message) = messages
                    .iter()
                    .find(|(package, m)| format!("{package}.{}", m.name()) == input)
                    .expect("input type is in the set");
                let string_field = message
                    .field
                    .iter()
                    .find(|f| f.r#type() == Type::String)
                    .map(|f| f.number());
                out.push(Method {
                    path: format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    streaming: method.server_streaming(),
                    string_field,
                });
            }
        }
    }
    out
}

/// The malformed bodies for `method`, each with its name.
fn bodies(method: &Method) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = vec![
        // Field 1, wire type 7.
        ("wire type 7", vec![0x0f, 0x01, 0x02]),
        // Field 1 as a varint whose continuation bit never ends.
        ("truncated varint", vec![0x08, 0xff, 0xff, 0xff]),
        // Fixed "random" bytes (from a seeded generator, so a failure can be replayed).
        ("random bytes", random_bytes(64)),
    ];
    if let Some(n) = method.string_field {
        let tag = u8::try_from((n << 3) | 2).expect("a small field number");
        out.push(("invalid UTF-8", vec![tag, 0x03, 0xff, 0xfe, 0xc3]));
    }
    out
}

fn random_bytes(len: usize) -> Vec<u8> {
    // xorshift64*, seeded: deterministic, and not a valid message of any request here.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// Sends `body` to `path` with `token` and returns the call's status (OK for an answer).
async fn call(endpoint: &str, token: &str, method: &Method, body: Vec<u8>) -> Status {
    let channel = tonic::transport::Channel::from_shared(endpoint.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let path = method.path.parse().expect("path");
    if method.streaming {
        match grpc.server_streaming(request, path, RawCodec).await {
            Err(status) => status,
            Ok(response) => match response.into_inner().message().await {
                Err(status) => status,
                Ok(_) => Status::ok("the stream answered"),
            },
        }
    } else {
        match grpc.unary(request, path, RawCodec).await {
            Err(status) => status,
            Ok(_) => Status::ok("answered"),
        }
    }
}

async fn malformed_bodies_are_invalid_argument_or_denied(server: &TestServer) {
    let tokens = [
        (Role::App, server.token(pb::Role::App, "", "").await),
        (
            Role::Device,
            server.token(pb::Role::Device, "alice", "phone").await,
        ),
        (Role::Staff, server.token(pb::Role::Staff, "", "").await),
        (Role::Admin, server.admin_token.clone()),
    ];
    let roles = keyhold::server::rpc_roles();
    let mut raw = RawDb::open(&server.db).await;
    let before = raw.fingerprint().await;
    let methods = methods();
    assert!(
        methods.len() > 30,
        "every method of the API: {}",
        methods.len()
    );
    let mut calls = 0;
    for method in &methods {
        let allowed = roles
            .roles(&method.path)
            .expect("every method has its roles");
        for (name, body) in bodies(method) {
            for (role, token) in &tokens {
                let status = call(&server.endpoint, token, method, body.clone()).await;
                let want = if allowed.contains(role) {
                    Code::InvalidArgument
                } else {
                    Code::PermissionDenied
                };
                assert_eq!(
                    status.code(),
                    want,
                    "{} with {name} as {role:?}: {}",
                    method.path,
                    status.message()
                );
                calls += 1;
            }
        }
    }
    assert!(calls > 400, "{calls} calls");
    assert_eq!(
        raw.fingerprint().await,
        before,
        "a malformed body wrote something"
    );
}

on_both_servers! {
    every_rpc_refuses_malformed_bodies => malformed_bodies_are_invalid_argument_or_denied;
}
