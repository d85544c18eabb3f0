//! Compiles proto/defuse.proto with protox (pure Rust): no protoc needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/defuse.proto");
    let fds = protox::compile(["proto/defuse.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
