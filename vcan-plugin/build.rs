//! Generates the gRPC client and server code for the kubelet device-plugin,
//! kubelet pod-resources and CRI APIs from the `.proto` files under `proto/`.
//!
//! The protos are parsed by `protox` (pure Rust, so no `protoc` is needed)
//! and the resulting descriptor set is handed to `tonic-build`.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// Proto files to compile, relative to the `proto/` include root.
const PROTOS: &[&str] = &[
    "deviceplugin/v1beta1/api.proto",
    "podresources/v1/api.proto",
    "cri/v1/api.proto",
];

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR is not set")?,
    );
    let proto_dir = manifest_dir.join("proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    println!("cargo:rerun-if-changed=build.rs");

    let files: Vec<PathBuf> = PROTOS.iter().map(|p| proto_dir.join(p)).collect();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let fds = protox::compile(&files, [&proto_dir]).map_err(|e| {
        anyhow::anyhow!(
            "failed to parse the .proto files under {}: {e:?}",
            proto_dir.display()
        )
    })?;

    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .context("tonic-build failed to generate Rust code from the proto descriptors")?;
    Ok(())
}
