//! A whole Defuse job in one process: models, identify, distill, label, correct,
//! report. Every step writes its outputs under the job's folder with a `done.json`
//! that records a hash of the configuration it depends on, so a rerun picks up after
//! the last finished step (and redoes a step whose configuration changed, with
//! everything after it).
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Device;

use crate::config::{JobConfig, LabelMode};
use crate::correct;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::identify::{self, Failures, IdentifyOptions, IdentifyStats};
use crate::layout::{self, read_json, write_json};
use crate::models::{self, Classifier, CnnArch, Vae, VaeArch};
use crate::scenarios::{self, Labels, Scenario};
use crate::train::{self, TrainOptions};
use crate::{progress, report};

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
    let ds = cfg.data.load()?;
    write_json(&job.out.join(layout::CLASSES), &ds.class_names)?;
    let toml_path = job.out.join(layout::JOB_TOML);
    std::fs::write(
        &toml_path,
        toml::to_string(cfg).map_err(|e| Error::invalid("config", e.to_string()))?,
    )
    .map_err(|e| Error::io(&toml_path, e))?;
    tracing::info!(dataset = %ds.name, train = ds.train.len(), test = ds.test.len(), classes = ds.num_classes(), "dataset loaded");

    let h_models = hash_of(&[&cfg.data, &cfg.models, &cfg.train, &cfg.seed]);
    let started = Instant::now();
    let was_done = job.done("models", &h_models);
    let (clf, vae) = load_or_train_models(&job, &ds, device, was_done)?;
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
        hash_of(&[&self.h_models, &self.job.cfg.identify])
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
        let (f, s) = run_identify(
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
    let n = ds.split(o.split).len();
    let n = if o.limit > 0 { o.limit.min(n) } else { n };
    ds.shards(o.split, o.shard_size)
        .into_iter()
        .filter(|r| r.start < n)
        .map(|r| r.start..r.end.min(n))
        .collect()
}

