//! A truncated Dirichlet-process Gaussian mixture with full covariances, fitted by
//! variational inference: the model of scikit-learn's
//! `BayesianGaussianMixture(weight_concentration_prior_type="dirichlet_process",
//! covariance_type="full")`, with the same priors, defaults, k-means initialisation
//! and updates (in log space, through Cholesky factors of the precisions). Computed
//! in float64 with libtorch; the k-means initialisation is linfa-clustering's.
use linfa::traits::{Fit, Predict};
use linfa::DatasetBase;
use linfa_clustering::KMeans;
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::seeds::{rng_for, Step};

/// Options, with scikit-learn's defaults where it has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpGmmOptions {
    /// Truncation level: at most this many components (authors: 100).
    pub max_components: usize,
    /// Concentration of the stick-breaking prior; default 1 / max_components.
    pub weight_concentration_prior: Option<f64>,
    pub mean_precision_prior: f64,
    /// Default: the number of features.
    pub degrees_of_freedom_prior: Option<f64>,
    pub reg_covar: f64,
    pub tol: f64,
    pub max_iter: usize,
}

impl Default for DpGmmOptions {
    fn default() -> Self {
        DpGmmOptions {
            max_components: 100,
            weight_concentration_prior: None,
            mean_precision_prior: 1.0,
            degrees_of_freedom_prior: None,
            reg_covar: 1e-6,
            tol: 1e-3,
            max_iter: 1000,
        }
    }
}

impl DpGmmOptions {
    pub fn validate(&self) -> Result<()> {
        if self.max_components == 0 {
            return Err(Error::invalid(
                "distill.max_components",
                "must be at least 1",
            ));
        }
        if self.max_iter == 0 {
            return Err(Error::invalid("distill.max_iter", "must be at least 1"));
        }
        use crate::limits::*;
        at_most(
            "distill.max_components",
            self.max_components,
            MAX_COMPONENTS,
        )?;
        at_most("distill.max_iter", self.max_iter, MAX_ITER)?;
        if !(self.reg_covar >= 0.0 && self.tol > 0.0 && self.mean_precision_prior > 0.0) {
            return Err(Error::invalid(
                "distill",
                "reg_covar >= 0, tol > 0 and mean_precision_prior > 0 are required",
            ));
        }
        Ok(())
    }
}

/// A fitted mixture.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DpGmm {
    pub weights: Vec<f64>,
    /// `[K][D]`
    pub means: Vec<Vec<f64>>,
    /// `[K][D][D]`: the expected covariances (scikit-learn's `covariances_`).
    pub covariances: Vec<Vec<Vec<f64>>>,
    pub n_iter: usize,
    pub converged: bool,
    /// The variational lower bound after every iteration.
    pub lower_bounds: Vec<f64>,
    #[serde(skip)]
    state: Option<State>,
}

/// Variational parameters, as tensors (float64, CPU).
#[derive(Debug)]
struct State {
    wc: (Tensor, Tensor),
    mean_precision: Tensor,
    means: Tensor,
    dof: Tensor,
    covariances: Tensor,
    prec_chol: Tensor,
}

impl Clone for State {
    fn clone(&self) -> Self {
        State {
            wc: (self.wc.0.copy(), self.wc.1.copy()),
            mean_precision: self.mean_precision.copy(),
            means: self.means.copy(),
            dof: self.dof.copy(),
            covariances: self.covariances.copy(),
            prec_chol: self.prec_chol.copy(),
        }
    }
}

struct Priors {
    wcp: f64,
    mpp: f64,
    mean: Tensor,
    dof: f64,
    cov: Tensor,
}

const EPS10: f64 = 10.0 * f64::EPSILON;

