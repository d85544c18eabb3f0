//! Correct: fine-tune the classifier from its current weights on
//! `CE(train batch) + lambda * CE(scenario batch)`, where the scenario batch comes
//! from images sampled from the labelled failure scenarios. Part of those samples is
//! held out (scenario-test) and never trained on.
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::data::Split;
use crate::error::{Error, Result};
use crate::models::{Classifier, Vae};
use crate::progress;
use crate::scenarios::{Label, Labels, Scenario};
use crate::seeds::{rng_for, Step};

/// Options of the correct step (the `[correct]` table of a job config). Defaults
/// follow the authors' code (SGD, lr 0.001, momentum 0.9, batch 64 + 64) except
/// `lambda` (theirs: 0.01; the paper sweeps it) and `epochs` (theirs: 20, retraining
/// from ImageNet weights; here a fine-tune of the analysed classifier).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorrectOptions {
    /// Samples drawn per labelled scenario (`M`).
    pub samples_per_scenario: usize,
    /// Share of them held out as scenario-test.
    pub test_fraction: f64,
    /// Weight of the scenario term.
    pub lambda: f64,
    pub lr: f64,
    pub momentum: f64,
    /// Training images per step.
    pub batch_size: usize,
    /// Scenario images per step.
    pub scenario_batch_size: usize,
    /// Passes over the training split.
    pub epochs: usize,
}

impl Default for CorrectOptions {
    fn default() -> Self {
        CorrectOptions {
            samples_per_scenario: 500,
            test_fraction: 0.3,
            lambda: 0.5,
            lr: 0.001,
            momentum: 0.9,
            batch_size: 64,
            scenario_batch_size: 64,
            epochs: 1,
        }
    }
}

