//! Models: load the models a job names, or train the built-in CNN and VAE with
//! `[train]`.
use tch::Device;

use super::Job;
use crate::data::Dataset;
use crate::error::Result;
use crate::models::{self, Classifier, CnnArch, Vae, VaeArch};
use crate::train::{self, TrainOptions};

pub(super) fn load_or_train(
    job: &Job,
    ds: &Dataset,
    device: Device,
    done: bool,
) -> Result<(Classifier, Vae)> {
    let cfg = job.cfg;
    let shape = ds.image_shape();
    // training draws batches from the whole training split: read into memory once,
    // and only when a model is trained
    let mut held: Option<std::borrow::Cow<'_, Dataset>> = None;
    let nc = ds.num_classes() as i64;
    let t = &cfg.train;
    let jit = crate::frozen::jit_for(cfg.models.jit, cfg.identify.precision);
    let clf = match &cfg.models.classifier {
        Some(p) => Classifier::load_for_inference(p, shape, nc, device, jit)?,
        None => {
            let p = job.out.join("models/classifier.safetensors");
            if done && p.exists() {
                Classifier::load_for_inference(&p, shape, nc, device, jit)?
            } else {
                tracing::info!("training the built-in classifier ([train] settings)");
                tch::manual_seed(cfg.seed as i64);
                let [c, h, w] = shape;
                let mut m = Classifier::new_builtin(
                    CnnArch {
                        channels: c,
                        height: h,
                        width: w,
                        num_classes: nc,
                        width_base: t.classifier_width,
                    },
                    device,
                )?;
                let o = TrainOptions {
                    epochs: t.classifier_epochs,
                    batch_size: t.batch_size,
                    lr: t.lr,
                    seed: cfg.seed,
                    max_batches: 0,
                    lr_decay: t.classifier_lr_decay,
                };
                if held.is_none() {
                    held = Some(ds.held()?);
                }
                let data = held.as_deref().expect("read above");
                train::train_classifier(data, &mut m, &o)?;
                job.dir("models")?;
                m.save(&p)?;
                m.into_inference(jit)
            }
        }
    };
    let vae = match &cfg.models.vae {
        Some(p) => models::load_vae(p, cfg.models.vae_decoder.as_deref(), shape, device, jit)?,
        None => {
            let p = job.out.join("models/vae.safetensors");
            if done && p.exists() {
                models::load_vae(&p, None, shape, device, jit)?
            } else {
                tracing::info!("training the built-in VAE ([train] settings)");
                tch::manual_seed(cfg.seed as i64 + 1);
                let [c, h, w] = shape;
                let arch = VaeArch {
                    channels: c,
                    height: h,
                    width: w,
                    latent: t.vae_latent,
                    width_base: t.vae_width,
                    hidden: t.vae_hidden,
                    beta: t.vae_beta,
                };
                let mut m = Vae::new_builtin(arch, device)?;
                let o = TrainOptions {
                    epochs: t.vae_epochs,
                    batch_size: t.batch_size,
                    lr: t.lr,
                    seed: cfg.seed,
                    max_batches: 0,
                    lr_decay: t.vae_lr_decay,
                };
                if held.is_none() {
                    held = Some(ds.held()?);
                }
                let data = held.as_deref().expect("read above");
                train::train_vae(data, &mut m, &o)?;
                job.dir("models")?;
                m.save(&p)?;
                let x = data.test.images(0..16.min(data.test.len()), device);
                crate::images::write_grid(
                    &job.out.join("models/vae.recon.png"),
                    &[x.shallow_clone(), train::reconstruct(&m, &x)?],
                    3,
                )?;
                m.into_inference(jit)
            }
        }
    };
    Ok((clf, vae))
}

/// A second, independent copy of the classifier under test, to fine-tune.
pub(super) fn load_classifier_again(job: &Job, ds: &Dataset, device: Device) -> Result<Classifier> {
    let p = job
        .cfg
        .models
        .classifier
        .clone()
        .unwrap_or_else(|| job.out.join("models/classifier.safetensors"));
    Classifier::load(&p, ds.image_shape(), ds.num_classes() as i64, device)
}
