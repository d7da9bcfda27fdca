//! The `keyhold.v1` gRPC API, generated from `proto/keyhold/v1/*.proto` by `build.rs`.
//!
//! [`keyhold::v1`] holds the messages and enums, plus for each service a `*_server` module
//! (the trait a service implements and the tonic server around it) and a `*_client` module:
//! `key_directory_server`, `sessions_server`, `escrow_server`, `admin_server` and their
//! `*_client` twins. The `.proto` files are the API's reference: each message, field and call
//! is documented there (roles, units, limits), and those comments are the docs of the
//! generated items; the crate's `deny(missing_docs)` turns a missing one into a build error.
//!
//! [`FILE_DESCRIPTOR_SET`] is the encoded descriptor set of the API, for server reflection.
//!
//! Generated types are the wire form only: services parse them into the domain types of
//! [`crate::crypto`] before doing anything with them.

use std::fmt;

/// The generated code, by protobuf package.
pub mod keyhold {
    /// Package `keyhold.v1`.
    //
    // `missing_docs` stays denied here on purpose: prost and tonic document every item they
    // generate from the `.proto` comments, so a message, field, enum value or rpc left
    // without a comment fails the build.
    #[allow(
        clippy::all,
        clippy::pedantic,
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "generated code: we do not control its shape"
    )]
    pub mod v1 {
        tonic::include_proto!("keyhold.v1");
    }
}

/// The encoded `google.protobuf.FileDescriptorSet` of every `keyhold.v1` file, with source
/// comments, for `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keyhold_descriptor.bin"));

/// A request the service deduplicates by its `idempotency_key` field (see `common.proto`,
/// "Idempotency keys"): every call that creates or consumes something. The Rust client sets a
/// fresh key on such a request when it has none and keeps it for its own retries
/// ([`crate::client::Client::retrying`]).
pub trait IdempotentRequest {
    /// The request's idempotency key; empty for none.
    fn idempotency_key(&self) -> &str;
    /// Sets the request's idempotency key.
    fn set_idempotency_key(&mut self, key: String);
}

macro_rules! idempotent_requests {
    ($($request:ident),+ $(,)?) => {$(
        impl IdempotentRequest for keyhold::v1::$request {
            fn idempotency_key(&self) -> &str {
                &self.idempotency_key
            }

            fn set_idempotency_key(&mut self, key: String) {
                self.idempotency_key = key;
            }
        }
    )+};
}

idempotent_requests!(
    CreateSessionRequest,
    AddRecipientsRequest,
    RemoveRecipientsRequest,
    RotateSessionRequest,
    ClaimPrekeysRequest,
    SendKeyPackagesRequest,
    CreateTokenRequest,
);

// `build.rs` skips the derived `Debug` of messages that carry a plaintext secret; these print
// everything else and only the secret's presence.

impl fmt::Debug for keyhold::v1::CreateSessionResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateSessionResponse")
            .field("session_id", &self.session_id)
            .field("epoch", &self.epoch)
            .field("session_keys", &self.session_keys)
            .field(
                "plaintext_dek",
                &self.plaintext_dek.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl fmt::Debug for keyhold::v1::CreateTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateTokenResponse")
            .field("token", &"<redacted>")
            .field("token_id", &self.token_id)
            .finish()
    }
}

impl fmt::Debug for keyhold::v1::GetRatchetStateResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetRatchetStateResponse")
            .field(
                "state",
                &format_args!("<{} bytes redacted>", self.state.len()),
            )
            .field("version", &self.version)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

impl fmt::Debug for keyhold::v1::PutRatchetStateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutRatchetStateRequest")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("conversation_id", &self.conversation_id)
            .field("expected_version", &self.expected_version)
            .field(
                "state",
                &format_args!("<{} bytes redacted>", self.state.len()),
            )
            .finish()
    }
}

// The same messages wipe their secret when dropped: after tonic has encoded a response, the
// message is dropped and the DEK or token bytes it held are zeroized. (The encoded copy lives
// in the transport's send buffer until written; that buffer is not ours to wipe.)

impl Drop for keyhold::v1::CreateSessionResponse {
    fn drop(&mut self) {
        if let Some(dek) = self.plaintext_dek.as_mut() {
            zeroize::Zeroize::zeroize(dek);
        }
    }
}

impl Drop for keyhold::v1::GetRatchetStateResponse {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.state);
    }
}

impl Drop for keyhold::v1::PutRatchetStateRequest {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.state);
    }
}

impl Drop for keyhold::v1::CreateTokenResponse {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::keyhold::v1 as pb;
    use super::*;

