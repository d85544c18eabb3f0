//! The correction objective: fine-tuning on `CE(train) + lambda * CE(scenario)` lowers
//! both terms, and the scenario-test accuracy rises while test accuracy holds.
use std::path::Path;

use defuse_core::correct::{accuracy_by_group, fine_tune, CorrectOptions, ScenarioData};
use defuse_core::data::DataSpec;
use defuse_core::models::{Classifier, CnnArch};
use defuse_core::train::{self, TrainOptions};
use tch::Device;

#[test]
fn fine_tune_lowers_both_terms_and_fixes_the_scenario() {
    let mut spec = DataSpec::from_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist"));
    spec.limit_train = 4000;
    spec.limit_test = 1000;
    let ds = spec.load().unwrap();
    tch::manual_seed(0);
    let arch = CnnArch {
        channels: 1,
        height: 28,
        width: 28,
        num_classes: 10,
        width_base: 8,
    };
    let mut clf = Classifier::new_builtin(arch, Device::Cpu).unwrap();
    let o = TrainOptions {
        epochs: 2,
        batch_size: 64,
        lr: 2e-3,
        seed: 0,
        max_batches: 0,
        lr_decay: 1.0,
    };
    train::train_classifier(&ds, &mut clf, &o).unwrap();

    // a failure scenario the classifier has never seen: inverted digits (white
    // background), with their true labels; learning it does not fight the train set
    let n = 600;
    let x: tch::Tensor = 1.0 - ds.test.images(0..n, Device::Cpu);
    let y = ds.test.labels(0..n, Device::Cpu);
    let data = ScenarioData {
        train_x: x.narrow(0, 0, 400),
        train_y: y.narrow(0, 0, 400),
        test_x: x.narrow(0, 400, 200),
        test_y: y.narrow(0, 400, 200),
        test_scenario: vec![0; 200],
        wider: vec![],
        train_labels: Default::default(),
    };
    let test_before = train::accuracy(&clf, &ds.test, Device::Cpu).unwrap();
    let (scn_before, _) =
        accuracy_by_group(&clf, &data.test_x, &data.test_y, &data.test_scenario).unwrap();
    let co = CorrectOptions {
        lambda: 1.0,
        lr: 0.01,
        epochs: 3,
        ..Default::default()
    };
    let history = fine_tune(&mut clf, &ds.train, &data, &co, 1).unwrap();
    let (first, last) = (&history[0], &history[2]);
    assert!(
        last.ce_scenario < 0.5 * first.ce_scenario,
        "scenario term {first:?} -> {last:?}"
    );
    assert!(
        last.ce_train < first.ce_train,
        "train term {first:?} -> {last:?}"
    );
    let test_after = train::accuracy(&clf, &ds.test, Device::Cpu).unwrap();
    let (scn_after, per) =
        accuracy_by_group(&clf, &data.test_x, &data.test_y, &data.test_scenario).unwrap();
    assert!(
        scn_after > scn_before + 0.3,
        "held-out scenario accuracy {scn_before} -> {scn_after}"
    );
    assert!(
        test_after > test_before - 0.02,
        "test accuracy {test_before} -> {test_after}"
    );
    assert_eq!(per.len(), 1);
    assert!((per[&0] - scn_after).abs() < 1e-12);
}
