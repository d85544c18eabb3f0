//! Data readers on the real MNIST and GTSRB files, and on bad ones.
use std::io::Write;
use std::path::{Path, PathBuf};

use defuse_core::data::idx::write_idx;
use defuse_core::data::SplitName::{Test, Train};
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
    // with data.resize they are scaled and centre-cropped to one size
    let mut spec = DataSpec::from_path(d.path());
    spec.resize = Some([6, 7]);
    let ds = spec.load().unwrap();
    assert_eq!(ds.image_shape(), [1, 6, 7]);
    // and IDX has no resize
    let idx = tempfile::tempdir().unwrap();
    tiny_idx(idx.path());
    let mut spec = DataSpec::from_path(idx.path());
    spec.resize = Some([6, 7]);
    let e = spec.load().unwrap_err().to_string();
    assert!(e.contains("data.resize") && e.contains("IDX"), "{e}");

    let d = tempfile::tempdir().unwrap();
    for i in 0..4 {
        png(&d.path().join(format!("a/{i}.png")), 8, 8, false, 0);
    }
    std::fs::write(d.path().join("a/4.png"), b"not a png").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("a/4.png") && e.contains("cannot decode"), "{e}");
}

/// The py-client-env folder deploy/setup-test.sh fills (pyarrow among it).
fn python_with_pyarrow() -> std::process::Command {
    let home = std::env::var("HOME").unwrap();
    let cache = std::env::var("DEFUSE_CACHE").unwrap_or(format!("{home}/.cache/defuse"));
    let mut c = std::process::Command::new("python3");
    c.env("PYTHONPATH", format!("{cache}/py-client-env"));
    c
}

/// The first `n_train` and `n_test` MNIST images as PNG files (`<split>/<i>_<label>.png`)
/// and as IDX files, so that every format holds the same images.
fn mnist_slice(n_train: usize, n_test: usize, png_dir: &Path, idx_dir: &Path) {
    let ds = DataSpec::from_path(repo().join("data/mnist"))
        .load()
        .unwrap();
    for (split, name, n) in [(&ds.train, "train", n_train), (&ds.test, "t10k", n_test)] {
        let bytes = &split.images[..n * 784];
        let labels: Vec<u8> = split.labels[..n].iter().map(|&l| l as u8).collect();
        write_idx(
            &idx_dir.join(format!("{name}-images-idx3-ubyte")),
            &[n, 28, 28],
            bytes,
        )
        .unwrap();
        write_idx(
            &idx_dir.join(format!("{name}-labels-idx1-ubyte")),
            &[n],
            &labels,
        )
        .unwrap();
        let folder = png_dir.join(if name == "t10k" { "test" } else { "train" });
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..n {
            image::GrayImage::from_raw(28, 28, bytes[i * 784..(i + 1) * 784].to_vec())
                .unwrap()
                .save(folder.join(format!("{i}_{}.png", labels[i])))
                .unwrap();
        }
    }
}

