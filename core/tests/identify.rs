//! Identify on planted failures: a 1-d latent (the mean pixel), a decoder that paints
//! it, and a classifier that says 1 above 0.5. A perturbation fails exactly when it
//! crosses 0.5, so every kept failure can be checked by hand.
use std::path::Path;

use defuse_core::data::idx::write_idx;
use defuse_core::data::{DataSpec, Dataset, SplitName};
use defuse_core::identify::{identify, Failures, IdentifyOptions, Perturbation, Precision, Search};
use defuse_core::models::{load_vae, Classifier, Jit, Vae};
use tch::Device;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// 40 constant 4x4 images: pixel value v_i, label 1 when v_i > 0.5.
fn planted() -> (tempfile::TempDir, Dataset, Vec<f64>) {
    planted_with(0)
}

/// [`planted`] with the `mislabelled` darkest images (class 0) labelled 1.
fn planted_with(mislabelled: usize) -> (tempfile::TempDir, Dataset, Vec<f64>) {
    let d = tempfile::tempdir().unwrap();
    let values: Vec<u8> = (0..40).map(|i| (i * 255 / 39) as u8).collect();
    let imgs: Vec<u8> = values
        .iter()
        .flat_map(|&v| std::iter::repeat_n(v, 16))
        .collect();
    let labels: Vec<u8> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| (i < mislabelled || v as f64 / 255.0 > 0.5) as u8)
        .collect();
    for split in ["train", "t10k"] {
        write_idx(
            &d.path().join(format!("{split}-images-idx3-ubyte")),
            &[40, 4, 4],
            &imgs,
        )
        .unwrap();
        write_idx(
            &d.path().join(format!("{split}-labels-idx1-ubyte")),
            &[40],
            &labels,
        )
        .unwrap();
    }
    let ds = DataSpec::from_path(d.path()).load().unwrap();
    (d, ds, values.iter().map(|&v| v as f64 / 255.0).collect())
}

fn models() -> (Classifier, Vae) {
    let clf =
        Classifier::load(&fixture("planted_classifier.pt"), [1, 4, 4], 2, Device::Cpu).unwrap();
    let vae = load_vae(
        &fixture("planted_encoder.pt"),
        Some(&fixture("planted_decoder.pt")),
        [1, 4, 4],
        Device::Cpu,
        Jit::default(),
    )
    .unwrap();
    (clf, vae)
}

fn opts(keep: usize) -> IdentifyOptions {
    IdentifyOptions {
        samples: 50,
        keep,
        perturbation: Perturbation::Gaussian { sigma: 0.1 },
        batch_size: 7,
        chunk: 64,
        ..Default::default()
    }
}

fn run(ds: &Dataset, range: std::ops::Range<usize>, o: &IdentifyOptions, seed: u64) -> Failures {
    let (clf, vae) = models();
    identify(
        &ds.test,
        SplitName::Test,
        range,
        &clf,
        &vae,
        o,
        seed,
        |_| true,
    )
    .unwrap()
    .0
}

#[test]
fn finds_the_planted_failures_and_keeps_the_smallest() {
    let (_d, ds, values) = planted();
    let (clf, vae) = models();
    let o = opts(3);
    let (f, stats) = identify(&ds.test, SplitName::Test, 0..40, &clf, &vae, &o, 11, |_| {
        true
    })
    .unwrap();
    assert_eq!(stats.n_images, 40);
    // the image at exactly 0.5 is labelled 0 and classified 0 (logit tie -> argmax 0)
    assert!(stats.n_searched >= 39, "{stats:?}");
    assert!(!f.is_empty());
    let codes = Vec::<f32>::try_from(f.codes.view([-1])).unwrap();
    let mut per_image = std::collections::BTreeMap::<i64, Vec<f32>>::new();
    for (i, &code) in codes.iter().enumerate() {
        let src = f.source_index[i] as usize;
        let (v, z) = (values[src], code as f64);
        // a failure crosses the threshold, and the predicted class is the other one
        assert_eq!(f.true_label[i], (v > 0.5) as i64);
        assert_eq!(f.predicted[i], 1 - f.true_label[i]);
        assert!(
            (z > 0.5) != (v > 0.5),
            "image {src} value {v} code {z} is no failure"
        );
        assert!(
            ((z - v).abs() - f.eps_norm[i] as f64).abs() < 1e-5,
            "eps norm of row {i}"
        );
        assert!(f.eps_norm[i] as f64 >= (0.5 - v).abs() - 1e-6);
        per_image
            .entry(f.source_index[i])
            .or_default()
            .push(f.eps_norm[i]);
    }
    for (src, norms) in &per_image {
        assert!(
            norms.len() <= 3,
            "image {src} keeps {} > N = 3",
            norms.len()
        );
        assert!(
            norms.windows(2).all(|w| w[0] <= w[1]),
            "image {src}: not smallest-first {norms:?}"
        );
    }
    // images far from the threshold (5 sigma) never fail, images next to it always do
    for (i, &v) in values.iter().enumerate() {
        let has = per_image.contains_key(&(i as i64));
        if (v - 0.5).abs() > 0.5 {
            assert!(!has, "image {i} at {v} cannot fail with sigma 0.1");
        }
        if (v - 0.5).abs() < 0.02 && v != 0.5 {
            assert!(has, "image {i} at {v} must fail");
            assert_eq!(
                per_image[&(i as i64)].len(),
                3,
                "image {i} has plenty of failures, keeps N"
            );
        }
    }
    assert_eq!(stats.n_images_with_failure, per_image.len());
    assert_eq!(stats.n_failures, f.len());

    // N = 1 keeps exactly the smallest of the N = 3 run
    let f1 = run(&ds, 0..40, &opts(1), 11);
    assert_eq!(f1.len(), per_image.len());
    for i in 0..f1.len() {
        assert_eq!(f1.eps_norm[i], per_image[&f1.source_index[i]][0]);
    }
}

