//! Identify: the latent-perturbation search for new failures.
//!
//! For each image `x` with label `y` of a split (or an index range of it: a shard),
//! `mu = enc(x)`; draw `Q` perturbations `eps`; decode `x' = dec(mu + eps)`; keep
//! `z' = mu + eps` when `argmax f(x') != y`, at most `N` per image, smallest `||eps||`
//! first. The noise of image `i` is seeded from `(job seed, identify, split, i)` only,
//! so a range gives the same failures however the split is cut into ranges.
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::{Split, SplitName};
use crate::error::{Error, Result};
pub use crate::frozen::Precision;
use crate::models::{Classifier, Vae};
use crate::seeds::{seed_for, Step};
use crate::tensor_io;

/// How latent codes are perturbed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Perturbation {
    /// `eps ~ N(0, sigma^2 I)`: centred noise (the default).
    Gaussian { sigma: f64 },
    /// `eps ~ Beta(a, b)` per dimension, added to `mu` as the authors' code does. Not
    /// centred: Beta(50, 50) has mean 0.5, so it also shifts every latent dimension by
    /// +0.5; `||eps||` includes that shift.
    Beta { a: f64, b: f64 },
}

impl Default for Perturbation {
    fn default() -> Self {
        Perturbation::Gaussian { sigma: 0.25 }
    }
}

