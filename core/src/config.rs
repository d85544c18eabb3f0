//! A job's configuration: one TOML file, every field but `data.path` with a default.
//! Parsed and validated here, once; everything else takes a [`JobConfig`].
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::correct::CorrectOptions;
use crate::data::DataSpec;
use crate::error::{Error, Result};
use crate::identify::IdentifyOptions;
use crate::models::{self, ModelFiles};
use crate::scenarios::DistillOptions;

/// A job: one TOML file. Every field but `data.path` has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Job name, shown in reports; default: the config file's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Seed of every random draw (see the determinism rule).
    #[serde(default)]
    pub seed: u64,
    /// Output folder, or a bucket prefix `s3://bucket/prefix` (the folder is then a
    /// working copy under `~/.cache/defuse/out/` copied there after every step);
    /// default `runs/<name>`.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    pub data: DataSpec,
    /// The models under test; missing ones are trained with `[train]`.
    #[serde(default)]
    pub models: ModelFiles,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub identify: IdentifyOptions,
    #[serde(default)]
    pub distill: DistillOptions,
    #[serde(default)]
    pub label: LabelSection,
    #[serde(default)]
    pub correct: CorrectOptions,
}

fn default_device() -> String {
    "cpu".into()
}

/// How to train the models a job does not bring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub classifier_epochs: usize,
    pub classifier_lr_decay: f64,
    pub classifier_width: i64,
    pub vae_epochs: usize,
    pub vae_lr_decay: f64,
    pub vae_latent: i64,
    pub vae_beta: f64,
    pub vae_width: i64,
    pub vae_hidden: i64,
    pub batch_size: usize,
    pub lr: f64,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            classifier_epochs: 5,
            classifier_lr_decay: 1.0,
            classifier_width: 32,
            vae_epochs: 10,
            vae_lr_decay: 1.0,
            vae_latent: 10,
            vae_beta: 1.0,
            vae_width: 32,
            vae_hidden: 256,
            batch_size: 128,
            lr: 1e-3,
        }
    }
}

/// `[label]`: where the scenario labels come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelSection {
    pub mode: LabelMode,
    /// The labels file for `mode = "file"`.
    pub file: Option<PathBuf>,
    /// `source-majority` discards a scenario whose majority source label covers less
    /// than this share of its failures (an ambiguous scenario a person would discard).
    pub min_purity: f64,
    /// `source-majority` discards a scenario whose samples the classifier already
    /// gets right (most of its grid): it is no failure.
    pub discard_non_failures: bool,
}

