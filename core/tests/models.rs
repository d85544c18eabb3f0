//! Model loading (built-in and TorchScript, good and mismatched), fine-tuning a
//! TorchScript classifier, and short training runs that must lower the loss.
use std::path::{Path, PathBuf};

use defuse_core::data::DataSpec;
use defuse_core::models::{load_vae, Classifier, CnnArch, Jit, Vae, VaeArch};
use defuse_core::train::{self, TrainOptions};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

const MNIST: [i64; 3] = [1, 28, 28];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn mnist_subset(train: usize, test: usize) -> defuse_core::data::Dataset {
    let mut spec = DataSpec::from_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist"));
    spec.limit_train = train;
    spec.limit_test = test;
    spec.load()
        .expect("deploy/setup.sh puts MNIST in data/mnist")
}

fn clf_err(name: &str, classes: i64) -> String {
    Classifier::load(&fixture(name), MNIST, classes, Device::Cpu)
        .unwrap_err()
        .to_string()
}

/// The inference copies (frozen, optimised) give what the modules as loaded give, a
/// frozen classifier refuses to train, and a bad file is still named in the error.
#[test]
fn frozen_torchscript_models_match_the_modules_as_loaded() {
    tch::manual_seed(7);
    let x = Tensor::rand([5, 1, 28, 28], (Kind::Float, Device::Cpu));
    let plain = Classifier::load(&fixture("classifier_ok.pt"), MNIST, 10, Device::Cpu).unwrap();
    let want = plain.forward(&x, false).unwrap();
    let vae = |jit| {
        load_vae(
            &fixture("encoder_ok.pt"),
            Some(&fixture("decoder_ok.pt")),
            MNIST,
            Device::Cpu,
            jit,
        )
        .unwrap()
    };
    let as_loaded = vae(Jit::AsLoaded);
    let z = Tensor::randn([5, as_loaded.latent()], (Kind::Float, Device::Cpu));
    let (mu0, lv0) = as_loaded.encode(&x).unwrap();
    let dec0 = as_loaded.decode(&z).unwrap();
    let close = |a: &Tensor, b: &Tensor| {
        assert_eq!(a.size(), b.size());
        let d = f64::try_from((a - b).abs().max()).unwrap();
        assert!(d < 1e-4, "max difference {d}");
    };
    for jit in [Jit::AsLoaded, Jit::Freeze, Jit::Optimize] {
        let c = Classifier::load_for_inference(
            &fixture("classifier_ok.pt"),
            MNIST,
            10,
            Device::Cpu,
            jit,
        )
        .unwrap();
        assert!(c.is_torchscript());
        close(&c.forward(&x, false).unwrap(), &want);
        // saved, it is the user's file again, and loads trainable
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("original.pt");
        c.save(&saved).unwrap();
        let back = Classifier::load(&saved, MNIST, 10, Device::Cpu).unwrap();
        back.trainable().unwrap();
        close(&back.forward(&x, false).unwrap(), &want);
        let e = c.trainable().unwrap_err().to_string();
        assert!(e.contains("cannot be trained"), "{e}");
        let mut c = c;
        let e = train::train_classifier(
            &mnist_subset(64, 16),
            &mut c,
            &TrainOptions {
                epochs: 1,
                batch_size: 32,
                lr: 1e-3,
                seed: 1,
                max_batches: 1,
                lr_decay: 1.0,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot be trained"), "{e}");
        let v = vae(jit);
        let (mu, lv) = v.encode(&x).unwrap();
        close(&mu, &mu0);
        close(&lv, &lv0);
        close(&v.decode(&z).unwrap(), &dec0);
    }
    // a forward that fails inside TorchScript code says why, not only where
    let e = as_loaded
        .decode(&Tensor::randn(
            [5, as_loaded.latent() + 3],
            (Kind::Float, Device::Cpu),
        ))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shapes cannot be multiplied") || e.contains("size mismatch"),
        "{e}"
    );
    // the frozen path explains bad files as the trainable one does
    for (bad, want) in [
        ("garbage.pt", "not a loadable TorchScript module"),
        ("classifier_5_classes.pt", "returns 5 logits"),
    ] {
        let e =
            Classifier::load_for_inference(&fixture(bad), MNIST, 10, Device::Cpu, Jit::Optimize)
                .unwrap_err()
                .to_string();
        assert!(e.contains(bad) && e.contains(want), "{bad}: {e}");
    }
    let e = load_vae(
        &fixture("encoder_single_output.pt"),
        Some(&fixture("decoder_ok.pt")),
        MNIST,
        Device::Cpu,
        Jit::Optimize,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("(mu, logvar)"), "{e}");
}

#[test]
fn torchscript_classifier_loads_and_mismatches_are_explained() {
    let c = Classifier::load(&fixture("classifier_ok.pt"), MNIST, 10, Device::Cpu).unwrap();
    assert!(c.is_torchscript());
    let out = c
        .forward(
            &Tensor::rand([3, 1, 28, 28], (Kind::Float, Device::Cpu)),
            false,
        )
        .unwrap();
    assert_eq!(out.size(), [3, 10]);

    let e = clf_err("classifier_5_classes.pt", 10);
    assert!(
        e.contains("classifier_5_classes.pt")
            && e.contains("returns 5 logits")
            && e.contains("10 classes"),
        "{e}"
    );
    let e = clf_err("classifier_3_channels.pt", 10);
    assert!(
        e.contains("classifier_3_channels.pt") && e.contains("[2, 1, 28, 28]"),
        "{e}"
    );
    for bad in ["empty.pt", "classifier_truncated.pt", "garbage.pt"] {
        let e = clf_err(bad, 10);
        assert!(
            e.contains(bad) && e.contains("not a loadable TorchScript module"),
            "{bad}: {e}"
        );
    }
    let e = clf_err("does-not-exist.pt", 10);
    assert!(e.contains("does-not-exist.pt"), "{e}");
}

#[test]
fn torchscript_vae_loads_and_mismatches_are_explained() {
    let v = load_vae(
        &fixture("encoder_ok.pt"),
        Some(&fixture("decoder_ok.pt")),
        MNIST,
        Device::Cpu,
        Jit::default(),
    )
    .unwrap();
    assert_eq!(v.latent(), 4);
    let x = Tensor::rand([5, 1, 28, 28], (Kind::Float, Device::Cpu));
    let (mu, logvar) = v.encode(&x).unwrap();
    assert_eq!((mu.size(), logvar.size()), (vec![5, 4], vec![5, 4]));
    assert_eq!(v.decode(&mu).unwrap().size(), [5, 1, 28, 28]);

    let err = |enc: &str, dec: &str| {
        load_vae(
            &fixture(enc),
            Some(&fixture(dec)),
            MNIST,
            Device::Cpu,
            Jit::default(),
        )
        .unwrap_err()
        .to_string()
    };
    let e = err("encoder_single_output.pt", "decoder_ok.pt");
    assert!(
        e.contains("encoder_single_output.pt") && e.contains("(mu, logvar)"),
        "{e}"
    );
    let e = err("encoder_ok.pt", "decoder_32px.pt");
    assert!(
        e.contains("decoder_32px.pt")
            && e.contains("[2, 1, 32, 32]")
            && e.contains("expected [2, 1, 28, 28]"),
        "{e}"
    );
    let e = err("encoder_ok.pt", "decoder_latent6.pt");
    assert!(
        e.contains("decoder_latent6.pt") && e.contains("[2, 4] batch of codes"),
        "{e}"
    );
    let e = load_vae(
        &fixture("encoder_ok.pt"),
        None,
        MNIST,
        Device::Cpu,
        Jit::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("needs its decoder"), "{e}");
    // a classifier is not a VAE
    let e = err("classifier_ok.pt", "decoder_ok.pt");
    assert!(e.contains("(mu, logvar)"), "{e}");
}

#[test]
fn torchscript_classifier_fine_tunes_and_saves_as_torchscript() {
    let ds = mnist_subset(512, 256);
    let mut c = Classifier::load(&fixture("classifier_ok.pt"), MNIST, 10, Device::Cpu).unwrap();
    let n_params = c.var_store().trainable_variables().len();
    assert_eq!(n_params, 4, "conv and fc weights and biases are trainable");
    let x = ds.train.images(0..512, Device::Cpu);
    let y = ds.train.labels(0..512, Device::Cpu);
    let before = f64::try_from(c.forward(&x, false).unwrap().cross_entropy_for_logits(&y)).unwrap();
    c.set_train(true);
    let mut opt = tch::nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(c.var_store(), 0.05)
    .unwrap();
    for _ in 0..30 {
        let loss = c.forward(&x, true).unwrap().cross_entropy_for_logits(&y);
        opt.backward_step(&loss);
    }
    c.set_train(false);
    let after = f64::try_from(c.forward(&x, false).unwrap().cross_entropy_for_logits(&y)).unwrap();
    assert!(
        after < 0.7 * before,
        "fine-tuning lowers the loss: {before} -> {after}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tuned.pt");
    c.save(&out).unwrap();
    let again = Classifier::load(&out, MNIST, 10, Device::Cpu).unwrap();
    assert!(again.is_torchscript());
    let reloaded = f64::try_from(
        again
            .forward(&x, false)
            .unwrap()
            .cross_entropy_for_logits(&y),
    )
    .unwrap();
    assert!(
        (reloaded - after).abs() < 1e-5,
        "saved weights are the tuned ones: {after} vs {reloaded}"
    );
}

#[test]
fn builtin_classifier_trains_saves_and_reloads() {
    let ds = mnist_subset(3000, 500);
    tch::manual_seed(1);
    let arch = CnnArch {
        channels: 1,
        height: 28,
        width: 28,
        num_classes: 10,
        width_base: 8,
    };
    let mut c = Classifier::new_builtin(arch, Device::Cpu).unwrap();
    let untrained = train::accuracy(&c, &ds.test, Device::Cpu).unwrap();
    let opts = TrainOptions {
        epochs: 2,
        batch_size: 64,
        lr: 2e-3,
        seed: 3,
        max_batches: 0,
        lr_decay: 1.0,
    };
    let history = train::train_classifier(&ds, &mut c, &opts).unwrap();
    assert!(history[1].train_loss < history[0].train_loss, "{history:?}");
    let acc = history[1].test_accuracy;
    assert!(
        acc > 0.8 && acc > untrained + 0.5,
        "accuracy {untrained} -> {acc}"
    );

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("clf.safetensors");
    c.save(&p).unwrap();
    let back = Classifier::load(&p, [1, 28, 28], 10, Device::Cpu).unwrap();
    assert!(!back.is_torchscript());
    assert_eq!(train::accuracy(&back, &ds.test, Device::Cpu).unwrap(), acc);
    // the same file against another dataset's shape or class count
    let e = Classifier::load(&p, [3, 32, 32], 10, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("clf.safetensors")
            && e.contains("takes [1, 28, 28]")
            && e.contains("[3, 32, 32]"),
        "{e}"
    );
    let e = Classifier::load(&p, [1, 28, 28], 43, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("returns 10 logits") && e.contains("43 classes"),
        "{e}"
    );
    // a VAE file is not a classifier
    let v = Vae::new_builtin(
        VaeArch {
            channels: 1,
            height: 28,
            width: 28,
            latent: 3,
            width_base: 4,
            hidden: 16,
            beta: 1.0,
        },
        Device::Cpu,
    )
    .unwrap();
    let vp = dir.path().join("vae.safetensors");
    v.save(&vp).unwrap();
    let e = Classifier::load(&vp, [1, 28, 28], 10, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("built-in 'vae' model, expected a 'cnn'"), "{e}");
    let e = Classifier::load(
        &fixture("empty.pt").with_extension("safetensors"),
        MNIST,
        10,
        Device::Cpu,
    );
    assert!(e.is_err());
}

#[test]
fn builtin_vae_training_lowers_the_loss_and_reloads() {
    let ds = mnist_subset(2000, 300);
    tch::manual_seed(2);
    let arch = VaeArch {
        channels: 1,
        height: 28,
        width: 28,
        latent: 6,
        width_base: 16,
        hidden: 64,
        beta: 1.0,
    };
    let mut v = Vae::new_builtin(arch, Device::Cpu).unwrap();
    let (rec0, kl0) = train::vae_test_loss(&v, &ds.test).unwrap();
    let opts = TrainOptions {
        epochs: 2,
        batch_size: 64,
        lr: 2e-3,
        seed: 1,
        max_batches: 0,
        lr_decay: 1.0,
    };
    let h = train::train_vae(&ds, &mut v, &opts).unwrap();
    assert!(h[1].train_loss < h[0].train_loss, "{h:?}");
    assert!(
        h[1].test_reconstruction + h[1].test_kl < 0.6 * (rec0 + kl0),
        "{rec0}+{kl0} -> {h:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vae.safetensors");
    v.save(&p).unwrap();
    let back = load_vae(&p, None, MNIST, Device::Cpu, Jit::default()).unwrap();
    assert_eq!(back.latent(), 6);
    let (r1, _) = train::vae_test_loss(&back, &ds.test).unwrap();
    assert!(
        (r1 - h[1].test_reconstruction).abs() < 1e-3,
        "{r1} vs {:?}",
        h[1]
    );
    let e = load_vae(&p, None, [3, 32, 32], Device::Cpu, Jit::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vae.safetensors")
            && e.contains("takes [1, 28, 28]")
            && e.contains("[3, 32, 32]"),
        "{e}"
    );
}

/// The two safetensors files hold the same tensors, bit for bit (their headers may
/// list the metadata in another order).
fn same_weights(a: &Path, b: &Path) {
    let read = |p: &Path| {
        let mut v = Tensor::read_safetensors(p).unwrap();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let (a, b) = (read(a), read(b));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs");
    }
}

/// Built-in models loaded for inference at `jit = optimize` run as traced, frozen,
/// optimised graphs: the same numbers as the eager nets to float tolerance at any batch
/// size, saved as the same file, and never trained; `freeze` and `as-loaded` keep them
/// eager (bit for bit).
#[test]
fn builtin_models_traced_for_inference_match_the_eager_nets() {
    tch::manual_seed(5);
    let dir = tempfile::tempdir().unwrap();
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        assert_eq!(a.size(), b.size(), "{what}");
        let d = f64::try_from((a - b).abs().max()).unwrap();
        assert!(d < 1e-4, "{what}: max difference {d}");
    };
    let x = Tensor::rand([37, 1, 28, 28], (Kind::Float, Device::Cpu));

    let clf = Classifier::new_builtin(
        CnnArch {
            channels: 1,
            height: 28,
            width: 28,
            num_classes: 10,
            width_base: 8,
        },
        Device::Cpu,
    )
    .unwrap();
    let p = dir.path().join("clf.safetensors");
    clf.save(&p).unwrap();
    let want = clf.forward(&x, false).unwrap();
    for jit in [Jit::AsLoaded, Jit::Freeze] {
        let c = Classifier::load_for_inference(&p, MNIST, 10, Device::Cpu, jit).unwrap();
        assert!(
            c.forward(&x, false).unwrap().equal(&want),
            "{jit:?} stays eager"
        );
        assert!(c.trainable().is_ok(), "{jit:?}");
    }
    let traced = Classifier::load_for_inference(&p, MNIST, 10, Device::Cpu, Jit::Optimize).unwrap();
    assert!(
        !traced.is_torchscript(),
        "still a built-in model to save and fine-tune"
    );
    let got = traced.forward(&x, false).unwrap();
    close(&got, &want, "logits");
    assert!(got.argmax(1, false).equal(&want.argmax(1, false)));
    close(
        &traced.forward(&x.narrow(0, 0, 1), false).unwrap(),
        &want.narrow(0, 0, 1),
        "one image",
    );
    assert!(traced.trainable().is_err());
    assert!(traced.forward(&x, true).is_err(), "no training forward");
    let again = dir.path().join("clf-again.safetensors");
    traced.save(&again).unwrap();
    same_weights(&p, &again);

    let vae = Vae::new_builtin(
        VaeArch {
            channels: 1,
            height: 28,
            width: 28,
            latent: 6,
            width_base: 8,
            hidden: 32,
            beta: 1.0,
        },
        Device::Cpu,
    )
    .unwrap();
    let vp = dir.path().join("vae.safetensors");
    vae.save(&vp).unwrap();
    let (mu, logvar) = tch::no_grad(|| vae.encode(&x)).unwrap();
    let z = Tensor::randn([37, 6], (Kind::Float, Device::Cpu));
    let images = tch::no_grad(|| vae.decode(&z)).unwrap();
    let traced = load_vae(&vp, None, MNIST, Device::Cpu, Jit::Optimize).unwrap();
    assert_eq!(traced.latent(), 6);
    let (tmu, tlogvar) = traced.encode(&x).unwrap();
    close(&tmu, &mu, "mu");
    close(&tlogvar, &logvar, "logvar");
    close(&traced.decode(&z).unwrap(), &images, "decoded images");
    assert!(traced.var_store().is_none(), "not trainable");
    let again = dir.path().join("vae-again.safetensors");
    traced.save(&again).unwrap();
    same_weights(&vp, &again);
    let eager = load_vae(&vp, None, MNIST, Device::Cpu, Jit::AsLoaded).unwrap();
    assert!(eager.var_store().is_some());
    assert!(eager.decode(&z).unwrap().equal(&images));

    // where tracing fails (here: no temporary file for the trace) the models stay
    // eager and trainable, with the eager numbers; last, as it changes this process's
    // TMPDIR (nextest runs each test in its own process)
    std::env::set_var("TMPDIR", dir.path().join("missing"));
    let c = Classifier::load_for_inference(&p, MNIST, 10, Device::Cpu, Jit::Optimize).unwrap();
    assert!(c.trainable().is_ok(), "eager after a failed trace");
    assert!(c.forward(&x, false).unwrap().equal(&want));
    let v = load_vae(&vp, None, MNIST, Device::Cpu, Jit::Optimize).unwrap();
    assert!(v.var_store().is_some(), "eager after a failed trace");
    assert!(v.decode(&z).unwrap().equal(&images));
    let requires_grad =
        |vs: &tch::nn::VarStore| vs.trainable_variables().iter().all(|t| t.requires_grad());
    assert!(requires_grad(c.var_store()) && requires_grad(v.var_store().unwrap()));
}

