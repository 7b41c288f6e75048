//! Compiles the gRPC contract in `proto/` into Rust, without `protoc`.
//!
//! `protox` parses every `.proto` file under `proto/courier/v1/` (the
//! well-known types such as `google/protobuf/timestamp.proto` ship with it),
//! then `tonic-prost-build` generates messages, servers and clients into
//! `OUT_DIR`, which `src/api/pb.rs` includes. The encoded descriptor set,
//! imports and comments included, is written to
//! `OUT_DIR/courier_descriptor.bin` for gRPC server reflection.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use prost::Message as _;

/// Include root: proto imports are relative to it (`courier/v1/common.proto`).
const PROTO_ROOT: &str = "proto";
/// Directory holding the files of package `courier.v1`.
const PROTO_PACKAGE_DIR: &str = "proto/courier/v1";
/// Name of the descriptor set in `OUT_DIR`; must match `src/api/pb.rs`.
const DESCRIPTOR_FILE_NAME: &str = "courier_descriptor.bin";

fn main() -> Result<(), Box<dyn Error>> {
    // A directory makes Cargo rerun this script when any file under it
    // changes, is added or is removed.
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    println!("cargo:rerun-if-changed=build.rs");

    let protos = proto_files(Path::new(PROTO_PACKAGE_DIR))?;
    let descriptors = protox::compile(&protos, [PROTO_ROOT])
        .map_err(|e| format!("compiling {PROTO_PACKAGE_DIR}/*.proto: {e:?}"))?;

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    fs::write(
        out_dir.join(DESCRIPTOR_FILE_NAME),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Payloads as `bytes::Bytes`: fanning a message out to many
        // subscriptions clones a reference count, not the payload.
        .bytes(".courier.v1")
        // Malformed input is the caller's fault: INVALID_ARGUMENT.
        .codec_path("crate::api::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}

/// The `.proto` files directly in `dir`, sorted so the output is stable.
fn proto_files(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(format!("no .proto files in {}", dir.display()).into());
    }
    files.sort();
    Ok(files)
}