/// bfloat16 autocast on the CPU: the same search, the same draws; only perturbations
/// whose decoded value lands within bfloat16's rounding of the threshold may be judged
/// differently, so nearly every failure of the float32 run is found again.
#[test]
fn bfloat16_autocast_finds_the_float32_failures() {
    let (_d, ds, values) = planted();
    let f32_run = run(&ds, 0..40, &opts(3), 11);
    let o = IdentifyOptions {
        precision: Precision::Bfloat16,
        ..opts(3)
    };
    let bf = run(&ds, 0..40, &o, 11);
    let key = |f: &Failures, i: usize| (f.source_index[i], f.eps_norm[i].to_bits());
    let a: std::collections::BTreeSet<_> = (0..f32_run.len()).map(|i| key(&f32_run, i)).collect();
    let b: std::collections::BTreeSet<_> = (0..bf.len()).map(|i| key(&bf, i)).collect();
    let shared = a.intersection(&b).count();
    assert!(!a.is_empty());
    assert!(
        shared as f64 >= 0.9 * a.len() as f64,
        "{shared} of {} float32 failures found again in bfloat16 ({} there)",
        a.len(),
        b.len()
    );
    // and every bfloat16 failure is a real crossing, up to bfloat16's rounding
    let codes = Vec::<f32>::try_from(bf.codes.view([-1])).unwrap();
    for (i, &z) in codes.iter().enumerate() {
        let v = values[bf.source_index[i] as usize];
        assert!(
            (z as f64 > 0.5) != (v > 0.5) || (z as f64 - 0.5).abs() < 0.01,
            "row {i}: code {z} for image value {v}"
        );
    }
}

#[test]
fn shards_give_the_same_failures_as_one_range() {
    let (_d, ds, _) = planted();
    let o = opts(4);
    let whole = run(&ds, 0..40, &o, 5);
    let parts = vec![
        run(&ds, 0..9, &o, 5),
        run(&ds, 9..23, &o, 5),
        run(&ds, 23..40, &o, 5),
    ];
    let joined = Failures::concat(parts, 1);
    assert_eq!(whole.source_index, joined.source_index);
    assert_eq!(whole.predicted, joined.predicted);
    assert_eq!(whole.eps_norm, joined.eps_norm);
    assert!(whole.codes.equal(&joined.codes));
    // other batch sizes too
    let o2 = IdentifyOptions {
        batch_size: 40,
        chunk: 7,
        ..o.clone()
    };
    let again = run(&ds, 0..40, &o2, 5);
    assert_eq!(whole.eps_norm, again.eps_norm);
    // and another seed gives other draws
    let other = run(&ds, 0..40, &o, 6);
    assert_ne!(whole.eps_norm, other.eps_norm);
}

