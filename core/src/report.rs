//! Evaluate and report: the numbers before and after correction, as
//! `report/summary.json` (for scripts) and `report/index.html` (for people).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::{Deserialize, Serialize};

use crate::config::JobConfig;
use crate::correct::CorrectEpoch;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::evaluate::{Confusion, Measured, RealImages, TrainMembers};
use crate::identify::{Failures, IdentifyStats, Search};
use crate::layout;
use crate::scenarios::{Example, Label, Labels, Scenario};

/// What the correct step measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub test_accuracy_before: f64,
    pub test_accuracy_after: f64,
    pub scenario_accuracy_before: f64,
    pub scenario_accuracy_after: f64,
    pub per_scenario_before: BTreeMap<usize, f64>,
    pub per_scenario_after: BTreeMap<usize, f64>,
    pub scenario_train_samples: usize,
    pub scenario_test_samples: usize,
    pub history: Vec<CorrectEpoch>,
    pub model: PathBuf,
    /// Held-out samples at each of `correct.test_taus`.
    #[serde(default)]
    pub wider: Vec<HeldOutAccuracy>,
    /// Real images by scenario id (`crate::evaluate`).
    #[serde(default)]
    pub real: BTreeMap<usize, RealImages>,
    /// The test images identify did not search (none when it searched them all).
    #[serde(default)]
    pub unsearched_test: Option<Measured>,
    /// Every pair of classes confused on the test split (`crate::evaluate`).
    #[serde(default)]
    pub confusions: Vec<Confusion>,
}

impl Evaluation {
    /// The real images inside the labelled scenarios, those that formed them, and the
    /// training images inside them.
    pub fn real_labelled(&self, labels: &Labels) -> (Measured, Measured, TrainMembers) {
        let labelled: Vec<&RealImages> = self
            .real
            .iter()
            .filter(|(id, _)| matches!(labels.get(id), Some(Label::Class(_))))
            .map(|(_, r)| r)
            .collect();
        (
            Measured::total(labelled.iter().map(|r| &r.members)),
            Measured::total(labelled.iter().map(|r| &r.sources)),
            TrainMembers::total(labelled.iter().map(|r| &r.train_members)),
        )
    }
}

/// Accuracy on the held-out samples of the labelled scenarios at one `tau`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldOutAccuracy {
    pub tau: f64,
    pub samples: usize,
    pub accuracy_before: f64,
    pub accuracy_after: f64,
    pub per_scenario_before: BTreeMap<usize, f64>,
    pub per_scenario_after: BTreeMap<usize, f64>,
}

/// One point of a scenario's generalisation curve: accuracy on its held-out samples
/// drawn at `tau`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct TauAccuracy {
    pub tau: f64,
    pub accuracy_before: Option<f64>,
    pub accuracy_after: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioSummary {
    pub id: usize,
    pub weight: f64,
    pub size: usize,
    /// The classifier's majority prediction on the scenario's failures.
    pub predicted: i64,
    pub predicted_name: String,
    /// The label given (a class id), or null when discarded.
    pub label: Option<i64>,
    pub label_name: Option<String>,
    /// On the scenario's held-out *samples* (synthetic, drawn at `distill.tau`).
    pub accuracy_before: Option<f64>,
    pub accuracy_after: Option<f64>,
    /// The same at `tau` and at each wider `correct.test_taus`: a small generalisation
    /// curve (labelled scenarios only).
    #[serde(default)]
    pub held_out_curve: Vec<TauAccuracy>,
    /// Real images of the searched range whose own code falls in the scenario.
    #[serde(default)]
    pub real_members: Measured,
    /// Real images of the searched range whose perturbed codes formed the scenario.
    #[serde(default)]
    pub real_sources: Measured,
    /// Images of the training split whose own code falls in the scenario: how many
    /// carry another label than the scenario's, what the fine-tune did with them
    /// (`correct.conflicting_labels`), and how many the classifier reads as the
    /// scenario's label before and after.
    #[serde(default)]
    pub train_members: TrainMembers,
    pub source_labels: BTreeMap<i64, usize>,
    pub sample_predictions: Vec<i64>,
    /// The failures shown for it (`distill/failures-<id>.png`).
    #[serde(default)]
    pub examples: Vec<Example>,
}

