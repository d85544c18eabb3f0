//! Correct: fine-tune the classifier on its training data plus samples of the labelled
//! scenarios, here or (on a coordinator, `correct.parts > 1`) as rounds on the
//! workers, and measure it before and after.
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use tch::Device;

use super::{hash_of, step_models, Job, RoundsDone, RoundsInput};
use crate::correct;
use crate::data::Dataset;
use crate::dpgmm::DpGmm;
use crate::error::Result;
use crate::evaluate;
use crate::identify::Failures;
use crate::layout::{self, read_json, write_json};
use crate::models::{Classifier, Vae};
use crate::report;
use crate::scenarios::{Label, Labels, Scenario};

/// What the step works on.
pub(super) struct Input<'a> {
    pub ds: &'a Dataset,
    pub clf: &'a Classifier,
    pub vae: &'a Vae,
    pub scenarios: &'a [Scenario],
    pub labels: &'a Labels,
    pub failures: &'a Failures,
}

pub(super) enum Corrected {
    /// The evaluation and the step's hash.
    Done(report::Evaluation, String),
    /// The rounds to run on the workers first.
    Rounds(RoundsInput),
}

pub(super) fn run(
    job: &mut Job,
    h_label: &str,
    distributed: bool,
    input: &Input,
) -> Result<Corrected> {
    let cfg = job.cfg;
    let Input { ds, clf, .. } = *input;
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
        let placed = place(job, input)?;
        let data = scenario_data(job, input, &placed, &cfg.correct)?;
        write_train_members(job, input, &placed)?;
        let Some(done) = done else {
            let scenario_train = dir.join("scenario-train.safetensors");
            let (rows, values): (Vec<i64>, Vec<i64>) = data
                .train_labels
                .iter()
                .map(|(&r, &l)| (r as i64, l))
                .unzip();
            crate::tensor_io::write(
                &scenario_train,
                &[
                    ("train_x".into(), data.train_x.shallow_clone()),
                    ("train_y".into(), data.train_y.shallow_clone()),
                    (
                        correct::TRAIN_LABEL_ROWS.into(),
                        tch::Tensor::from_slice(&rows),
                    ),
                    (
                        correct::TRAIN_LABEL_VALUES.into(),
                        tch::Tensor::from_slice(&values),
                    ),
                ],
                Default::default(),
            )?;
            let original = dir.join(format!("original.{}", clf.extension()));
            clf.save(&original)?;
            return Ok(Corrected::Rounds(RoundsInput {
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
        // loaded once, as it is measured; saved in its own format at the step's path
        let tuned = load_to_measure(job, ds, &final_path, clf.device())?;
        tuned.save(&tuned_path)?;
        let ev = evaluate(
            job,
            input,
            &placed,
            &tuned,
            &data,
            done.history,
            &tuned_path,
        )?;
        write_json(&eval_path, &ev)?;
        job.mark("correct", &h_correct, started)?;
        ev
    } else {
        job.dir("correct")?;
        let placed = place(job, input)?;
        write_train_members(job, input, &placed)?;
        let ev = correct_and_evaluate(job, input, &placed, &cfg.correct, &tuned_path)?;
        write_json(&eval_path, &ev)?;
        job.mark("correct", &h_correct, started)?;
        ev
    };

    Ok(Corrected::Done(evaluation, h_correct))
}

/// Fine-tunes a fresh copy of the classifier on the training data plus the labelled
/// scenarios' samples (with `o`), saves it at `tuned_path` (in the format it came in),
/// and measures it before and after ([`evaluate`]).
pub(super) fn correct_and_evaluate(
    job: &Job,
    input: &Input,
    placed: &Placed,
    o: &correct::CorrectOptions,
    tuned_path: &Path,
) -> Result<report::Evaluation> {
    let cfg = job.cfg;
    let device = input.clf.device();
    let data = scenario_data(job, input, placed, o)?;
    let mut tuned = step_models::load_classifier_again(job, input.ds, device)?;
    tch::manual_seed(cfg.seed as i64);
    let history = correct::fine_tune(&mut tuned, &input.ds.train, &data, o, cfg.seed)?;
    tuned.save(tuned_path)?;
    let tuned = load_to_measure(job, input.ds, tuned_path, device)?;
    evaluate(job, input, placed, &tuned, &data, history, tuned_path)
}

/// The corrected classifier saved at `path`, loaded to be measured the way the original
/// is (prepared for inference per the job's `models.jit`, as identify ran it), so that
/// before and after differ by the weights alone.
fn load_to_measure(job: &Job, ds: &Dataset, path: &Path, device: Device) -> Result<Classifier> {
    let jit = crate::frozen::jit_for(job.cfg.models.jit, job.cfg.identify.precision);
    Classifier::load_for_inference(path, ds.image_shape(), ds.num_classes() as i64, device, jit)
}

/// Where the scenarios lie in code space (under the mixture distill fitted), the
/// searched images that formed them, and the training images inside them.
pub(super) struct Placed {
    regions: evaluate::Regions,
    sources: HashMap<usize, usize>,
    train_members: Vec<evaluate::TrainMember>,
    /// Each failure's component (distill's assignments).
    assign: Vec<i64>,
}

pub(super) fn place(job: &Job, input: &Input) -> Result<Placed> {
    let gmm: DpGmm = read_json(&job.out.join(layout::GMM))?;
    let assign: Vec<i64> = read_json(&job.out.join(layout::ASSIGNMENTS))?;
    let regions = evaluate::Regions::new(
        gmm,
        input.scenarios,
        input.failures,
        &assign,
        job.cfg.correct.region_scale,
    )?;
    let sources = evaluate::sources(input.scenarios, input.failures, &assign);
    let train_members = evaluate::train_members(&input.ds.train, input.vae, &regions)?;
    tracing::info!(
        train_members = train_members.len(),
        "training images inside the scenarios"
    );
    Ok(Placed {
        regions,
        sources,
        train_members,
        assign,
    })
}

/// The labelled scenarios' samples, and the training labels `o.conflicting_labels`
/// changes.
fn scenario_data(
    job: &Job,
    input: &Input,
    placed: &Placed,
    o: &correct::CorrectOptions,
) -> Result<correct::ScenarioData> {
    let cfg = job.cfg;
    let mut data = correct::scenario_data(
        input.vae,
        input.scenarios,
        input.labels,
        &correct::AssignedFailures {
            failures: input.failures,
            component: &placed.assign,
        },
        cfg.distill.tau,
        o,
        cfg.seed,
    )?;
    data.train_labels =
        correct::train_labels(&placed.train_members, input.labels, o.conflicting_labels);
    Ok(data)
}

/// Writes [`layout::TRAIN_MEMBERS`]: the training images inside the scenarios, with
/// what the correct step's fine-tune trains them as (`correct.conflicting_labels`).
fn write_train_members(job: &Job, input: &Input, placed: &Placed) -> Result<()> {
    let train_labels = correct::train_labels(
        &placed.train_members,
        input.labels,
        job.cfg.correct.conflicting_labels,
    );
    let rows: Vec<TrainMemberRow> = placed
        .train_members
        .iter()
        .map(|m| TrainMemberRow {
            row: m.row,
            scenario: m.scenario,
            label: m.label,
            scenario_label: match input.labels.get(&m.scenario) {
                Some(Label::Class(c)) => Some(*c),
                _ => None,
            },
            trained_as: match train_labels.get(&m.row) {
                Some(&correct::IGNORED) => None,
                Some(&l) => Some(l),
                None => Some(m.label),
            },
        })
        .collect();
    write_json(&job.out.join(layout::TRAIN_MEMBERS), &rows)
}

/// A line of [`layout::TRAIN_MEMBERS`]: a training image inside a scenario.
#[derive(serde::Serialize)]
struct TrainMemberRow {
    /// its index in the training split
    row: usize,
    scenario: usize,
    /// its label in the training data
    label: i64,
    /// the scenario's label (null: discarded or not labelled)
    scenario_label: Option<i64>,
    /// the label the fine-tune trained it with (null: left out)
    trained_as: Option<i64>,
}

/// The classifier before and after correction: on the test split (all of it, and the
/// images identify did not search), on the real images of each scenario, and on the
/// scenarios' held-out samples at every `tau`.
fn evaluate(
    job: &Job,
    input: &Input,
    placed: &Placed,
    tuned: &Classifier,
    data: &correct::ScenarioData,
    history: Vec<correct::CorrectEpoch>,
    tuned_path: &Path,
) -> Result<report::Evaluation> {
    let Input {
        ds,
        clf,
        vae,
        labels,
        ..
    } = *input;
    let cfg = job.cfg;
    let searched = evaluate::Searched {
        split: cfg.identify.split,
        range: cfg
            .identify
            .searched_range(ds.split(cfg.identify.split).len()),
    };
    let mut real = evaluate::measure_real(
        ds,
        clf,
        tuned,
        vae,
        &placed.regions,
        &placed.sources,
        &searched,
    )?;
    let train = evaluate::measure_train_members(
        &ds.train,
        &placed.train_members,
        labels,
        &data.train_labels,
        clf,
        tuned,
    )?;
    for (id, t) in train {
        real.scenarios.entry(id).or_default().train_members = t;
    }
    let held_out = |x: &tch::Tensor, y: &tch::Tensor, groups: &[usize]| {
        Ok::<_, crate::error::Error>((
            correct::accuracy_by_group(clf, x, y, groups)?,
            correct::accuracy_by_group(tuned, x, y, groups)?,
        ))
    };
    let ((scn_before, per_before), (scn_after, per_after)) =
        held_out(&data.test_x, &data.test_y, &data.test_scenario)?;
    let wider = data
        .wider
        .iter()
        .map(|w| {
            let ((b, pb), (a, pa)) = held_out(&w.x, &w.y, &w.scenario)?;
            Ok(report::HeldOutAccuracy {
                tau: w.tau,
                samples: w.scenario.len(),
                accuracy_before: b,
                accuracy_after: a,
                per_scenario_before: pb,
                per_scenario_after: pa,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(report::Evaluation {
        test_accuracy_before: real.test.accuracy_before.unwrap_or(f64::NAN),
        test_accuracy_after: real.test.accuracy_after.unwrap_or(f64::NAN),
        scenario_accuracy_before: scn_before,
        scenario_accuracy_after: scn_after,
        per_scenario_before: per_before,
        per_scenario_after: per_after,
        scenario_train_samples: data.train_x.size()[0] as usize,
        scenario_test_samples: data.test_x.size()[0] as usize,
        history,
        model: tuned_path.to_path_buf(),
        wider,
        real: real.scenarios,
        unsearched_test: real.unsearched_test,
        confusions: real.confusions,
    })
}