impl Default for LabelSection {
    fn default() -> Self {
        LabelSection {
            mode: LabelMode::SourceMajority,
            file: None,
            min_purity: 0.6,
            discard_non_failures: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LabelMode {
    /// Each scenario gets the majority true label of its codes' source images.
    SourceMajority,
    /// Labels from `label.file`.
    File,
    /// A person labels: the run stops after distill until `defuse label` has
    /// written `<out>/labels.json`.
    Manual,
}

impl JobConfig {
    /// Reads and validates a job file; unknown fields and bad values are errors.
    pub fn load(path: &Path) -> Result<JobConfig> {
        Self::load_with(path, &[])
    }

    /// Reads a job file with overrides on top (`--set`): defaults < the file <
    /// `sets`, each `key.path=value` with the value in TOML syntax (a bare word is a
    /// string), applied in order; then validates as [`JobConfig::load`] does.
    pub fn load_with(path: &Path, sets: &[String]) -> Result<JobConfig> {
        let mut c = Self::read_with(path, sets)?;
        if c.name.is_none() {
            c.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        c.validate()
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok(c)
    }

    /// The job file with `sets` applied and its relative paths (`data.path`,
    /// `models.*`, `label.file`, `out`) taken from the file's folder, as written
    /// otherwise (not validated, no default name): what `defuse submit` sends.
    pub fn read_with(path: &Path, sets: &[String]) -> Result<JobConfig> {
        let text = Self::text_with(path, sets)?;
        let what = if sets.is_empty() {
            String::new()
        } else {
            format!(" (with --set {})", sets.join(" --set "))
        };
        let mut c: JobConfig =
            toml::from_str(&text).map_err(|e| Error::format(path, format!("{e}{what}")))?;
        c.resolve_paths(path.parent().unwrap_or(Path::new("")));
        Ok(c)
    }

    /// Takes the local relative paths the job names from `base` (the job file's
    /// folder): `examples/mnist.toml` naming `../data/mnist` reads `data/mnist`
    /// whatever the current folder. Absolute paths stay where they point (their `x/..`
    /// pairs taken away, as in relative ones); `s3://` URLs stay as written.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            let url = p.to_str().is_some_and(|s| s.starts_with("s3://"));
            if !url {
                *p = joined(base, p);
            }
        };
        fix(&mut self.data.path);
        for p in [
            &mut self.models.classifier,
            &mut self.models.vae,
            &mut self.models.vae_decoder,
            &mut self.label.file,
            &mut self.out,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    /// The job file's text with `sets` applied (see [`JobConfig::load_with`]).
    pub fn text_with(path: &Path, sets: &[String]) -> Result<String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::invalid("config", format!("cannot read {}: {e}", path.display()))
        })?;
        if sets.is_empty() {
            return Ok(text);
        }
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        for s in sets {
            set_key(&mut table, s)?;
        }
        toml::to_string(&table).map_err(|e| Error::invalid("--set", e.to_string()))
    }

    pub fn validate(&self) -> Result<()> {
        models::parse_device(&self.device)?;
        crate::sources::check_urls(self)?;
        self.identify.validate()?;
        self.distill.validate()?;
        self.correct.validate()?;
        if !(0.0..=1.0).contains(&self.label.min_purity) {
            return Err(Error::invalid(
                "label.min_purity",
                format!("{} is not in [0, 1]", self.label.min_purity),
            ));
        }
        if self.label.mode == LabelMode::File && self.label.file.is_none() {
            return Err(Error::invalid(
                "label.file",
                "mode = \"file\" needs label.file",
            ));
        }
        if self.models.vae_decoder.is_some() && self.models.vae.is_none() {
            return Err(Error::invalid(
                "models.vae_decoder",
                "given without models.vae (the encoder)",
            ));
        }
        let t = &self.train;
        if t.classifier_epochs == 0 || t.vae_epochs == 0 || t.batch_size == 0 || t.vae_latent < 1 {
            return Err(Error::invalid(
                "train",
                "epochs, batch_size and vae_latent must be at least 1",
            ));
        }
        Ok(())
    }

    /// The job folder on this machine: `out`, or for an `out` in a bucket its working
    /// copy (`sources::local_out`), or `runs/<name>`.
    pub fn out_dir(&self) -> PathBuf {
        if let Some(u) = self.out_in_bucket() {
            return crate::sources::local_out(&u);
        }
        self.out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(self.name.as_deref().unwrap_or("job")))
    }

    /// `out` when it is a bucket prefix (`s3://bucket/prefix`).
    pub fn out_in_bucket(&self) -> Option<crate::sources::S3Url> {
        let out = self.out.as_deref()?;
        crate::sources::S3Url::parse("out", out).ok().flatten()
    }
}

/// `base/rel` with `x/..` pairs taken away (`examples/../data` is `data`).
fn joined(base: &Path, rel: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            c => out.push(c),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Applies one `key.path=value` override to a job file's table.
fn set_key(table: &mut toml::Table, set: &str) -> Result<()> {
    let bad = |why: String| Error::invalid("--set", format!("'{set}': {why}"));
    let (key, value) = set
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE, e.g. identify.samples=50".into()))?;
    let path: Vec<&str> = key.trim().split('.').map(str::trim).collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(bad(format!(
            "'{key}' is not a key path like identify.samples"
        )));
    }
    let value = value.trim();
    // a TOML value (50, 0.5, true, "x", [1, 2], { kind = "gaussian" }), else a string
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let (last, parents) = path.split_last().expect("a non-empty path");
    let mut at = table;
    for (i, p) in parents.iter().enumerate() {
        let next = at
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = next.as_table_mut().ok_or_else(|| {
            bad(format!(
                "'{}' is a value, not a table",
                path[..=i].join(".")
            ))
        })?;
    }
    at.insert(last.to_string(), parsed);
    Ok(())
}

