//! Micro benchmarks of the library's hot spots that are not libtorch kernels.
use criterion::{criterion_group, criterion_main, Criterion};
use defuse_core::data::SplitName;
use defuse_core::dpgmm::{DpGmm, DpGmmOptions};
use defuse_core::identify::Perturbation;
use tch::{Device, Kind, Tensor};

fn noise(c: &mut Criterion) {
    // the noise draw of one identify batch: 32 images, Q = 100, latent 10
    let p = Perturbation::default();
    let mut i = 0usize;
    c.bench_function("perturbation draw 32 images q=100 d=10", |b| {
        b.iter(|| {
            i += 32;
            let images: Vec<usize> = (i..i + 32).collect();
            p.draw(0, SplitName::Test, &images, 100, 10, Device::Cpu)
        })
    });
}

fn dpgmm(c: &mut Criterion) {
    tch::manual_seed(0);
    let x = Tensor::randn([2000, 10], (Kind::Double, Device::Cpu));
    let o = DpGmmOptions {
        max_components: 10,
        max_iter: 20,
        ..Default::default()
    };
    let mut g = c.benchmark_group("dpgmm");
    g.sample_size(10);
    g.bench_function("fit n=2000 d=10 k=10 20 iterations", |b| {
        b.iter(|| DpGmm::fit(&x, &o, 0).unwrap())
    });
    g.finish();
}

criterion_group!(benches, noise, dpgmm);
criterion_main!(benches);