impl CorrectOptions {
    pub fn validate(&self) -> Result<()> {
        if self.samples_per_scenario < 2 {
            return Err(Error::invalid(
                "correct.samples_per_scenario",
                "must be at least 2",
            ));
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            return Err(Error::invalid(
                "correct.test_fraction",
                format!("{} is not in (0, 1)", self.test_fraction),
            ));
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(Error::invalid(
                "correct.lambda",
                format!("{} is not >= 0", self.lambda),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && (0.0..1.0).contains(&self.momentum)) {
            return Err(Error::invalid(
                "correct",
                "lr must be > 0 and momentum in [0, 1)",
            ));
        }
        if self.batch_size == 0 || self.scenario_batch_size == 0 || self.epochs == 0 {
            return Err(Error::invalid(
                "correct",
                "batch_size, scenario_batch_size and epochs must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Images sampled from the labelled scenarios, split into train and held-out test.
#[derive(Debug)]
pub struct ScenarioData {
    pub train_x: Tensor,
    pub train_y: Tensor,
    pub test_x: Tensor,
    pub test_y: Tensor,
    /// Scenario id of every test row.
    pub test_scenario: Vec<usize>,
}

/// Draws `M` codes per labelled (not discarded) scenario, decodes them, and splits
/// them: the first `(1 - test_fraction) M` train, the rest test.
pub fn scenario_data(
    vae: &Vae,
    scenarios: &[Scenario],
    labels: &Labels,
    tau: f64,
    o: &CorrectOptions,
    seed: u64,
) -> Result<ScenarioData> {
    o.validate()?;
    let m = o.samples_per_scenario;
    let n_train = ((1.0 - o.test_fraction) * m as f64)
        .round()
        .clamp(1.0, (m - 1) as f64) as i64;
    let (mut tx, mut ty, mut vx, mut vy, mut vs) = (vec![], vec![], vec![], vec![], vec![]);
    for s in scenarios {
        let Some(Label::Class(class)) = labels.get(&s.id).copied() else {
            continue;
        };
        let codes = s.sample_codes(m, tau, seed, 1)?;
        let imgs =
            tch::no_grad(|| vae.decode(&codes.to_device(vae.device())))?.to_device(Device::Cpu);
        tx.push(imgs.narrow(0, 0, n_train));
        vx.push(imgs.narrow(0, n_train, m as i64 - n_train));
        ty.push(Tensor::full([n_train], class, (Kind::Int64, Device::Cpu)));
        vy.push(Tensor::full(
            [m as i64 - n_train],
            class,
            (Kind::Int64, Device::Cpu),
        ));
        vs.extend(std::iter::repeat_n(s.id, m - n_train as usize));
    }
    if tx.is_empty() {
        return Err(Error::invalid(
            "labels",
            "no scenario has a class label (all discarded?): nothing to correct",
        ));
    }
    Ok(ScenarioData {
        train_x: Tensor::cat(&tx, 0),
        train_y: Tensor::cat(&ty, 0),
        test_x: Tensor::cat(&vx, 0),
        test_y: Tensor::cat(&vy, 0),
        test_scenario: vs,
    })
}

/// Loss terms of one fine-tune pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CorrectEpoch {
    pub epoch: usize,
    pub ce_train: f64,
    pub ce_scenario: f64,
}

/// The fine-tune step a worker runs on its part of the data: for each pair of index
/// batches, one SGD step on `CE(train) + lambda * CE(scenario)`. Returns the summed
/// loss terms (weighted by batch size) and the number of train rows.
#[allow(clippy::too_many_arguments)]
pub fn fine_tune_steps(
    clf: &mut Classifier,
    opt: &mut nn::Optimizer,
    train: &Split,
    train_batches: &[&[usize]],
    scn_x: &Tensor,
    scn_y: &Tensor,
    scn_batches: &[Vec<i64>],
    lambda: f64,
    mut on_step: impl FnMut(),
) -> Result<(f64, f64, usize)> {
    let device = clf.device();
    clf.set_train(true);
    let (mut ce_t, mut ce_s, mut n) = (0.0, 0.0, 0usize);
    for (b, idx) in train_batches.iter().enumerate() {
        let x = train.gather(idx, device);
        let y = train.gather_labels(idx, device);
        let si = Tensor::from_slice(&scn_batches[b % scn_batches.len()]);
        let sx = scn_x.index_select(0, &si).to_device(device);
        let sy = scn_y.index_select(0, &si).to_device(device);
        let lt = clf.forward(&x, true)?.cross_entropy_for_logits(&y);
        let ls = clf.forward(&sx, true)?.cross_entropy_for_logits(&sy);
        opt.backward_step(&(&lt + &ls * lambda));
        ce_t += f64::try_from(&lt)? * idx.len() as f64;
        ce_s += f64::try_from(&ls)? * idx.len() as f64;
        n += idx.len();
        on_step();
    }
    clf.set_train(false);
    Ok((ce_t, ce_s, n))
}

/// Fine-tunes `clf` in place (single process).
pub fn fine_tune(
    clf: &mut Classifier,
    train: &Split,
    data: &ScenarioData,
    o: &CorrectOptions,
    seed: u64,
) -> Result<Vec<CorrectEpoch>> {
    o.validate()?;
    let mut opt = nn::Sgd {
        momentum: o.momentum,
        ..Default::default()
    }
    .build(clf.var_store(), o.lr)?;
    let mut history = Vec::new();
    let n_scn = data.train_x.size()[0] as usize;
    for epoch in 1..=o.epochs {
        let order = epoch_permutation(train.len(), seed, epoch as u64, 0);
        let batches: Vec<&[usize]> = order.chunks(o.batch_size).collect();
        let scn_order = epoch_permutation(n_scn, seed, epoch as u64, 1);
        // as many scenario batches as train batches, cycling through the scenario set
        let scn_batches: Vec<Vec<i64>> = (0..batches.len())
            .map(|b| {
                (0..o.scenario_batch_size)
                    .map(|j| scn_order[(b * o.scenario_batch_size + j) % n_scn] as i64)
                    .collect()
            })
            .collect();
        let bar = progress::bar(
            batches.len() as u64,
            &format!("correct epoch {epoch}/{}", o.epochs),
        );
        let (ct, cs, n) = fine_tune_steps(
            clf,
            &mut opt,
            train,
            &batches,
            &data.train_x,
            &data.train_y,
            &scn_batches,
            o.lambda,
            || bar.inc(1),
        )?;
        bar.finish_and_clear();
        let e = CorrectEpoch {
            epoch,
            ce_train: ct / n as f64,
            ce_scenario: cs / n as f64,
        };
        tracing::info!(
            epoch,
            ce_train = e.ce_train,
            ce_scenario = e.ce_scenario,
            "correct epoch done"
        );
        history.push(e);
    }
    Ok(history)
}

fn epoch_permutation(n: usize, seed: u64, epoch: u64, stream: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rng_for(seed, Step::Correct, &[epoch, stream]));
    v
}

/// Accuracy on labelled images (`x` on the CPU), overall and per group.
pub fn accuracy_by_group(
    clf: &Classifier,
    x: &Tensor,
    y: &Tensor,
    groups: &[usize],
) -> Result<(f64, std::collections::BTreeMap<usize, f64>)> {
    let (pred, _) = clf.predict(&x.to_device(clf.device()), 500)?;
    let right = Vec::<bool>::try_from(pred.to_device(Device::Cpu).eq_tensor(y))?;
    let mut per: std::collections::BTreeMap<usize, (usize, usize)> = Default::default();
    for (i, &g) in groups.iter().enumerate() {
        let e = per.entry(g).or_default();
        e.0 += right[i] as usize;
        e.1 += 1;
    }
    let overall = right.iter().filter(|&&r| r).count() as f64 / right.len().max(1) as f64;
    Ok((
        overall,
        per.into_iter()
            .map(|(g, (r, n))| (g, r as f64 / n as f64))
            .collect(),
    ))
}