/// A fine-tune part trained on only its rows, read alone from the IDX files (what a
/// worker does), ends with the same weights as one trained on the whole split.
#[test]
fn a_part_on_its_rows_alone_trains_as_on_the_whole_split() {
    let spec = DataSpec::from_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist"));
    let full = spec
        .load()
        .expect("deploy/setup.sh puts MNIST in data/mnist");
    let layout = full.layout.clone().expect("IDX has a layout");
    let o = defuse_core::correct::CorrectOptions {
        parts: 3,
        local_steps: 3,
        batch_size: 16,
        scenario_batch_size: 4,
        lr: 0.05,
        ..Default::default()
    };
    let n = full.train.len();
    let scn_x = full.test.images(0..12, Device::Cpu);
    let scn_y = full.test.labels(0..12, Device::Cpu);
    let (round, part) = (5, 1);
    let rows = defuse_core::correct::part_rows(n, 12, &o, 7, round, part);
    assert_eq!(rows.len(), 48, "3 steps of 16 distinct rows");
    let alone = spec
        .read_rows(&layout, defuse_core::data::SplitName::Train, &rows, None)
        .unwrap();
    assert_eq!(alone.train.len(), 48, "only the part's rows are read");
    let mut trained = Vec::new();
    for train in [&full.train, &alone.train] {
        let mut c = Classifier::load(&fixture("classifier_ok.pt"), MNIST, 10, Device::Cpu).unwrap();
        let r = defuse_core::correct::train_part(
            &mut c,
            train,
            n,
            &scn_x,
            &scn_y,
            &Default::default(),
            &o,
            7,
            round,
            part,
        )
        .unwrap();
        assert_eq!(r.2, 48);
        trained.push((c, r));
    }
    let ((a, ra), (b, rb)) = (&trained[0], &trained[1]);
    assert_eq!(ra, rb, "the same losses");
    let (va, vb) = (a.var_store().variables(), b.var_store().variables());
    for (name, t) in &va {
        assert!(t.equal(&vb[name]), "{name} differs");
    }
}

