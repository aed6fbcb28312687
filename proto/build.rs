//! Generates the Rust code of `hsev/v1/*.proto` with protoc (installed by
//! `make deps`; `PROTOC` overrides its path).

fn main() -> std::io::Result<()> {
    let protos = ["hsev/v1/attestation.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    prost_build::compile_protos(&protos, &["."])
}