/// The central steps after identify: distill, label, correct, report.
pub fn finish(p: &mut Prepared) -> Result<RunOutcome> {
    let cfg = p.job.cfg;
    let distributed = p.distributed_correct && cfg.correct.parts > 1;
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

    // distill
    let h_distill = hash_of(&[&h_identify, &cfg.distill]);
    let started = Instant::now();
    let scen_path = job.out.join(layout::SCENARIOS);
    let scenarios: Vec<Scenario> = if job.done("distill", &h_distill) {
        job.reuse("distill");
        read_json(&scen_path)?
    } else {
        job.dir("distill")?;
        let (gmm, mut scenarios, assign) = scenarios::distill(&failures, &cfg.distill, cfg.seed)?;
        for s in &mut scenarios {
            let codes = s.sample_codes(cfg.distill.grid_samples, cfg.distill.tau, cfg.seed, 0)?;
            let (imgs, preds) = scenarios::decode_and_classify(vae, clf, &codes)?;
            // rows of 8: a block a person can take in at a glance
            let rows = imgs.split(8, 0);
            crate::images::write_grid(&job.out.join(layout::scenario_grid(s.id)), &rows, 3)?;
            s.sample_predictions = preds;
        }
        write_json(&job.out.join(layout::GMM), &gmm)?;
        write_json(&job.out.join(layout::ASSIGNMENTS), &assign)?;
        write_json(&scen_path, &scenarios)?;
        job.mark("distill", &h_distill, started)?;
        scenarios
    };
    tracing::info!(scenarios = scenarios.len(), "distill");

    // pictures: the nearest training images per scenario, the projection of all codes
    let h_pictures = hash_of(&[&h_distill]);
    if job.done("pictures", &h_pictures) {
        job.reuse("pictures");
    } else {
        let started = Instant::now();
        let dir = job.dir("pictures")?;
        let assign: Vec<i64> = read_json(&job.out.join(layout::ASSIGNMENTS))?;
        crate::pictures::write(&dir, vae, ds, &scenarios, &failures.codes, &assign)?;
        job.mark("pictures", &h_pictures, started)?;
    }

    // label
    let labels_path = job.out.join(layout::LABELS);
    let label_input = match cfg.label.mode {
        LabelMode::File => std::fs::read_to_string(cfg.label.file.as_ref().expect("validated"))
            .map_err(|e| Error::io(cfg.label.file.as_ref().expect("validated"), e))?,
        LabelMode::Manual => std::fs::read_to_string(&labels_path).unwrap_or_default(),
        LabelMode::SourceMajority => String::new(),
    };
    let h_label = hash_of(&[&h_distill, &cfg.label, &label_input]);
    let started = Instant::now();
    let labels: Labels = match cfg.label.mode {
        LabelMode::SourceMajority => scenarios::source_majority_labels(
            &scenarios,
            cfg.label.min_purity,
            cfg.label.discard_non_failures,
        ),
        LabelMode::File => scenarios::read_labels(
            cfg.label.file.as_ref().expect("validated"),
            &scenarios,
            &ds.class_names,
        )?,
        LabelMode::Manual => {
            if !labels_path.exists() {
                tracing::info!(
                    scenarios = scenarios.len(),
                    "waiting for labels: run `defuse label`"
                );
                return Ok(RunOutcome::AwaitingLabels {
                    scenarios: scenarios.len(),
                });
            }
            scenarios::read_labels(&labels_path, &scenarios, &ds.class_names)?
        }
    };
    if cfg.label.mode != LabelMode::Manual {
        scenarios::write_labels(&labels_path, &labels)?;
    }
    if job.done("label", &h_label) {
        job.reuse("label")
    } else {
        job.mark("label", &h_label, started)?
    }

    // correct
    let h_correct = hash_of(&[&h_label, &cfg.correct]);
    let started = Instant::now();
    let tuned_path = job
        .out
        .join("correct")
        .join(format!("classifier.{}", clf.extension()));
    let eval_path = job.out.join(layout::EVALUATION);
    let evaluation: report::Evaluation = if job.done("correct", &h_correct) {
        job.reuse("correct");
        read_json(&eval_path)?
    } else if distributed {
        let dir = job.dir("correct")?;
        let done: Option<RoundsDone> = read_json(&job.out.join(layout::ROUNDS_DONE))
            .ok()
            .filter(|d: &RoundsDone| d.hash == h_correct);
        let Some(done) = done else {
            let data = correct::scenario_data(
                vae,
                &scenarios,
                &labels,
                cfg.distill.tau,
                &cfg.correct,
                cfg.seed,
            )?;
            let scenario_train = dir.join("scenario-train.safetensors");
            crate::tensor_io::write(
                &scenario_train,
                &[
                    ("train_x".into(), data.train_x.shallow_clone()),
                    ("train_y".into(), data.train_y.shallow_clone()),
                ],
                Default::default(),
            )?;
            let original = dir.join(format!("original.{}", clf.extension()));
            clf.save(&original)?;
            return Ok(RunOutcome::FineTune(RoundsInput {
                rounds: correct::n_rounds(ds.train.len(), &cfg.correct),
                parts: cfg.correct.parts,
                classifier: original,
                extension: clf.extension().to_string(),
                scenario_train,
                hash: h_correct,
                n_train: ds.train.len(),
                n_scenario: data.train_x.size()[0] as usize,
                image_shape: ds.image_shape(),
                num_classes: ds.num_classes() as i64,
            }));
        };
        let final_path = job.out.join(layout::rounds_final(clf.extension()));
        let tuned = Classifier::load(
            &final_path,
            ds.image_shape(),
            ds.num_classes() as i64,
            clf.device(),
        )?;
        tuned.save(&tuned_path)?;
        let data = correct::scenario_data(
            vae,
            &scenarios,
            &labels,
            cfg.distill.tau,
            &cfg.correct,
            cfg.seed,
        )?;
        let ev = evaluate(ds, clf, &tuned, &data, done.history, &tuned_path)?;
        write_json(&eval_path, &ev)?;
        job.mark("correct", &h_correct, started)?;
        ev
    } else {
        job.dir("correct")?;
        let ev = correct_and_evaluate(
            job,
            ds,
            clf,
            vae,
            &scenarios,
            &labels,
            &cfg.correct,
            &tuned_path,
        )?;
        write_json(&eval_path, &ev)?;
        job.mark("correct", &h_correct, started)?;
        ev
    };

    // report
    let started = Instant::now();
    let h_report = hash_of(&[&h_correct]);
    let mut timings = job.timings.clone();
    timings.push(("report".into(), 0.0));
    let summary = report::Summary::new(
        cfg,
        ds,
        &istats,
        &failures,
        &scenarios,
        &labels,
        &evaluation,
        timings,
    );
    report::write(
        &job.out.join("report"),
        &summary,
        &job.out.join("distill"),
        &job.out.join("pictures"),
    )?;
    job.mark("report", &h_report, started)?;
    Ok(RunOutcome::Finished(Box::new(summary)))
}

