//! A whole Defuse job in one process: models, identify, distill, pictures, label,
//! correct, report, one file each (`step_*.rs`); this module chains them. Every step
//! writes its outputs under the job's folder (`crate::layout`) with a `done.json` that
//! records a hash of the configuration it depends on, so a rerun picks up after the
//! last finished step (and redoes a step whose configuration changed, with everything
//! after it).
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::JobConfig;
use crate::correct;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::identify::{Failures, IdentifyOptions, IdentifyStats};
use crate::layout::{self, write_json};
use crate::models::{self, Classifier, Vae};
use crate::report;

mod step_correct;
mod step_distill;
mod step_identify;
mod step_label;
mod step_models;
mod step_pictures;
mod step_report;
mod sweep;

pub use sweep::{sweep, Sweep};

/// Outcome of a run.
#[derive(Debug)]
pub enum RunOutcome {
    Finished(Box<report::Summary>),
    /// `label.mode = "manual"` and no labels yet: the run stopped after distill.
    AwaitingLabels {
        scenarios: usize,
    },
    /// `correct.parts > 1` on a coordinator: the round inputs are ready under
    /// `correct/` (see [`RoundsInput`]); the coordinator runs the rounds on its workers,
    /// writes `correct/rounds-final.<ext>` and `correct/rounds-done.json`, and calls
    /// [`finish`] again.
    FineTune(RoundsInput),
}

/// What a distributed fine-tune starts from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundsInput {
    pub rounds: usize,
    pub parts: usize,
    /// The classifier to fine-tune (round 0's checkpoint) and its extension.
    pub classifier: PathBuf,
    pub extension: String,
    /// `train_x`, `train_y` of the scenario-train samples.
    pub scenario_train: PathBuf,
    /// The correct step's hash: `rounds-done.json` must carry it.
    pub hash: String,
    /// Rows of the training split and of the scenario-train samples.
    pub n_train: usize,
    pub n_scenario: usize,
    pub image_shape: [i64; 3],
    pub num_classes: i64,
}

/// Written by the coordinator when the last round is averaged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundsDone {
    pub hash: String,
    pub history: Vec<correct::CorrectEpoch>,
}

#[derive(Serialize, Deserialize)]
struct Done {
    hash: String,
    seconds: f64,
}

fn hash_of(parts: &[&dyn erased::Json]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.json().as_bytes());
        h.update([0]);
    }
    format!("{:x}", h.finalize())[..16].to_string()
}

mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("config serialises")
        }
    }
}

struct Job<'a> {
    cfg: &'a JobConfig,
    out: PathBuf,
    timings: Vec<(String, f64)>,
}

impl Job<'_> {
    fn dir(&self, step: &str) -> Result<PathBuf> {
        let d = self.out.join(step);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        Ok(d)
    }

    fn done(&self, step: &str, hash: &str) -> bool {
        let p = self.out.join(layout::done(step));
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| serde_json::from_str::<Done>(&s).ok())
            .is_some_and(|d| d.hash == hash)
    }

    fn mark(&mut self, step: &str, hash: &str, started: Instant) -> Result<()> {
        self.mark_seconds(step, hash, started.elapsed().as_secs_f64())
    }

    fn mark_seconds(&mut self, step: &str, hash: &str, seconds: f64) -> Result<()> {
        self.dir(step)?;
        let p = self.out.join(layout::done(step));
        std::fs::write(
            &p,
            serde_json::to_string(&Done {
                hash: hash.into(),
                seconds,
            })
            .expect("json"),
        )
        .map_err(|e| Error::io(&p, e))?;
        self.timings.push((step.into(), seconds));
        tracing::info!(step, seconds, "step done");
        Ok(())
    }

    /// A path as a step's hash covers it: a file in the job folder (a copy of an input
    /// in a bucket) relative to the folder, so that the same job resumed in another
    /// copy of its folder (an `out` in a bucket, on another machine) finds its steps done.
    fn path_id(&self, p: &Option<PathBuf>) -> Option<PathBuf> {
        p.as_ref().map(|p| {
            p.strip_prefix(&self.out)
                .map_or_else(|_| p.clone(), PathBuf::from)
        })
    }

    /// `[models]` as the models step's hash covers it.
    fn models_id(&self) -> crate::models::ModelFiles {
        let m = &self.cfg.models;
        crate::models::ModelFiles {
            classifier: self.path_id(&m.classifier),
            vae: self.path_id(&m.vae),
            vae_decoder: self.path_id(&m.vae_decoder),
            // how TorchScript is run changes no model: identify's hash covers it
            jit: crate::models::Jit::default(),
        }
    }

    /// `[label]` as the label step's hash covers it.
    fn label_id(&self) -> crate::config::LabelSection {
        let mut l = self.cfg.label.clone();
        l.file = self.path_id(&l.file);
        l
    }

    fn reuse(&mut self, step: &str) {
        tracing::info!(step, "step already done, reusing its outputs");
        let p = self.out.join(layout::done(step));
        let secs = std::fs::read_to_string(p)
            .ok()
            .and_then(|s| serde_json::from_str::<Done>(&s).ok())
            .map_or(0.0, |d| d.seconds);
        self.timings.push((step.into(), secs));
    }
}

