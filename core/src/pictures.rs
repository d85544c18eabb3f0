//! The report's pictures beyond the scenario grids: for each scenario, the real
//! training images whose codes lie nearest its mean (which real inputs the scenario
//! resembles), and a 2-D projection (PCA) of all failure codes coloured by scenario.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::models::Vae;
use crate::scenarios::Scenario;

/// Most points drawn in the projection (an even subsample beyond): the SVG stays small.
const MAX_PROJECTED: usize = 20_000;

/// Indices of the `k` training images whose posterior means are nearest (Euclidean)
/// each scenario's mean, nearest first.
pub fn nearest_training_images(
    vae: &Vae,
    ds: &Dataset,
    scenarios: &[Scenario],
    k: usize,
) -> Result<Vec<Vec<usize>>> {
    let n = ds.train.len();
    if n == 0 || scenarios.is_empty() {
        return Ok(vec![vec![]; scenarios.len()]);
    }
    let d = vae.latent();
    let means: Vec<f32> = scenarios
        .iter()
        .flat_map(|s| s.mean.iter().map(|&v| v as f32))
        .collect();
    let means = Tensor::from_slice(&means).view([scenarios.len() as i64, d]);
    // best (distance, index) so far per scenario, merged chunk by chunk
    let mut best: Vec<Vec<(f32, usize)>> = vec![Vec::new(); scenarios.len()];
    let chunk = 1024;
    tch::no_grad(|| -> Result<()> {
        for start in (0..n).step_by(chunk) {
            let end = (start + chunk).min(n);
            let x = ds.train.images(start..end, vae.device());
            let (mu, _) = vae.encode(&x)?;
            let dist = Tensor::cdist(
                &means,
                &mu.to_device(Device::Cpu).to_kind(Kind::Float),
                2.0,
                None,
            );
            let kk = k.min(end - start) as i64;
            let (vals, idx) = dist.topk(kk, 1, false, true);
            for (s, b) in best.iter_mut().enumerate() {
                let v = Vec::<f32>::try_from(vals.get(s as i64)).map_err(Error::Torch)?;
                let i = Vec::<i64>::try_from(idx.get(s as i64)).map_err(Error::Torch)?;
                b.extend(v.into_iter().zip(i.into_iter().map(|i| start + i as usize)));
                b.sort_by(|a, c| a.0.total_cmp(&c.0).then(a.1.cmp(&c.1)));
                b.truncate(k);
            }
        }
        Ok(())
    })?;
    Ok(best
        .into_iter()
        .map(|b| b.into_iter().map(|(_, i)| i).collect())
        .collect())
}

/// Writes `nearest-<id>.png` (the nearest training images, in one row) per scenario
/// and `projection.svg` into `dir`.
pub fn write(
    dir: &Path,
    vae: &Vae,
    ds: &Dataset,
    scenarios: &[Scenario],
    codes: &Tensor,
    components: &[i64],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let nearest = nearest_training_images(vae, ds, scenarios, 8)?;
    for (s, idx) in scenarios.iter().zip(&nearest) {
        if idx.is_empty() {
            continue;
        }
        let imgs = ds.train.gather(idx, Device::Cpu);
        crate::images::write_grid(&dir.join(format!("nearest-{}.png", s.id)), &[imgs], 3)?;
    }
    // the projection: every code, coloured by its scenario
    let n = codes.size()[0] as usize;
    if n != components.len() {
        return Err(Error::invalid(
            "pictures",
            format!("{n} failure codes but {} assignments", components.len()),
        ));
    }
    let step = n.div_ceil(MAX_PROJECTED).max(1);
    let keep: Vec<i64> = (0..n).step_by(step).map(|i| i as i64).collect();
    let xy = crate::plots::pca_2d(&codes.index_select(0, &Tensor::from_slice(&keep)))?;
    let group: Vec<Option<usize>> = keep
        .iter()
        .map(|&i| {
            scenarios
                .iter()
                .position(|s| s.component as i64 == components[i as usize])
        })
        .collect();
    let names: Vec<String> = scenarios
        .iter()
        .map(|s| format!("scenario {} ({})", s.id, s.size))
        .collect();
    crate::plots::projection_svg(
        &dir.join("projection.svg"),
        &format!("{} failure codes, first two principal components", n),
        &xy,
        &group,
        &names,
    )
}
