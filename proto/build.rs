//! Generates the Rust code (messages, gRPC clients and servers) of
//! `hsev/v1/*.proto` (the public API) and `hsev/internal/v1/pool.proto`
//! (the pool's own protocol) with protoc (installed by `make deps`;
//! `PROTOC` overrides its path), and the file descriptor set of the public
//! API that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "hsev/v1/attestation.proto",
        "hsev/v1/vm.proto",
        "hsev/v1/host.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptor =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("hsev_v1_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptor)
        .compile_protos(&protos, &["."])?;
    let internal = "hsev/internal/v1/pool.proto";
    println!("cargo:rerun-if-changed={internal}");
    // A disk's chunks are decoded without a copy of their megabyte.
    tonic_prost_build::configure()
        .bytes(".hsev.internal.v1.FileChunk.data")
        .compile_protos(&[internal], &["."])?;
    Ok(())
}