/// Identify's coverage of one class of the searched split: how many of its images were
/// searched, and why the others were not.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassCoverage {
    pub class: i64,
    pub name: String,
    pub images: usize,
    /// misclassified as they are (skipped by `right`: not a hidden failure)
    pub wrong: usize,
    /// whose plain VAE reconstruction is misclassified
    pub reconstruction_wrong: usize,
    /// whose plain VAE reconstruction is read otherwise than the image (skipped by
    /// every rule but `all`: a perturbation of their code would count the VAE's error
    /// as the classifier's)
    #[serde(default)]
    pub reconstruction_differs: usize,
    pub searched: usize,
    pub with_failure: usize,
    /// fewer than half of the class's images were searched: its failures are largely
    /// unexplored (a better VAE for this class is the fix)
    pub mostly_skipped: bool,
}

/// Test images of one class read as another (the most frequent pairs of the test
/// split, [`TOP_CONFUSIONS`] of them; all of them in `correct/evaluation.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfusionSummary {
    pub true_class: i64,
    pub true_name: String,
    pub predicted: i64,
    pub predicted_name: String,
    pub before: usize,
    pub after: usize,
}

pub const TOP_CONFUSIONS: usize = 10;

/// Below this share of a class's images searched, the class is flagged.
pub const MOSTLY_SKIPPED_BELOW: f64 = 0.5;

/// `report/summary.json`. Accuracies are fractions in [0,1].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub job: String,
    pub dataset: String,
    pub seed: u64,
    pub split: String,
    pub n_images_searched: usize,
    pub n_images_in_split: usize,
    pub n_images_wrong: usize,
    pub n_reconstructions_wrong: usize,
    /// Images whose reconstruction the classifier reads otherwise than the image.
    #[serde(default)]
    pub n_reconstructions_differ: usize,
    /// Which images identify searched (`identify.search`); a summary written before
    /// the setting existed searched `right`.
    #[serde(default = "searched_right")]
    pub search: Search,
    pub n_perturbations: usize,
    pub n_failures: usize,
    pub n_images_with_failure: usize,
    /// Share of searched images that yielded at least one failure.
    pub failure_rate_per_image: f64,
    pub n_scenarios: usize,
    pub n_labelled: usize,
    pub n_discarded: usize,
    /// On the whole test split.
    pub test_accuracy_before: f64,
    pub test_accuracy_after: f64,
    /// On the test images identify did not search (`identify.hold_out`): nothing was
    /// steered by them. Null when identify searched every test image.
    #[serde(default)]
    pub test_unsearched: Option<Measured>,
    /// Real images of the searched range inside the labelled scenarios, and those whose
    /// failures formed them, with the classifier's accuracy on their true labels.
    #[serde(default)]
    pub real_members_labelled: Measured,
    #[serde(default)]
    pub real_sources_labelled: Measured,
    /// Training images inside the labelled scenarios (see `ScenarioSummary`).
    #[serde(default)]
    pub train_members_labelled: TrainMembers,
    /// On the labelled scenarios' held-out *samples* (synthetic) at `distill.tau`.
    pub scenario_accuracy_before: f64,
    pub scenario_accuracy_after: f64,
    pub scenario_test_samples: usize,
    /// The same at `distill.tau` and each wider `correct.test_taus`.
    #[serde(default)]
    pub held_out_curve: Vec<TauAccuracy>,
    pub model: PathBuf,
    pub scenarios: Vec<ScenarioSummary>,
    /// identify's coverage per class of the searched split
    #[serde(default)]
    pub coverage: Vec<ClassCoverage>,
    /// The classifier's most frequent confusions on the real test images, before
    /// (and the same pairs after) correction.
    #[serde(default)]
    pub confusions: Vec<ConfusionSummary>,
    /// Seconds per step (the report's own is 0).
    pub step_seconds: Vec<(String, f64)>,
    #[serde(skip)]
    class_names: Vec<String>,
}

