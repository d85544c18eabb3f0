//! Distill and label: cluster the failure codes into scenarios, sample each scenario
//! for a person (or an oracle) to judge, and hold the one label per scenario.
use std::collections::BTreeMap;
use std::path::Path;

use rand::seq::index::sample;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::dpgmm::{DpGmm, DpGmmOptions};
use crate::error::{Error, Result};
use crate::identify::Failures;
use crate::models::{Classifier, Vae};
use crate::seeds::{rng_for, Step};

/// Options of the distill step (the `[distill]` table of a job config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillOptions {
    /// Truncation level of the DP-GMM (authors: 100).
    pub max_components: usize,
    /// Fit on at most this many codes, drawn without replacement (authors: 10,000
    /// with replacement); every code is then assigned to a component.
    pub subsample: usize,
    /// Components above this weight are failure scenarios.
    pub weight_cutoff: f64,
    /// Samples of a scenario come from `N(mean, tau * Sigma)`.
    pub tau: f64,
    pub max_iter: usize,
    pub tol: f64,
    /// Samples shown per scenario (grid and predictions).
    pub grid_samples: usize,
}

impl Default for DistillOptions {
    fn default() -> Self {
        DistillOptions {
            max_components: 100,
            subsample: 10_000,
            weight_cutoff: 0.01,
            tau: 0.01,
            max_iter: 1000,
            tol: 1e-3,
            grid_samples: 16,
        }
    }
}

impl DistillOptions {
    pub fn gmm(&self) -> DpGmmOptions {
        DpGmmOptions {
            max_components: self.max_components,
            max_iter: self.max_iter,
            tol: self.tol,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.gmm().validate()?;
        if !(self.weight_cutoff >= 0.0 && self.weight_cutoff < 1.0) {
            return Err(Error::invalid(
                "distill.weight_cutoff",
                format!("{} is not in [0, 1)", self.weight_cutoff),
            ));
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return Err(Error::invalid(
                "distill.tau",
                format!("{} is not positive", self.tau),
            ));
        }
        if self.subsample < 2 {
            return Err(Error::invalid("distill.subsample", "must be at least 2"));
        }
        Ok(())
    }
}

/// One failure scenario: a heavy component of the mixture.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    /// 0.. in order of decreasing weight.
    pub id: usize,
    pub component: usize,
    pub weight: f64,
    /// Failure codes assigned to it.
    pub size: usize,
    pub mean: Vec<f64>,
    pub covariance: Vec<Vec<f64>>,
    /// The classifier's majority prediction on its failure codes.
    pub predicted: i64,
    /// True labels of the source images of its codes: label -> count.
    pub source_labels: BTreeMap<i64, usize>,
    /// The classifier's predictions on the grid samples, in grid order.
    pub sample_predictions: Vec<i64>,
    /// A few of its own failures, one per searched image, for a person to see what the
    /// classifier got wrong (`distill/failures-<id>.png`: the images above, the
    /// failures below, in this order).
    #[serde(default)]
    pub examples: Vec<Example>,
}

/// One failure shown for a scenario: a searched image and its perturbed decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The image's index in the searched split.
    pub source: usize,
    /// Its label in the data set.
    pub label: i64,
    /// The classifier's prediction on the decoded failure, as shown.
    pub predicted: i64,
}

/// Failures shown per scenario.
pub const EXAMPLES: usize = 8;

/// Up to `n` of component `component`'s failures (indices into `f`), each from a
/// different searched image: the failures in an order shuffled by `(seed, scenario)`,
/// the first failure of each image in that order, so the same job shows the same ones.
pub fn example_failures(
    f: &Failures,
    assign: &[i64],
    component: usize,
    scenario: usize,
    n: usize,
    seed: u64,
) -> Vec<usize> {
    let mut members: Vec<usize> = (0..f.len())
        .filter(|&i| assign.get(i) == Some(&(component as i64)))
        .collect();
    members.shuffle(&mut Stream::Examples.rng(seed, scenario));
    let mut seen = std::collections::HashSet::new();
    members
        .into_iter()
        .filter(|&i| seen.insert(f.source_index[i]))
        .take(n)
        .collect()
}