impl Perturbation {
    pub fn validate(&self) -> Result<()> {
        match *self {
            Perturbation::Gaussian { sigma } if !(sigma.is_finite() && sigma > 0.0) => {
                Err(Error::invalid(
                    "identify.perturbation.sigma",
                    format!("{sigma} is not a positive number"),
                ))
            }
            Perturbation::Beta { a, b }
                if !(a.is_finite() && a > 0.0 && b.is_finite() && b > 0.0) =>
            {
                Err(Error::invalid(
                    "identify.perturbation",
                    format!("beta a = {a}, b = {b}: both must be positive"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The perturbations `[images.len(), q, d]` of `images` (indices in `split`) on
    /// `device`; image `i`'s depend on `(job seed, identify, split, i)` only. Gaussian
    /// noise is drawn on the device by a counter-based generator
    /// ([`crate::seeds::normal_by_counter`]): the same on the CPU and on a GPU. Beta
    /// noise (the authors' setting) is drawn on the host from a seeded stream per
    /// image and uploaded.
    pub fn draw(
        &self,
        job_seed: u64,
        split: SplitName,
        images: &[usize],
        q: usize,
        d: usize,
        device: Device,
    ) -> Tensor {
        let key = |i: usize| seed_for(job_seed, Step::Identify, &[split as u64, i as u64]);
        match *self {
            Perturbation::Gaussian { sigma } => {
                let keys: Vec<u64> = images.iter().map(|&i| key(i)).collect();
                crate::seeds::normal_by_counter(&keys, q as i64, d as i64, device) * sigma
            }
            Perturbation::Beta { a, b } => {
                let n = Beta::new(a, b).expect("validated a, b");
                let mut v = Vec::with_capacity(images.len() * q * d);
                for &i in images {
                    let mut rng = ChaCha8Rng::seed_from_u64(key(i));
                    v.extend((0..q * d).map(|_| n.sample(&mut rng) as f32));
                }
                crate::data::upload(
                    Tensor::from_slice(&v).view([images.len() as i64, q as i64, d as i64]),
                    device,
                )
            }
        }
    }
}

/// Which images of the searched range identify perturbs. Every rule first classifies
/// each image as it is and as the VAE reconstructs it (its code decoded unperturbed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Search {
    /// Every image (the default, and the authors' code). A real failure is searched
    /// from its own code, so the failures cover where the classifier is already wrong,
    /// not only the border around it.
    #[default]
    All,
    /// Images the classifier reads the same as they are and reconstructed, right or
    /// wrong: an image whose reconstruction it reads otherwise is skipped, since its
    /// failures could be the VAE's error as much as the classifier's.
    Consistent,
    /// Only images the classifier gets right both as they are and reconstructed:
    /// every failure is new, made by the perturbation (Defuse's default until
    /// 2026-12-03).
    Right,
}

impl Search {
    const NAMES: [(&'static str, Search); 3] = [
        ("all", Search::All),
        ("consistent", Search::Consistent),
        ("right", Search::Right),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, s)| *s == self)
            .map(|(n, _)| *n)
            .expect("every rule is named")
    }

    /// What the rule searches and skips, in a sentence for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Search::Consistent => "Identify searches the images the classifier reads the same as they are and as the VAE reconstructs them, right or wrong; those whose reconstruction it reads otherwise are skipped (their failures would be the VAE's as much as the classifier's).",
            Search::Right => "Identify searches the images the classifier gets right both as they are and as the VAE reconstructs them; the others are skipped.",
            Search::All => "Identify searches every image.",
        }
    }

    /// Whether an image is searched, from the classifier's reading of the image and of
    /// its reconstruction against its label.
    pub fn searches(self, label: i64, read: i64, reconstruction_read: i64) -> bool {
        match self {
            Search::Consistent => read == reconstruction_read,
            Search::Right => read == label && reconstruction_read == label,
            Search::All => true,
        }
    }
}

impl std::fmt::Display for Search {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Search {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A rule's name, or the older `only_correct = true | false` (`right` | `all`).
impl<'de> Deserialize<'de> for Search {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Search;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "\"all\", \"consistent\" or \"right\" (or, as only_correct, true or false)",
                )
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<Search, E> {
                Ok(if v { Search::Right } else { Search::All })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Search, E> {
                Search::NAMES
                    .iter()
                    .find(|(n, _)| *n == v)
                    .map(|(_, s)| *s)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// Options of the search (the `[identify]` table of a job config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentifyOptions {
    /// Which split to search.
    pub split: SplitName,
    /// Which images are searched: `all` (the default and the authors'), `consistent`
    /// or `right`; see [`Search`]. `only_correct = true | false`, the older spelling,
    /// still reads as `right` | `all`.
    #[serde(alias = "only_correct")]
    pub search: Search,
    /// Perturbations per image (`Q`).
    pub samples: usize,
    /// Failures kept per image, smallest `||eps||` first (`N`).
    pub keep: usize,
    pub perturbation: Perturbation,
    /// Images encoded per batch.
    pub batch_size: usize,
    /// Rows per decoder + classifier forward (small batches are faster on CPU).
    pub chunk: usize,
    /// Search only the first images of the split (0 = all).
    pub limit: usize,
    /// Share of the test split, at its end, that identify never searches, so that the
    /// report's test accuracy on it is measured on images that steered nothing (no
    /// failure, no scenario, no correction step came from them). Applies when the test
    /// split is searched; 0 searches all of it (the paper's setting).
    pub hold_out: f64,
    /// Images per shard: the unit of work, of resume, and of distribution.
    pub shard_size: usize,
    /// Number format of the decoder and classifier forwards: `float32` (the default),
    /// or `bfloat16` / `float16` through libtorch's autocast (faster on GPUs and on
    /// CPUs with bfloat16 units; a perturbation near the decision boundary may then be
    /// judged differently). Codes, noise and norms stay float32.
    pub precision: Precision,
}

impl Default for IdentifyOptions {
    fn default() -> Self {
        IdentifyOptions {
            split: SplitName::Test,
            search: Search::All,
            samples: 100,
            keep: 5,
            perturbation: Perturbation::default(),
            batch_size: 32,
            chunk: 400,
            limit: 0,
            hold_out: 0.2,
            shard_size: 1000,
            precision: Precision::Float32,
        }
    }
}

impl IdentifyOptions {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("samples", self.samples),
            ("keep", self.keep),
            ("batch_size", self.batch_size),
            ("chunk", self.chunk),
            ("shard_size", self.shard_size),
        ] {
            if v == 0 {
                return Err(Error::invalid(
                    format!("identify.{name}"),
                    "must be at least 1",
                ));
            }
        }
        if !(self.hold_out >= 0.0 && self.hold_out < 1.0) {
            return Err(Error::invalid(
                "identify.hold_out",
                format!("{} is not in [0, 1)", self.hold_out),
            ));
        }
        use crate::limits::*;
        at_most("identify.samples", self.samples, MAX_SAMPLES)?;
        at_most("identify.keep", self.keep, MAX_SAMPLES)?;
        at_most("identify.batch_size", self.batch_size, MAX_BATCH)?;
        at_most("identify.chunk", self.chunk, MAX_BATCH)?;
        at_most("identify.shard_size", self.shard_size, MAX_SHARD_SIZE)?;
        self.perturbation.validate()
    }

    /// The searched images of a split of `n`: the first ones, up to `limit` (when set)
    /// and short of the held-out tail (when the test split is searched).
    pub fn searched_range(&self, n: usize) -> std::ops::Range<usize> {
        let held = match self.split {
            SplitName::Test => (self.hold_out * n as f64).ceil() as usize,
            SplitName::Train => 0,
        };
        let end = n.saturating_sub(held);
        0..if self.limit > 0 {
            self.limit.min(end)
        } else {
            end
        }
    }
}

/// The failures found in a range: one row per kept perturbed code.
#[derive(Debug)]
pub struct Failures {
    /// `[F, D]` float32 latent codes `mu + eps`.
    pub codes: Tensor,
    pub source_index: Vec<i64>,
    pub true_label: Vec<i64>,
    pub predicted: Vec<i64>,
    pub confidence: Vec<f32>,
    pub eps_norm: Vec<f32>,
}

/// Counts of a search.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdentifyStats {
    pub split: SplitName,
    pub start: usize,
    pub end: usize,
    /// Images in the range.
    pub n_images: usize,
    /// Images searched (those [`IdentifyOptions::search`] picks).
    pub n_searched: usize,
    /// Images whose plain reconstruction the classifier already gets wrong.
    pub n_recon_wrong: usize,
    /// Images whose plain reconstruction the classifier reads otherwise than the image.
    #[serde(default)]
    pub n_recon_differs: usize,
    /// Images the classifier gets wrong as they are.
    pub n_wrong: usize,
    pub n_perturbations: usize,
    pub n_failures: usize,
    pub n_images_with_failure: usize,
    /// The same counts per true class (indexed by the label): which classes the search
    /// covered and which it mostly skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_class: Vec<ClassCounts>,
}

/// Identify's counts for the images of one class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCounts {
    pub images: usize,
    /// misclassified as they are
    pub wrong: usize,
    /// whose plain VAE reconstruction is misclassified
    pub recon_wrong: usize,
    /// whose plain VAE reconstruction is read otherwise than the image
    #[serde(default)]
    pub recon_differs: usize,
    pub searched: usize,
    pub with_failure: usize,
}

impl ClassCounts {
    fn add(&mut self, o: &ClassCounts) {
        self.images += o.images;
        self.wrong += o.wrong;
        self.recon_wrong += o.recon_wrong;
        self.recon_differs += o.recon_differs;
        self.searched += o.searched;
        self.with_failure += o.with_failure;
    }
}

impl IdentifyStats {
    /// The counts of class `c`, grown to hold it.
    fn class(&mut self, c: i64) -> &mut ClassCounts {
        let c = usize::try_from(c).unwrap_or(0);
        if self.by_class.len() <= c {
            self.by_class.resize(c + 1, ClassCounts::default());
        }
        &mut self.by_class[c]
    }