/// Fine-tunes a fresh copy of the classifier on the training data plus the labelled
/// scenarios' samples (with `o`), saves it at `tuned_path` (in the format it came in),
/// and measures test and scenario-test accuracy before and after.
#[allow(clippy::too_many_arguments)]
fn correct_and_evaluate(
    job: &Job,
    ds: &Dataset,
    clf: &Classifier,
    vae: &Vae,
    scenarios: &[Scenario],
    labels: &Labels,
    o: &correct::CorrectOptions,
    tuned_path: &Path,
) -> Result<report::Evaluation> {
    let cfg = job.cfg;
    let device = clf.device();
    let data = correct::scenario_data(vae, scenarios, labels, cfg.distill.tau, o, cfg.seed)?;
    let mut tuned = load_classifier_again(job, ds, device)?;
    tch::manual_seed(cfg.seed as i64);
    let history = correct::fine_tune(&mut tuned, &ds.train, &data, o, cfg.seed)?;
    tuned.save(tuned_path)?;
    evaluate(ds, clf, &tuned, &data, history, tuned_path)
}

/// Test and scenario-test accuracy of the classifier before and after correction.
fn evaluate(
    ds: &Dataset,
    clf: &Classifier,
    tuned: &Classifier,
    data: &correct::ScenarioData,
    history: Vec<correct::CorrectEpoch>,
    tuned_path: &Path,
) -> Result<report::Evaluation> {
    let device = clf.device();
    let test_before = train::accuracy(clf, &ds.test, device)?;
    let (scn_before, per_before) =
        correct::accuracy_by_group(clf, &data.test_x, &data.test_y, &data.test_scenario)?;
    let test_after = train::accuracy(tuned, &ds.test, device)?;
    let (scn_after, per_after) =
        correct::accuracy_by_group(tuned, &data.test_x, &data.test_y, &data.test_scenario)?;
    Ok(report::Evaluation {
        test_accuracy_before: test_before,
        test_accuracy_after: test_after,
        scenario_accuracy_before: scn_before,
        scenario_accuracy_after: scn_after,
        per_scenario_before: per_before,
        per_scenario_after: per_after,
        scenario_train_samples: data.train_x.size()[0] as usize,
        scenario_test_samples: data.test_x.size()[0] as usize,
        history,
        model: tuned_path.to_path_buf(),
    })
}

/// What `sweep` measured: the classifier before correction, and one correction per lambda.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sweep {
    pub test_accuracy_before: f64,
    pub scenario_accuracy_before: f64,
    pub scenario_test_samples: usize,
    pub points: Vec<crate::plots::SweepPoint>,
}