impl DpGmm {
    /// Fits the mixture to the rows of `x` (`[N, D]`, any float kind).
    pub fn fit(x: &Tensor, o: &DpGmmOptions, seed: u64) -> Result<DpGmm> {
        o.validate()?;
        let x = x.to_kind(Kind::Double).to_device(Device::Cpu);
        let (n, d) = match x.size()[..] {
            [n, d] if n >= 2 && d >= 1 => (n, d),
            ref s => {
                return Err(Error::invalid(
                    "distill input",
                    format!("need an [N >= 2, D] matrix, got {s:?}"),
                ))
            }
        };
        if !bool::try_from(x.isfinite().all())? {
            return Err(Error::invalid(
                "distill input",
                "the codes contain NaN or infinite values",
            ));
        }
        let k = (o.max_components as i64).min(n);
        let xc = &x - x.mean_dim(0, false, Kind::Double);
        let priors = Priors {
            wcp: o.weight_concentration_prior.unwrap_or(1.0 / k as f64),
            mpp: o.mean_precision_prior,
            mean: x.mean_dim(0, false, Kind::Double),
            dof: o.degrees_of_freedom_prior.unwrap_or(d as f64),
            cov: xc.transpose(0, 1).matmul(&xc) / (n - 1) as f64,
        };
        // initial responsibilities: one-hot k-means labels
        let labels = kmeans_labels(&x, k as usize, seed)?;
        let resp = Tensor::zeros([n, k], (Kind::Double, Device::Cpu)).scatter_value(
            1,
            &Tensor::from_slice(&labels).view([n, 1]),
            1.0,
        );
        let mut state = m_step(&x, &resp, &priors, o.reg_covar)?;
        let mut lower_bounds = Vec::new();
        let mut converged = false;
        let mut lb = f64::NEG_INFINITY;
        let mut n_iter = 0;
        for it in 1..=o.max_iter {
            n_iter = it;
            let prev = lb;
            let (_, log_resp) = e_step(&x, &state);
            state = m_step(&x, &log_resp.exp(), &priors, o.reg_covar)?;
            lb = lower_bound(&log_resp, &state, d);
            lower_bounds.push(lb);
            if (lb - prev).abs() < o.tol {
                converged = true;
                break;
            }
        }
        if !converged {
            tracing::warn!(
                max_iter = o.max_iter,
                "dp-gmm did not converge; raise distill.max_iter"
            );
        }
        let mut out = DpGmm {
            weights: vec![],
            means: vec![],
            covariances: vec![],
            n_iter,
            converged,
            lower_bounds,
            state: None,
        };
        out.weights = Vec::<f64>::try_from(weights(&state))?;
        out.means = to_rows(&state.means)?;
        out.covariances = (0..k)
            .map(|i| to_rows(&state.covariances.get(i)))
            .collect::<Result<_>>()?;
        out.state = Some(state);
        Ok(out)
    }

    pub fn n_components(&self) -> usize {
        self.weights.len()
    }

    fn state(&self) -> Result<State> {
        match &self.state {
            Some(s) => Ok(s.clone()),
            None => Err(Error::invalid(
                "dp-gmm",
                "a mixture read back from JSON cannot predict; refit it",
            )),
        }
    }

    /// Per-row responsibilities `[N, K]` (the posterior over components).
    pub fn predict_proba(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.state()?;
        Ok(e_step(&x.to_kind(Kind::Double).to_device(Device::Cpu), &s)
            .1
            .exp())
    }

    /// Most likely component of every row.
    pub fn predict(&self, x: &Tensor) -> Result<Vec<i64>> {
        Ok(Vec::<i64>::try_from(
            self.predict_proba(x)?.argmax(1, false),
        )?)
    }

    /// Mean log-likelihood per row under the plug-in mixture (weights, means,
    /// covariances): comparable with scikit-learn's `score`.
    pub fn score(&self, x: &Tensor) -> Result<f64> {
        let x = x.to_kind(Kind::Double).to_device(Device::Cpu);
        let k = self.n_components() as i64;
        let d = x.size()[1];
        let means = Tensor::from_slice(&self.means.concat()).view([k, d]);
        let covs = Tensor::from_slice(
            &self
                .covariances
                .iter()
                .flatten()
                .flatten()
                .copied()
                .collect::<Vec<_>>(),
        )
        .view([k, d, d]);
        let prec_chol = precision_cholesky(&covs)?;
        let lw = Tensor::from_slice(&self.weights).clamp_min(1e-300).log();
        let lp = log_gaussian(&x, &means, &prec_chol) + lw.unsqueeze(0);
        Ok(f64::try_from(lp.logsumexp([1], false).mean(Kind::Double))?)
    }
}