fn searched_right() -> Search {
    Search::Right
}

/// The per-class counts of a search, as the summary shows them.
fn coverage(istats: &IdentifyStats, ds: &Dataset) -> Vec<ClassCoverage> {
    istats
        .by_class
        .iter()
        .enumerate()
        .filter(|(_, k)| k.images > 0)
        .map(|(c, k)| ClassCoverage {
            class: c as i64,
            name: ds.class_name(c as i64),
            images: k.images,
            wrong: k.wrong,
            reconstruction_wrong: k.recon_wrong,
            reconstruction_differs: k.recon_differs,
            searched: k.searched,
            with_failure: k.with_failure,
            mostly_skipped: (k.searched as f64) < MOSTLY_SKIPPED_BELOW * k.images as f64,
        })
        .collect()
}

impl Summary {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &JobConfig,
        ds: &Dataset,
        istats: &IdentifyStats,
        failures: &Failures,
        scenarios: &[Scenario],
        labels: &Labels,
        ev: &Evaluation,
        step_seconds: Vec<(String, f64)>,
    ) -> Summary {
        let tau = cfg.distill.tau;
        let curve = |get: &dyn Fn(&BTreeMap<usize, f64>) -> Option<f64>| -> Vec<TauAccuracy> {
            std::iter::once(TauAccuracy {
                tau,
                accuracy_before: get(&ev.per_scenario_before),
                accuracy_after: get(&ev.per_scenario_after),
            })
            .chain(ev.wider.iter().map(|w| TauAccuracy {
                tau: w.tau,
                accuracy_before: get(&w.per_scenario_before),
                accuracy_after: get(&w.per_scenario_after),
            }))
            .collect()
        };
        let (real_members_labelled, real_sources_labelled, train_members_labelled) =
            ev.real_labelled(labels);
        let scen = scenarios
            .iter()
            .map(|s| {
                let label = match labels.get(&s.id) {
                    Some(Label::Class(c)) => Some(*c),
                    _ => None,
                };
                let real = ev.real.get(&s.id).copied().unwrap_or_default();
                ScenarioSummary {
                    id: s.id,
                    weight: s.weight,
                    size: s.size,
                    predicted: s.predicted,
                    predicted_name: ds.class_name(s.predicted),
                    label,
                    label_name: label.map(|c| ds.class_name(c)),
                    accuracy_before: ev.per_scenario_before.get(&s.id).copied(),
                    accuracy_after: ev.per_scenario_after.get(&s.id).copied(),
                    held_out_curve: if label.is_some() {
                        curve(&|m| m.get(&s.id).copied())
                    } else {
                        vec![]
                    },
                    real_members: real.members,
                    real_sources: real.sources,
                    train_members: real.train_members,
                    source_labels: s.source_labels.clone(),
                    sample_predictions: s.sample_predictions.clone(),
                    examples: s.examples.clone(),
                }
            })
            .collect();
        Summary {
            job: cfg.name.clone().unwrap_or_default(),
            dataset: ds.name.clone(),
            seed: cfg.seed,
            split: istats.split.to_string(),
            n_images_searched: istats.n_searched,
            n_images_in_split: istats.n_images,
            n_images_wrong: istats.n_wrong,
            n_reconstructions_wrong: istats.n_recon_wrong,
            n_reconstructions_differ: istats.n_recon_differs,
            search: cfg.identify.search,
            n_perturbations: istats.n_perturbations,
            n_failures: failures.len(),
            n_images_with_failure: istats.n_images_with_failure,
            failure_rate_per_image: istats.n_images_with_failure as f64
                / istats.n_searched.max(1) as f64,
            n_scenarios: scenarios.len(),
            n_labelled: labels
                .values()
                .filter(|l| matches!(l, Label::Class(_)))
                .count(),
            n_discarded: labels
                .values()
                .filter(|l| matches!(l, Label::Discard))
                .count(),
            test_accuracy_before: ev.test_accuracy_before,
            test_accuracy_after: ev.test_accuracy_after,
            test_unsearched: ev.unsearched_test,
            real_members_labelled,
            real_sources_labelled,
            train_members_labelled,
            scenario_accuracy_before: ev.scenario_accuracy_before,
            scenario_accuracy_after: ev.scenario_accuracy_after,
            scenario_test_samples: ev.scenario_test_samples,
            held_out_curve: std::iter::once(TauAccuracy {
                tau,
                accuracy_before: Some(ev.scenario_accuracy_before),
                accuracy_after: Some(ev.scenario_accuracy_after),
            })
            .chain(ev.wider.iter().map(|w| TauAccuracy {
                tau: w.tau,
                accuracy_before: Some(w.accuracy_before),
                accuracy_after: Some(w.accuracy_after),
            }))
            .collect(),
            model: ev.model.clone(),
            scenarios: scen,
            coverage: coverage(istats, ds),
            confusions: ev
                .confusions
                .iter()
                .take(TOP_CONFUSIONS)
                .map(|c| ConfusionSummary {
                    true_class: c.true_class,
                    true_name: ds.class_name(c.true_class),
                    predicted: c.predicted,
                    predicted_name: ds.class_name(c.predicted),
                    before: c.before,
                    after: c.after,
                })
                .collect(),
            step_seconds,
            class_names: ds.class_names.clone(),
        }
    }
}