/// A job whose models are ready: what the identify step and the central steps need.
pub struct Prepared<'a> {
    job: Job<'a>,
    pub ds: Dataset,
    pub clf: Classifier,
    pub vae: Vae,
    h_models: String,
    /// Run the correct step as rounds on a coordinator's workers when
    /// `correct.parts > 1` (set by the coordinator; a plain run corrects here).
    pub distributed_correct: bool,
}

/// Runs the models step (loads or trains them) after validating the config, loading
/// the data and recording the job in its folder.
pub fn prepare(cfg: &JobConfig) -> Result<Prepared<'_>> {
    cfg.validate()?;
    let device = models::parse_device(&cfg.device)?;
    let mut job = Job {
        cfg,
        out: cfg.out_dir(),
        timings: vec![],
    };
    std::fs::create_dir_all(&job.out).map_err(|e| Error::io(&job.out, e))?;
    let ds = cfg.data.open()?;
    write_json(&job.out.join(layout::CLASSES), &ds.class_names)?;
    let toml_path = job.out.join(layout::JOB_TOML);
    std::fs::write(
        &toml_path,
        toml::to_string(cfg).map_err(|e| Error::invalid("config", e.to_string()))?,
    )
    .map_err(|e| Error::io(&toml_path, e))?;
    tracing::info!(dataset = %ds.name, train = ds.train.len(), test = ds.test.len(), classes = ds.num_classes(), "dataset loaded");

    let h_models = hash_of(&[&cfg.data, &job.models_id(), &cfg.train, &cfg.seed]);
    let started = Instant::now();
    let was_done = job.done("models", &h_models);
    let (clf, vae) = step_models::load_or_train(&job, &ds, device, was_done)?;
    if was_done {
        job.reuse("models")
    } else {
        job.mark("models", &h_models, started)?
    }
    Ok(Prepared {
        job,
        ds,
        clf,
        vae,
        h_models,
        distributed_correct: false,
    })
}