fn to_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(Vec::<Vec<f64>>::try_from(t.contiguous())?)
}

fn kmeans_labels(x: &Tensor, k: usize, seed: u64) -> Result<Vec<i64>> {
    let (n, d) = (x.size()[0] as usize, x.size()[1] as usize);
    let flat = Vec::<f64>::try_from(x.contiguous().view([-1]))?;
    let arr = Array2::from_shape_vec((n, d), flat).expect("shape matches");
    let data = DatasetBase::from(arr.clone());
    let model = KMeans::params_with_rng(k, rng_for(seed, Step::KMeans, &[]))
        .n_runs(1)
        .max_n_iterations(300)
        .tolerance(1e-4)
        .fit(&data)
        .map_err(|e| Error::invalid("distill", format!("k-means initialisation failed: {e}")))?;
    Ok(model.predict(&arr).iter().map(|&l| l as i64).collect())
}

/// Rows per block of the `[K, rows, D]` intermediates: about 2 MB of doubles, so a
/// block stays in cache. Whole-`N` intermediates (16 MB at 10k x 20 x 10, eight
/// passes per iteration) made each iteration memory-bound.
fn block_rows(k: i64, d: i64) -> i64 {
    ((1 << 18) / (k * d).max(1)).max(64)
}

/// `nk, xk, sk` (scikit-learn's `_estimate_gaussian_parameters`, full covariance).
fn gaussian_parameters(x: &Tensor, resp: &Tensor, reg: f64) -> (Tensor, Tensor, Tensor) {
    let (n, d) = (x.size()[0], x.size()[1]);
    let k = resp.size()[1];
    let nk = resp.sum_dim_intlist([0].as_slice(), false, Kind::Double) + EPS10;
    let xk = resp.transpose(0, 1).matmul(x) / nk.unsqueeze(1);
    // sk[k] = sum_n r_nk (x_n - xk_k)(x_n - xk_k)^T / nk + reg I, by blocks of rows
    let mut sk = Tensor::zeros([k, d, d], (Kind::Double, Device::Cpu));
    let b = block_rows(k, d);
    for start in (0..n).step_by(b as usize) {
        let len = b.min(n - start);
        let diff = x.narrow(0, start, len).unsqueeze(0) - xk.unsqueeze(1); // [K, B, D]
        let weighted = &diff * resp.narrow(0, start, len).transpose(0, 1).unsqueeze(2);
        sk += weighted.transpose(1, 2).matmul(&diff);
    }
    let sk = sk / nk.view([-1, 1, 1]) + Tensor::eye(d, (Kind::Double, Device::Cpu)) * reg;
    (nk, xk, sk)
}

fn m_step(x: &Tensor, resp: &Tensor, p: &Priors, reg: f64) -> Result<State> {
    let (nk, xk, sk) = gaussian_parameters(x, resp, reg);
    let d = x.size()[1];
    // stick-breaking weights: (1 + nk, prior + sum of nk after k)
    let rev_cum = nk.flip([0]).cumsum(0, Kind::Double).flip([0]);
    let tail = rev_cum.narrow(0, 1, nk.size()[0] - 1);
    let tail = Tensor::cat(&[tail, Tensor::zeros([1], (Kind::Double, Device::Cpu))], 0);
    let wc = (&nk + 1.0, tail + p.wcp);
    let mean_precision = &nk + p.mpp;
    let means = (p.mean.unsqueeze(0) * p.mpp + nk.unsqueeze(1) * &xk) / mean_precision.unsqueeze(1);
    let dof = &nk + p.dof;
    let diff = &xk - p.mean.unsqueeze(0); // [K, D]
    let outer = diff.unsqueeze(2) * diff.unsqueeze(1);
    let covariances = (p.cov.unsqueeze(0)
        + nk.view([-1, 1, 1]) * &sk
        + (&nk * p.mpp / &mean_precision).view([-1, 1, 1]) * outer)
        / dof.view([-1, 1, 1]);
    let _ = d;
    let prec_chol = precision_cholesky(&covariances)?;
    Ok(State {
        wc,
        mean_precision,
        means,
        dof,
        covariances,
        prec_chol,
    })
}

