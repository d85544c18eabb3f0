//! Identify in this process, shard by shard (finished shards are reused); on a
//! coordinator the workers run it instead.
use super::{shard_ranges, Job};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::identify::{self, Failures, IdentifyStats};
use crate::models::{Classifier, Vae};
use crate::progress;

/// Identify over every shard of the split; finished shards are reused.
pub(super) fn run(
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
                let window = split.read(range.clone())?;
                let r = identify::identify(
                    &window,
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