impl Prepared<'_> {
    fn identify_hash(&self) -> String {
        hash_of(&[
            &self.h_models,
            &self.job.cfg.identify,
            &self.job.cfg.models.jit,
        ])
    }

    /// Whether identify already finished for this configuration.
    pub fn identify_done(&self) -> bool {
        self.job.done("identify", &self.identify_hash())
    }

    /// The model files (classifier, VAE or encoder, decoder) workers must load.
    pub fn model_files(&self) -> (PathBuf, PathBuf, Option<PathBuf>) {
        let cfg = self.job.cfg;
        let clf = cfg
            .models
            .classifier
            .clone()
            .unwrap_or_else(|| self.job.out.join("models/classifier.safetensors"));
        let vae = cfg
            .models
            .vae
            .clone()
            .unwrap_or_else(|| self.job.out.join("models/vae.safetensors"));
        (clf, vae, cfg.models.vae_decoder.clone())
    }

    /// Where the data's images are, by file (`None`: SVHN's MAT files).
    pub fn data_layout(&self) -> Option<crate::data::DataLayout> {
        self.ds.layout.clone()
    }

    /// The identify shards: index ranges of the searched split.
    pub fn shard_ranges(&self) -> Vec<std::ops::Range<usize>> {
        shard_ranges(&self.ds, &self.job.cfg.identify)
    }

    /// Records identify's result (however it was computed, in `seconds`) as the
    /// finished step.
    pub fn record_identify(
        &mut self,
        failures: &Failures,
        stats: &IdentifyStats,
        seconds: f64,
    ) -> Result<()> {
        self.job.dir("identify")?;
        failures.write(&self.job.out.join(layout::FAILURES), stats)?;
        let h = self.identify_hash();
        self.job.mark_seconds("identify", &h, seconds)
    }

    /// Identify in this process, shard by shard (finished shards are reused).
    pub fn identify_here(&mut self) -> Result<()> {
        if self.identify_done() {
            self.job.reuse("identify");
            return Ok(());
        }
        let started = Instant::now();
        let (f, s) = step_identify::run(
            &self.job,
            &self.ds,
            &self.clf,
            &self.vae,
            &self.identify_hash(),
        )?;
        self.record_identify(&f, &s, started.elapsed().as_secs_f64())
    }
}

/// Index ranges of at most `shard_size` images over the searched part of the split.
pub fn shard_ranges(ds: &Dataset, o: &IdentifyOptions) -> Vec<std::ops::Range<usize>> {
    let n = o.searched_range(ds.split(o.split).len()).end;
    ds.shards(o.split, o.shard_size)
        .into_iter()
        .filter(|r| r.start < n)
        .map(|r| r.start..r.end.min(n))
        .collect()
}

/// The central steps after identify: distill, pictures, label, correct, report.
pub fn finish(p: &mut Prepared) -> Result<RunOutcome> {
    let distributed = p.distributed_correct && p.job.cfg.correct.parts > 1;
    let h_identify = p.identify_hash();
    let (failures, istats) = Failures::read(&p.job.out.join(layout::FAILURES))?;
    let (ds, clf, vae) = (&p.ds, &p.clf, &p.vae);
    let job = &mut p.job;
    if !job.timings.iter().any(|(s, _)| s == "identify") {
        job.reuse("identify");
    }
    tracing::info!(
        searched = istats.n_searched,
        failures = failures.len(),
        images_with_failure = istats.n_images_with_failure,
        "identify"
    );
    let (scenarios, h_distill) = step_distill::run(job, &h_identify, &failures, vae, clf, ds)?;
    step_pictures::run(job, &h_distill, vae, ds, &scenarios, &failures)?;
    let Some((labels, h_label)) = step_label::run(job, &h_distill, &scenarios, ds)? else {
        return Ok(RunOutcome::AwaitingLabels {
            scenarios: scenarios.len(),
        });
    };
    let input = step_correct::Input {
        ds,
        clf,
        vae,
        scenarios: &scenarios,
        labels: &labels,
        failures: &failures,
    };
    let (evaluation, h_correct) = match step_correct::run(job, &h_label, distributed, &input)? {
        step_correct::Corrected::Done(ev, h) => (ev, h),
        step_correct::Corrected::Rounds(r) => return Ok(RunOutcome::FineTune(r)),
    };
    let summary = step_report::run(
        job,
        &h_correct,
        step_report::Input {
            ds,
            istats: &istats,
            failures: &failures,
            scenarios: &scenarios,
            labels: &labels,
            evaluation: &evaluation,
        },
    )?;
    Ok(RunOutcome::Finished(Box::new(summary)))
}