/// The seed streams of one scenario's draws, one per use, so that no two uses share
/// numbers (the held-out samples are independent of the trained ones and of each other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The grid of samples shown for labelling.
    Grid,
    /// The samples (or own failures) the correction trains on.
    Train,
    /// The held-out samples at the scenario's `tau`.
    Test,
    /// The held-out samples at the `j`-th of `correct.test_taus`.
    Wider(usize),
    /// The order in which the scenario's own failures are shown.
    Examples,
}

impl Stream {
    /// The generator of this stream for `scenario` (its id) under the job's `seed`.
    pub fn rng(self, seed: u64, scenario: usize) -> rand_chacha::ChaCha8Rng {
        let id = scenario as u64;
        match self {
            Stream::Grid => rng_for(seed, Step::Scenario, &[id, 0]),
            Stream::Train => rng_for(seed, Step::Scenario, &[id, 1]),
            Stream::Test => rng_for(seed, Step::Scenario, &[id, 2]),
            Stream::Wider(j) => rng_for(seed, Step::Scenario, &[id, 3, j as u64]),
            Stream::Examples => rng_for(seed, Step::Scenario, &[id, 4]),
        }
    }
}

impl Scenario {
    /// The `source-majority` oracle: the most common true label of the sources.
    pub fn source_majority(&self) -> Option<i64> {
        self.source_labels
            .iter()
            .max_by_key(|(l, &c)| (c, std::cmp::Reverse(**l)))
            .map(|(&l, _)| l)
    }

    /// `n` codes from `N(mean, tau * Sigma)`, drawn from `stream` of this scenario.
    pub fn sample_codes(&self, n: usize, tau: f64, seed: u64, stream: Stream) -> Result<Tensor> {
        let d = self.mean.len() as i64;
        let cov = Tensor::from_slice(&self.covariance.concat()).view([d, d]) * tau;
        let chol = (cov + Tensor::eye(d, (Kind::Double, Device::Cpu)) * 1e-9)
            .f_linalg_cholesky(false)
            .map_err(|_| {
                Error::invalid(
                    "scenario",
                    format!(
                        "covariance of scenario {} is not positive definite",
                        self.id
                    ),
                )
            })?;
        let mut rng = stream.rng(seed, self.id);
        let z: Vec<f64> = (0..n * d as usize)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let eps = Tensor::from_slice(&z).view([n as i64, d]);
        Ok(
            (eps.matmul(&chol.transpose(0, 1)) + Tensor::from_slice(&self.mean).unsqueeze(0))
                .to_kind(Kind::Float),
        )
    }
}

/// Fits the mixture on (a subsample of) the failure codes and returns the scenarios,
/// heaviest first, and every code's component.
pub fn distill(
    f: &Failures,
    o: &DistillOptions,
    seed: u64,
) -> Result<(DpGmm, Vec<Scenario>, Vec<i64>)> {
    o.validate()?;
    if f.len() < 2 {
        return Err(Error::invalid(
            "distill",
            format!("{} failures found: too few to cluster; search more images or perturb more (identify.samples, sigma)", f.len()),
        ));
    }
    let codes = f.codes.to_kind(Kind::Double);
    let fit_on = if f.len() > o.subsample {
        let mut rng = rng_for(seed, Step::Subsample, &[]);
        let mut idx: Vec<i64> = sample(&mut rng, f.len(), o.subsample)
            .into_iter()
            .map(|i| i as i64)
            .collect();
        idx.sort_unstable();
        codes.index_select(0, &Tensor::from_slice(&idx))
    } else {
        codes.shallow_clone()
    };
    let gmm = DpGmm::fit(&fit_on, &o.gmm(), seed)?;
    let assign = gmm.predict(&codes)?;
    // A component heavy enough can still have no failure assigned to it: the weights
    // are fitted on a subsample and include the prior's share. It is no scenario:
    // there is nothing of it to show, label or train on.
    let mut members: Vec<Vec<usize>> = vec![vec![]; gmm.n_components()];
    for (i, &k) in assign.iter().enumerate() {
        members[k as usize].push(i);
    }
    let mut heavy: Vec<usize> = (0..gmm.n_components())
        .filter(|&k| gmm.weights[k] > o.weight_cutoff && !members[k].is_empty())
        .collect();
    heavy.sort_by(|&a, &b| gmm.weights[b].total_cmp(&gmm.weights[a]).then(a.cmp(&b)));
    let scenarios = heavy
        .into_iter()
        .enumerate()
        .map(|(id, k)| {
            let members = &members[k];
            let mut preds: BTreeMap<i64, usize> = BTreeMap::new();
            let mut sources: BTreeMap<i64, usize> = BTreeMap::new();
            for &i in members {
                *preds.entry(f.predicted[i]).or_default() += 1;
                *sources.entry(f.true_label[i]).or_default() += 1;
            }
            Scenario {
                id,
                component: k,
                weight: gmm.weights[k],
                size: members.len(),
                mean: gmm.means[k].clone(),
                covariance: gmm.covariances[k].clone(),
                predicted: preds
                    .iter()
                    .max_by_key(|(l, &c)| (c, std::cmp::Reverse(**l)))
                    .map(|(&l, _)| l)
                    .unwrap_or(-1),
                source_labels: sources,
                sample_predictions: vec![],
                examples: vec![],
            }
        })
        .collect();
    Ok((gmm, scenarios, assign))
}