#[cfg(test)]
mod set_tests {
    use super::*;

    #[test]
    fn sets_override_the_file_and_bad_ones_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        std::fs::write(
            &path,
            "name = \"x\"\nseed = 1\n[data]\npath = \"/d\"\n[identify]\nsamples = 10\n",
        )
        .unwrap();
        let sets = [
            "identify.samples=50".to_string(),
            "seed=7".into(),
            "device=cpu".into(),
            "identify.perturbation={ kind = \"gaussian\", sigma = 0.25 }".into(),
            "correct.lambda=2".into(),
        ];
        let c = JobConfig::load_with(&path, &sets).unwrap();
        assert_eq!((c.identify.samples, c.seed), (50, 7));
        assert_eq!(c.correct.lambda, 2.0);
        assert_eq!(c.name.as_deref(), Some("x"));
        // what submit sends carries them
        let back = JobConfig::read_with(&path, &sets).unwrap();
        assert_eq!(back.identify.samples, 50);
        for (set, says) in [
            ("identify.samples", "expected KEY=VALUE"),
            ("seed.x=1", "'seed' is a value, not a table"),
            ("identify..x=1", "is not a key path"),
        ] {
            let e = JobConfig::load_with(&path, &[set.to_string()]).unwrap_err();
            assert!(e.to_string().contains(says), "{set}: {e}");
        }
        let e = JobConfig::load_with(&path, &["identify.samples=many".to_string()]).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("job.toml") && e.contains("--set identify.samples=many"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn relative_paths_are_taken_from_the_job_files_folder() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = dir.path().join("jobs");
        std::fs::create_dir(&jobs).unwrap();
        let path = jobs.join("job.toml");
        std::fs::write(
            &path,
            "out = \"../runs/x\"\n[data]\npath = \"../data/mnist\"\n[models]\nclassifier = \"m/c.pt\"\nvae = \"s3://bucket/vae.safetensors\"\n[label]\nfile = \"/abs/x/../labels.json\"\n",
        )
        .unwrap();
        let c = JobConfig::load(&path).unwrap();
        assert_eq!(c.data.path, dir.path().join("data/mnist"));
        assert_eq!(c.out.as_deref(), Some(dir.path().join("runs/x").as_path()));
        assert_eq!(c.models.classifier, Some(jobs.join("m/c.pt")));
        assert_eq!(c.models.vae, Some("s3://bucket/vae.safetensors".into()));
        // an absolute path stays where it points, written without `x/..`
        assert_eq!(c.label.file, Some("/abs/labels.json".into()));
        // a job file named from its own folder keeps relative paths relative
        assert_eq!(
            joined(Path::new("examples"), Path::new("../data/mnist")),
            Path::new("data/mnist")
        );
        assert_eq!(joined(Path::new(""), Path::new("data")), Path::new("data"));
        assert_eq!(
            joined(Path::new(".."), Path::new("../d")),
            Path::new("../../d")
        );
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn every_count_has_an_upper_bound_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        std::fs::write(&path, "[data]\npath = \"/d\"\n").unwrap();
        assert!(JobConfig::load(&path).is_ok());
        for (set, field) in [
            ("identify.samples=100001", "identify.samples"),
            ("identify.keep=100001", "identify.keep"),
            ("identify.batch_size=65537", "identify.batch_size"),
            ("identify.chunk=1000000", "identify.chunk"),
            ("identify.shard_size=10000001", "identify.shard_size"),
            ("distill.max_components=1001", "distill.max_components"),
            ("distill.max_iter=100001", "distill.max_iter"),
            (
                "correct.samples_per_scenario=100001",
                "correct.samples_per_scenario",
            ),
            ("correct.parts=257", "correct.parts"),
            ("correct.local_steps=1000001", "correct.local_steps"),
            ("correct.epochs=10001", "correct.epochs"),
            ("correct.batch_size=65537", "correct.batch_size"),
        ] {
            let sets = [set.to_string()];
            let e = JobConfig::load_with(&path, &sets).unwrap_err().to_string();
            assert!(
                e.contains(field) && e.contains("above the limit"),
                "{set}: {e}"
            );
        }
    }
}