/// WebDataset shards (Python's tarfile) and a Hugging Face Parquet export (pyarrow)
/// of the same MNIST images read as the IDX copy does: same bytes, same labels, so
/// every later step (identify's failures among them) is the same.
#[test]
fn webdataset_and_parquet_read_the_same_images_as_idx() {
    let d = tempfile::tempdir().unwrap();
    let (pngs, idx, made) = (
        d.path().join("png"),
        d.path().join("idx"),
        d.path().join("made"),
    );
    std::fs::create_dir_all(&idx).unwrap();
    mnist_slice(40, 20, &pngs, &idx);
    let script = repo().join("core/tests/fixtures/make_formats.py");
    let out = python_with_pyarrow()
        .arg(&script)
        .arg(&pngs)
        .arg(&made)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed (pyarrow is installed by deploy/setup-test.sh): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let want = DataSpec::from_path(&idx).load().unwrap();
    for (dir, format, names) in [
        (made.join("wds"), DataFormat::Webdataset, "classes.txt"),
        (
            made.join("hf"),
            DataFormat::Parquet,
            "the huggingface metadata",
        ),
    ] {
        // found by `auto` as well as named
        for spec_format in [DataFormat::Auto, format] {
            let mut spec = DataSpec::from_path(&dir);
            spec.format = spec_format;
            let got = spec
                .load()
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            assert_eq!(got.image_shape(), [1, 28, 28], "{format:?}");
            assert_eq!((got.train.len(), got.test.len()), (40, 20), "{format:?}");
            assert_eq!(got.train.labels, want.train.labels, "{format:?}");
            assert_eq!(got.test.labels, want.test.labels, "{format:?}");
            assert!(
                got.train.images == want.train.images,
                "{format:?}: train pixels differ"
            );
            assert!(
                got.test.images == want.test.images,
                "{format:?}: test pixels differ"
            );
            assert_eq!(
                got.class_names[3], "three",
                "{format:?}: names from {names}"
            );
        }
    }
    // a window read alone (what a worker reads for its shard) is the same slice: across
    // shard and row-group boundaries (16 samples a tar, 8 rows a row group)
    for (dir, format) in [
        (idx.clone(), DataFormat::Idx),
        (made.join("wds"), DataFormat::Webdataset),
        (made.join("hf"), DataFormat::Parquet),
    ] {
        let spec = DataSpec::from_path(&dir);
        let full = spec.load().unwrap();
        let layout = full.layout.clone().expect("a layout");
        assert_eq!(layout.format, format);
        for (which, range) in [
            (Test, 0..7),
            (Test, 5..19),
            (Train, 15..33),
            (Train, 39..40),
            (Test, 0..20),
        ] {
            let w = spec.read_window(&layout, which, range.clone()).unwrap();
            let (part, whole) = (w.split(which), want.split(which));
            assert_eq!(part.window(), range, "{format:?}");
            assert!(
                part.images == whole.images[range.start * 784..range.end * 784],
                "{format:?} {which} {range:?}"
            );
            assert_eq!(part.labels, whole.labels[range.clone()], "{format:?}");
            let x = part.images(range.clone(), tch::Device::Cpu);
            assert!(x.equal(&whole.images(range.clone(), tch::Device::Cpu)));
        }
        let e = spec
            .read_window(&layout, Test, 10..21)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the test split of 20"), "{e}");
        // rows spread over the split (what a fine-tune part reads): each once, the same
        // pixels and labels as the whole read, across files and row groups
        let rows = [33usize, 2, 17, 2, 16, 39, 0, 31, 8];
        let r = spec.read_rows(&layout, Train, &rows, None).unwrap();
        let (held, whole) = (&r.train, &want.train);
        assert_eq!(held.len(), 8, "{format:?}: a repeated row is held once");
        assert!(r.test.is_empty());
        let x = held.gather(&rows, tch::Device::Cpu);
        assert!(
            x.equal(&whole.gather(&rows, tch::Device::Cpu)),
            "{format:?}: rows' pixels differ"
        );
        assert_eq!(
            Vec::<i64>::try_from(held.gather_labels(&rows, tch::Device::Cpu)).unwrap(),
            rows.iter().map(|&i| whole.labels[i]).collect::<Vec<_>>(),
            "{format:?}"
        );
        assert!(held.holds(16..18) && !held.holds(16..19) && !held.holds(1..2));
        let e = spec
            .read_rows(&layout, Train, &[3, 40], None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("image 40 is outside the train split of 40"),
            "{e}"
        );

        // opened (what the central steps use): the layout without decoding, the same
        // images read by window, by rows, or whole; limits cut the splits
        let opened = spec.open().unwrap();
        assert_eq!(opened.layout, full.layout, "{format:?}");
        assert_eq!(opened.class_names, full.class_names, "{format:?}");
        assert_eq!(opened.image_shape(), [1, 28, 28]);
        assert!(
            !opened.train.is_held() && !opened.test.is_held(),
            "{format:?}"
        );
        assert_eq!((opened.train.len(), opened.test.len()), (40, 20));
        let w = opened.test.read(5..19).unwrap();
        assert!(w
            .images(5..19, tch::Device::Cpu)
            .equal(&want.test.images(5..19, tch::Device::Cpu)));
        let r = opened.train.read_rows(&rows).unwrap();
        assert!(r
            .gather(&rows, tch::Device::Cpu)
            .equal(&want.train.gather(&rows, tch::Device::Cpu)));
        let held = opened.held().unwrap();
        assert!(held.train.images == want.train.images && held.train.labels == want.train.labels);
        assert!(held.test.images == want.test.images && held.test.labels == want.test.labels);
        let mut seen = Vec::new();
        opened
            .test
            .for_windows(3..20, |w, range| {
                seen.extend(range.clone());
                assert!(w.holds(range));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, (3..20).collect::<Vec<_>>());
        let e = opened.test.read(10..21).unwrap_err().to_string();
        assert!(e.contains("outside the test split of 20"), "{e}");
        let mut limited = spec.clone();
        limited.limit_test = 7;
        assert_eq!(limited.open().unwrap().test.len(), 7);
    }
    // an image folder opens from its listing and its first image
    let classes = d.path().join("classes");
    for split in ["train", "test"] {
        for e in std::fs::read_dir(pngs.join(split)).unwrap() {
            let p = e.unwrap().path();
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let (i, label) = stem.split_once('_').unwrap();
            let dir = classes.join(split).join(label);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(&p, dir.join(format!("{i:0>3}.png"))).unwrap();
        }
    }
    let folder = DataSpec::from_path(&classes);
    let (opened, full) = (folder.open().unwrap(), folder.load().unwrap());
    assert!(!opened.train.is_held());
    assert_eq!(opened.layout, full.layout);
    assert!(opened.held().unwrap().test.images == full.test.images);
    // WebDataset shards whose classes neither a classes.txt nor the config names are read
    // whole: the number of classes comes from every label
    std::fs::remove_file(made.join("wds/classes.txt")).unwrap();
    let unnamed = DataSpec::from_path(made.join("wds")).open().unwrap();
    assert!(unnamed.train.is_held());
    assert_eq!(unnamed.num_classes(), want.num_classes());
    let mut named = DataSpec::from_path(made.join("wds"));
    named.num_classes = Some(10);
    assert!(!named.open().unwrap().train.is_held());
}

fn tar_with(path: &Path, members: &[(&str, &[u8])]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in members {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.finish().unwrap();
}

fn png_bytes(w: u32, h: u32, v: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::GrayImage::from_pixel(w, h, image::Luma([v]))
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[test]
fn bad_webdataset_shards_are_named_errors() {
    let img = png_bytes(4, 4, 9);
    let wide = png_bytes(6, 4, 9);
    let good_test = |d: &Path| {
        tar_with(
            &d.join("test-000000.tar"),
            &[("a.png", &img), ("a.cls", b"0")],
        )
    };
    // (what, the train shard's members, what the error must say)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a [u8])>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "no label",
            vec![("k1.png", &img), ("k2.png", &img), ("k2.cls", b"1")],
            vec!["train-000000.tar", "'k1'", "no label"],
        ),
        ("no image", vec![("k1.cls", b"1")], vec!["'k1'", "no image"]),
        (
            "bad cls",
            vec![("k1.png", &img), ("k1.cls", b"seven")],
            vec!["k1.cls", "seven", "class id"],
        ),
        (
            "bad json",
            vec![("k1.png", &img), ("k1.json", b"{\"label\": \"x\"}")],
            vec!["k1.json", "'label'", "integer"],
        ),
        (
            "json without label",
            vec![("k1.png", &img), ("k1.json", b"{}")],
            vec!["k1.json", "no integer"],
        ),
        (
            "not an image",
            vec![("k1.png", b"nope"), ("k1.cls", b"1")],
            vec!["k1.png", "cannot decode"],
        ),
        (
            "two sizes",
            vec![
                ("k1.png", &img),
                ("k1.cls", b"0"),
                ("k2.png", &wide),
                ("k2.cls", b"0"),
            ],
            vec!["'k2'", "6x4", "data.resize"],
        ),
    ];
    for (what, members, needles) in cases {
        let d = tempfile::tempdir().unwrap();
        tar_with(&d.path().join("train-000000.tar"), &members);
        good_test(d.path());
        let e = load_err(d.path());
        for n in needles {
            assert!(e.contains(n), "{what}: '{n}' not in: {e}");
        }
    }
    // a label beyond the classes names the shard
    let d = tempfile::tempdir().unwrap();
    tar_with(
        &d.path().join("train-000000.tar"),
        &[("k.png", &img), ("k.cls", b"5")],
    );
    good_test(d.path());
    std::fs::write(d.path().join("classes.txt"), "a\nb\n").unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("train-000000.tar") && e.contains("label 5"),
        "{e}"
    );
    // a truncated shard, and no test shards
    let d = tempfile::tempdir().unwrap();
    tar_with(
        &d.path().join("train-000000.tar"),
        &[("k.png", &img), ("k.cls", b"0")],
    );
    let bytes = std::fs::read(d.path().join("train-000000.tar")).unwrap();
    std::fs::write(d.path().join("test-000000.tar"), &bytes[..700]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("test-000000.tar"), "{e}");
    std::fs::remove_file(d.path().join("test-000000.tar")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("1 train and 0 test tar files"), "{e}");
}

