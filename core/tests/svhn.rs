//! SVHN's MAT files: small files written by scipy (`savemat`, MATLAB level 5, with and
//! without compression) in SVHN's layout, read back pixel for pixel; and files that
//! lie, refused with their name.
use std::path::Path;
use std::process::Command;

use defuse_core::data::{mat, DataSpec};

/// Pixel value of image `i`, channel `ch`, at (`row`, `col`) in the generated files.
fn pixel(i: usize, ch: usize, row: usize, col: usize) -> u8 {
    ((row + 2 * col + 50 * ch + 7 * i) % 256) as u8
}

fn write_mat(path: &Path, n: usize, labels: &str, label_dtype: &str, compress: bool, extra: &str) {
    let cache = defuse_testkit::cache_dir();
    let script = format!(
        r#"
import numpy as np, scipy.io
n = {n}
X = np.zeros((32, 32, 3, n), dtype=np.uint8)
for i in range(n):
    for ch in range(3):
        for row in range(32):
            for col in range(32):
                X[row, col, ch, i] = (row + 2 * col + 50 * ch + 7 * i) % 256
y = np.array({labels}, dtype=np.{label_dtype}).reshape(-1, 1)
d = {{"X": X, "y": y}}
{extra}
scipy.io.savemat(r"{path}", d, format="5", do_compression={compress})
"#,
        path = path.display(),
        compress = if compress { "True" } else { "False" },
    );
    let out = Command::new("python3")
        .env("PYTHONPATH", cache.join("pytest-env"))
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scipy (run deploy/setup-test.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn reads_svhn_mat_files_in_matlab_order_with_10_as_zero() {
    let dir = tempfile::tempdir().unwrap();
    // train: compressed, uint8 labels (as SVHN ships them); test: plain, double labels
    write_mat(
        &dir.path().join(mat::TRAIN_FILE),
        5,
        "[10, 1, 2, 3, 9]",
        "uint8",
        true,
        "",
    );
    write_mat(
        &dir.path().join(mat::TEST_FILE),
        3,
        "[4, 10, 5]",
        "float64",
        false,
        "",
    );
    let ds = DataSpec::from_path(dir.path()).load().unwrap();
    assert_eq!(
        ds.class_names,
        (0..10).map(|d| d.to_string()).collect::<Vec<_>>()
    );
    assert_eq!((ds.height, ds.width, ds.channels), (32, 32, 3));
    assert_eq!(ds.train.labels, vec![0, 1, 2, 3, 9]);
    assert_eq!(ds.test.labels, vec![4, 0, 5]);
    // pixel for pixel, through the tensor the models see (NCHW in [0,1])
    let t = ds.train.images(0..5, tch::Device::Cpu);
    assert_eq!(t.size(), vec![5, 3, 32, 32]);
    for (i, ch, row, col) in [(0, 0, 0, 0), (1, 2, 5, 7), (4, 1, 31, 3), (3, 0, 2, 30)] {
        let v = t.double_value(&[i as i64, ch as i64, row as i64, col as i64]);
        let want = pixel(i, ch, row, col) as f64 / 255.0;
        assert!(
            (v - want).abs() < 1e-6,
            "image {i} ch {ch} ({row},{col}): {v} vs {want}"
        );
    }
    let t = ds.test.images(2..3, tch::Device::Cpu);
    assert!((t.double_value(&[0, 1, 4, 9]) - pixel(2, 1, 4, 9) as f64 / 255.0).abs() < 1e-6);
}

#[test]
fn svhn_files_that_lie_are_refused_with_their_name() {
    let err = |train: &dyn Fn(&Path)| {
        let dir = tempfile::tempdir().unwrap();
        train(&dir.path().join(mat::TRAIN_FILE));
        write_mat(
            &dir.path().join(mat::TEST_FILE),
            2,
            "[1, 2]",
            "uint8",
            false,
            "",
        );
        DataSpec::from_path(dir.path())
            .load()
            .unwrap_err()
            .to_string()
    };
    let e = err(&|p| std::fs::write(p, b"MATLAB 5.0 MAT-file, but then garbage").unwrap());
    assert!(
        e.contains("train_32x32.mat") && e.contains("MAT file"),
        "{e}"
    );
    let e = err(&|p| write_mat(p, 3, "[1, 11, 2]", "uint8", true, ""));
    assert!(e.contains("label 11 of image 1 is outside 1..10"), "{e}");
    let e = err(&|p| write_mat(p, 3, "[1, 2]", "uint8", true, ""));
    assert!(e.contains("2 labels") && e.contains("3 images"), "{e}");
    let e = err(&|p| write_mat(p, 2, "[1, 2]", "uint8", true, "del d['X']"));
    assert!(e.contains("no array X"), "{e}");
    let e = err(&|p| {
        write_mat(
            p,
            2,
            "[1, 2]",
            "uint8",
            true,
            "d['X'] = d['X'].astype(np.float32)",
        )
    });
    assert!(e.contains("X must be uint8"), "{e}");
    // a folder with only the test file says what is missing
    let dir = tempfile::tempdir().unwrap();
    write_mat(
        &dir.path().join(mat::TEST_FILE),
        2,
        "[1, 2]",
        "uint8",
        false,
        "",
    );
    let e = DataSpec::from_path(dir.path())
        .load()
        .unwrap_err()
        .to_string();
    assert!(e.contains("no train_32x32.mat"), "{e}");
}

#[test]
fn the_svhn_example_config_reads_svhn_files() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cfg = defuse_core::config::JobConfig::load(&repo.join("examples/svhn.toml")).unwrap();
    assert_eq!(cfg.data.format, defuse_core::data::DataFormat::Svhn);
    let dir = tempfile::tempdir().unwrap();
    write_mat(
        &dir.path().join(mat::TRAIN_FILE),
        4,
        "[1, 2, 3, 10]",
        "uint8",
        true,
        "",
    );
    write_mat(
        &dir.path().join(mat::TEST_FILE),
        2,
        "[5, 6]",
        "uint8",
        true,
        "",
    );
    cfg.data.path = dir.path().to_path_buf();
    let ds = cfg.data.load().unwrap();
    assert_eq!(
        (ds.train.len(), ds.test.len(), ds.num_classes()),
        (4, 2, 10)
    );
}
