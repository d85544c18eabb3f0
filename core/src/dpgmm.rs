//! A truncated Dirichlet-process Gaussian mixture with full covariances, fitted by
//! variational inference: the model of scikit-learn's
//! `BayesianGaussianMixture(weight_concentration_prior_type="dirichlet_process",
//! covariance_type="full")`, with the same priors, defaults, k-means initialisation
//! and updates (in log space, through Cholesky factors of the precisions). Computed
//! in float64 with libtorch.
//!
//! Where the time goes, and what is done about it (`bench/run.py`, DP-GMM rows):
//! - the k-means start: k-means++ (greedy, as scikit-learn's) and Lloyd iterations with
//!   the distances of all rows to all centres as one matrix product;
//! - the two `O(N K D^2)` parts of an iteration, the quadratic forms of the E-step and
//!   the scatter matrices of the M-step, are each one matrix product per block of rows
//!   over the `D (D + 1) / 2` products `x_i x_j` (i <= j) of every row, instead of a
//!   product per component: scikit-learn loops over components in Python. The data
//!   are centred first, so the expanded forms lose nothing in float64;
//! - everything per component (Cholesky, digamma, the bound) is batched over `K`.
use rand::Rng;
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

/// Variational parameters, as tensors (float64, CPU), in coordinates centred at
/// `center` (the mean of the fitted rows).
#[derive(Debug)]
struct State {
    center: Tensor,
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
            center: self.center.copy(),
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
        // the model is translation-equivariant: fit the centred rows (the prior mean,
        // the mean of the rows, is then 0) and move the means back at the end
        let center = x.mean_dim(0, false, Kind::Double);
        let x = &x - &center;
        let tri = Triu::new(d);
        let priors = Priors {
            wcp: o.weight_concentration_prior.unwrap_or(1.0 / k as f64),
            mpp: o.mean_precision_prior,
            mean: Tensor::zeros([d], (Kind::Double, Device::Cpu)),
            dof: o.degrees_of_freedom_prior.unwrap_or(d as f64),
            cov: x.transpose(0, 1).matmul(&x) / (n - 1) as f64,
        };
        // initial responsibilities: one-hot k-means labels
        let labels = kmeans_labels(&x, k, seed);
        let resp = Tensor::zeros([n, k], (Kind::Double, Device::Cpu)).scatter_value(
            1,
            &labels.view([n, 1]),
            1.0,
        );
        let rows = Rows::new(&x, tri);
        let mut state = m_step(
            &Stats::of(&rows, &resp),
            &rows.tri,
            &priors,
            o.reg_covar,
            &center,
        )?;
        let mut lower_bounds = Vec::new();
        let mut converged = false;
        let mut lb = f64::NEG_INFINITY;
        let mut n_iter = 0;
        for it in 1..=o.max_iter {
            n_iter = it;
            let prev = lb;
            let st = e_step_stats(&rows, &state);
            state = m_step(&st, &rows.tri, &priors, o.reg_covar, &center)?;
            lb = lower_bound(&st.r_log_r, &state, d);
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
        out.means = to_rows(&(&state.means + &state.center))?;
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
        let x = x.to_kind(Kind::Double).to_device(Device::Cpu) - &s.center;
        let d = x.size()[1];
        Ok(e_step(&Rows::new(&x, Triu::new(d)), &s).exp())
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
        let lp = self.plugin_log_prob(x)?;
        Ok(f64::try_from(lp.logsumexp([1], false).mean(Kind::Double))?)
    }

    /// `log w_k + log N(x | mean_k, cov_k)` of every row, `[N, K]`, under the plug-in
    /// mixture: only the weights, means and covariances are used, so a mixture read
    /// back from `gmm.json` can answer too.
    pub fn plugin_log_prob(&self, x: &Tensor) -> Result<Tensor> {
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
        // centred as the fit was, so the expanded quadratic forms lose nothing
        let center = x.mean_dim(0, false, Kind::Double);
        Ok(log_gaussian(
            &Rows::new(&(&x - &center), Triu::new(d)),
            &(means - &center),
            &prec_chol,
            &lw,
        ))
    }
}

fn to_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(Vec::<Vec<f64>>::try_from(t.contiguous())?)
}