#[test]
fn bad_parquet_files_are_named_errors() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("train.parquet"), b"PAR1 not really").unwrap();
    std::fs::write(d.path().join("test.parquet"), b"PAR1 not really").unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("train.parquet") && e.contains("not a readable Parquet file"),
        "{e}"
    );

    // columns that are not what datasets writes, made by pyarrow
    let d = tempfile::tempdir().unwrap();
    let script = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
d = sys.argv[1]
png = open(sys.argv[2], "rb").read()
for split in ["train", "test"]:
    t = pa.table({"picture": pa.array([png]), "y": pa.array([1]), "name": pa.array(["one"])})
    pq.write_table(t, d + "/" + split + ".parquet")
"#;
    let png = d.path().join("x.png");
    std::fs::write(&png, png_bytes(4, 4, 1)).unwrap();
    let out = python_with_pyarrow()
        .arg("-c")
        .arg(script)
        .arg(d.path())
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&png).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("no image column") && e.contains("picture"),
        "{e}"
    );
    let mut spec = DataSpec::from_path(d.path());
    spec.image_column = Some("picture".into());
    let e = spec.load().unwrap_err().to_string();
    assert!(e.contains("no label column") && e.contains("\"y\""), "{e}");
    spec.label_column = Some("y".into());
    let ds = spec.load().unwrap();
    assert_eq!((ds.train.len(), ds.test.labels.clone()), (1, vec![1]));
    spec.label_column = Some("name".into());
    let e = spec.load().unwrap_err().to_string();
    assert!(
        e.contains("row 0") && e.contains("expected an integer class id"),
        "{e}"
    );
}