/// Upper-triangular `P` with `P P^T = Sigma^-1`, per component (scikit-learn's
/// `_compute_precision_cholesky`).
fn precision_cholesky(covs: &Tensor) -> Result<Tensor> {
    let d = covs.size()[1];
    let chol = covs.f_linalg_cholesky(false).map_err(|_| {
        Error::invalid(
            "distill",
            "a component's covariance is not positive definite: the codes may be degenerate (duplicated rows or a constant dimension); raise distill.reg_covar",
        )
    })?;
    let eye = Tensor::eye(d, (Kind::Double, Device::Cpu)).expand([covs.size()[0], d, d], false);
    let inv_l = chol.linalg_solve_triangular(&eye, false, true, false);
    Ok(inv_l.transpose(1, 2))
}

/// `log N(x | mu_k, Sigma_k)` for all rows and components `[N, K]`.
fn log_gaussian(x: &Tensor, means: &Tensor, prec_chol: &Tensor) -> Tensor {
    let d = x.size()[1] as f64;
    let log_det =
        prec_chol
            .diagonal(0, 1, 2)
            .log()
            .sum_dim_intlist([1].as_slice(), false, Kind::Double); // [K]
    let (n, k, dd) = (x.size()[0], means.size()[0], x.size()[1]);
    if n == 0 {
        return Tensor::zeros([0, k], (Kind::Double, Device::Cpu));
    }
    let mp = means.unsqueeze(1).matmul(prec_chol); // [K, 1, D]
    let b = block_rows(k, dd);
    let blocks: Vec<Tensor> = (0..n)
        .step_by(b as usize)
        .map(|start| {
            let y = x
                .narrow(0, start, b.min(n - start))
                .unsqueeze(0)
                .matmul(prec_chol)
                - &mp; // [K, B, D]
            y.square()
                .sum_dim_intlist([2].as_slice(), false, Kind::Double)
                .transpose(0, 1) // [B, K]
        })
        .collect();
    let maha = Tensor::cat(&blocks, 0); // [N, K]
    (maha + d * (2.0 * std::f64::consts::PI).ln()) * -0.5 + log_det.unsqueeze(0)
}

fn log_weights(s: &State) -> Tensor {
    let (a, b) = &s.wc;
    let dsum = (a + b).digamma();
    let da = a.digamma();
    let db = b.digamma();
    let k = a.size()[0];
    let cum = (&db - &dsum).cumsum(0, Kind::Double);
    let shifted = Tensor::cat(
        &[
            Tensor::zeros([1], (Kind::Double, Device::Cpu)),
            cum.narrow(0, 0, k - 1),
        ],
        0,
    );
    da - dsum + shifted
}

fn e_step(x: &Tensor, s: &State) -> (Tensor, Tensor) {
    let d = x.size()[1];
    let df = d as f64;
    let log_gauss =
        log_gaussian(x, &s.means, &s.prec_chol) - (s.dof.log() * (0.5 * df)).unsqueeze(0);
    let ar = Tensor::arange(d, (Kind::Double, Device::Cpu));
    let log_lambda = ((s.dof.unsqueeze(1) - ar.unsqueeze(0)) * 0.5)
        .digamma()
        .sum_dim_intlist([1].as_slice(), false, Kind::Double)
        + df * 2f64.ln();
    let log_prob =
        log_gauss + ((log_lambda - s.mean_precision.reciprocal() * df) * 0.5).unsqueeze(0);
    let weighted = log_prob + log_weights(s).unsqueeze(0);
    let norm = weighted.logsumexp([1], true);
    let log_resp = &weighted - &norm;
    (norm.mean(Kind::Double), log_resp)
}