/// The paper's lambda sweep: runs the job up to its report (reusing every step already
/// done), then corrects the classifier once per lambda from the same scenarios, labels
/// and scenario samples, each from the original classifier. Writes
/// `sweep/lambda-<l>/` (model, evaluation), `sweep/sweep.json`, `sweep/sweep.md` and
/// the figure `sweep/sweep.svg` (test accuracy against scenario accuracy).
pub fn sweep(cfg: &JobConfig, lambdas: &[f64]) -> Result<Sweep> {
    if lambdas.is_empty() {
        return Err(Error::invalid("lambdas", "give at least one lambda"));
    }
    if let Some(l) = lambdas.iter().find(|l| !(l.is_finite() && **l >= 0.0)) {
        return Err(Error::invalid(
            "lambdas",
            format!("{l} is not >= 0 (the loss is CE(train) + lambda * CE(scenario))"),
        ));
    }
    let mut p = prepare(cfg)?;
    p.identify_here()?;
    if let RunOutcome::AwaitingLabels { scenarios } = finish(&mut p)? {
        return Err(Error::invalid(
            "label",
            format!("the job waits for labels on its {scenarios} scenarios: label them first (defuse label)"),
        ));
    }
    let (ds, clf, vae) = (&p.ds, &p.clf, &p.vae);
    let job = &mut p.job;
    let scenarios: Vec<Scenario> = read_json(&job.out.join(layout::SCENARIOS))?;
    let labels =
        scenarios::read_labels(&job.out.join(layout::LABELS), &scenarios, &ds.class_names)?;
    let h_label = std::fs::read_to_string(job.out.join(layout::done("label")))
        .ok()
        .and_then(|t| serde_json::from_str::<Done>(&t).ok())
        .map(|d| d.hash)
        .unwrap_or_default();
    let mut points = Vec::new();
    let mut before = None;
    for &lambda in lambdas {
        let mut o = cfg.correct.clone();
        o.lambda = lambda;
        let step = format!("sweep/lambda-{lambda}");
        let h = hash_of(&[&h_label, &o]);
        let eval_path = job.out.join(&step).join("evaluation.json");
        let started = Instant::now();
        let ev: report::Evaluation = if job.done(&step, &h) {
            job.reuse(&step);
            read_json(&eval_path)?
        } else {
            let dir = job.dir(&step)?;
            let tuned = dir.join(format!("classifier.{}", clf.extension()));
            let ev = correct_and_evaluate(job, ds, clf, vae, &scenarios, &labels, &o, &tuned)?;
            write_json(&eval_path, &ev)?;
            job.mark(&step, &h, started)?;
            ev
        };
        tracing::info!(
            lambda,
            test = ev.test_accuracy_after,
            scenarios = ev.scenario_accuracy_after,
            "sweep point"
        );
        before.get_or_insert((
            ev.test_accuracy_before,
            ev.scenario_accuracy_before,
            ev.scenario_test_samples,
        ));
        points.push(crate::plots::SweepPoint {
            lambda,
            test_accuracy: ev.test_accuracy_after,
            scenario_accuracy: ev.scenario_accuracy_after,
        });
    }
    let (tb, sb, n) = before.expect("at least one lambda");
    let sweep = Sweep {
        test_accuracy_before: tb,
        scenario_accuracy_before: sb,
        scenario_test_samples: n,
        points,
    };
    let dir = job.dir("sweep")?;
    write_json(&dir.join("sweep.json"), &sweep)?;
    let mut md = format!(
        "| lambda | test accuracy | failure-scenario accuracy ({n} held-out samples) |\n|---:|---:|---:|\n| before | {:.2}% | {:.2}% |\n",
        100.0 * tb,
        100.0 * sb
    );
    for pt in &sweep.points {
        md.push_str(&format!(
            "| {} | {:.2}% | {:.2}% |\n",
            pt.lambda,
            100.0 * pt.test_accuracy,
            100.0 * pt.scenario_accuracy
        ));
    }
    let md_path = dir.join("sweep.md");
    std::fs::write(&md_path, &md).map_err(|e| Error::io(&md_path, e))?;
    crate::plots::sweep_svg(
        &dir.join("sweep.svg"),
        &format!("{}: correction by lambda", ds.name),
        &sweep.points,
        (tb, sb),
    )?;
    Ok(sweep)
}

