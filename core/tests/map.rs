//! The report's map of the failure codes: t-SNE keeps clusters apart that a PCA
//! projection draws on top of each other, and it is the same on any number of threads.
use defuse_core::plots::pca_2d;
use defuse_core::tsne::{neighbours_agree, tsne_2d, TsneOptions};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use tch::Tensor;

/// `k` clusters of `per` points in `d = k` dimensions, cluster `c` around `4 e_c`:
/// all equally far apart, so no two directions hold them all apart.
fn clusters(k: usize, per: usize) -> (Vec<f32>, Vec<i64>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let noise = Normal::new(0.0f32, 1.0).unwrap();
    let mut x = Vec::new();
    let mut label = Vec::new();
    for c in 0..k {
        for _ in 0..per {
            for j in 0..k {
                x.push(if j == c { 4.0 } else { 0.0 } + noise.sample(&mut rng));
            }
            label.push(c as i64);
        }
    }
    (x, label)
}

#[test]
fn tsne_keeps_apart_the_clusters_pca_mixes_and_is_the_same_on_any_threads() {
    let (k, per) = (10, 60);
    let (x, label) = clusters(k, per);
    let n = k * per;
    let pca = pca_2d(&Tensor::from_slice(&x).view([n as i64, k as i64])).unwrap();
    let one = TsneOptions {
        threads: 1,
        ..TsneOptions::default()
    };
    let map = tsne_2d(&x, n, k, &pca, &one).expect("600 points are enough");
    let (by_pca, by_tsne) = (
        neighbours_agree(&pca, &label).expect("600 points"),
        neighbours_agree(&map, &label).expect("600 points"),
    );
    eprintln!("10-NN agreement with the clusters: PCA {by_pca:.3}, t-SNE {by_tsne:.3}");
    assert!(by_pca < 0.7, "the case is not hard for PCA: {by_pca}");
    assert!(by_tsne > 0.95, "t-SNE mixed the clusters: {by_tsne}");
    let three = TsneOptions { threads: 3, ..one };
    assert_eq!(tsne_2d(&x, n, k, &pca, &three).unwrap(), map);
}
