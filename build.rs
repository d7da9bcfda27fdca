//! Compiles the `keyhold.v1` gRPC API from `proto/` into Rust, without `protoc`.
//!
//! `protox` parses the `.proto` files into a `FileDescriptorSet` (with comments, so the
//! generated code carries the API's documentation); `tonic-prost-build` generates messages,
//! servers and clients from it. The encoded descriptor set is written beside the generated
//! code as `keyhold_descriptor.bin` for gRPC server reflection.

use std::{env, fs, path::PathBuf};

use protox::prost::Message as _;

/// Every file of the API, one per service plus the shared types.
const PROTOS: &[&str] = &[
    "proto/keyhold/v1/common.proto",
    "proto/keyhold/v1/key_directory.proto",
    "proto/keyhold/v1/sessions.proto",
    "proto/keyhold/v1/escrow.proto",
    "proto/keyhold/v1/admin.proto",
    "proto/keyhold/v1/messages.proto",
    "proto/keyhold/v1/trust.proto",
    "proto/keyhold/v1/ratchet.proto",
    "proto/keyhold/v1/device_sync.proto",
];

/// Messages that carry a plaintext secret (a DEK, a bearer token, a ratchet state): their
/// `Debug` is written by hand in `src/proto.rs` so that logging one never prints the secret.
const REDACTED_DEBUG: &[&str] = &[
    ".keyhold.v1.CreateSessionResponse",
    ".keyhold.v1.CreateTokenResponse",
    ".keyhold.v1.GetRatchetStateResponse",
    ".keyhold.v1.PutRatchetStateRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    // The store embeds the migrations: a new migration directory must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");

    let fds = protox::compile(PROTOS, ["proto"])?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("keyhold_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // prost's codec, with a body that does not decode as INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::ProtoCodec")
        .skip_debug(REDACTED_DEBUG.iter().copied())
        .compile_fds(fds)?;
    Ok(())
}
