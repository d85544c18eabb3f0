//! Training and evaluation of the built-in models on a dataset (`defuse train`), and
//! the shared pieces: seeded shuffles, batched evaluation.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::data::{Dataset, Split};
use crate::error::{Error, Result};
use crate::models::{vae_forward_train, vae_loss_terms, Classifier, Vae};
use crate::progress;

/// The usual knobs of a training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// Stop an epoch after this many batches (0 = the whole split); for tests.
    #[serde(default)]
    pub max_batches: usize,
    /// The learning rate is multiplied by this after every epoch (1 = constant).
    #[serde(default = "one")]
    pub lr_decay: f64,
}

fn one() -> f64 {
    1.0
}

impl TrainOptions {
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::invalid("epochs", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid(
                "lr",
                format!("{} is not a positive learning rate", self.lr),
            ));
        }
        if !(self.lr_decay > 0.0 && self.lr_decay <= 1.0) {
            return Err(Error::invalid(
                "lr_decay",
                format!("{} is not in (0, 1]", self.lr_decay),
            ));
        }
        Ok(())
    }
}

/// What one epoch of classifier training measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierEpoch {
    pub epoch: usize,
    pub train_loss: f64,
    pub test_accuracy: f64,
}

/// What one epoch of VAE training measured (per image, test split).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeEpoch {
    pub epoch: usize,
    pub train_loss: f64,
    pub test_reconstruction: f64,
    pub test_kl: f64,
}

/// A seeded permutation of `0..n`: the batch order of epoch `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64);
    idx.shuffle(&mut rng);
    idx
}

/// Trains a classifier with Adam and cross-entropy; evaluates on the test split after
/// every epoch.
pub fn train_classifier(
    ds: &Dataset,
    clf: &mut Classifier,
    o: &TrainOptions,
) -> Result<Vec<ClassifierEpoch>> {
    o.validate()?;
    clf.trainable()?;
    let device = clf.device();
    let mut opt = nn::Adam::default().build(clf.var_store(), o.lr)?;
    let mut history = Vec::new();
    for epoch in 1..=o.epochs {
        opt.set_lr(o.lr * o.lr_decay.powi(epoch as i32 - 1));
        clf.set_train(true);
        let order = epoch_order(ds.train.len(), o.seed, epoch);
        let batches = batches(&order, o);
        let bar = progress::bar(
            batches.len() as u64,
            &format!("classifier epoch {epoch}/{}", o.epochs),
        );
        let (mut sum, mut count) = (0.0, 0usize);
        for idx in batches {
            let x = ds.train.gather(idx, device);
            let y = ds.train.gather_labels(idx, device);
            let loss = clf.forward(&x, true)?.cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            sum += f64::try_from(&loss)? * idx.len() as f64;
            count += idx.len();
            bar.set_message(format!("loss {:.4}", sum / count as f64));
            bar.inc(1);
        }
        bar.finish_and_clear();
        clf.set_train(false);
        let acc = accuracy(clf, &ds.test, device)?;
        tracing::info!(
            epoch,
            train_loss = sum / count as f64,
            test_accuracy = acc,
            "classifier epoch done"
        );
        history.push(ClassifierEpoch {
            epoch,
            train_loss: sum / count as f64,
            test_accuracy: acc,
        });
    }
    Ok(history)
}

fn batches<'a>(order: &'a [usize], o: &TrainOptions) -> Vec<&'a [usize]> {
    let mut b: Vec<&[usize]> = order.chunks(o.batch_size).collect();
    if o.max_batches > 0 {
        b.truncate(o.max_batches);
    }
    b
}

/// Accuracy of `clf` on a whole split, in batches, without gradients.
pub fn accuracy(clf: &Classifier, split: &Split, device: Device) -> Result<f64> {
    if split.is_empty() {
        return Ok(f64::NAN);
    }
    let mut correct = 0i64;
    split.for_windows(0..split.len(), |w, range| {
        for start in range.clone().step_by(1000) {
            let end = (start + 1000).min(range.end);
            let x = w.images(start..end, device);
            let y = w.labels(start..end, device);
            let (pred, _) = clf.predict(&x, 1000)?;
            correct += i64::try_from(pred.eq_tensor(&y).sum(Kind::Int64))?;
        }
        Ok(())
    })?;
    Ok(correct as f64 / split.len() as f64)
}

/// Trains a built-in VAE with Adam on `recon + beta * KL` (per image).
pub fn train_vae(ds: &Dataset, vae: &mut Vae, o: &TrainOptions) -> Result<Vec<VaeEpoch>> {
    o.validate()?;
    let device = vae.device();
    let beta = vae.beta();
    let vs = vae
        .var_store()
        .ok_or_else(|| Error::invalid("vae", "only built-in VAEs can be trained by Defuse"))?;
    let mut opt = nn::Adam::default().build(vs, o.lr)?;
    let mut history = Vec::new();
    for epoch in 1..=o.epochs {
        opt.set_lr(o.lr * o.lr_decay.powi(epoch as i32 - 1));
        let order = epoch_order(ds.train.len(), o.seed, epoch);
        let batches = batches(&order, o);
        let bar = progress::bar(
            batches.len() as u64,
            &format!("vae epoch {epoch}/{}", o.epochs),
        );
        let (mut sum, mut count) = (0.0, 0usize);
        for idx in batches {
            let x = ds.train.gather(idx, device);
            let (recon, mu, logvar) = vae_forward_train(vae, &x)?;
            let (rec, kl) = vae_loss_terms(&x, &recon, &mu, &logvar);
            let loss = rec + kl * beta;
            opt.backward_step(&loss);
            sum += f64::try_from(&loss)? * idx.len() as f64;
            count += idx.len();
            bar.set_message(format!("loss {:.2}", sum / count as f64));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let (rec, kl) = vae_test_loss(vae, &ds.test)?;
        tracing::info!(
            epoch,
            train_loss = sum / count as f64,
            test_reconstruction = rec,
            test_kl = kl,
            "vae epoch done"
        );
        history.push(VaeEpoch {
            epoch,
            train_loss: sum / count as f64,
            test_reconstruction: rec,
            test_kl: kl,
        });
    }
    Ok(history)
}

/// Reconstruction (from `mu`, no sampling) and KL per image on a split.
pub fn vae_test_loss(vae: &Vae, split: &Split) -> Result<(f64, f64)> {
    let device = vae.device();
    let (mut rec, mut kl) = (0.0, 0.0);
    tch::no_grad(|| {
        split.for_windows(0..split.len(), |w, range| {
            for start in range.clone().step_by(1000) {
                let end = (start + 1000).min(range.end);
                let x = w.images(start..end, device);
                let (mu, logvar) = vae.encode(&x)?;
                let recon = vae.decode(&mu)?;
                let (r, k) = vae_loss_terms(&x, &recon, &mu, &logvar);
                rec += f64::try_from(r)? * (end - start) as f64;
                kl += f64::try_from(k)? * (end - start) as f64;
            }
            Ok(())
        })
    })?;
    let n = split.len().max(1) as f64;
    Ok((rec / n, kl / n))
}

/// Deterministic reconstructions of `x` (decode `mu`).
pub fn reconstruct(vae: &Vae, x: &Tensor) -> Result<Tensor> {
    tch::no_grad(|| {
        let (mu, _) = vae.encode(x)?;
        vae.decode(&mu)
    })
}