/// The single-process fine-tune on a training split left in its files, read a group of
/// steps at a time, ends with the weights of the same fine-tune on the split in memory.
#[test]
fn fine_tune_on_a_split_in_its_files_read_by_groups_equals_one_in_memory() {
    let mut spec = DataSpec::from_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist"));
    spec.limit_train = 1000;
    let (opened, loaded) = (spec.open().unwrap(), spec.load().unwrap());
    assert!(!opened.train.is_held() && loaded.train.is_held());
    assert_eq!(opened.train.len(), 1000);
    let o = defuse_core::correct::CorrectOptions {
        epochs: 2,
        batch_size: 32,
        scenario_batch_size: 8,
        lr: 0.05,
        ..Default::default()
    };
    let data = defuse_core::correct::ScenarioData {
        train_x: loaded.test.images(0..24, Device::Cpu),
        train_y: loaded.test.labels(0..24, Device::Cpu),
        test_x: loaded.test.images(24..30, Device::Cpu),
        test_y: loaded.test.labels(24..30, Device::Cpu),
        test_scenario: vec![0; 6],
        wider: vec![],
        // some rows relabelled and one left out: the same in every group size too
        train_labels: [(0, 3), (1, 3), (2, 3), (5, defuse_core::correct::IGNORED)].into(),
    };
    let tune = |train: &defuse_core::data::Split, rows_per_group: usize| {
        let mut c = Classifier::load(&fixture("classifier_ok.pt"), MNIST, 10, Device::Cpu).unwrap();
        tch::manual_seed(3);
        let h =
            defuse_core::correct::fine_tune_in_groups(&mut c, train, &data, &o, 9, rows_per_group)
                .unwrap();
        (c, h)
    };
    // 32 steps an epoch; groups of 3 steps (100 rows) read from the files
    let (a, ha) = tune(&loaded.train, usize::MAX);
    let (b, hb) = tune(&opened.train, 100);
    assert_eq!(ha.len(), 2);
    for (x, y) in ha.iter().zip(&hb) {
        assert!(
            (x.ce_train - y.ce_train).abs() < 1e-9 && (x.ce_scenario - y.ce_scenario).abs() < 1e-9
        );
    }
    let (va, vb) = (a.var_store().variables(), b.var_store().variables());
    for (name, t) in &va {
        assert!(t.equal(&vb[name]), "{name} differs");
    }
}