/// The pairs `(i, j)`, `i <= j`, of a `D x D` symmetric matrix: the products
/// `x_i x_j` of a row carry everything its quadratic forms and scatter need.
struct Triu {
    d: i64,
    /// Position of `(i, j)` in a flattened `D x D` matrix, and of `(j, i)`.
    upper: Tensor,
    lower: Tensor,
    /// 1 on the diagonal, 2 off it: `x^T A x = sum_{i <= j} w_ij A_ij x_i x_j`.
    weight: Tensor,
}

impl Triu {
    fn new(d: i64) -> Triu {
        let idx = Tensor::triu_indices(d, d, 0, (Kind::Int64, Device::Cpu));
        let (rows, cols) = (idx.get(0), idx.get(1));
        let weight = (rows.ne_tensor(&cols).to_kind(Kind::Double) + 1.0).to_kind(Kind::Double);
        Triu {
            d,
            upper: &rows * d + &cols,
            lower: &cols * d + &rows,
            weight,
        }
    }

    /// `[B, T]`: each row's products `x_i x_j`, `i <= j`.
    fn products(&self, x: &Tensor) -> Tensor {
        let out = Tensor::empty(
            [x.size()[0], self.weight.size()[0]],
            (Kind::Double, Device::Cpu),
        );
        self.products_into(x, &out);
        out
    }

    /// [`Triu::products`] written into `out` `[B, T]`: the pairs are in row-major
    /// order, so the products of row `i` of the triangle are one broadcast product,
    /// `x_i * x_{i..D}`, into `D - i` adjacent columns (two column gathers and their
    /// product, element by element, took three times as long).
    fn products_into(&self, x: &Tensor, out: &Tensor) {
        let mut at = 0;
        for i in 0..self.d {
            let width = self.d - i;
            let _ = x
                .narrow(1, i, 1)
                .mul_out(&out.narrow(1, at, width), &x.narrow(1, i, width));
            at += width;
        }
    }

    /// `[K, T]` upper triangles of `[K, D, D]` matrices.
    fn pick(&self, m: &Tensor) -> Tensor {
        let k = m.size()[0];
        m.reshape([k, self.d * self.d]).index_select(1, &self.upper)
    }

    /// `[K, D, D]` symmetric matrices from their upper triangles `[K, T]`.
    fn unpick(&self, t: &Tensor) -> Tensor {
        let k = t.size()[0];
        let full = Tensor::zeros([k, self.d * self.d], (Kind::Double, Device::Cpu));
        full.index_copy(1, &self.lower, t)
            .index_copy(1, &self.upper, t)
            .view([k, self.d, self.d])
    }
}

/// Rows per block of the `[B, T]` pair products (about 8 MB of doubles): a block's
/// products are used by the E-step and then by the M-step's sums while they are still
/// in cache.
fn block_rows(t: i64) -> i64 {
    ((1 << 20) / t.max(1)).max(64)
}

/// `(start, len)` of consecutive blocks of at most `b` of `n` rows.
fn blocks(n: i64, b: i64) -> impl Iterator<Item = (i64, i64)> {
    (0..n)
        .step_by(b as usize)
        .map(move |start| (start, b.min(n - start)))
}

/// The pair products of all rows are made once per fit and kept up to this size;
/// above it they are made again for every block of every iteration.
const PRODUCTS_CACHE_BYTES: i64 = 512 << 20;

/// The (centred) rows of a fit, and their pair products.
struct Rows {
    x: Tensor,
    tri: Triu,
    /// `[N, T]`, when it fits in [`PRODUCTS_CACHE_BYTES`].
    products: Option<Tensor>,
}

impl Rows {
    fn new(x: &Tensor, tri: Triu) -> Rows {
        let (n, t) = (x.size()[0], tri.weight.size()[0]);
        // made a block at a time into their place: whole-matrix temporaries would fault
        // in several [N, T] tensors' pages (1.3 GB at 100,000 x 32) for one
        let products = (n * t * 8 <= PRODUCTS_CACHE_BYTES).then(|| {
            let z = Tensor::empty([n, t], (Kind::Double, Device::Cpu));
            for (start, len) in blocks(n, block_rows(t)) {
                tri.products_into(&x.narrow(0, start, len), &z.narrow(0, start, len));
            }
            z
        });
        Rows {
            x: x.shallow_clone(),
            tri,
            products,
        }
    }

