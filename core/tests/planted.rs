//! The planted copies of MNIST (`defuse_core::planted`), on the real data: each slice
//! relabels a third of its class, at the right end of the ink, in the training split
//! only, and nothing else.
use std::path::Path;

use defuse_core::data::DataSpec;
use defuse_core::planted::{write_planted_mnist, Slice, BOLD_THREES, THIN_ONES};

#[test]
fn each_slice_relabels_a_third_of_its_class_by_ink_in_the_training_split_only() {
    let mnist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
    let original = DataSpec::from_path(&mnist).load().unwrap();
    let ink = |im: &[u8]| im.iter().map(|&p| p as u64).sum::<u64>();
    for slice in [THIN_ONES, BOLD_THREES] {
        assert_eq!(Slice::named(slice.name).unwrap(), slice);
        let dir = tempfile::tempdir().unwrap();
        let planted = write_planted_mnist(&mnist, dir.path(), slice).unwrap();
        let copy = DataSpec::from_path(dir.path()).load().unwrap();
        let of_class = original
            .train
            .labels
            .iter()
            .filter(|&&l| l == slice.class)
            .count();
        let third = planted.train_relabelled as f64 / of_class as f64;
        assert!((0.32..0.36).contains(&third), "{slice:?}: {third}");
        let rows = planted.rows(&original.train);
        let (mut changed, mut inside_min, mut inside_max) = (0, u64::MAX, 0);
        let (mut outside_min, mut outside_max) = (u64::MAX, 0);
        for (i, (&was, &now)) in original
            .train
            .labels
            .iter()
            .zip(&copy.train.labels)
            .enumerate()
        {
            let k = ink(&original.train.images[i * 784..(i + 1) * 784]);
            if was != now {
                changed += 1;
                assert!(
                    rows[i] && was == slice.class && now == slice.as_label,
                    "row {i}"
                );
                (inside_min, inside_max) = (inside_min.min(k), inside_max.max(k));
            } else if was == slice.class {
                (outside_min, outside_max) = (outside_min.min(k), outside_max.max(k));
            }
        }
        assert_eq!(changed, planted.train_relabelled);
        // the slice is one end of the class's ink
        match slice.ink {
            defuse_core::planted::Ink::Least => assert!(inside_max < outside_min, "{slice:?}"),
            defuse_core::planted::Ink::Most => assert!(inside_min > outside_max, "{slice:?}"),
        }
        // the test split and the images are the original's
        assert_eq!(copy.test.labels, original.test.labels);
        assert_eq!(copy.train.images, original.train.images);
    }
}