fn load_or_train_models(
    job: &Job,
    ds: &Dataset,
    device: Device,
    done: bool,
) -> Result<(Classifier, Vae)> {
    let cfg = job.cfg;
    let shape = ds.image_shape();
    let nc = ds.num_classes() as i64;
    let t = &cfg.train;
    let clf = match &cfg.models.classifier {
        Some(p) => Classifier::load(p, shape, nc, device)?,
        None => {
            let p = job.out.join("models/classifier.safetensors");
            if done && p.exists() {
                Classifier::load(&p, shape, nc, device)?
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
                train::train_classifier(ds, &mut m, &o)?;
                job.dir("models")?;
                m.save(&p)?;
                m
            }
        }
    };
    let vae = match &cfg.models.vae {
        Some(p) => models::load_vae(p, cfg.models.vae_decoder.as_deref(), shape, device)?,
        None => {
            let p = job.out.join("models/vae.safetensors");
            if done && p.exists() {
                models::load_vae(&p, None, shape, device)?
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
                train::train_vae(ds, &mut m, &o)?;
                job.dir("models")?;
                m.save(&p)?;
                let x = ds.test.images(0..16.min(ds.test.len()), device);
                crate::images::write_grid(
                    &job.out.join("models/vae.recon.png"),
                    &[x.shallow_clone(), train::reconstruct(&m, &x)?],
                    3,
                )?;
                m
            }
        }
    };
    Ok((clf, vae))
}

/// A second, independent copy of the classifier under test, to fine-tune.
fn load_classifier_again(job: &Job, ds: &Dataset, device: Device) -> Result<Classifier> {
    let p = job
        .cfg
        .models
        .classifier
        .clone()
        .unwrap_or_else(|| job.out.join("models/classifier.safetensors"));
    Classifier::load(&p, ds.image_shape(), ds.num_classes() as i64, device)
}

/// Identify over every shard of the split; finished shards are reused.
fn run_identify(
    job: &Job,
    ds: &Dataset,
    clf: &Classifier,
    vae: &Vae,
    hash: &str,
) -> Result<(Failures, IdentifyStats)> {
    let cfg = job.cfg;
    let o = &cfg.identify;
    let dir = job.dir("identify")?;
    // shards of another configuration are stale
    let hash_file = dir.join("shards.hash");
    if std::fs::read_to_string(&hash_file).ok().as_deref() != Some(hash) {
        for e in std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("shard-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        std::fs::write(&hash_file, hash).map_err(|e| Error::io(&hash_file, e))?;
    }
    let split = ds.split(o.split);
    let shards = shard_ranges(ds, o);
    let n = shards.last().map_or(0, |r| r.end);
    let bar = progress::bar(n as u64, "identify");
    let mut parts = Vec::new();
    let mut total = IdentifyStats {
        split: o.split,
        ..Default::default()
    };
    for (i, range) in shards.into_iter().enumerate() {
        let p = dir.join(format!("shard-{i:05}.safetensors"));
        let (f, s) = match Failures::read(&p) {
            Ok(r) if r.1.start == range.start && r.1.end == range.end => {
                bar.inc(range.len() as u64);
                r
            }
            _ => {
                let r = identify::identify(
                    split,
                    o.split,
                    range.clone(),
                    clf,
                    vae,
                    o,
                    cfg.seed,
                    |k| {
                        bar.inc(k as u64);
                        true
                    },
                )?;
                r.0.write(&p, &r.1)?;
                r
            }
        };
        total.absorb(&s);
        parts.push(f);
        bar.set_message(format!("{} failures", total.n_failures));
    }
    bar.finish_and_clear();
    Ok((Failures::concat(parts, vae.latent()), total))
}
