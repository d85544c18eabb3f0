//! Data readers on the real MNIST and GTSRB files, and on bad ones.
use std::io::Write;
use std::path::{Path, PathBuf};

use defuse_core::data::idx::write_idx;
use defuse_core::data::{DataFormat, DataSpec};
use defuse_core::Error;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn reads_real_mnist() {
    let ds = DataSpec::from_path(repo().join("data/mnist"))
        .load()
        .expect("deploy/setup.sh puts MNIST in data/mnist");
    assert_eq!((ds.train.len(), ds.test.len()), (60_000, 10_000));
    assert_eq!(ds.image_shape(), [1, 28, 28]);
    assert_eq!(ds.num_classes(), 10);
    // the first training digit of MNIST is a 5, the first test digit a 7
    assert_eq!((ds.train.labels[0], ds.test.labels[0]), (5, 7));
    let x = ds.train.images(0..4, tch::Device::Cpu);
    assert_eq!(x.size(), [4, 1, 28, 28]);
    assert_eq!(x.kind(), tch::Kind::Float);
    let (lo, hi) = (
        f64::try_from(x.min()).unwrap(),
        f64::try_from(x.max()).unwrap(),
    );
    assert!(lo == 0.0 && hi == 1.0, "pixels in [0,1], got {lo}..{hi}");
    let shards = ds.shards(defuse_core::data::SplitName::Test, 3000);
    assert_eq!(shards, vec![0..3000, 3000..6000, 6000..9000, 9000..10_000]);
}

#[test]
fn reads_gtsrb_32_gzipped_4d() {
    let dir = repo().join("data/gtsrb-32");
    if !dir.join("train-images-idx4-ubyte.gz").exists() {
        eprintln!(
            "SKIPPED: GTSRB copy not linked at {} (deploy/setup.sh links ../shared/data/gtsrb-32)",
            dir.display()
        );
        return;
    }
    let ds = DataSpec::from_path(&dir).load().unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (39_209, 12_630));
    assert_eq!(ds.image_shape(), [3, 32, 32]);
    assert_eq!(ds.num_classes(), 43);
    let x = ds.test.gather(&[5, 0, 5], tch::Device::Cpu);
    assert_eq!(x.size(), [3, 3, 32, 32]);
    assert!(bool::try_from(x.get(0).eq_tensor(&x.get(2)).all()).unwrap());
}

/// A small valid IDX dataset in `dir`: 6 train and 4 test 4x4 images, labels 0..3.
fn tiny_idx(dir: &Path) {
    write_idx(&dir.join("train-images-idx3-ubyte"), &[6, 4, 4], &[7; 96]).unwrap();
    write_idx(
        &dir.join("train-labels-idx1-ubyte"),
        &[6],
        &[0, 1, 2, 0, 1, 2],
    )
    .unwrap();
    write_idx(&dir.join("t10k-images-idx3-ubyte"), &[4, 4, 4], &[9; 64]).unwrap();
    write_idx(&dir.join("t10k-labels-idx1-ubyte"), &[4], &[2, 1, 0, 1]).unwrap();
}