    // Just enough of `google/protobuf/descriptor.proto` to read service and method names;
    // prost skips the fields left out.
    #[derive(Clone, PartialEq, prost::Message)]
    struct FileDescriptorSet {
        #[prost(message, repeated, tag = "1")]
        file: Vec<FileDescriptorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct FileDescriptorProto {
        #[prost(string, optional, tag = "1")]
        name: Option<String>,
        #[prost(string, optional, tag = "2")]
        package: Option<String>,
        #[prost(message, repeated, tag = "6")]
        service: Vec<ServiceDescriptorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct ServiceDescriptorProto {
        #[prost(string, optional, tag = "1")]
        name: Option<String>,
        #[prost(message, repeated, tag = "2")]
        method: Vec<MethodDescriptorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct MethodDescriptorProto {
        #[prost(string, optional, tag = "1")]
        name: Option<String>,
    }

    /// Every `package.Service/Method` in the descriptor set.
    fn methods() -> Vec<String> {
        let set = <FileDescriptorSet as prost::Message>::decode(FILE_DESCRIPTOR_SET).unwrap();
        let mut out = Vec::new();
        for file in &set.file {
            assert_eq!(file.package(), "keyhold.v1", "{:?}", file.name);
            for service in &file.service {
                for method in &service.method {
                    out.push(format!(
                        "{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        out
    }

    #[test]
    #[cfg(feature = "server")]
    fn every_method_and_only_those_has_the_roles_that_may_call_it() {
        let mut want: Vec<String> = methods().into_iter().map(|m| format!("/{m}")).collect();
        want.sort();
        let roles = crate::server::rpc_roles();
        let mut got: Vec<String> = roles.paths().map(str::to_owned).collect();
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn descriptor_set_decodes_with_every_service_and_call() {
        let mut got = methods();
        got.sort();
        let mut want = [
            "keyhold.v1.Admin/CreateToken",
            "keyhold.v1.Admin/RevokeToken",
            "keyhold.v1.DeviceSync/AckKeyPackages",
            "keyhold.v1.DeviceSync/FetchKeyPackages",
            "keyhold.v1.DeviceSync/SendKeyPackages",
            "keyhold.v1.DeviceSync/WatchKeyPackages",
            "keyhold.v1.Escrow/GetEscrowedKeys",
            "keyhold.v1.Escrow/ListAuditEvents",
            "keyhold.v1.Escrow/VerifyAuditLog",
            "keyhold.v1.KeyDirectory/GetEscrowKey",
            "keyhold.v1.KeyDirectory/GetUserKeys",
            "keyhold.v1.KeyDirectory/PublishDeviceKey",
            "keyhold.v1.KeyDirectory/RevokeDeviceKey",
            "keyhold.v1.Messages/DeleteMessage",
            "keyhold.v1.Messages/ListAuthorMessages",
            "keyhold.v1.Messages/ListSessionMessages",
            "keyhold.v1.Messages/PutMessages",
            "keyhold.v1.Messages/Timeline",
            "keyhold.v1.KeyDirectory/UploadPrekeys",
            "keyhold.v1.KeyDirectory/ClaimPrekeys",
            "keyhold.v1.KeyDirectory/CountPrekeys",
            "keyhold.v1.KeyDirectory/WatchPrekeyStock",
            "keyhold.v1.Ratchet/DeleteRatchetState",
            "keyhold.v1.Ratchet/GetRatchetState",
            "keyhold.v1.Ratchet/PutRatchetState",
            "keyhold.v1.Sessions/AddRecipients",
            "keyhold.v1.Sessions/CreateSession",
            "keyhold.v1.Sessions/DeleteSession",
            "keyhold.v1.Sessions/GetSessionKeys",
            "keyhold.v1.Sessions/RemoveRecipients",
            "keyhold.v1.Sessions/RotateSession",
            "keyhold.v1.Sessions/SyncSessionKeys",
            "keyhold.v1.Trust/AddTrustedUser",
            "keyhold.v1.Trust/ListTrustedUsers",
            "keyhold.v1.Trust/RemoveTrustedUser",
        ];
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    #[cfg(feature = "server")]
    fn reflection_accepts_the_descriptor_set() {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .build_v1()
            .unwrap();
    }

    #[test]
    fn debug_of_secret_bearing_responses_prints_no_secret() {
        let created = pb::CreateSessionResponse {
            session_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
            epoch: 1,
            session_keys: Vec::new(),
            plaintext_dek: Some(vec![0xAB; 32]),
        };
        let shown = format!("{created:?}");
        assert!(shown.contains("01890a5d-ac96-774b-bcce-b302099a8057"));
        assert!(shown.contains("redacted"));
        assert!(!shown.contains("171"), "{shown}"); // 0xAB as Debug prints it

        let token = pb::CreateTokenResponse {
            token: "kh_secret_token_value".into(),
            token_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
        };
        let shown = format!("{token:?}");
        assert!(!shown.contains("kh_secret_token_value"), "{shown}");
        assert!(shown.contains("01890a5d-ac96-774b-bcce-b302099a8057"));

        let state = vec![0xAB; 40];
        let got = pb::GetRatchetStateResponse {
            state: state.clone(),
            version: 7,
            updated_at: 1,
        };
        let put = pb::PutRatchetStateRequest {
            user_id: "alice".into(),
            device_id: "phone".into(),
            conversation_id: "conv-1".into(),
            expected_version: 6,
            state,
        };
        for shown in [format!("{got:?}"), format!("{put:?}")] {
            assert!(shown.contains("<40 bytes redacted>"), "{shown}");
            assert!(!shown.contains("171"), "{shown}");
        }
        assert!(format!("{put:?}").contains("conv-1"));
    }

    #[test]
    fn enum_numbers_match_the_crypto_suite_byte() {
        assert_eq!(
            pb::Suite::XwingAes256gcmV1 as i32,
            crate::crypto::Suite::XWingAes256GcmV1 as i32
        );
    }
}
