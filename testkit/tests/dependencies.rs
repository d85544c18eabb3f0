//! Dependency hygiene, checked offline on every `make test`: crate versions with known
//! advisories, or that only a legacy feature pulls in, must not come back into
//! `Cargo.lock` through a default feature of a new dependency.
//!
//! This is not an advisory audit (`cargo deny check advisories` needs the RustSec
//! database from GitHub, which this project's machines cannot reach); it holds the line
//! on what an audit found once.

/// (crate, versions refused by prefix, why)
const REFUSED: &[(&str, &str, &str)] = &[
    (
        "hyper",
        "0.",
        "hyper 0.14 comes only with aws-sdk's legacy HTTPS client",
    ),
    (
        "rustls",
        "0.21",
        "rustls 0.21 is end of life (aws-sdk's legacy client)",
    ),
    (
        "rustls-webpki",
        "0.101",
        "rustls-webpki 0.101 has open advisories and no fixed 0.101 release",
    ),
    ("tokio-rustls", "0.24", "tokio-rustls 0.24 is rustls 0.21's"),
    ("h2", "0.3", "h2 0.3 is hyper 0.14's"),
];

#[test]
fn the_lock_file_carries_no_refused_version() {
    // the crate's folder as the test runner gives it at run time: a binary reused from
    // another checkout sharing the target folder must read this checkout's lock file
    let dir = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let path = &format!("{dir}/../Cargo.lock");
    let text = std::fs::read_to_string(path).unwrap();
    let lock: toml::Value = toml::from_str(&text).unwrap();
    let packages = lock["package"].as_array().expect("[[package]] entries");
    assert!(
        packages.len() > 100,
        "{path}: only {} packages",
        packages.len()
    );
    let mut found = Vec::new();
    for p in packages {
        let (name, version) = (p["name"].as_str().unwrap(), p["version"].as_str().unwrap());
        for (refused, prefix, why) in REFUSED {
            if name == *refused && version.starts_with(prefix) {
                found.push(format!("{name} {version}: {why}"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "Cargo.lock carries refused versions (`cargo tree -i <name>@<version>` shows who pulls them in):\n{}",
        found.join("\n")
    );
}