/// Writes [`layout::SUMMARY`] and [`layout::REPORT`] into the job folder `out` (its
/// `report/` made); the scenarios' pictures, the nearest training images and the map
/// are read from the same folder and embedded, so the page stands alone.
pub fn write(out: &Path, s: &Summary) -> Result<()> {
    layout::write_json(&out.join(layout::SUMMARY), s)?;
    let html = render_html(s, out);
    let p = out.join(layout::REPORT);
    std::fs::write(&p, html).map_err(|e| Error::io(&p, e))
}

fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.1}%", 100.0 * v))
}

/// A file as an `<img>` with a data URL (nothing when the file is missing).
fn embedded_img(path: &Path, mime: &str, alt: &str) -> Markup {
    match std::fs::read(path) {
        Ok(b) => html! {
            img alt=(alt) src={ "data:" (mime) ";base64," (base64::engine::general_purpose::STANDARD.encode(b)) };
        },
        Err(_) => html! {},
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222}
table{border-collapse:collapse}td,th{padding:.25rem .75rem;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}.scn{margin:1.5rem 0;padding-top:.5rem;border-top:1px solid #eee}
.small{font-size:.85rem;color:#555}img{image-rendering:pixelated;max-width:100%}";

/// `report/index.html`, a maud template: every name from the data (job, dataset,
/// classes, the model's path) is escaped by the engine.
fn render_html(s: &Summary, out: &Path) -> String {
    let name = |c: i64| {
        s.class_names
            .get(c as usize)
            .cloned()
            .unwrap_or_else(|| c.to_string())
    };
    let steps: Vec<String> = s
        .step_seconds
        .iter()
        .map(|(n, t)| format!("{n} {t:.0} s"))
        .collect();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Defuse report: " (s.job) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "Defuse report: " (s.job) }
                p {
                    "Dataset " b { (s.dataset) } ", " (s.split) " split: searched " (s.n_images_searched)
                    " of " (s.n_images_in_split) " images (" (s.n_images_wrong) " misclassified as they are, "
                    (s.n_reconstructions_wrong) " as the VAE reconstructs them, " (s.n_reconstructions_differ)
                    " read otherwise once reconstructed; rule " code { (s.search) } "), "
                    (s.n_perturbations) " perturbations, " b { (s.n_failures) } " failures from "
                    (s.n_images_with_failure) " images (" (format!("{:.1}", 100.0 * s.failure_rate_per_image))
                    "% of searched images), distilled into " b { (s.n_scenarios) } " scenarios ("
                    (s.n_labelled) " labelled, " (s.n_discarded) " discarded)."
                }
                table {
                    tr { th {} th { "before" } th { "after" } }
                    tr {
                        td { "test accuracy (the whole test split)" }
                        td { (pct(Some(s.test_accuracy_before))) }
                        td { (pct(Some(s.test_accuracy_after))) }
                    }
                    @if let Some(u) = &s.test_unsearched {
                        tr {
                            td { "test accuracy on the " (u.images) " test images identify did not search (steered nothing)" }
                            td { (pct(u.accuracy_before)) }
                            td { b { (pct(u.accuracy_after)) } }
                        }
                    }
                    tr {
                        td { "real images inside the labelled scenarios (" (s.real_members_labelled.images) ")" }
                        td { (pct(s.real_members_labelled.accuracy_before)) }
                        td { b { (pct(s.real_members_labelled.accuracy_after)) } }
                    }
                    tr {
                        td { "real images whose failures formed them (" (s.real_sources_labelled.images) ")" }
                        td { (pct(s.real_sources_labelled.accuracy_before)) }
                        td { (pct(s.real_sources_labelled.accuracy_after)) }
                    }
                    @let t = &s.train_members_labelled;
                    @if t.images > 0 {
                        tr {
                            td {
                                "training images inside the labelled scenarios (" (t.images) "; " (t.conflicting)
                                " labelled other than their scenario, " (t.relabelled) " relabelled, " (t.dropped)
                                " left out), read as their scenario's label"
                            }
                            td { (pct(Some(t.as_label_before as f64 / t.images as f64))) }
                            td { (pct(Some(t.as_label_after as f64 / t.images as f64))) }
                        }
                    }
                    @for (i, c) in s.held_out_curve.iter().enumerate() {
                        tr {
                            td {
                                "synthetic scenario samples, held out, τ = " (c.tau)
                                @if i == 0 { " (" (s.scenario_test_samples) ", the trained neighbourhood)" }
                            }
                            td { (pct(c.accuracy_before)) }
                            td { (pct(c.accuracy_after)) }
                        }
                    }
                }
                p.small {
                    "Real images are checked against their true labels. Those inside a scenario are the images of the searched range whose own code "
                    "the mixture places in it; those that formed it are the images whose perturbed codes did (with " code { "search = \"right\"" } ", all of them "
                    "classified right as they are; with the default " code { "all" } ", the real failures among them too). Synthetic samples are drawn from each scenario's Gaussian N(mean, τ Σ) from their own "
                    "seed streams, never the training samples' draw; the wider τ show how far beyond the trained neighbourhood the correction holds."
                }
                p.small { "Fine-tuned model: " (s.model.display()) ". Step times: " (steps.join(", ")) "." }
                @if !s.coverage.is_empty() {
                    h2 { "Coverage by class" }
                    p.small {
                        (s.search.describe())
                        " A class with fewer than half of its images searched is flagged: its failures are "
                        "largely unexplored, and a VAE that reconstructs it better is the fix."
                    }
                    table {
                        tr { th { "class" } th { "images" } th { "misclassified" } th { "reconstruction misclassified" } th { "reconstruction read otherwise" } th { "searched" } th { "with a failure" } th {} }
                        @for c in &s.coverage {
                            tr {
                                td { (c.name) }
                                td { (c.images) }
                                td { (c.wrong) }
                                td { (c.reconstruction_wrong) }
                                td { (c.reconstruction_differs) }
                                td { (c.searched) " (" (format!("{:.0}", 100.0 * c.searched as f64 / c.images.max(1) as f64)) "%)" }
                                td { (c.with_failure) }
                                td { @if c.mostly_skipped { b { "mostly skipped: not searched" } } }
                            }
                        }
                    }
                }
                @if !s.confusions.is_empty() {
                    h2 { "Confusions on the real test images" }
                    p.small {
                        "The classifier's most frequent mistakes on the whole test split (true class read as another), "
                        "before and after correction; every pair is in correct/evaluation.json."
                    }
                    table {
                        tr { th { "true class" } th { "read as" } th { "before" } th { "after" } }
                        @for c in &s.confusions {
                            tr {
                                td { (c.true_name) }
                                td { (c.predicted_name) }
                                td { (c.before) }
                                td { (c.after) }
                            }
                        }
                    }
                }
                h2 { "All failures" }
                p.small { "Every failure code projected on its first two principal components, coloured by scenario." }
                (embedded_img(&out.join(layout::PROJECTION), "image/svg+xml", "failure codes by scenario"))
                h2 { "Failure scenarios" }
                @for sc in &s.scenarios {
                    section.scn id={ "s" (sc.id) } {
                        h3 { "Scenario " (sc.id) }
                        p {
                            "weight " (format!("{:.3}", sc.weight)) " · " (sc.size) " failures · classifier says "
                            b { (name(sc.predicted)) } " · labelled "
                            b {
                                @match sc.label {
                                    Some(l) => (name(l)),
                                    None => em { "discarded" },
                                }
                            }
                            " · samples held out: " (pct(sc.accuracy_before)) " → " b { (pct(sc.accuracy_after)) }
                        }
                        p.small {
                            "real images inside it: " (sc.real_members.images) " (accuracy " (pct(sc.real_members.accuracy_before)) " → "
                            (pct(sc.real_members.accuracy_after)) "); that formed it: " (sc.real_sources.images) " ("
                            (pct(sc.real_sources.accuracy_before)) " → " (pct(sc.real_sources.accuracy_after)) ")"
                            @if sc.held_out_curve.len() > 1 {
                                "; held-out samples by τ: "
                                (sc.held_out_curve.iter().map(|c| format!("{}: {} → {}", c.tau, pct(c.accuracy_before), pct(c.accuracy_after))).collect::<Vec<_>>().join(", "))
                            }
                        }
                        @let t = &sc.train_members;
                        @if t.images > 0 {
                            p.small {
                                "training images inside it: " (t.images)
                                @if let Some(l) = sc.label {
                                    " · labelled other than " (name(l)) " in the training data: " b { (t.conflicting) }
                                    @if t.relabelled > 0 { " (relabelled " (name(l)) " for the fine-tune)" }
                                    @if t.dropped > 0 { " (left out of the fine-tune)" }
                                    @if t.conflicting > 0 && t.relabelled + t.dropped == 0 { " (trained on as labelled: correct.conflicting_labels = keep)" }
                                    " · read as " (name(l)) ": " (t.as_label_before) " → " (t.as_label_after)
                                }
                            }
                        }
                        @if !sc.examples.is_empty() {
                            p.small { "some of its own failures: the searched images above, the perturbed ones the classifier got wrong below:" }
                            (embedded_img(&out.join(layout::scenario_failures(sc.id)), "image/png", &format!("failures of scenario {}", sc.id)))
                            p.small {
                                "labelled → read as, column by column: "
                                (sc.examples.iter().map(|e| format!("{} → {}", name(e.label), name(e.predicted))).collect::<Vec<_>>().join(", "))
                            }
                        }
                        p.small { "samples of its Gaussian (the paper's picture):" }
                        (embedded_img(&out.join(layout::scenario_grid(sc.id)), "image/png", &format!("samples of scenario {}", sc.id)))
                        p.small {
                            "predictions on the samples above, row by row: "
                            (sc.sample_predictions.iter().map(|&p| name(p)).collect::<Vec<_>>().join(" "))
                        }
                        p.small { "the real training images nearest the scenario's mean (in the VAE's code space):" }
                        (embedded_img(&out.join(layout::nearest(sc.id)), "image/png", &format!("training images nearest scenario {}", sc.id)))
                        p.small {
                            "true labels of the source images: "
                            (sc.source_labels.iter().map(|(l, n)| format!("{}: {n}", name(*l))).collect::<Vec<_>>().join(", "))
                        }
                    }
                }
            }
        }
    }
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names come from the user's data (folder names are class names, the job name
    /// from its file): the report escapes them, and embeds the pictures it finds.
    #[test]
    fn the_report_escapes_names_from_the_data_and_embeds_pictures() {
        let evil = r#"<img src=x onerror="alert(1)">"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("distill")).unwrap();
        for f in [layout::scenario_grid(0), layout::scenario_failures(0)] {
            std::fs::write(dir.path().join(f), b"\x89PNG fake").unwrap();
        }
        let s = Summary {
            job: evil.into(),
            dataset: evil.into(),
            seed: 0,
            split: "test".into(),
            n_images_searched: 10,
            n_images_in_split: 10,
            n_images_wrong: 0,
            n_reconstructions_wrong: 0,
            n_reconstructions_differ: 0,
            search: Search::All,
            n_perturbations: 100,
            n_failures: 3,
            n_images_with_failure: 2,
            failure_rate_per_image: 0.2,
            n_scenarios: 1,
            n_labelled: 0,
            n_discarded: 1,
            test_accuracy_before: 0.9,
            test_accuracy_after: 0.91,
            scenario_accuracy_before: 0.1,
            scenario_accuracy_after: 0.8,
            scenario_test_samples: 50,
            test_unsearched: None,
            real_members_labelled: Measured::default(),
            real_sources_labelled: Measured::default(),
            train_members_labelled: TrainMembers::default(),
            held_out_curve: vec![],
            coverage: vec![ClassCoverage {
                class: 0,
                name: evil.into(),
                images: 10,
                wrong: 1,
                reconstruction_wrong: 6,
                reconstruction_differs: 6,
                searched: 3,
                with_failure: 2,
                mostly_skipped: true,
            }],
            confusions: vec![ConfusionSummary {
                true_class: 0,
                true_name: evil.into(),
                predicted: 1,
                predicted_name: "one".into(),
                before: 4,
                after: 2,
            }],
            model: PathBuf::from(evil),
            scenarios: vec![ScenarioSummary {
                id: 0,
                weight: 0.5,
                size: 3,
                predicted: 1,
                predicted_name: evil.into(),
                label: None,
                label_name: None,
                accuracy_before: Some(0.1),
                accuracy_after: None,
                held_out_curve: vec![],
                real_members: Measured::default(),
                real_sources: Measured::default(),
                train_members: TrainMembers {
                    images: 5,
                    ..Default::default()
                },
                source_labels: [(0, 3)].into(),
                sample_predictions: vec![0, 1],
                examples: vec![Example {
                    source: 4,
                    label: 0,
                    predicted: 1,
                }],
            }],
            step_seconds: vec![("identify".into(), 1.0)],
            class_names: vec![evil.into(), "one".into()],
        };
        let html = render_html(&s, dir.path());
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(
            html.contains("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"),
            "{html}"
        );
        assert!(html.contains("<em>discarded</em>"), "{html}");
        assert!(html.contains("mostly skipped: not searched"), "{html}");
        assert!(html.contains("3 (30%)"), "{html}");
        assert!(html.contains("training images inside it: 5"), "{html}");
        assert!(
            html.contains("<td>one</td><td>4</td><td>2</td>"),
            "the confusion of class 0 as one: {html}"
        );
        assert!(
            html.contains("samples held out: 10.0% → <b>–</b>"),
            "{html}"
        );
        assert!(
            html.contains("column by column: &lt;img src=x onerror=&quot;alert(1)&quot;&gt; → one"),
            "{html}"
        );
        // the grid and the failures found are embedded; the missing projection and
        // nearest images are left out
        assert_eq!(html.matches("data:image/png;base64,").count(), 2, "{html}");
        assert!(!html.contains("image/svg+xml"));
    }
}