    /// `[N, K]`: `f(rows, their pair products)` `[K, B]` of each block, stacked.
    fn rows_of(&self, k: i64, f: impl Fn(&Tensor, &Tensor) -> Tensor) -> Tensor {
        let out = Tensor::empty([self.x.size()[0], k], (Kind::Double, Device::Cpu));
        self.each_block(|start, xb, zb| {
            out.narrow(0, start, xb.size()[0]).copy_(&f(xb, zb).tr());
        });
        out
    }

    /// `f(start, rows, their pair products)` over blocks of rows.
    fn each_block(&self, mut f: impl FnMut(i64, &Tensor, &Tensor)) {
        let n = self.x.size()[0];
        for (start, len) in blocks(n, block_rows(self.tri.weight.size()[0])) {
            let xb = self.x.narrow(0, start, len);
            match &self.products {
                Some(z) => f(start, &xb, &z.narrow(0, start, len)),
                None => f(start, &xb, &self.tri.products(&xb)),
            }
        }
    }
}

/// What the M-step and the bound need of the responsibilities `r`: `sum_n r_nk`,
/// `sum_n r_nk x_n`, `sum_n r_nk x_n x_n^T` (upper triangles) and `sum r log r`.
struct Stats {
    nk: Tensor,
    sx: Tensor,
    s2: Tensor,
    r_log_r: Tensor,
}

impl Stats {
    fn zeros(k: i64, d: i64, t: i64) -> Stats {
        let o = (Kind::Double, Device::Cpu);
        Stats {
            nk: Tensor::zeros([k], o),
            sx: Tensor::zeros([k, d], o),
            s2: Tensor::zeros([k, t], o),
            r_log_r: Tensor::zeros([], o),
        }
    }

    /// Adds a block's responsibilities `r`, component-major `[K, B]`, of rows `xb`
    /// with products `zb`.
    fn add(&mut self, r: &Tensor, xb: &Tensor, zb: &Tensor) {
        self.nk += r.sum_dim_intlist([1].as_slice(), false, Kind::Double);
        let _ = self.sx.addmm_(r, xb);
        let _ = self.s2.addmm_(r, zb);
    }

    /// Of given responsibilities `[N, K]` (the k-means start).
    fn of(rows: &Rows, resp: &Tensor) -> Stats {
        let (d, t) = (rows.x.size()[1], rows.tri.weight.size()[0]);
        let mut st = Stats::zeros(resp.size()[1], d, t);
        rows.each_block(|start, xb, zb| st.add(&resp.narrow(0, start, xb.size()[0]).tr(), xb, zb));
        st
    }
}

/// Squared distances `[N, C]` of rows to centres, as one matrix product.
fn sq_dist(x: &Tensor, x_sq: &Tensor, c: &Tensor) -> Tensor {
    let c_sq = c
        .square()
        .sum_dim_intlist([1].as_slice(), false, Kind::Double);
    (x_sq.unsqueeze(1) - x.matmul(&c.transpose(0, 1)) * 2.0 + c_sq.unsqueeze(0)).clamp_min(0.0)
}