fn lower_bound(log_resp: &Tensor, s: &State, d: i64) -> f64 {
    let df = d as f64;
    let log_det_chol =
        s.prec_chol
            .diagonal(0, 1, 2)
            .log()
            .sum_dim_intlist([1].as_slice(), false, Kind::Double)
            - s.dof.log() * (0.5 * df);
    let ar = Tensor::arange(d, (Kind::Double, Device::Cpu));
    let lgam = ((s.dof.unsqueeze(1) - ar.unsqueeze(0)) * 0.5)
        .lgamma()
        .sum_dim_intlist([1].as_slice(), false, Kind::Double);
    let log_wishart = -(&s.dof * &log_det_chol + &s.dof * (df * 0.5 * 2f64.ln()) + lgam);
    let (a, b) = &s.wc;
    let betaln = a.lgamma() + b.lgamma() - (a + b).lgamma();
    let log_norm_weight = -betaln.sum(Kind::Double);
    let ent = (log_resp.exp() * log_resp).sum(Kind::Double);
    let v = -ent
        - log_wishart.sum(Kind::Double)
        - log_norm_weight
        - s.mean_precision.log().sum(Kind::Double) * (0.5 * df);
    f64::try_from(v).unwrap_or(f64::NAN)
}

fn weights(s: &State) -> Tensor {
    let (a, b) = &s.wc;
    let sum = a + b;
    let tmp = b / &sum;
    let k = a.size()[0];
    let cp = Tensor::cat(
        &[
            Tensor::ones([1], (Kind::Double, Device::Cpu)),
            tmp.narrow(0, 0, k - 1).cumprod(0, Kind::Double),
        ],
        0,
    );
    let w = a / sum * cp;
    &w / w.sum(Kind::Double)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> Tensor {
        tch::manual_seed(3);
        let a = Tensor::randn([300, 3], (Kind::Double, Device::Cpu)) + 6.0;
        let b = Tensor::randn([200, 3], (Kind::Double, Device::Cpu)) * 0.5 - 6.0;
        let c = Tensor::randn([100, 3], (Kind::Double, Device::Cpu)) * 2.0;
        Tensor::cat(&[a, b, c], 0)
    }

    #[test]
    fn lower_bound_never_decreases_and_weights_sum_to_one() {
        let x = blobs();
        let m = DpGmm::fit(
            &x,
            &DpGmmOptions {
                max_components: 15,
                tol: 1e-8,
                ..Default::default()
            },
            1,
        )
        .unwrap();
        assert!(m.lower_bounds.len() > 3);
        for w in m.lower_bounds.windows(2) {
            assert!(
                w[1] >= w[0] - 1e-9 * w[0].abs(),
                "lower bound decreased: {} -> {}",
                w[0],
                w[1]
            );
        }
        assert!((m.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let big: Vec<f64> = m.weights.iter().copied().filter(|&w| w > 0.05).collect();
        assert_eq!(big.len(), 3, "{:?}", m.weights);
        let p = m.predict_proba(&x).unwrap();
        let rows = p.sum_dim_intlist([1].as_slice(), false, Kind::Double);
        assert!(bool::try_from((rows - 1.0).abs().max().le(1e-9)).unwrap());
    }

    #[test]
    fn same_seed_same_fit_and_bad_input_is_refused() {
        let x = blobs();
        let o = DpGmmOptions {
            max_components: 10,
            ..Default::default()
        };
        let a = DpGmm::fit(&x, &o, 5).unwrap();
        let b = DpGmm::fit(&x, &o, 5).unwrap();
        assert_eq!(a.weights, b.weights);
        assert_eq!(a.predict(&x).unwrap(), b.predict(&x).unwrap());
        let nan = Tensor::from_slice(&[1.0f64, f64::NAN, 2.0, 3.0]).view([2, 2]);
        assert!(DpGmm::fit(&nan, &o, 0)
            .unwrap_err()
            .to_string()
            .contains("NaN"));
        let one = Tensor::ones([1, 3], (Kind::Double, Device::Cpu));
        assert!(DpGmm::fit(&one, &o, 0).is_err());
        let bad = DpGmmOptions {
            max_components: 0,
            ..Default::default()
        };
        assert!(DpGmm::fit(&x, &bad, 0)
            .unwrap_err()
            .to_string()
            .contains("max_components"));
    }
}
