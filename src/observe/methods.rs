//! The gRPC methods this server answers, read once from the compiled-in descriptor sets, so
//! that per-call metrics and logs name a method only from a fixed list: a caller who sends
//! requests to made-up paths cannot grow the number of metric series.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;

/// The label every path outside the known list gets.
pub(crate) const UNKNOWN: &str = "unknown";

/// One gRPC method, named as its path names it.
#[derive(Debug)]
pub(crate) struct Method {
    /// `package.Service/Method`, the path without its leading `/`.
    pub(crate) full: Box<str>,
    /// `package.Service`.
    pub(crate) service: Box<str>,
    /// `Method`.
    pub(crate) method: Box<str>,
    /// Whether the call streams requests or responses (the Watch calls, reflection): a
    /// stream lives long, so no default deadline applies to it (`server::limits`).
    pub(crate) streams: bool,
}

/// The label values of a call's path: the known method's names, or [`UNKNOWN`] twice.
pub(crate) struct CallName {
    /// `package.Service`, or [`UNKNOWN`].
    pub(crate) service: &'static str,
    /// `Method`, or [`UNKNOWN`].
    pub(crate) method: &'static str,
    /// What the call's log line names: `package.Service/Method`, or the path as sent (cut at
    /// [`MAX_LOGGED_PATH`] bytes) for a path outside the list.
    pub(crate) logged: Cow<'static, str>,
}

/// Longest unknown path written to a log line, in bytes.
pub(crate) const MAX_LOGGED_PATH: usize = 128;

/// The encoded descriptor sets of every service the server registers.
fn descriptor_sets() -> [&'static [u8]; 4] {
    [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
}

/// The few fields of `google.protobuf.FileDescriptorSet` the table needs; prost skips the rest.
mod descriptor {
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct FileDescriptorSet {
        #[prost(message, repeated, tag = "1")]
        pub(super) file: Vec<FileDescriptorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct FileDescriptorProto {
        #[prost(string, optional, tag = "2")]
        pub(super) package: Option<String>,
        #[prost(message, repeated, tag = "6")]
        pub(super) service: Vec<ServiceDescriptorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ServiceDescriptorProto {
        #[prost(string, optional, tag = "1")]
        pub(super) name: Option<String>,
        #[prost(message, repeated, tag = "2")]
        pub(super) method: Vec<MethodDescriptorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct MethodDescriptorProto {
        #[prost(string, optional, tag = "1")]
        pub(super) name: Option<String>,
        #[prost(bool, optional, tag = "5")]
        pub(super) client_streaming: Option<bool>,
        #[prost(bool, optional, tag = "6")]
        pub(super) server_streaming: Option<bool>,
    }
}

fn build_table() -> HashMap<Box<str>, Method> {
    let mut table = HashMap::new();
    for encoded in descriptor_sets() {
        let set = match <descriptor::FileDescriptorSet as prost::Message>::decode(encoded) {
            Ok(set) => set,
            Err(e) => {
                // Compiled in, so this is a build defect; the calls are then labelled unknown.
                tracing::error!(error = %e, "cannot read a compiled-in descriptor set");
                continue;
            }
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = match package.as_str() {
                    "" => service.name.unwrap_or_default(),
                    p => format!("{p}.{}", service.name.unwrap_or_default()),
                };
                for method in service.method {
                    let streams = method.client_streaming.unwrap_or(false)
                        || method.server_streaming.unwrap_or(false);
                    let method = method.name.unwrap_or_default();
                    let full: Box<str> = format!("{service_name}/{method}").into();
                    table.insert(
                        full.clone(),
                        Method {
                            full,
                            service: service_name.clone().into(),
                            method: method.into(),
                            streams,
                        },
                    );
                }
            }
        }
    }
    table
}

/// Every method the server answers, by `package.Service/Method`.
pub(crate) fn table() -> &'static HashMap<Box<str>, Method> {
    static TABLE: OnceLock<HashMap<Box<str>, Method>> = OnceLock::new();
    TABLE.get_or_init(build_table)
}

/// The names of the call to `path` (`/package.Service/Method`).
pub(crate) fn name_of(path: &str) -> CallName {
    let key = path.strip_prefix('/').unwrap_or(path);
    match table().get(key) {
        Some(m) => CallName {
            service: &m.service,
            method: &m.method,
            logged: Cow::Borrowed(&m.full),
        },
        None => {
            let mut end = path.len().min(MAX_LOGGED_PATH);
            while !path.is_char_boundary(end) {
                end -= 1;
            }
            CallName {
                service: UNKNOWN,
                method: UNKNOWN,
                logged: Cow::Owned(path[..end].to_string()),
            }
        }
    }
}

/// The name the gRPC specification gives a status code (`OK`, `INVALID_ARGUMENT`, ...): the
/// `code` label and log field.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_paths_are_named_and_others_are_unknown() {
        let n = name_of("/keyhold.v1.KeyDirectory/GetUserKeys");
        assert_eq!(
            (n.service, n.method),
            ("keyhold.v1.KeyDirectory", "GetUserKeys")
        );
        assert_eq!(n.logged, "keyhold.v1.KeyDirectory/GetUserKeys");
        let n = name_of("/grpc.health.v1.Health/Check");
        assert_eq!((n.service, n.method), ("grpc.health.v1.Health", "Check"));
        let n = name_of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo");
        assert_eq!(n.method, "ServerReflectionInfo");
        let n = name_of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo");
        assert_eq!(n.service, "grpc.reflection.v1alpha.ServerReflection");

        let n = name_of("/keyhold.v1.KeyDirectory/NoSuchCall");
        assert_eq!((n.service, n.method), (UNKNOWN, UNKNOWN));
        assert_eq!(n.logged, "/keyhold.v1.KeyDirectory/NoSuchCall");
        let long = format!("/{}é", "x".repeat(MAX_LOGGED_PATH - 2));
        assert!(name_of(&long).logged.len() <= MAX_LOGGED_PATH);
    }

    #[test]
    fn streaming_methods_are_marked() {
        let streams = |path: &str| table().get(path).map(|m| m.streams);
        assert_eq!(
            streams("keyhold.v1.DeviceSync/WatchKeyPackages"),
            Some(true)
        );
        assert_eq!(
            streams("keyhold.v1.KeyDirectory/WatchPrekeyStock"),
            Some(true)
        );
        assert_eq!(streams("grpc.health.v1.Health/Watch"), Some(true));
        assert_eq!(
            streams("grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some(true)
        );
        assert_eq!(
            streams("keyhold.v1.DeviceSync/SendKeyPackages"),
            Some(false)
        );
        assert_eq!(streams("grpc.health.v1.Health/Check"), Some(false));
    }

    #[test]
    fn every_keyhold_service_has_its_methods() {
        for service in [
            "KeyDirectory",
            "Sessions",
            "Messages",
            "Trust",
            "Escrow",
            "Ratchet",
            "DeviceSync",
            "Admin",
        ] {
            let prefix = format!("keyhold.v1.{service}/");
            assert!(table().keys().any(|k| k.starts_with(&prefix)), "{service}");
        }
    }

    #[test]
    fn code_names_follow_the_grpc_specification() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
    }
}
