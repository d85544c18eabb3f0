//! Evaluate and report: the numbers before and after correction, as
//! `report/summary.json` (for scripts) and `report/index.html` (for people).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::config::JobConfig;
use crate::correct::CorrectEpoch;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::identify::{Failures, IdentifyStats};
use crate::scenarios::{Label, Labels, Scenario};

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
    pub accuracy_before: Option<f64>,
    pub accuracy_after: Option<f64>,
    pub source_labels: BTreeMap<i64, usize>,
    pub sample_predictions: Vec<i64>,
}

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
    pub n_perturbations: usize,
    pub n_failures: usize,
    pub n_images_with_failure: usize,
    /// Share of searched images that yielded at least one failure.
    pub failure_rate_per_image: f64,
    pub n_scenarios: usize,
    pub n_labelled: usize,
    pub n_discarded: usize,
    pub test_accuracy_before: f64,
    pub test_accuracy_after: f64,
    pub scenario_accuracy_before: f64,
    pub scenario_accuracy_after: f64,
    pub scenario_test_samples: usize,
    pub model: PathBuf,
    pub scenarios: Vec<ScenarioSummary>,
    /// Seconds per step (the report's own is 0).
    pub step_seconds: Vec<(String, f64)>,
    #[serde(skip)]
    class_names: Vec<String>,
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
        let scen = scenarios
            .iter()
            .map(|s| {
                let label = match labels.get(&s.id) {
                    Some(Label::Class(c)) => Some(*c),
                    _ => None,
                };
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
                    source_labels: s.source_labels.clone(),
                    sample_predictions: s.sample_predictions.clone(),
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
            scenario_accuracy_before: ev.scenario_accuracy_before,
            scenario_accuracy_after: ev.scenario_accuracy_after,
            scenario_test_samples: ev.scenario_test_samples,
            model: ev.model.clone(),
            scenarios: scen,
            step_seconds,
            class_names: ds.class_names.clone(),
        }
    }
}

/// Writes `summary.json` and `index.html` into `dir`; scenario grids are read from
/// `grids` (`scenario-<id>.png`), the nearest training images and the projection from
/// `pictures` (`nearest-<id>.png`, `projection.svg`), all embedded, so the page stands
/// alone.
pub fn write(dir: &Path, s: &Summary, grids: &Path, pictures: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::layout::write_json(&dir.join("summary.json"), s)?;
    let html = render_html(s, grids, pictures);
    let p = dir.join("index.html");
    std::fs::write(&p, html).map_err(|e| Error::io(&p, e))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.1}%", 100.0 * v))
}

/// A file as an `<img>` with a data URL (nothing when the file is missing).
fn embedded_img(path: &Path, mime: &str, alt: &str) -> String {
    std::fs::read(path)
        .map(|b| {
            format!(
                "<img alt=\"{}\" src=\"data:{mime};base64,{}\">",
                esc(alt),
                base64::engine::general_purpose::STANDARD.encode(b)
            )
        })
        .unwrap_or_default()
}

fn render_html(s: &Summary, grids: &Path, pictures: &Path) -> String {
    let name = |c: i64| {
        esc(&s
            .class_names
            .get(c as usize)
            .cloned()
            .unwrap_or_else(|| c.to_string()))
    };
    let mut rows = String::new();
    for sc in &s.scenarios {
        let img = embedded_img(
            &grids.join(format!("scenario-{}.png", sc.id)),
            "image/png",
            &format!("samples of scenario {}", sc.id),
        );
        let nearest = embedded_img(
            &pictures.join(format!("nearest-{}.png", sc.id)),
            "image/png",
            &format!("training images nearest scenario {}", sc.id),
        );
        let preds: Vec<String> = sc.sample_predictions.iter().map(|&p| name(p)).collect();
        let sources: Vec<String> = sc
            .source_labels
            .iter()
            .map(|(l, n)| format!("{}: {n}", name(*l)))
            .collect();
        let label = sc.label.map_or("<em>discarded</em>".to_string(), name);
        rows.push_str(&format!(
            "<section class=\"scn\" id=\"s{id}\"><h3>Scenario {id}</h3>\
             <p>weight {w:.3} · {size} failures · classifier says <b>{pred}</b> · labelled <b>{label}</b> · \
             accuracy {before} → <b>{after}</b></p>{img}\
             <p class=\"small\">predictions on the samples above, row by row: {preds}</p>\
             <p class=\"small\">the real training images nearest the scenario's mean (in the VAE's code space):</p>{nearest}\
             <p class=\"small\">true labels of the source images: {sources}</p></section>\n",
            id = sc.id,
            w = sc.weight,
            size = sc.size,
            pred = name(sc.predicted),
            before = pct(sc.accuracy_before),
            after = pct(sc.accuracy_after),
            preds = preds.join(" "),
            sources = sources.join(", "),
        ));
    }
    let steps: Vec<String> = s
        .step_seconds
        .iter()
        .map(|(n, t)| format!("{n} {t:.0} s"))
        .collect();
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Defuse report: {job}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222}}
table{{border-collapse:collapse}}td,th{{padding:.25rem .75rem;border-bottom:1px solid #ddd;text-align:right}}
th:first-child,td:first-child{{text-align:left}}.scn{{margin:1.5rem 0;padding-top:.5rem;border-top:1px solid #eee}}
.small{{font-size:.85rem;color:#555}}img{{image-rendering:pixelated;max-width:100%}}</style></head><body>
<h1>Defuse report: {job}</h1>
<p>Dataset <b>{dataset}</b>, {split} split: searched {searched} of {n_split} images
({wrong} misclassified, {recon} whose VAE reconstruction is misclassified, skipped), {perts} perturbations,
<b>{fails}</b> failures from {imgs_fail} images ({rate:.1}% of searched images), distilled into
<b>{nscn}</b> scenarios ({labelled} labelled, {discarded} discarded).</p>
<table><tr><th></th><th>before</th><th>after</th></tr>
<tr><td>test accuracy</td><td>{tb}</td><td>{ta}</td></tr>
<tr><td>scenario-test accuracy ({nst} held-out samples)</td><td>{sb}</td><td>{sa}</td></tr></table>
<p class="small">Fine-tuned model: {model}. Step times: {steps}.</p>
<h2>All failures</h2>
<p class="small">Every failure code projected on its first two principal components, coloured by scenario.</p>
{projection}
<h2>Failure scenarios</h2>
{rows}</body></html>
"#,
        job = esc(&s.job),
        dataset = esc(&s.dataset),
        split = s.split,
        searched = s.n_images_searched,
        n_split = s.n_images_in_split,
        wrong = s.n_images_wrong,
        recon = s.n_reconstructions_wrong,
        perts = s.n_perturbations,
        fails = s.n_failures,
        imgs_fail = s.n_images_with_failure,
        rate = 100.0 * s.failure_rate_per_image,
        nscn = s.n_scenarios,
        labelled = s.n_labelled,
        discarded = s.n_discarded,
        tb = pct(Some(s.test_accuracy_before)),
        ta = pct(Some(s.test_accuracy_after)),
        sb = pct(Some(s.scenario_accuracy_before)),
        sa = pct(Some(s.scenario_accuracy_after)),
        nst = s.scenario_test_samples,
        model = esc(&s.model.display().to_string()),
        steps = steps.join(", "),
        projection = embedded_img(
            &pictures.join("projection.svg"),
            "image/svg+xml",
            "failure codes by scenario"
        ),
    )
}