#[test]
fn beta_noise_is_the_authors_uncentred_shift() {
    let (_d, ds, values) = planted();
    let o = IdentifyOptions {
        perturbation: Perturbation::Beta { a: 50.0, b: 50.0 },
        ..opts(5)
    };
    let f = run(&ds, 0..40, &o, 1);
    let codes = Vec::<f32>::try_from(f.codes.view([-1])).unwrap();
    // Beta(50,50) is about 0.5 +- 0.05: every code moves up by ~0.5, so only images
    // below 0.5 can fail (they cross upwards), and those near 0 (+0.5 < 0.5) rarely
    for (i, &code) in codes.iter().enumerate() {
        let v = values[f.source_index[i] as usize];
        let shift = code as f64 - v;
        assert!(shift > 0.25 && shift < 0.75, "shift {shift}");
        assert!(v < 0.5);
    }
    assert!(!f.is_empty());
}

#[test]
fn failures_round_trip_through_safetensors() {
    let (_d, ds, _) = planted();
    let (clf, vae) = models();
    let (f, stats) = identify(
        &ds.test,
        SplitName::Test,
        3..31,
        &clf,
        &vae,
        &opts(2),
        2,
        |_| true,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shard-0.safetensors");
    f.write(&p, &stats).unwrap();
    assert!(
        p.with_extension("json").exists(),
        "manifest beside the tensors"
    );
    let (g, s2) = Failures::read(&p).unwrap();
    assert_eq!(s2, stats);
    assert_eq!(g.source_index, f.source_index);
    assert_eq!(g.confidence, f.confidence);
    assert!(g.codes.equal(&f.codes));
    // a range outside the split is refused
    let e = identify(
        &ds.test,
        SplitName::Test,
        30..41,
        &clf,
        &vae,
        &opts(2),
        2,
        |_| true,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("outside the test split's images 0..40"),
        "{e}"
    );
}

/// Identify's counts per class, under each rule: the mislabelled images are
/// misclassified, as are their reconstructions (the decoder paints the code), in their
/// (given) class; `right` skips them, `consistent` and `all` search them from their
/// own codes; the counts add up to the totals, and shards add up to one range.
#[test]
fn coverage_per_class_says_what_was_skipped_and_why() {
    let (_d, ds, values) = planted_with(6);
    let (clf, vae) = models();
    let ones = values.iter().filter(|&&v| v > 0.5).count();
    for search in [Search::Right, Search::Consistent, Search::All] {
        let o = IdentifyOptions { search, ..opts(2) };
        let (f, stats) = identify(&ds.test, SplitName::Test, 0..40, &clf, &vae, &o, 4, |_| {
            true
        })
        .unwrap();
        let k = &stats.by_class;
        assert_eq!(k.len(), 2, "{stats:?}");
        assert_eq!((k[0].images, k[1].images), (40 - ones - 6, ones + 6));
        // the six dark images labelled 1 are classified 0, as are their reconstructions
        assert!(k[1].wrong >= 6 && k[1].recon_wrong >= 6, "{k:?}");
        assert_eq!(stats.n_recon_differs, 0, "{stats:?}");
        let mislabelled_searched = (0..6)
            .filter(|&i| f.source_index.contains(&(i as i64)))
            .count();
        match search {
            Search::Right => {
                assert!(k[1].searched <= ones, "{k:?}");
                assert_eq!(mislabelled_searched, 0);
            }
            Search::Consistent | Search::All => {
                assert_eq!(stats.n_searched, 40, "{search}: {stats:?}");
                // each real failure yields its two nearest perturbations, still read 0
                assert_eq!(mislabelled_searched, 6, "{search}");
                for (r, &src) in f.source_index.iter().enumerate() {
                    if src < 6 {
                        assert_eq!((f.true_label[r], f.predicted[r]), (1, 0));
                        assert!(f.eps_norm[r] < 0.2, "{}", f.eps_norm[r]);
                    }
                }
            }
        }
        let sum =
            |f: fn(&defuse_core::identify::ClassCounts) -> usize| k.iter().map(f).sum::<usize>();
        assert_eq!(sum(|c| c.images), stats.n_images);
        assert_eq!(sum(|c| c.searched), stats.n_searched);
        assert_eq!(sum(|c| c.wrong), stats.n_wrong);
        assert_eq!(sum(|c| c.recon_wrong), stats.n_recon_wrong);
        assert_eq!(sum(|c| c.with_failure), stats.n_images_with_failure);
    }
    let o = opts(2);
    let (_, stats) = identify(&ds.test, SplitName::Test, 0..40, &clf, &vae, &o, 4, |_| {
        true
    })
    .unwrap();
    let mut shards = defuse_core::identify::IdentifyStats::default();
    for r in [0..9, 9..23, 23..40] {
        let (_, s) = identify(&ds.test, SplitName::Test, r, &clf, &vae, &o, 4, |_| true).unwrap();
        shards.absorb(&s);
    }
    assert_eq!(shards.by_class, stats.by_class);
}
