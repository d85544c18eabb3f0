//! Fuzzing the readers of user input: IDX (raw and gzipped), SVHN's MAT files, job
//! configs, labels JSON and failure files. Property: any bytes give `Ok` or an error
//! that names the file; never a panic, an abort or an unbounded allocation.
//!
//! Each target starts from the seeds in `tests/corpus/<target>/` (valid files and
//! known-bad ones) and mutates them: byte flips, truncation, insertion, splicing.
//! proptest keeps any failing case it finds in `proptest-regressions/fuzz.txt`, which
//! is committed, so a found bug stays a test. `PROPTEST_CASES` sets the number of
//! cases (default here 256 per target; `make fuzz` runs 20,000).
use std::path::{Path, PathBuf};

use proptest::prelude::*;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    /// Overwrites 4 bytes with a big-endian u32 (sizes and counts in headers).
    Word(usize, u32),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
            any::<usize>().prop_map(Edit::Truncate),
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
                .prop_map(|(i, b)| Edit::Insert(i, b)),
            (
                any::<usize>(),
                prop_oneof![
                    Just(0u32),
                    Just(1),
                    Just(u32::MAX),
                    Just(1 << 31),
                    any::<u32>()
                ]
            )
                .prop_map(|(i, w)| Edit::Word(i, w)),
        ],
        0..6,
    )
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let n = b.len().max(1);
        match e {
            Edit::Flip(i, x) if !b.is_empty() => b[i % n] ^= x,
            Edit::Truncate(i) => b.truncate(i % n),
            Edit::Insert(i, x) => {
                let at = i % (b.len() + 1);
                b.splice(at..at, x.iter().copied());
            }
            Edit::Word(i, w) if b.len() >= 4 => {
                let at = i % (b.len() - 3);
                b[at..at + 4].copy_from_slice(&w.to_be_bytes());
            }
            _ => {}
        }
    }
    b
}

fn input(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(target);
    (0..seeds.len(), edits()).prop_map(move |(i, e)| apply(&seeds[i], &e))
}

fn in_file(bytes: &[u8], name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    (dir, p)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("proptest-regressions/fuzz.txt"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn idx_reader(bytes in input("idx")) {
        let (_d, p) = in_file(&bytes, "t10k-images-idx3-ubyte");
        if let Err(e) = defuse_core::data::idx::read_idx(&p) {
            prop_assert!(e.to_string().contains("t10k-images-idx3-ubyte"), "{e}");
        }
    }

    #[test]
    fn svhn_mat_reader(bytes in input("mat")) {
        let (_d, p) = in_file(&bytes, "test_32x32.mat");
        if let Err(e) = defuse_core::data::mat::read_split(&p) {
            prop_assert!(e.to_string().contains("test_32x32.mat"), "{e}");
        }
    }

    #[test]
    fn config_parser(bytes in input("config")) {
        let (_d, p) = in_file(&bytes, "job.toml");
        if let Err(e) = defuse_core::config::JobConfig::load(&p) {
            prop_assert!(e.to_string().contains("job.toml"), "{e}");
        }
    }

    #[test]
    fn labels_json(bytes in input("labels")) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = defuse_core::scenarios::label_pairs_from_json(&text);
        let args: Vec<String> = text.split_whitespace().map(String::from).collect();
        let _ = defuse_core::scenarios::label_pairs_from_args(&args);
    }

    #[test]
    fn failures_reader(edits in edits()) {
        let seed = failures_seed();
        let (_d, p) = in_file(&apply(&seed, &edits), "failures.safetensors");
        if let Err(e) = defuse_core::identify::Failures::read(&p) {
            prop_assert!(e.to_string().contains("failures.safetensors"), "{e}");
        }
    }
}

/// A small valid failures file, written by the library itself.
fn failures_seed() -> Vec<u8> {
    use defuse_core::identify::{Failures, IdentifyStats};
    let mut f = Failures::empty(3);
    for i in 0..4 {
        f.source_index.push(i);
        f.true_label.push(1);
        f.predicted.push(2);
        f.confidence.push(0.5);
        f.eps_norm.push(0.1 * i as f32);
    }
    f.codes = tch::Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu)).view([4, 3]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.safetensors");
    f.write(&p, &IdentifyStats::default()).unwrap();
    std::fs::read(p).unwrap()
}