#[test]
fn averaged_torchscript_parts_are_the_mean_and_save_as_torchscript() {
    let ds = mnist_subset(256, 64);
    let base = Classifier::load(&fixture("classifier_ok.pt"), MNIST, 10, Device::Cpu).unwrap();
    let o = defuse_core::correct::CorrectOptions {
        parts: 2,
        local_steps: 2,
        batch_size: 32,
        scenario_batch_size: 8,
        lr: 0.05,
        ..Default::default()
    };
    let scn_x = ds.test.images(0..32, Device::Cpu);
    let scn_y = ds.test.labels(0..32, Device::Cpu);
    let mut parts = Vec::new();
    for part in 0..2 {
        let mut c = Classifier::load(&fixture("classifier_ok.pt"), MNIST, 10, Device::Cpu).unwrap();
        let (_, _, n) = defuse_core::correct::train_part(
            &mut c,
            &ds.train,
            ds.train.len(),
            &scn_x,
            &scn_y,
            &Default::default(),
            &o,
            7,
            0,
            part,
        )
        .unwrap();
        assert_eq!(n, 64, "2 steps of 32 rows");
        parts.push(c);
    }
    let mut avg = Classifier::load(&fixture("classifier_ok.pt"), MNIST, 10, Device::Cpu).unwrap();
    defuse_core::correct::average_into(&mut avg, &[(&parts[0], 1.0), (&parts[1], 3.0)]).unwrap();
    let (a, p0, p1, b) = (
        avg.var_store().variables(),
        parts[0].var_store().variables(),
        parts[1].var_store().variables(),
        base.var_store().variables(),
    );
    for (name, t) in &a {
        let want = (&p0[name] * 0.25) + (&p1[name] * 0.75);
        assert!(
            t.allclose(&want, 1e-6, 1e-6, false),
            "{name} is not the weighted mean"
        );
        assert!(
            !t.allclose(&b[name], 1e-6, 1e-6, false),
            "{name} did not move"
        );
    }
    // TorchScript in, TorchScript out, and it loads back with the averaged weights
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("avg.pt");
    avg.save(&out).unwrap();
    let again = Classifier::load(&out, MNIST, 10, Device::Cpu).unwrap();
    assert!(again.is_torchscript());
    let x = ds.test.images(0..16, Device::Cpu);
    let (ya, yb) = (
        avg.forward(&x, false).unwrap(),
        again.forward(&x, false).unwrap(),
    );
    assert!(ya.allclose(&yb, 1e-5, 1e-5, false));
}