/// k-means labels of the rows, as scikit-learn's `KMeans(n_init=1)` finds them for the
/// mixture's start: greedy k-means++ seeding (`2 + ln k` candidates per centre, the
/// one that lowers the inertia most is kept), then Lloyd iterations until the centres
/// move less than `1e-4` of the mean variance (at most 300); an empty cluster takes
/// the row farthest from its centre. Seeded by `(seed, KMeans)`.
fn kmeans_labels(x: &Tensor, k: i64, seed: u64) -> Tensor {
    let n = x.size()[0];
    let mut rng = rng_for(seed, Step::KMeans, &[]);
    let x_sq = x
        .square()
        .sum_dim_intlist([1].as_slice(), false, Kind::Double);
    let first = rng.gen_range(0..n);
    let mut centres = vec![first];
    let mut closest = sq_dist(x, &x_sq, &x.narrow(0, first, 1)).squeeze_dim(1);
    let mut pot = f64::try_from(closest.sum(Kind::Double)).unwrap_or(0.0);
    let trials = 2 + (k as f64).ln() as i64;
    for _ in 1..k {
        let cum = closest.cumsum(0, Kind::Double);
        let draws: Vec<f64> = (0..trials).map(|_| rng.gen::<f64>() * pot).collect();
        let cand = Tensor::from_slice(&draws)
            .searchsorted(&cum, false, false, "left", None::<&Tensor>)
            .clamp(0, n - 1);
        let d = sq_dist(x, &x_sq, &x.index_select(0, &cand)); // [N, trials]
        let cand_closest = d.minimum(&closest.unsqueeze(1));
        let pots = cand_closest.sum_dim_intlist([0].as_slice(), false, Kind::Double);
        let best = i64::try_from(pots.argmin(0, false)).unwrap_or(0);
        centres.push(i64::try_from(cand.get(best)).unwrap_or(0));
        closest = cand_closest.select(1, best).contiguous();
        pot = f64::try_from(pots.get(best)).unwrap_or(pot);
    }
    let mut c = x.index_select(0, &Tensor::from_slice(&centres));
    let var = x.var_dim([0].as_slice(), false, false).mean(Kind::Double);
    let tol = 1e-4 * f64::try_from(var).unwrap_or(0.0);
    // nearest centre of every row, and its squared distance; argmin over
    // |c|^2 - 2 x.c (one product per block: |x|^2 is the same for every centre), as
    // [x, 1] @ [-2 c^T; |c|^2]: adding |c|^2 inside the product saves MKL a pass that
    // broadcasts it into the output first (a tenth of a K = 20 start)
    let ones = Tensor::ones([n, 1], (Kind::Double, Device::Cpu));
    let x1 = Tensor::cat(&[x.shallow_clone(), ones], 1);
    let assign = |c: &Tensor| -> (Tensor, Tensor) {
        let c_sq = c
            .square()
            .sum_dim_intlist([1].as_slice(), false, Kind::Double);
        let w = Tensor::cat(&[c.transpose(0, 1) * -2.0, c_sq.unsqueeze(0)], 0);
        // [B, K] scores of ~1 MB stay in cache between the product and the argmin
        let (mut labels, mut dist) = (Vec::new(), Vec::new());
        for (start, len) in blocks(n, ((1 << 17) / k).max(64)) {
            let scores = x1.narrow(0, start, len).matmul(&w);
            let (v, i) = scores.min_dim(1, false);
            dist.push((v + x_sq.narrow(0, start, len)).clamp_min(0.0));
            labels.push(i);
        }
        (Tensor::cat(&labels, 0), Tensor::cat(&dist, 0))
    };
    let mut previous: Option<Tensor> = None;
    for _ in 0..300 {
        let (labels, dist) = assign(&c);
        // strict convergence: no row changed its cluster
        if previous.as_ref().is_some_and(|p| p.equal(&labels)) {
            return labels;
        }
        let counts = labels.bincount(None::<&Tensor>, k).to_kind(Kind::Double);
        let sums =
            Tensor::zeros([k, x.size()[1]], (Kind::Double, Device::Cpu)).index_add(0, &labels, x);
        let mut next = sums / counts.clamp_min(1.0).unsqueeze(1);
        let empty = counts.eq(0.0).nonzero().squeeze_dim(1);
        let n_empty = empty.size()[0];
        if n_empty > 0 {
            // the rows farthest from their centres start the empty clusters
            let far = dist.topk(n_empty.min(n), 0, true, true).1;
            next = next.index_copy(0, &empty, &x.index_select(0, &far));
        }
        let shift = f64::try_from((&next - &c).square().sum(Kind::Double)).unwrap_or(0.0);
        c = next;
        if n_empty == 0 && shift <= tol {
            break;
        }
        previous = Some(labels);
    }
    assign(&c).0
}

/// `nk, xk, sk` (scikit-learn's `_estimate_gaussian_parameters`, full covariance):
/// `sk = sum_n r_nk x_n x_n^T / nk - xk xk^T + reg I`.
fn gaussian_parameters(st: &Stats, tri: &Triu, reg: f64) -> (Tensor, Tensor, Tensor) {
    let nk = &st.nk + EPS10;
    let xk = &st.sx / nk.unsqueeze(1);
    let mean_outer = tri.products(&xk);
    let sk = tri.unpick(&(&st.s2 / nk.unsqueeze(1) - mean_outer))
        + Tensor::eye(tri.d, (Kind::Double, Device::Cpu)) * reg;
    (nk, xk, sk)
}

