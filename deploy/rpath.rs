//! Build script shared by every crate that links libtorch: it records libtorch's
//! library folder as an rpath, so binaries and tests start without LD_LIBRARY_PATH.
pub fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    // `--features cuda` (the CLI's): keep libtorch_cuda linked. The linker drops it as
    // unused by default (--as-needed), and then tch::Cuda::is_available() is false.
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