#[test]
fn rounds_cover_the_single_process_steps_exactly_once() {
    let o = defuse_core::correct::CorrectOptions {
        parts: 3,
        local_steps: 4,
        batch_size: 10,
        epochs: 2,
        ..Default::default()
    };
    // 95 rows: 10 batches per epoch, 20 steps, 12 per round: 2 rounds
    assert_eq!(defuse_core::correct::n_rounds(95, &o), 2);
    let mut seen = std::collections::HashMap::<usize, usize>::new();
    for round in 0..2 {
        for part in 0..3 {
            let (tb, sb) = defuse_core::correct::round_steps(95, 7, &o, 1, round, part);
            assert_eq!(tb.len(), sb.len());
            for b in tb {
                for i in b {
                    *seen.entry(i).or_default() += 1;
                }
            }
        }
    }
    assert_eq!(seen.len(), 95, "every row is seen");
    assert!(seen.values().all(|&n| n == 2), "once per epoch");
    // one part and enough steps: the whole sequence in one round; the parts of the
    // rounds, in order, are that sequence cut in pieces
    let one = defuse_core::correct::CorrectOptions {
        parts: 1,
        local_steps: 1000,
        ..o.clone()
    };
    let (all_t, all_s) = defuse_core::correct::round_steps(95, 7, &one, 1, 0, 0);
    assert_eq!(all_t.len(), 20);
    let (mut cut_t, mut cut_s) = (Vec::new(), Vec::new());
    for round in 0..2 {
        for part in 0..3 {
            let (t, s) = defuse_core::correct::round_steps(95, 7, &o, 1, round, part);
            cut_t.extend(t);
            cut_s.extend(s);
        }
    }
    assert_eq!(cut_t, all_t);
    assert_eq!(cut_s, all_s);
}

