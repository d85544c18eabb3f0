//! Every job file in `examples/` is one `defuse run` accepts: it parses, has no unknown
//! field and passes validation (the models and data it names are not opened here).
use std::path::Path;

#[test]
fn every_example_job_file_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = defuse_core::config::JobConfig::load(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen.push((path.file_name().unwrap().to_owned(), cfg));
        }
    }
    assert!(seen.len() >= 4, "{} examples", seen.len());
    // the bring-your-own example names all three TorchScript files
    let (_, own) = seen
        .iter()
        .find(|(n, _)| n == "bring-your-own-models.toml")
        .expect("examples/bring-your-own-models.toml");
    let m = &own.models;
    assert!(
        m.classifier.is_some() && m.vae.is_some() && m.vae_decoder.is_some(),
        "{m:?}"
    );
}
