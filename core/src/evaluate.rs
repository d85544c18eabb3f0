//! Evaluate: what the correction changed, measured where it means something.
//!
//! - **Real images per scenario.** A scenario's *members* are the real images of the
//!   searched range whose own code (the encoder's mean) falls in the scenario: the
//!   scenario's component is the most responsible one under the fitted mixture, with a
//!   responsibility of at least [`MIN_RESPONSIBILITY`], and the code lies inside the
//!   region the scenario's own failures occupy (a squared Mahalanobis distance to the
//!   component no larger than `correct.region_scale` times the [`REGION_QUANTILE`]
//!   quantile of its failures'). Its
//!   *sources* are the images whose perturbed codes formed it. The classifier's accuracy
//!   on both (against the images' true labels), before and after, sits beside the
//!   synthetic figure.
//! - **Test images identify did not search** (the held-out tail of the test split,
//!   `identify.hold_out`, or the whole test split when identify searched the training
//!   split): no failure, no scenario and no correction step was steered by them.
//! - Held-out *samples* of the scenarios, from their own seed streams at `distill.tau`
//!   and at the wider `correct.test_taus`, are drawn in [`crate::correct::scenario_data`].
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::{Dataset, Split, SplitName};
use crate::dpgmm::DpGmm;
use crate::error::{Error, Result};
use crate::identify::Failures;
use crate::models::{Classifier, Vae};
use crate::scenarios::{Label, Labels, Scenario};

/// A real image belongs to a scenario only when the scenario's component takes at least
/// this share of it under the mixture.
pub const MIN_RESPONSIBILITY: f64 = 0.5;
/// ... and when its squared Mahalanobis distance to the component is at most
/// `correct.region_scale` times this quantile of the scenario's own failures'.
pub const REGION_QUANTILE: f64 = 0.95;

/// Images classified right before and after correction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub images: usize,
    pub right_before: usize,
    pub right_after: usize,
    /// `right_before / images` (null without images)
    pub accuracy_before: Option<f64>,
    pub accuracy_after: Option<f64>,
}

impl Measured {
    fn add(&mut self, before: bool, after: bool) {
        self.images += 1;
        self.right_before += before as usize;
        self.right_after += after as usize;
    }

    fn sum(&mut self, o: &Measured) {
        self.images += o.images;
        self.right_before += o.right_before;
        self.right_after += o.right_after;
    }

    /// Sets the accuracies from the counts.
    fn finished(mut self) -> Measured {
        let of = |r: usize| (self.images > 0).then(|| r as f64 / self.images as f64);
        self.accuracy_before = of(self.right_before);
        self.accuracy_after = of(self.right_after);
        self
    }

    /// The sum of `parts`.
    pub fn total<'a>(parts: impl IntoIterator<Item = &'a Measured>) -> Measured {
        let mut t = Measured::default();
        for p in parts {
            t.sum(p);
        }
        t.finished()
    }
}

/// One scenario's real images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RealImages {
    /// images of the searched range whose own code falls in the scenario
    pub members: Measured,
    /// images of the searched range whose perturbed codes formed the scenario
    pub sources: Measured,
    /// images of the training split whose own code falls in the scenario
    #[serde(default)]
    pub train_members: TrainMembers,
}

/// The training images inside one scenario (same rule as the searched range's
/// members). Their labels are the data set's, which may be wrong: those that differ
/// from the scenario's label are what `correct.conflicting_labels` acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainMembers {
    pub images: usize,
    /// labelled, in the training split, other than the scenario's label (labelled
    /// scenarios only)
    pub conflicting: usize,
    /// what the fine-tune did with those: relabelled with the scenario's label, or
    /// left out of the training loss
    pub relabelled: usize,
    pub dropped: usize,
    /// read as the scenario's label by the classifier before and after correction
    pub as_label_before: usize,
    pub as_label_after: usize,
}