#[test]
fn merging_by_sum_applies_every_part_update() {
    let ds = mnist_subset(128, 32);
    let load = || Classifier::load(&fixture("classifier_ok.pt"), MNIST, 10, Device::Cpu).unwrap();
    let o = defuse_core::correct::CorrectOptions {
        parts: 2,
        local_steps: 1,
        batch_size: 32,
        scenario_batch_size: 8,
        lr: 0.05,
        ..Default::default()
    };
    let (sx, sy) = (
        ds.test.images(0..16, Device::Cpu),
        ds.test.labels(0..16, Device::Cpu),
    );
    let mut parts = Vec::new();
    for part in 0..2 {
        let mut c = load();
        defuse_core::correct::train_part(
            &mut c,
            &ds.train,
            ds.train.len(),
            &sx,
            &sy,
            &Default::default(),
            &o,
            3,
            0,
            part,
        )
        .unwrap();
        parts.push(c);
    }
    let mut merged = load();
    let start = load();
    defuse_core::correct::merge_into(
        &mut merged,
        &[(&parts[0], 32.0), (&parts[1], 96.0)],
        defuse_core::correct::Merge::Sum,
    )
    .unwrap();
    let (m, s0, p0, p1) = (
        merged.var_store().variables(),
        start.var_store().variables(),
        parts[0].var_store().variables(),
        parts[1].var_store().variables(),
    );
    for (name, t) in &m {
        // weights relative to the mean (64): 0.5 and 1.5
        let want = &s0[name] + (&p0[name] - &s0[name]) * 0.5 + (&p1[name] - &s0[name]) * 1.5;
        assert!(t.allclose(&want, 1e-5, 1e-6, false), "{name}");
        assert!(
            !t.allclose(&s0[name], 1e-7, 1e-7, false),
            "{name} did not move"
        );
    }
}

