//! core's build script: the rpath every libtorch crate records (deploy/rpath.rs), and
//! the C++ shim that freezes TorchScript modules (cxx/frozen.cpp), compiled against
//! the libtorch tch links.
#[path = "../deploy/rpath.rs"]
mod rpath;

fn main() {
    rpath::main();
    println!("cargo:rerun-if-changed=cxx/frozen.cpp");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        panic!("LIBTORCH is not set: run deploy/setup.sh and `. ./env.sh` (see the README)");
    };
    let root = std::path::Path::new(&libtorch);
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("cxx/frozen.cpp")
        .compile("defuse_frozen");
    // the shim's symbols live in libtorch_cpu (torch-sys links it too; say so here so
    // the order on the link line is right)
    println!(
        "cargo:rustc-link-search=native={}",
        root.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
