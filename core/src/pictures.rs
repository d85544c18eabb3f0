//! The report's pictures beyond the scenario grids: for each scenario, the real
//! training images whose codes lie nearest its mean (which real inputs the scenario
//! resembles; among at most 20,480 images spread over the split), and a 2-D map of the
//! failure codes coloured by scenario: t-SNE ([`crate::tsne`]), which keeps each code's
//! neighbours together, where a PCA projection draws one round blob.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::layout;
use crate::models::Vae;
use crate::scenarios::Scenario;
use crate::tsne::{effective_perplexity, tsne_2d, TsneOptions};

/// Most codes mapped (an even subsample beyond): t-SNE's time and the SVG's size stay
/// bounded (about 15 s on 2 cores at 5,000 codes of 10 dimensions).
const MAX_MAPPED: usize = 5_000;

/// Most training images searched for the nearest ones: a bounded sample (runs of
/// `CHUNK` images spread evenly over the split) beyond, so the step's time does not grow
/// with the training split.
const MAX_SEARCHED: usize = 20 * CHUNK;
const CHUNK: usize = 1024;

/// The runs of training images searched: all of a split of `n` up to `MAX_SEARCHED`,
/// else `MAX_SEARCHED / CHUNK` runs of `CHUNK` spread evenly (first at 0).
fn searched(n: usize) -> Vec<std::ops::Range<usize>> {
    if n <= MAX_SEARCHED {
        return (0..n)
            .step_by(CHUNK)
            .map(|a| a..(a + CHUNK).min(n))
            .collect();
    }
    let runs = MAX_SEARCHED / CHUNK;
    (0..runs)
        .map(|r| {
            let a = r * (n - CHUNK) / (runs - 1);
            a..a + CHUNK
        })
        .collect()
}

/// Indices of the `k` training images whose posterior means are nearest (Euclidean)
/// each scenario's mean, nearest first, among the images [`searched`].
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
    tch::no_grad(|| -> Result<()> {
        for std::ops::Range { start, end } in searched(n) {
            let x = ds.train.read(start..end)?.images(start..end, vae.device());
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

/// Writes [`layout::nearest`] (the nearest training images, in one row) per scenario
/// and [`layout::PROJECTION`] into the job folder `out` (its `pictures/` made).
pub fn write(
    out: &Path,
    vae: &Vae,
    ds: &Dataset,
    scenarios: &[Scenario],
    codes: &Tensor,
    components: &[i64],
) -> Result<()> {
    let nearest = nearest_training_images(vae, ds, scenarios, 8)?;
    for (s, idx) in scenarios.iter().zip(&nearest) {
        if idx.is_empty() {
            continue;
        }
        let imgs = ds.train.read_rows(idx)?.gather(idx, Device::Cpu);
        crate::images::write_grid(&out.join(layout::nearest(s.id)), &[imgs], 3)?;
    }
    // the projection: every code, coloured by its scenario
    let n = codes.size()[0] as usize;
    if n != components.len() {
        return Err(Error::invalid(
            "pictures",
            format!("{n} failure codes but {} assignments", components.len()),
        ));
    }
    let map = map(codes)?;
    let drawn = if map.rows.len() < n {
        format!("{} of {n}", map.rows.len())
    } else {
        n.to_string()
    };
    let (xy, title, axis) = match map.perplexity {
        Some(p) => (
            map.xy,
            format!("{drawn} failure codes, t-SNE (perplexity {p:.0})"),
            "t-SNE",
        ),
        None => (
            map.pca,
            format!("{drawn} failure codes, first two principal components"),
            "principal component",
        ),
    };
    let group: Vec<Option<usize>> = map
        .rows
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
        &out.join(layout::PROJECTION),
        &title,
        axis,
        &xy,
        &group,
        &names,
    )
}

/// The report's map of the failure codes.
pub struct Map {
    /// The rows of the codes mapped: all, or an even subsample of `MAX_MAPPED`.
    pub rows: Vec<i64>,
    /// Their first two principal components (t-SNE's start).
    pub pca: Vec<(f64, f64)>,
    /// Their t-SNE map; empty when there are too few rows for one.
    pub xy: Vec<(f64, f64)>,
    /// The perplexity of the t-SNE map (`None`: no map, too few rows).
    pub perplexity: Option<f64>,
}

/// Maps the codes (N x D) to 2-D: the rows kept, their PCA and their t-SNE map, on the
/// central steps' threads.
pub fn map(codes: &Tensor) -> Result<Map> {
    let n = codes.size()[0] as usize;
    let step = n.div_ceil(MAX_MAPPED).max(1);
    let rows: Vec<i64> = (0..n).step_by(step).map(|i| i as i64).collect();
    let sub = codes
        .index_select(0, &Tensor::from_slice(&rows))
        .to_kind(Kind::Float)
        .contiguous();
    let pca = crate::plots::pca_2d(&sub)?;
    let x = Vec::<f32>::try_from(sub.flatten(0, -1)).map_err(Error::Torch)?;
    let o = TsneOptions {
        threads: crate::threads::central_count(),
        ..TsneOptions::default()
    };
    let xy = tsne_2d(&x, rows.len(), sub.size()[1] as usize, &pca, &o).unwrap_or_default();
    let perplexity = (!xy.is_empty()).then(|| effective_perplexity(rows.len(), o.perplexity));
    Ok(Map {
        rows,
        pca,
        xy,
        perplexity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_searched_runs_cover_small_splits_and_spread_over_large_ones() {
        assert_eq!(searched(0), vec![]);
        assert_eq!(searched(1500), vec![0..1024, 1024..1500]);
        assert_eq!(searched(MAX_SEARCHED).len(), 20);
        let big = searched(1_000_000);
        assert_eq!(big.len(), 20);
        assert_eq!(big[0], 0..CHUNK);
        assert_eq!(big[19], 1_000_000 - CHUNK..1_000_000);
        assert!(big.windows(2).all(|w| w[0].end <= w[1].start));
        assert_eq!(big.iter().map(|r| r.len()).sum::<usize>(), MAX_SEARCHED);
    }
}