#[test]
fn nan_from_a_model_is_an_error_not_a_failure() {
    // NaN for every input: refused when loaded, naming the file
    let e = clf_err("classifier_nan.pt", 10);
    assert!(e.contains("classifier_nan.pt") && e.contains("NaN"), "{e}");
    // NaN only for real digits (a pixel at 1.0): loads, then the search stops with an
    // error instead of counting NaN predictions as failures
    let clf = Classifier::load(
        &fixture("classifier_nan_on_bright.pt"),
        MNIST,
        10,
        Device::Cpu,
    )
    .unwrap();
    let vae = load_vae(
        &fixture("encoder_ok.pt"),
        Some(&fixture("decoder_ok.pt")),
        MNIST,
        Device::Cpu,
        Jit::default(),
    )
    .unwrap();
    let ds = mnist_subset(10, 64);
    let split = ds.split(defuse_core::data::SplitName::Test);
    let o = defuse_core::identify::IdentifyOptions {
        samples: 4,
        ..Default::default()
    };
    let e = defuse_core::identify::identify(
        split,
        defuse_core::data::SplitName::Test,
        0..64,
        &clf,
        &vae,
        &o,
        0,
        |_| true,
    )
    .unwrap_err();
    assert!(
        matches!(e, defuse_core::Error::Invalid { .. }),
        "not retryable: {e}"
    );
    let e = e.to_string();
    assert!(
        e.contains("NaN or infinite logits") && e.contains("of 32 images"),
        "{e}"
    );
    // the check the search applies to every chunk of decoded perturbations
    let logits = Tensor::from_slice(&[0.0f32, 1.0, f32::NAN, 2.0, 3.0, 4.0]).view([3, 2]);
    let e =
        defuse_core::models::finite_logits(logits, || "decoded perturbations (images 0..3)".into())
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("1 of 3 decoded perturbations (images 0..3)"),
        "{e}"
    );
    let fine = Tensor::from_slice(&[0.0f32, 1.0]).view([1, 2]);
    assert!(defuse_core::models::finite_logits(fine, || "x".into()).is_ok());
    // and predict (evaluation) refuses the same way
    let e = clf
        .predict(&split.images(0..8, Device::Cpu), 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN"), "{e}");
}