fn m_step(st: &Stats, tri: &Triu, p: &Priors, reg: f64, center: &Tensor) -> Result<State> {
    let (nk, xk, sk) = gaussian_parameters(st, tri, reg);
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
    let prec_chol = precision_cholesky(&covariances)?;
    Ok(State {
        center: center.shallow_clone(),
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

/// `log N(x | mu_k, Sigma_k) + extra_k` of a block of rows is
/// `bias + products @ quad + rows @ lin`: with `A = P P^T`, `-1/2` of the squared
/// Mahalanobis distance is `-1/2 x^T A x + x^T A mu - 1/2 mu^T A mu`, the first term
/// a product of the rows' pair products with the precisions' upper triangles; every
/// per-component constant (and `extra`) is in the bias, so no pass over `[N, K]` is
/// added.
///
/// A block's terms are computed component-major, `[K, B]` = `quad [K, T] @ products^T`:
/// the product over 20,000 x 528 products at K = 20 took 18-20 ms on this machine's
/// MKL (one thread) against 50-77 ms as `products [B, T] @ [T, K]`; the M-step's sums
/// then take the `[K, B]` responsibilities as they come.
struct GaussianTerms {
    /// `[K, T]`
    quad: Tensor,
    /// `[K, D]`
    lin: Tensor,
    /// `[K, 1]`
    bias: Tensor,
}

impl GaussianTerms {
    fn new(tri: &Triu, means: &Tensor, prec_chol: &Tensor, extra: &Tensor) -> GaussianTerms {
        let d = means.size()[1];
        let log_det =
            prec_chol
                .diagonal(0, 1, 2)
                .log()
                .sum_dim_intlist([1].as_slice(), false, Kind::Double); // [K]
        let prec = prec_chol.matmul(&prec_chol.transpose(1, 2)); // [K, D, D]
        let am = prec.matmul(&means.unsqueeze(2)).squeeze_dim(2); // [K, D]
        let c = (means * &am).sum_dim_intlist([1].as_slice(), false, Kind::Double); // [K]
        let bias = log_det - c * 0.5 - d as f64 * 0.5 * (2.0 * std::f64::consts::PI).ln() + extra;
        GaussianTerms {
            quad: (tri.pick(&prec) * tri.weight.unsqueeze(0) * -0.5).contiguous(),
            lin: am.contiguous(),
            bias: bias.unsqueeze(1),
        }
    }

    /// `[K, B]` for rows `xb` with pair products `zb`.
    fn block(&self, xb: &Tensor, zb: &Tensor) -> Tensor {
        let out = Tensor::empty(
            [self.bias.size()[0], xb.size()[0]],
            (Kind::Double, Device::Cpu),
        );
        self.block_into(&out, xb, zb);
        out
    }

    /// [`GaussianTerms::block`] written into `out` `[K, B]`.
    fn block_into(&self, out: &Tensor, xb: &Tensor, zb: &Tensor) {
        let mut out = self.bias.addmm_out(out, &self.quad, &zb.tr());
        let _ = out.addmm_(&self.lin, &xb.tr());
    }
}

/// `log N(x | mu_k, Sigma_k) + extra_k` for all rows and components `[N, K]`.
fn log_gaussian(rows: &Rows, means: &Tensor, prec_chol: &Tensor, extra: &Tensor) -> Tensor {
    let terms = GaussianTerms::new(&rows.tri, means, prec_chol, extra);
    rows.rows_of(means.size()[0], |xb, zb| terms.block(xb, zb))
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

/// Every per-component term of the expected log density (the Wishart's, the
/// weights') beside the Gaussian's.
fn e_step_terms(rows: &Rows, s: &State) -> GaussianTerms {
    let d = rows.x.size()[1];
    let df = d as f64;
    let ar = Tensor::arange(d, (Kind::Double, Device::Cpu));
    let log_lambda = ((s.dof.unsqueeze(1) - ar.unsqueeze(0)) * 0.5)
        .digamma()
        .sum_dim_intlist([1].as_slice(), false, Kind::Double)
        + df * 2f64.ln();
    let extra = -(s.dof.log() * (0.5 * df))
        + (log_lambda - s.mean_precision.reciprocal() * df) * 0.5
        + log_weights(s);
    GaussianTerms::new(&rows.tri, &s.means, &s.prec_chol, &extra)
}

/// Log responsibilities of a block, component-major `[K, B]`.
fn log_resp_block(terms: &GaussianTerms, xb: &Tensor, zb: &Tensor) -> Tensor {
    let mut log_r = Tensor::empty(
        [terms.bias.size()[0], xb.size()[0]],
        (Kind::Double, Device::Cpu),
    );
    log_resp_into(terms, &mut log_r, xb, zb);
    log_r
}

/// [`log_resp_block`] written into `log_r` `[K, B]`.
fn log_resp_into(terms: &GaussianTerms, log_r: &mut Tensor, xb: &Tensor, zb: &Tensor) {
    terms.block_into(log_r, xb, zb);
    let norm = log_r.logsumexp([0], true);
    *log_r -= &norm;
}

/// Log responsibilities `[N, K]` (predictions).
fn e_step(rows: &Rows, s: &State) -> Tensor {
    let terms = e_step_terms(rows, s);
    rows.rows_of(s.means.size()[0], |xb, zb| log_resp_block(&terms, xb, zb))
}

/// One E-step fused with the M-step's sums: each block's responsibilities are made and
/// summed while its rows and pair products are in cache; `[N, K]` is never stored.
fn e_step_stats(rows: &Rows, s: &State) -> Stats {
    let terms = e_step_terms(rows, s);
    let (d, t) = (rows.x.size()[1], rows.tri.weight.size()[0]);
    let k = s.means.size()[0];
    let mut st = Stats::zeros(k, d, t);
    // one buffer each for a block's log responsibilities and responsibilities, reused:
    // a fresh [K, B] tensor per block is a fresh mmap (above glibc's 128 KB threshold)
    // whose pages fault in again, a tenth of a fit's time at 100,000 x 32
    let len_max = block_rows(t).min(rows.x.size()[0]);
    let (log_buf, r_buf) = (
        Tensor::empty([k * len_max], (Kind::Double, Device::Cpu)),
        Tensor::empty([k * len_max], (Kind::Double, Device::Cpu)),
    );
    rows.each_block(|_, xb, zb| {
        let len = xb.size()[0];
        let mut log_r = log_buf.narrow(0, 0, k * len).view([k, len]);
        log_resp_into(&terms, &mut log_r, xb, zb);
        let r = log_r.exp_out(&r_buf.narrow(0, 0, k * len).view([k, len]));
        st.r_log_r += r.view([-1]).dot(&log_r.view([-1]));
        st.add(&r, xb, zb);
    });
    st
}

fn lower_bound(r_log_r: &Tensor, s: &State, d: i64) -> f64 {
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
    let ent = r_log_r;
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
        // the two tight blobs are one component each, of their share of the rows (less
        // the prior's mass on the unused components), and the wide blob's rows go to
        // neither (whether it is one component or split depends on the start)
        let labels = m.predict(&x).unwrap();
        let (a, b) = (labels[0], labels[300]);
        assert!(labels[..300].iter().all(|&l| l == a), "{labels:?}");
        assert!(labels[300..500].iter().all(|&l| l == b), "{labels:?}");
        assert!(
            labels[500..].iter().all(|&l| l != a && l != b),
            "{labels:?}"
        );
        assert!(
            (m.weights[a as usize] - 0.5).abs() < 0.02,
            "{:?}",
            m.weights
        );
        assert!(
            (m.weights[b as usize] - 1.0 / 3.0).abs() < 0.03,
            "{:?}",
            m.weights
        );
        let p = m.predict_proba(&x).unwrap();
        let rows = p.sum_dim_intlist([1].as_slice(), false, Kind::Double);
        assert!(bool::try_from((rows - 1.0).abs().max().le(1e-9)).unwrap());
    }

    /// The expanded forms (pair products, one matrix product per block of rows) equal
    /// the direct per-component computation, and the fused E-step gathers the same
    /// sums as the responsibilities it returns.
    #[test]
    fn expanded_forms_equal_the_direct_computation() {
        tch::manual_seed(11);
        let opts = (Kind::Double, Device::Cpu);
        // several blocks at this D, the last one short
        let (d, k) = (5i64, 4i64);
        let n = 2 * block_rows(15) + 1001;
        let x = Tensor::randn([n, d], opts) * 2.0;
        let x = &x - x.mean_dim(0, false, Kind::Double);
        let resp = Tensor::rand([n, k], opts).softmax(1, Kind::Double);
        let a = Tensor::randn([k, d, d], opts);
        let covs = a.matmul(&a.transpose(1, 2)) + Tensor::eye(d, opts) * 0.5;
        let prec_chol = precision_cholesky(&covs).unwrap();
        let means = Tensor::randn([k, d], opts);
        let extra = Tensor::randn([k], opts);
        let rows = Rows::new(&x, Triu::new(d));
        let (nk, xk, sk) = gaussian_parameters(&Stats::of(&rows, &resp), &rows.tri, 1e-6);
        for c in 0..k {
            let diff = &x - xk.get(c).unsqueeze(0);
            let direct = (&diff * resp.select(1, c).unsqueeze(1))
                .transpose(0, 1)
                .matmul(&diff)
                / nk.get(c)
                + Tensor::eye(d, opts) * 1e-6;
            let err = f64::try_from((sk.get(c) - direct).abs().max()).unwrap();
            assert!(err < 1e-10, "scatter of component {c}: {err}");
        }
        let lg = log_gaussian(&rows, &means, &prec_chol, &extra);
        for c in 0..k {
            let y = (&x - means.get(c).unsqueeze(0)).matmul(&prec_chol.get(c));
            let log_det = prec_chol.get(c).diagonal(0, 0, 1).log().sum(Kind::Double);
            let direct = (y
                .square()
                .sum_dim_intlist([1].as_slice(), false, Kind::Double)
                + d as f64 * (2.0 * std::f64::consts::PI).ln())
                * -0.5
                + log_det
                + extra.get(c);
            let err = f64::try_from((lg.select(1, c) - direct).abs().max()).unwrap();
            assert!(err < 1e-8, "log density of component {c}: {err}");
        }
        // the fused pass: the same sums as the stored responsibilities give
        let m = DpGmm::fit(
            &x,
            &DpGmmOptions {
                max_components: k as usize,
                max_iter: 3,
                ..Default::default()
            },
            0,
        )
        .unwrap();
        let state = m.state().unwrap();
        let fused = e_step_stats(&rows, &state);
        let log_r = e_step(&rows, &state);
        let stored = Stats::of(&rows, &log_r.exp());
        for (a, b) in [
            (&fused.nk, &stored.nk),
            (&fused.sx, &stored.sx),
            (&fused.s2, &stored.s2),
        ] {
            let err = f64::try_from((a - b).abs().max()).unwrap();
            assert!(
                err < 1e-8 * (1.0 + f64::try_from(b.abs().max()).unwrap()),
                "{err}"
            );
        }
        let r_log_r = f64::try_from((log_r.exp() * &log_r).sum(Kind::Double)).unwrap();
        assert!(
            (f64::try_from(&fused.r_log_r).unwrap() - r_log_r).abs()
                < 1e-6 * r_log_r.abs().max(1.0)
        );
    }

    #[test]
    fn kmeans_finds_separated_clusters_and_is_seeded() {
        let x = blobs();
        let x = &x - x.mean_dim(0, false, Kind::Double);
        let a = kmeans_labels(&x, 3, 4);
        assert_eq!(a, kmeans_labels(&x, 3, 4));
        let a = Vec::<i64>::try_from(a).unwrap();
        // the three blobs (300, 200, 100 rows) each get one label of their own
        for (start, len) in [(0usize, 300usize), (300, 200), (500, 100)] {
            let l = a[start];
            assert!(
                a[start..start + len].iter().all(|&v| v == l),
                "blob at {start}"
            );
        }
        assert!(a[0] != a[300] && a[0] != a[500] && a[300] != a[500]);
        // more clusters than distinct rows: none is left empty of a centre
        let few = Tensor::from_slice(&[0.0f64, 0.0, 1.0, 1.0, 5.0, 5.0]).view([6, 1]);
        let l = Vec::<i64>::try_from(kmeans_labels(&few, 3, 0)).unwrap();
        assert!(l[0] == l[1] && l[2] == l[3] && l[4] == l[5], "{l:?}");
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