    /// Adds the counts of the next range (ranges in order).
    pub fn absorb(&mut self, s: &IdentifyStats) {
        if self.n_images == 0 {
            self.split = s.split;
            self.start = s.start;
        }
        self.end = s.end;
        self.n_images += s.n_images;
        self.n_searched += s.n_searched;
        self.n_recon_wrong += s.n_recon_wrong;
        self.n_recon_differs += s.n_recon_differs;
        self.n_wrong += s.n_wrong;
        self.n_perturbations += s.n_perturbations;
        self.n_failures += s.n_failures;
        self.n_images_with_failure += s.n_images_with_failure;
        for (c, k) in s.by_class.iter().enumerate() {
            self.class(c as i64).add(k);
        }
    }
}

impl Failures {
    pub fn empty(latent: i64) -> Self {
        Failures {
            codes: Tensor::zeros([0, latent], (Kind::Float, Device::Cpu)),
            source_index: vec![],
            true_label: vec![],
            predicted: vec![],
            confidence: vec![],
            eps_norm: vec![],
        }
    }

    pub fn len(&self) -> usize {
        self.source_index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.source_index.is_empty()
    }

    /// Concatenates ranges in order (shard outputs into one job output).
    pub fn concat(parts: Vec<Failures>, latent: i64) -> Failures {
        let mut out = Failures::empty(latent);
        let mut codes = vec![out.codes.shallow_clone()];
        for p in parts {
            codes.push(p.codes);
            out.source_index.extend(p.source_index);
            out.true_label.extend(p.true_label);
            out.predicted.extend(p.predicted);
            out.confidence.extend(p.confidence);
            out.eps_norm.extend(p.eps_norm);
        }
        out.codes = Tensor::cat(&codes, 0);
        out
    }

