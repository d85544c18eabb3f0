//! Compiles proto/defuse.proto with protox (pure Rust): no protoc needed. The encoded
//! descriptor set is kept too, for the coordinator's gRPC reflection service.
use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/defuse.proto");
    let fds = protox::compile(["proto/defuse.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("defuse_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