impl TrainMembers {
    /// The sum of `parts`.
    pub fn total<'a>(parts: impl IntoIterator<Item = &'a TrainMembers>) -> TrainMembers {
        parts
            .into_iter()
            .fold(TrainMembers::default(), |a, p| TrainMembers {
                images: a.images + p.images,
                conflicting: a.conflicting + p.conflicting,
                relabelled: a.relabelled + p.relabelled,
                dropped: a.dropped + p.dropped,
                as_label_before: a.as_label_before + p.as_label_before,
                as_label_after: a.as_label_after + p.as_label_after,
            })
    }
}

/// A training image inside a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainMember {
    pub row: usize,
    pub scenario: usize,
    /// its label in the training split
    pub label: i64,
}

/// The training images whose own code falls in a scenario, in row order: the split is
/// read a window at a time and encoded in chunks of 1,000.
pub fn train_members(split: &Split, vae: &Vae, regions: &Regions) -> Result<Vec<TrainMember>> {
    let mut out = Vec::new();
    if regions.by_component.is_empty() || split.is_empty() {
        return Ok(out);
    }
    split.for_windows(0..split.len(), |w, r| {
        for start in r.clone().step_by(1000) {
            let end = (start + 1000).min(r.end);
            let x = w.images(start..end, vae.device());
            let codes = tch::no_grad(|| vae.encode(&x))?.0;
            let member = regions.scenario_of(&codes)?;
            if member.iter().all(Option::is_none) {
                continue;
            }
            let y = Vec::<i64>::try_from(w.labels(start..end, Device::Cpu))?;
            for (j, id) in member.into_iter().enumerate() {
                if let Some(scenario) = id {
                    out.push(TrainMember {
                        row: start + j,
                        scenario,
                        label: y[j],
                    });
                }
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// The training members' counts per scenario, with what the classifiers `before` and
/// `after` correction read them as, and what the fine-tune's `train_labels` did.
pub fn measure_train_members(
    split: &Split,
    members: &[TrainMember],
    labels: &Labels,
    train_labels: &crate::correct::TrainLabels,
    before: &Classifier,
    after: &Classifier,
) -> Result<BTreeMap<usize, TrainMembers>> {
    let mut out: BTreeMap<usize, TrainMembers> = BTreeMap::new();
    for chunk in members.chunks(1000) {
        let rows: Vec<usize> = chunk.iter().map(|m| m.row).collect();
        let held = split.read_rows(&rows)?;
        let x = held.gather(&rows, before.device());
        let pb = Vec::<i64>::try_from(before.predict(&x, 1000)?.0.to_device(Device::Cpu))?;
        let pa = Vec::<i64>::try_from(after.predict(&x, 1000)?.0.to_device(Device::Cpu))?;
        for (j, m) in chunk.iter().enumerate() {
            let t = out.entry(m.scenario).or_default();
            t.images += 1;
            if let Some(Label::Class(c)) = labels.get(&m.scenario) {
                t.conflicting += (m.label != *c) as usize;
                t.as_label_before += (pb[j] == *c) as usize;
                t.as_label_after += (pa[j] == *c) as usize;
                match train_labels.get(&m.row) {
                    Some(&crate::correct::IGNORED) => t.dropped += 1,
                    Some(_) => t.relabelled += 1,
                    None => {}
                }
            }
        }
    }
    Ok(out)
}

/// Which scenario a code falls in.
pub struct Regions {
    gmm: DpGmm,
    /// component -> (scenario id, its mean `[D]`, Cholesky factor of its covariance,
    /// the largest squared Mahalanobis distance of a member)
    by_component: HashMap<i64, (usize, Tensor, Tensor, f64)>,
}

/// Squared Mahalanobis distances `[N]` of `codes` `[N, D]` (float64) to a Gaussian.
fn mahalanobis_sq(codes: &Tensor, mean: &Tensor, chol: &Tensor) -> Tensor {
    let centred = (codes - mean.unsqueeze(0)).transpose(0, 1); // [D, N]
    let y = chol.linalg_solve_triangular(&centred, false, true, false);
    (&y * &y).sum_dim_intlist([0].as_slice(), false, Kind::Double)
}

impl Regions {
    /// The regions of `scenarios` under the mixture they came from, from the failures
    /// and their components (`assign`), reaching `scale` times the failures' spread
    /// (`correct.region_scale`).
    pub fn new(
        gmm: DpGmm,
        scenarios: &[Scenario],
        failures: &Failures,
        assign: &[i64],
        scale: f64,
    ) -> Result<Regions> {
        let codes = failures.codes.to_kind(Kind::Double).to_device(Device::Cpu);
        let mut by_component = HashMap::new();
        for s in scenarios {
            let d = s.mean.len() as i64;
            let mean = Tensor::from_slice(&s.mean);
            let cov = Tensor::from_slice(&s.covariance.concat()).view([d, d]);
            let chol = cov.f_linalg_cholesky(false).map_err(|_| {
                Error::invalid(
                    "scenario",
                    format!("covariance of scenario {} is not positive definite", s.id),
                )
            })?;
            let rows: Vec<i64> = (0..assign.len() as i64)
                .filter(|&i| assign[i as usize] == s.component as i64)
                .collect();
            // a scenario no failure was assigned to has no region
            let limit = if rows.is_empty() {
                f64::NEG_INFINITY
            } else {
                let own = codes.index_select(0, &Tensor::from_slice(&rows));
                let mut m = Vec::<f64>::try_from(mahalanobis_sq(&own, &mean, &chol))?;
                m.sort_by(f64::total_cmp);
                let at = ((REGION_QUANTILE * m.len() as f64).ceil() as usize).clamp(1, m.len());
                scale * m[at - 1]
            };
            by_component.insert(s.component as i64, (s.id, mean, chol, limit));
        }
        Ok(Regions { gmm, by_component })
    }

    /// The scenario (id) each code `[N, D]` falls in, if any.
    pub fn scenario_of(&self, codes: &Tensor) -> Result<Vec<Option<usize>>> {
        let n = codes.size()[0] as usize;
        if n == 0 || self.by_component.is_empty() {
            return Ok(vec![None; n]);
        }
        let codes = codes.to_kind(Kind::Double).to_device(Device::Cpu);
        let lp = self.gmm.plugin_log_prob(&codes)?;
        let resp = (&lp - lp.logsumexp([1], true)).exp();
        let (top, arg) = resp.max_dim(1, false);
        let top = Vec::<f64>::try_from(top)?;
        let arg = Vec::<i64>::try_from(arg)?;
        let mut out = vec![None; n];
        for (&k, (id, mean, chol, limit)) in &self.by_component {
            let rows: Vec<i64> = (0..n as i64)
                .filter(|&i| arg[i as usize] == k && top[i as usize] >= MIN_RESPONSIBILITY)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let m = mahalanobis_sq(
                &codes.index_select(0, &Tensor::from_slice(&rows)),
                mean,
                chol,
            );
            for (&i, m) in rows.iter().zip(Vec::<f64>::try_from(m)?) {
                if m <= *limit {
                    out[i as usize] = Some(*id);
                }
            }
        }
        Ok(out)
    }
}

/// The source images of each scenario: rows of the searched split whose failures
/// were assigned to its component.
pub fn sources(
    scenarios: &[Scenario],
    failures: &Failures,
    assign: &[i64],
) -> HashMap<usize, usize> {
    let by_component: HashMap<i64, usize> = scenarios
        .iter()
        .map(|s| (s.component as i64, s.id))
        .collect();
    let mut out = HashMap::new();
    for (i, &k) in assign.iter().enumerate() {
        if let Some(&id) = by_component.get(&k) {
            // an image whose failures fell in two scenarios counts for the first met
            out.entry(failures.source_index[i] as usize).or_insert(id);
        }
    }
    out
}

/// Test images of one class read as another, before and after correction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    pub true_class: i64,
    pub predicted: i64,
    pub before: usize,
    pub after: usize,
}

/// What one pass over the real images measured.
#[derive(Debug, Clone, Default)]
pub struct RealMeasures {
    /// the whole test split
    pub test: Measured,
    /// every pair of distinct classes confused on the test split, before or after,
    /// most frequent before first
    pub confusions: Vec<Confusion>,
    /// the test images identify did not search (none when it searched all of them)
    pub unsearched_test: Option<Measured>,
    /// by scenario id
    pub scenarios: BTreeMap<usize, RealImages>,
}

/// Where identify searched: a split and the range of it.
#[derive(Debug, Clone)]
pub struct Searched {
    pub split: SplitName,
    pub range: Range<usize>,
}

/// Classifies the test split (and the searched range, when identify searched the
/// training split) with the classifier `before` and `after` correction, a window at a
/// time; encodes the searched images to place them in the scenarios.
pub fn measure_real(
    ds: &Dataset,
    before: &Classifier,
    after: &Classifier,
    vae: &Vae,
    regions: &Regions,
    sources: &HashMap<usize, usize>,
    searched: &Searched,
) -> Result<RealMeasures> {
    let mut m = RealMeasures::default();
    let mut unsearched = Measured::default();
    let ids: HashSet<usize> = regions.by_component.values().map(|v| v.0).collect();
    for id in ids {
        m.scenarios.insert(id, RealImages::default());
    }
    let device = before.device();
    let mut confused: BTreeMap<(i64, i64), (usize, usize)> = BTreeMap::new();
    let mut pass = |which: SplitName, range: Range<usize>| -> Result<()> {
        let split = ds.split(which);
        if range.is_empty() {
            return Ok(());
        }
        let is_searched = which == searched.split;
        split.for_windows(range.clone(), |w, r| {
            for start in r.clone().step_by(1000) {
                let end = (start + 1000).min(r.end);
                let x = w.images(start..end, device);
                let y = Vec::<i64>::try_from(w.labels(start..end, Device::Cpu))?;
                let pb = Vec::<i64>::try_from(before.predict(&x, 1000)?.0.to_device(Device::Cpu))?;
                let pa = Vec::<i64>::try_from(after.predict(&x, 1000)?.0.to_device(Device::Cpu))?;
                let right = |j: usize| (pb[j] == y[j], pa[j] == y[j]);
                if which == SplitName::Test {
                    for j in 0..y.len() {
                        let (b, a) = right(j);
                        m.test.add(b, a);
                        if !b {
                            confused.entry((y[j], pb[j])).or_default().0 += 1;
                        }
                        if !a {
                            confused.entry((y[j], pa[j])).or_default().1 += 1;
                        }
                        let i = start + j;
                        if !(is_searched && searched.range.contains(&i)) {
                            unsearched.add(b, a);
                        }
                    }
                }
                if !is_searched {
                    continue;
                }
                // the searched images of this chunk
                let lo = start.max(searched.range.start);
                let hi = end.min(searched.range.end);
                if lo >= hi {
                    continue;
                }
                let xs = x.narrow(0, (lo - start) as i64, (hi - lo) as i64);
                let codes = tch::no_grad(|| vae.encode(&xs.to_device(vae.device())))?.0;
                let member = regions.scenario_of(&codes)?;
                for i in lo..hi {
                    let (b, a) = right(i - start);
                    if let Some(id) = member[i - lo] {
                        m.scenarios.entry(id).or_default().members.add(b, a);
                    }
                    if let Some(&id) = sources.get(&i) {
                        m.scenarios.entry(id).or_default().sources.add(b, a);
                    }
                }
            }
            Ok(())
        })
    };
    pass(SplitName::Test, 0..ds.test.len())?;
    if searched.split != SplitName::Test {
        pass(searched.split, searched.range.clone())?;
    }
    m.test = m.test.finished();
    m.confusions = confused
        .into_iter()
        .map(|((t, p), (b, a))| Confusion {
            true_class: t,
            predicted: p,
            before: b,
            after: a,
        })
        .collect();
    m.confusions
        .sort_by_key(|c| (std::cmp::Reverse(c.before), std::cmp::Reverse(c.after)));
    m.unsearched_test = (unsearched.images > 0).then(|| unsearched.finished());
    for r in m.scenarios.values_mut() {
        r.members = r.members.finished();
        r.sources = r.sources.finished();
    }
    Ok(m)
}