    /// Writes the failures as safetensors (`codes`, `source_index`, `true_label`,
    /// `predicted`, `confidence`, `eps_norm`) with the stats in the metadata, and a JSON
    /// manifest beside it (`<path>.json`).
    pub fn write(&self, path: &Path, stats: &IdentifyStats) -> Result<()> {
        let t = |v: &[i64]| Tensor::from_slice(v);
        let f = |v: &[f32]| Tensor::from_slice(v);
        let tensors = vec![
            ("codes".to_string(), self.codes.to_kind(Kind::Float)),
            ("source_index".to_string(), t(&self.source_index)),
            ("true_label".to_string(), t(&self.true_label)),
            ("predicted".to_string(), t(&self.predicted)),
            ("confidence".to_string(), f(&self.confidence)),
            ("eps_norm".to_string(), f(&self.eps_norm)),
        ];
        let stats_json = serde_json::to_string(stats).expect("stats serialise");
        tensor_io::write(
            path,
            &tensors,
            HashMap::from([("defuse.identify".to_string(), stats_json.clone())]),
        )?;
        let manifest = path.with_extension("json");
        std::fs::write(
            &manifest,
            serde_json::to_string_pretty(stats).expect("stats serialise"),
        )
        .map_err(|e| Error::io(&manifest, e))
    }

    pub fn read(path: &Path) -> Result<(Failures, IdentifyStats)> {
        let (mut t, meta) = tensor_io::read(path)?;
        let stats: IdentifyStats = meta
            .get("defuse.identify")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| Error::format(path, "missing or invalid 'defuse.identify' metadata"))?;
        let mut take = |name: &str| {
            t.remove(name)
                .ok_or_else(|| Error::format(path, format!("tensor '{name}' is missing")))
        };
        let codes = take("codes")?;
        let i64s = |x: Tensor| Vec::<i64>::try_from(x.to_kind(Kind::Int64)).map_err(Error::Torch);
        let f32s = |x: Tensor| Vec::<f32>::try_from(x.to_kind(Kind::Float)).map_err(Error::Torch);
        let out = Failures {
            codes,
            source_index: i64s(take("source_index")?)?,
            true_label: i64s(take("true_label")?)?,
            predicted: i64s(take("predicted")?)?,
            confidence: f32s(take("confidence")?)?,
            eps_norm: f32s(take("eps_norm")?)?,
        };
        let n = out.len();
        if out.codes.size().first().copied() != Some(n as i64)
            || [
                out.true_label.len(),
                out.predicted.len(),
                out.confidence.len(),
                out.eps_norm.len(),
            ]
            .iter()
            .any(|&l| l != n)
        {
            return Err(Error::format(path, "tensors of different lengths"));
        }
        Ok((out, stats))
    }
}