fn load_err(dir: &Path) -> String {
    match DataSpec::from_path(dir).load() {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tiny_idx_raw_and_gzipped() {
    let d = tempfile::tempdir().unwrap();
    tiny_idx(d.path());
    let ds = DataSpec::from_path(d.path()).load().unwrap();
    assert_eq!((ds.train.len(), ds.test.len(), ds.num_classes()), (6, 4, 3));
    // gzip one file: recognised by its content
    let p = d.path().join("train-images-idx3-ubyte");
    let raw = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    std::fs::write(
        d.path().join("train-images-idx3-ubyte.gz"),
        gz.finish().unwrap(),
    )
    .unwrap();
    let ds2 = DataSpec::from_path(d.path()).load().unwrap();
    assert_eq!(ds2.train.images, ds.train.images);
}

#[test]
fn bad_idx_files_are_named_errors() {
    // truncated images
    let d = tempfile::tempdir().unwrap();
    tiny_idx(d.path());
    let p = d.path().join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("truncated"),
        "{e}"
    );

    // wrong magic
    let d = tempfile::tempdir().unwrap();
    tiny_idx(d.path());
    std::fs::write(
        d.path().join("t10k-labels-idx1-ubyte"),
        b"PK\x03\x04 not idx",
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("t10k-labels-idx1-ubyte") && e.contains("not an IDX file"),
        "{e}"
    );

    // label count does not match
    let d = tempfile::tempdir().unwrap();
    tiny_idx(d.path());
    write_idx(
        &d.path().join("train-labels-idx1-ubyte"),
        &[5],
        &[0, 1, 2, 0, 1],
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("train-labels-idx1-ubyte")
            && e.contains("5 labels but")
            && e.contains("6 images"),
        "{e}"
    );

    // labels out of range for the declared class count
    let d = tempfile::tempdir().unwrap();
    tiny_idx(d.path());
    let mut spec = DataSpec::from_path(d.path());
    spec.num_classes = Some(2);
    let e = spec.load().unwrap_err().to_string();
    assert!(
        e.contains("label 2") && e.contains("out of range") && e.contains("2 classes"),
        "{e}"
    );

    // test images of another size
    let d = tempfile::tempdir().unwrap();
    tiny_idx(d.path());
    write_idx(
        &d.path().join("t10k-images-idx3-ubyte"),
        &[4, 5, 5],
        &[1; 100],
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(e.contains("t10k-images") && e.contains("[5, 5, 1]"), "{e}");

    // gzip stream cut short
    let d = tempfile::tempdir().unwrap();
    tiny_idx(d.path());
    let p = d.path().join("t10k-images-idx3-ubyte");
    let raw = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    let gz = gz.finish().unwrap();
    std::fs::write(
        d.path().join("t10k-images-idx3-ubyte.gz"),
        &gz[..gz.len() / 2],
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(e.contains("t10k-images-idx3-ubyte.gz"), "{e}");

    // a missing file
    let d = tempfile::tempdir().unwrap();
    tiny_idx(d.path());
    std::fs::remove_file(d.path().join("t10k-labels-idx1-ubyte")).unwrap();
    let mut spec = DataSpec::from_path(d.path());
    spec.format = DataFormat::Idx;
    let e = spec.load().unwrap_err().to_string();
    assert!(e.contains("no test labels file"), "{e}");

    // not a folder at all
    let e = DataSpec::from_path(d.path().join("nope"))
        .load()
        .unwrap_err();
    assert!(
        matches!(e, Error::Invalid { .. }) && e.to_string().contains("nope"),
        "{e}"
    );
}

fn png(path: &Path, w: u32, h: u32, rgb: bool, v: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    if rgb {
        image::RgbImage::from_pixel(w, h, image::Rgb([v, 0, 255 - v]))
            .save(path)
            .unwrap();
    } else {
        image::GrayImage::from_pixel(w, h, image::Luma([v]))
            .save(path)
            .unwrap();
    }
}

#[test]
fn image_folder_with_and_without_splits() {
    let d = tempfile::tempdir().unwrap();
    for (class, v) in [("cat", 10u8), ("dog", 200u8)] {
        for i in 0..5 {
            png(
                &d.path().join(class).join(format!("{i}.png")),
                8,
                6,
                true,
                v,
            );
        }
    }
    let ds = DataSpec::from_path(d.path()).load().unwrap();
    assert_eq!(ds.class_names, vec!["cat", "dog"]);
    assert_eq!(ds.image_shape(), [3, 6, 8]);
    // every 5th image of each class goes to test
    assert_eq!((ds.train.len(), ds.test.len()), (8, 2));
    assert_eq!(ds.test.labels, vec![0, 1]);
    let x = ds.test.images(1..2, tch::Device::Cpu);
    let red = f64::try_from(x.get(0).get(0).mean(tch::Kind::Float)).unwrap();
    assert!((red - 200.0 / 255.0).abs() < 1e-6, "{red}");

    let d = tempfile::tempdir().unwrap();
    for split in ["train", "test"] {
        for (class, v) in [("a", 0u8), ("b", 255u8)] {
            png(
                &d.path().join(split).join(class).join("x.png"),
                4,
                4,
                false,
                v,
            );
        }
    }
    let ds = DataSpec::from_path(d.path()).load().unwrap();
    assert_eq!((ds.train.len(), ds.test.len(), ds.channels), (2, 2, 1));
}

#[test]
fn image_folder_mixed_sizes_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..5 {
        png(&d.path().join(format!("a/{i}.png")), 8, 8, false, 0);
        png(
            &d.path().join(format!("b/{i}.png")),
            if i == 0 { 9 } else { 8 },
            8,
            false,
            0,
        );
    }
    let e = load_err(d.path());
    assert!(
        e.contains("b/0.png") && e.contains("9x8") && e.contains("one size"),
        "{e}"
    );

    let d = tempfile::tempdir().unwrap();
    for i in 0..4 {
        png(&d.path().join(format!("a/{i}.png")), 8, 8, false, 0);
    }
    std::fs::write(d.path().join("a/4.png"), b"not a png").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("a/4.png") && e.contains("cannot decode"), "{e}");
}