/// Decodes `codes` in batches and classifies them: images and predictions.
pub fn decode_and_classify(
    vae: &Vae,
    clf: &Classifier,
    codes: &Tensor,
) -> Result<(Tensor, Vec<i64>)> {
    tch::no_grad(|| {
        let imgs = vae.decode(&codes.to_device(vae.device()))?;
        let (pred, _) = clf.predict(&imgs, 500)?;
        Ok((imgs, Vec::<i64>::try_from(pred.to_device(Device::Cpu))?))
    })
}

/// A scenario's label: a class, or discard (not a failure, or not recognisable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Class(i64),
    Discard,
}

impl Serialize for Label {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Label::Class(c) => s.serialize_i64(*c),
            Label::Discard => s.serialize_str("discard"),
        }
    }
}

/// Labels of a job: scenario id -> label.
pub type Labels = BTreeMap<usize, Label>;

/// The `source-majority` oracle for every scenario: the majority source label, or
/// discard when that majority covers less than `min_purity` of the scenario, or (with
/// `discard_non_failures`) when the classifier already gets most of the scenario's
/// samples right, as a person would discard a scenario that is no failure.
pub fn source_majority_labels(
    scenarios: &[Scenario],
    min_purity: f64,
    discard_non_failures: bool,
) -> Labels {
    scenarios
        .iter()
        .map(|s| {
            let total: usize = s.source_labels.values().sum();
            let label = match s.source_majority() {
                Some(l) if total > 0 && s.source_labels[&l] as f64 >= min_purity * total as f64 => {
                    let right = s.sample_predictions.iter().filter(|&&p| p == l).count();
                    let no_failure =
                        !s.sample_predictions.is_empty() && 2 * right >= s.sample_predictions.len();
                    if discard_non_failures && no_failure {
                        Label::Discard
                    } else {
                        Label::Class(l)
                    }
                }
                _ => Label::Discard,
            };
            (s.id, label)
        })
        .collect()
}

/// Parses one label value: a class id, a class name, or `discard`.
pub fn parse_label(v: &str, class_names: &[String]) -> std::result::Result<Label, String> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("discard") {
        return Ok(Label::Discard);
    }
    let class = match v.parse::<i64>() {
        Ok(c) => c,
        Err(_) => class_names
            .iter()
            .position(|n| n == v)
            .map(|c| c as i64)
            .ok_or_else(|| format!("'{v}' is not a class id, a class name or 'discard'"))?,
    };
    if class < 0 || class as usize >= class_names.len() {
        return Err(format!(
            "class {class} is out of range: the dataset has {} classes (0..{})",
            class_names.len(),
            class_names.len() - 1
        ));
    }
    Ok(Label::Class(class))
}

/// Validates `pairs` (scenario id text, label text) against the scenarios and classes;
/// all or nothing.
pub fn validate_labels<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    scenarios: &[Scenario],
    class_names: &[String],
) -> std::result::Result<Labels, String> {
    let mut out = Labels::new();
    for (id, value) in pairs {
        let sid: usize = id
            .trim()
            .parse()
            .map_err(|_| format!("'{id}' is not a scenario id"))?;
        if !scenarios.iter().any(|s| s.id == sid) {
            return Err(format!(
                "scenario {sid} does not exist (this job has scenarios 0..{})",
                scenarios.len().saturating_sub(1)
            ));
        }
        let label = parse_label(value, class_names).map_err(|e| format!("scenario {sid}: {e}"))?;
        if out.insert(sid, label).is_some() {
            return Err(format!("scenario {sid} is labelled twice"));
        }
    }
    Ok(out)
}