/// Searches `range` of `split` for failures. `progress` hears of every batch of
/// images done; when it answers false the search stops with `Error::Cancelled`.
#[allow(clippy::too_many_arguments)]
pub fn identify(
    split: &Split,
    which: SplitName,
    range: Range<usize>,
    clf: &Classifier,
    vae: &Vae,
    o: &IdentifyOptions,
    job_seed: u64,
    mut progress: impl FnMut(usize) -> bool,
) -> Result<(Failures, IdentifyStats)> {
    o.validate()?;
    let held = split.window();
    if range.start > range.end || !split.holds(range.clone()) {
        return Err(Error::invalid(
            "identify range",
            format!(
                "{}..{} is outside the {which} split's images {}..{}",
                range.start, range.end, held.start, held.end
            ),
        ));
    }
    let device = clf.device();
    let d = vae.latent();
    let (q, keep) = (o.samples, o.keep);
    let mut stats = IdentifyStats {
        split: which,
        start: range.start,
        end: range.end,
        n_images: range.len(),
        ..Default::default()
    };
    let mut parts = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for start in range.clone().step_by(o.batch_size) {
            let end = (start + o.batch_size).min(range.end);
            let x = split.images(start..end, device);
            let (mu, _) = vae.encode(&x)?;
            let (p, _) = clf.predict(&x, o.chunk as i64)?;
            let (pr, _) = clf.predict(&vae.decode(&mu)?, o.chunk as i64)?;
            let read = Vec::<i64>::try_from(p.to_device(Device::Cpu))?;
            let recon_read = Vec::<i64>::try_from(pr.to_device(Device::Cpu))?;
            let mut picked = Vec::with_capacity(end - start);
            for i in 0..end - start {
                let label = split.label(start + i);
                let (wrong, recon_wrong) = (read[i] != label, recon_read[i] != label);
                let differs = read[i] != recon_read[i];
                let searched = o.search.searches(label, read[i], recon_read[i]);
                let k = stats.class(label);
                k.images += 1;
                k.wrong += usize::from(wrong);
                k.recon_wrong += usize::from(recon_wrong);
                k.recon_differs += usize::from(differs);
                k.searched += usize::from(searched);
                stats.n_wrong += usize::from(wrong);
                stats.n_recon_wrong += usize::from(recon_wrong);
                stats.n_recon_differs += usize::from(differs);
                if searched {
                    picked.push(i);
                }
            }
            if !progress(end - start) {
                return Err(Error::Cancelled);
            }
            if picked.is_empty() {
                continue;
            }
            let b = picked.len();
            stats.n_searched += b;
            stats.n_perturbations += b * q;
            let idx = Tensor::from_slice(&picked.iter().map(|&i| i as i64).collect::<Vec<_>>())
                .to_device(device);
            let mu = mu.index_select(0, &idx);
            let images: Vec<usize> = picked.iter().map(|&i| start + i).collect();
            let eps = o
                .perturbation
                .draw(job_seed, which, &images, q, d as usize, device);
            let z = (mu.unsqueeze(1) + &eps).view([-1, d]);
            let mut preds = Vec::new();
            let mut confs = Vec::new();
            for c in (0..(b * q) as i64).step_by(o.chunk) {
                let len = (o.chunk as i64).min((b * q) as i64 - c);
                let logits = crate::frozen::autocast(device, o.precision, || {
                    clf.forward(&vae.decode(&z.narrow(0, c, len))?, false)
                })?;
                let what = || {
                    format!("decoded perturbations (images {start}..{end} of the {which} split)")
                };
                let p = crate::models::finite_logits(logits, what)?.softmax(-1, Kind::Float);
                let (conf, pred) = p.max_dim(1, false);
                preds.push(pred);
                confs.push(conf);
            }
            let pred = Vec::<i64>::try_from(Tensor::cat(&preds, 0).to_device(Device::Cpu))?;
            let conf = Vec::<f32>::try_from(Tensor::cat(&confs, 0).to_device(Device::Cpu))?;
            let norms = Vec::<f32>::try_from(
                eps.view([-1, d])
                    .norm_scalaropt_dim(2, [1], false)
                    .to_device(Device::Cpu),
            )?;
            let mut rows = Vec::new();
            let mut part = Failures::empty(d);
            for (j, &i) in picked.iter().enumerate() {
                let label = split.label(start + i);
                let mut fails: Vec<usize> =
                    (j * q..(j + 1) * q).filter(|&r| pred[r] != label).collect();
                if fails.is_empty() {
                    continue;
                }
                stats.n_images_with_failure += 1;
                stats.class(label).with_failure += 1;
                // smallest ||eps|| first; ties broken by draw order, so the result is exact
                fails.sort_by(|&a, &b| norms[a].total_cmp(&norms[b]).then(a.cmp(&b)));
                for &r in fails.iter().take(keep) {
                    rows.push(r as i64);
                    part.source_index.push((start + i) as i64);
                    part.true_label.push(label);
                    part.predicted.push(pred[r]);
                    part.confidence.push(conf[r]);
                    part.eps_norm.push(norms[r]);
                }
            }
            if !rows.is_empty() {
                part.codes = z
                    .index_select(0, &Tensor::from_slice(&rows).to_device(device))
                    .to_device(Device::Cpu);
                parts.push(part);
            }
        }
        Ok(())
    })?;
    let out = Failures::concat(parts, d);
    stats.n_failures = out.len();
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_picks_its_images() {
        // (label, read, reconstruction read) -> consistent, right, all
        for (case, want) in [
            ((1, 1, 1), [true, true, true]),   // right both ways
            ((1, 7, 7), [true, false, true]),  // a real failure the VAE keeps
            ((1, 1, 7), [false, false, true]), // the VAE's blur makes it fail
            ((1, 7, 1), [false, false, true]), // the VAE loses what fails
            ((1, 7, 4), [false, false, true]),
        ] {
            let (label, read, recon) = case;
            let got = [Search::Consistent, Search::Right, Search::All]
                .map(|s| s.searches(label, read, recon));
            assert_eq!(got, want, "{case:?}");
        }
    }

    #[test]
    fn the_rule_reads_by_name_and_as_the_older_only_correct() {
        let read = |t: &str| toml::from_str::<IdentifyOptions>(t).map(|o| o.search);
        assert_eq!(read("").unwrap(), Search::All);
        for (t, s) in [
            ("search = \"consistent\"", Search::Consistent),
            ("search = \"right\"", Search::Right),
            ("search = \"all\"", Search::All),
            ("only_correct = true", Search::Right),
            ("only_correct = false", Search::All),
        ] {
            assert_eq!(read(t).unwrap(), s, "{t}");
            // written back under its name, and read back the same
            let o = IdentifyOptions {
                search: s,
                ..Default::default()
            };
            let text = toml::to_string(&o).unwrap();
            assert!(text.contains(&format!("search = \"{s}\"")), "{text}");
            assert_eq!(read(&text).unwrap(), s);
        }
        let e = read("search = \"correct\"").unwrap_err().to_string();
        assert!(e.contains("\"all\", \"consistent\" or \"right\""), "{e}");
        let e = read("search = \"all\"\nonly_correct = true")
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate"), "{e}");
    }
}
