//! Generates the gRPC client and server code for the kubelet device-plugin,
//! kubelet pod-resources, CRI and containerd events and containers APIs from the `.proto` files under `proto/`.
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
    "containerd/services/events/v1/events.proto",
    "containerd/services/containers/v1/containers.proto",
    "containerd/events/task.proto",
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
    build_ebpf()?;
    Ok(())
}

// ─── eBPF counter program ───────────────────────────────────────────────────────────────────────
//
// The tc classifier in `vcan-ebpf/` is C (Rust BPF programs need nightly and bpf-linker, which
// this project cannot use; see vcan-ebpf/README.md). It is compiled here so that a plain
// `cargo build` produces a plugin with the program embedded (`src/ebpf/loader.rs` includes
// `$OUT_DIR/vcan_count.bpf.o`). `CLANG` overrides the compiler.

/// The C source, relative to the workspace root.
const EBPF_SOURCE: &str = "vcan-ebpf/src/vcan_count.bpf.c";
/// The compiled object, in `OUT_DIR`.
const EBPF_OBJECT: &str = "vcan_count.bpf.o";
/// What to tell a developer whose machine lacks the toolchain.
const EBPF_INSTALL_HINT: &str = "install it with `apt-get install clang-19 libbpf-dev` (or run \
     `cargo xtask setup`), or set CLANG to another clang (>= 14) with the BPF target";

fn build_ebpf() -> Result<()> {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR is not set")?,
    );
    let ebpf_dir = manifest_dir
        .parent()
        .context("vcan-plugin has no parent directory")?
        .join("vcan-ebpf");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("include").display()
    );
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang-19".to_string());
    // `-target bpf` has no libc: asm/types.h (pulled in by linux/types.h) lives in the host's
    // multiarch include directory, e.g. /usr/include/x86_64-linux-gnu.
    let host = std::env::var("HOST").unwrap_or_default();
    let arch = host.split('-').next().unwrap_or("x86_64");
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    if !PathBuf::from("/usr/include/bpf/bpf_helpers.h").exists() {
        println!(
            "cargo:warning=/usr/include/bpf/bpf_helpers.h not found: the eBPF program needs \
             libbpf's headers; {EBPF_INSTALL_HINT}"
        );
    }
    let object = out_dir.join(EBPF_OBJECT);
    let output = std::process::Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg("-I")
        .arg(ebpf_dir.join("include"))
        .arg("-I")
        .arg(&multiarch)
        .arg("-c")
        .arg(ebpf_dir.join("src").join("vcan_count.bpf.c"))
        .arg("-o")
        .arg(&object)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "`{clang}` was not found: vcan-plugin embeds an eBPF program written in C \
             ({EBPF_SOURCE}) that is compiled with clang-19; {EBPF_INSTALL_HINT}"
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot run `{clang}`")),
    };
    if !output.status.success() {
        anyhow::bail!(
            "`{clang}` failed to compile {EBPF_SOURCE} ({}):\n{}{}\nIf headers such as \
             bpf/bpf_helpers.h or asm/types.h are missing, {EBPF_INSTALL_HINT}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