/// The (scenario, label) pairs of a labels JSON object
/// `{"<scenario id>": <class id> | "<class name>" | "discard"}`, not yet validated.
pub fn label_pairs_from_json(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| {
            format!("expected a JSON object {{\"<scenario id>\": <class> or \"discard\"}}: {e}")
        })?;
    Ok(v.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect())
}

/// The (scenario, label) pairs of `<scenario>=<class>|discard` arguments, not yet
/// validated.
pub fn label_pairs_from_args(
    args: &[String],
) -> std::result::Result<Vec<(String, String)>, String> {
    args.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("'{p}' is not <scenario>=<class>|discard"))
        })
        .collect()
}

/// Reads a labels file: a JSON object `{"<scenario id>": <class id> | "<class name>" | "discard"}`.
pub fn read_labels(path: &Path, scenarios: &[Scenario], class_names: &[String]) -> Result<Labels> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let pairs = label_pairs_from_json(&text).map_err(|m| Error::format(path, m))?;
    validate_labels(
        pairs.iter().map(|(a, b)| (a.as_str(), b.as_str())),
        scenarios,
        class_names,
    )
    .map_err(|m| Error::format(path, m))
}

/// Labels as the JSON object `labels.json` holds (`{"<scenario>": <label>}`).
pub fn labels_json(labels: &Labels) -> String {
    let obj: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::to_value(v).expect("label")))
        .collect();
    serde_json::to_string_pretty(&obj).expect("json")
}

pub fn write_labels(path: &Path, labels: &Labels) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, labels_json(labels)).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(id: usize, sources: &[(i64, usize)], samples: &[i64]) -> Scenario {
        Scenario {
            id,
            component: id,
            weight: 0.1,
            size: sources.iter().map(|s| s.1).sum(),
            mean: vec![0.0],
            covariance: vec![vec![1.0]],
            predicted: 0,
            source_labels: sources.iter().copied().collect(),
            sample_predictions: samples.to_vec(),
            examples: vec![],
        }
    }

    #[test]
    fn each_use_of_a_scenario_draws_from_its_own_stream() {
        use rand::Rng;
        let streams = [
            Stream::Grid,
            Stream::Train,
            Stream::Test,
            Stream::Wider(0),
            Stream::Wider(1),
            Stream::Wider(2),
            Stream::Examples,
        ];
        let first = |st: Stream, id: usize| st.rng(7, id).gen::<u64>();
        let mut seen = std::collections::HashSet::new();
        for id in 0..3 {
            for st in streams {
                assert!(
                    seen.insert(first(st, id)),
                    "{st:?} of scenario {id} repeats a stream"
                );
                // and the same stream again gives the same numbers
                assert_eq!(first(st, id), first(st, id));
            }
        }
        // the samples follow their stream
        let s = scenario(1, &[(0, 1)], &[]);
        let a = s.sample_codes(5, 0.1, 7, Stream::Wider(1)).unwrap();
        let b = s.sample_codes(5, 0.1, 7, Stream::Examples).unwrap();
        let c = s.sample_codes(5, 0.1, 7, Stream::Wider(1)).unwrap();
        assert!(a.equal(&c));
        assert!(!a.equal(&b));
    }

    #[test]
    fn oracle_discards_ambiguous_scenarios_and_non_failures() {
        let s = vec![
            scenario(0, &[(8, 90), (3, 10)], &[3, 3, 3, 8]),
            scenario(1, &[(8, 50), (3, 50)], &[3, 3, 3, 3]),
            scenario(2, &[(5, 80), (6, 20)], &[5, 5, 5, 6]),
        ];
        let l = source_majority_labels(&s, 0.6, true);
        assert_eq!(l[&0], Label::Class(8));
        assert_eq!(l[&1], Label::Discard, "50% pure");
        assert_eq!(l[&2], Label::Discard, "already classified right");
        let l = source_majority_labels(&s, 0.6, false);
        assert_eq!(l[&2], Label::Class(5));
        let names: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        assert!(validate_labels([("0", "3"), ("0", "4")], &s, &names)
            .unwrap_err()
            .contains("twice"));
        assert!(validate_labels([("7", "3")], &s, &names)
            .unwrap_err()
            .contains("scenario 7 does not exist"));
        assert_eq!(
            validate_labels([("2", "discard")], &s, &names).unwrap()[&2],
            Label::Discard
        );
    }
}
