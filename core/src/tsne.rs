//! A neighbour-preserving 2-D map of the failure codes: Barnes-Hut t-SNE (van der
//! Maaten, "Accelerating t-SNE using tree-based algorithms", JMLR 2014) with openTSNE's
//! defaults (Poličar et al. 2019; Kobak and Berens, "The art of using t-SNE for
//! single-cell transcriptomics", 2019): perplexity 30 over the 90 nearest neighbours,
//! a PCA start scaled to standard deviation 1e-4, early exaggeration 12 for 250
//! iterations at momentum 0.5, then 500 at momentum 0.8, the learning rate
//! `max(200, N / exaggeration)` of each phase, gains (+0.2 / x0.8, at least 0.01).
//!
//! Deterministic: no random draw (the start is the PCA), and each point's forces are
//! computed on their own and summed in point order, so the map is the same bit for bit
//! whatever the number of threads.
use std::ops::Range;

/// How the map is made; [`TsneOptions::default`] is openTSNE's.
#[derive(Debug, Clone, PartialEq)]
pub struct TsneOptions {
    /// The effective number of neighbours each point keeps (lowered to `(N - 1) / 3`
    /// for small `N`).
    pub perplexity: f64,
    /// Barnes-Hut accuracy: a cell whose side over its distance is below `theta` acts
    /// as one point (0: every pair exactly).
    pub theta: f64,
    pub exaggeration: f64,
    pub exaggeration_iters: usize,
    /// Iterations after the early exaggeration.
    pub iters: usize,
    /// Threads the forces are computed on (at least 1).
    pub threads: usize,
}

impl Default for TsneOptions {
    fn default() -> Self {
        TsneOptions {
            perplexity: 30.0,
            theta: 0.5,
            exaggeration: 12.0,
            exaggeration_iters: 250,
            iters: 500,
            threads: 1,
        }
    }
}

/// The t-SNE map of the `n` rows of `x` (row-major, `n x d`), starting from `start`
/// (one point per row, e.g. the first two principal components). Returns `None` when
/// there are too few rows for a neighbourhood (fewer than 4).
pub fn tsne_2d(
    x: &[f32],
    n: usize,
    d: usize,
    start: &[(f64, f64)],
    o: &TsneOptions,
) -> Option<Vec<(f64, f64)>> {
    assert_eq!(x.len(), n * d, "tsne_2d: x is not n x d");
    assert_eq!(start.len(), n, "tsne_2d: one start point per row");
    let perplexity = effective_perplexity(n, o.perplexity);
    if perplexity < 1.0 {
        return None;
    }
    let threads = o.threads.max(1);
    let p = affinities(x, n, d, perplexity, threads);
    // the PCA start, scaled to a standard deviation of 1e-4 along its first axis
    let sd = {
        let m = start.iter().map(|s| s.0).sum::<f64>() / n as f64;
        (start.iter().map(|s| (s.0 - m).powi(2)).sum::<f64>() / n as f64).sqrt()
    };
    let scale = if sd > 0.0 { 1e-4 / sd } else { 1.0 };
    let mut y: Vec<[f64; 2]> = start
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if sd > 0.0 {
                [s.0 * scale, s.1 * scale]
            } else {
                // a degenerate start (all rows alike): a fixed spiral keeps points apart
                let t = i as f64;
                [1e-4 * t.cos() * t.sqrt(), 1e-4 * t.sin() * t.sqrt()]
            }
        })
        .collect();
    let mut update = vec![[0.0f64; 2]; n];
    let mut gains = vec![[1.0f64; 2]; n];
    let phases = [
        (o.exaggeration, o.exaggeration_iters, 0.5),
        (1.0, o.iters, 0.8),
    ];
    for (exaggeration, iters, momentum) in phases {
        let lr = (n as f64 / exaggeration).max(200.0);
        for _ in 0..iters {
            let grad = gradient(&p, &y, exaggeration, o.theta, threads);
            for i in 0..n {
                for k in 0..2 {
                    let (g, u) = (grad[i][k], update[i][k]);
                    gains[i][k] = if (g > 0.0) != (u > 0.0) {
                        gains[i][k] + 0.2
                    } else {
                        (gains[i][k] * 0.8).max(0.01)
                    };
                    update[i][k] = momentum * u - lr * gains[i][k] * g;
                    y[i][k] += update[i][k];
                }
            }
            let (mx, my) = y.iter().fold((0.0, 0.0), |(a, b), p| (a + p[0], b + p[1]));
            for p in &mut y {
                p[0] -= mx / n as f64;
                p[1] -= my / n as f64;
            }
        }
    }
    Some(y.into_iter().map(|p| (p[0], p[1])).collect())
}

/// The perplexity a map of `n` points uses: the asked one, lowered to `(n - 1) / 3`
/// so that each point has `3 x perplexity` neighbours; below 1 (fewer than 4 points)
/// there is no map.
pub fn effective_perplexity(n: usize, asked: f64) -> f64 {
    asked.min(n.saturating_sub(1) as f64 / 3.0)
}

/// How well a 2-D map keeps groups together: the share of each point's 10 nearest
/// neighbours on the map that carry its label (`None`: 10 points or fewer).
pub fn neighbours_agree(xy: &[(f64, f64)], label: &[i64]) -> Option<f64> {
    let n = xy.len();
    if n <= 10 {
        return None;
    }
    let mut same = 0usize;
    for i in 0..n {
        let mut d: Vec<(f64, usize)> = (0..n)
            .filter(|&j| j != i)
            .map(|j| ((xy[i].0 - xy[j].0).powi(2) + (xy[i].1 - xy[j].1).powi(2), j))
            .collect();
        d.select_nth_unstable_by(9, |a, b| a.0.total_cmp(&b.0));
        same += d[..10].iter().filter(|e| label[e.1] == label[i]).count();
    }
    Some(same as f64 / (10 * n) as f64)
}

/// The symmetric joint probabilities `P` over each row's nearest neighbours, as sparse
/// rows (`P` sums to 1).
struct Affinities {
    /// Row `i`'s neighbours and `p_ij`, both directions of every pair present.
    rows: Vec<Vec<(u32, f64)>>,
}

fn affinities(x: &[f32], n: usize, d: usize, perplexity: f64, threads: usize) -> Affinities {
    let k = ((3.0 * perplexity) as usize).clamp(1, n - 1);
    // each row's conditional p_{j|i} over its k nearest neighbours
    let conditional: Vec<Vec<(u32, f64)>> = par_map(n, threads, |rows| {
        rows.map(|i| {
            let xi = &x[i * d..(i + 1) * d];
            let mut dist: Vec<(f64, u32)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    let xj = &x[j * d..(j + 1) * d];
                    let s: f64 = xi
                        .iter()
                        .zip(xj)
                        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                        .sum();
                    (s, j as u32)
                })
                .collect();
            let by_distance =
                |a: &(f64, u32), b: &(f64, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
            if k < dist.len() {
                dist.select_nth_unstable_by(k - 1, by_distance);
                dist.truncate(k);
            }
            dist.sort_unstable_by(by_distance);
            let p = conditional_row(&dist.iter().map(|e| e.0).collect::<Vec<_>>(), perplexity);
            dist.iter().zip(p).map(|(e, p)| (e.1, p)).collect()
        })
        .collect()
    });
    // symmetrise: p_ij = (p_{j|i} + p_{i|j}) / 2N
    let mut rows: Vec<Vec<(u32, f64)>> = vec![Vec::new(); n];
    for (i, row) in conditional.iter().enumerate() {
        for &(j, p) in row {
            rows[i].push((j, p));
            rows[j as usize].push((i as u32, p));
        }
    }
    for row in &mut rows {
        row.sort_unstable_by_key(|e| e.0);
        let mut merged: Vec<(u32, f64)> = Vec::with_capacity(row.len());
        for &(j, p) in row.iter() {
            match merged.last_mut() {
                Some(last) if last.0 == j => last.1 += p,
                _ => merged.push((j, p)),
            }
        }
        for e in &mut merged {
            e.1 /= 2.0 * n as f64;
        }
        *row = merged;
    }
    Affinities { rows }
}

/// `p_{j|i}` over squared distances `d2` (ascending) whose entropy is
/// `ln(perplexity)`: a bisection on the Gaussian's precision.
fn conditional_row(d2: &[f64], perplexity: f64) -> Vec<f64> {
    let target = perplexity.ln();
    let d0 = d2.first().copied().unwrap_or(0.0);
    let (mut beta, mut lo, mut hi) = (1.0f64, 0.0f64, f64::INFINITY);
    let mut p = vec![0.0; d2.len()];
    for _ in 0..200 {
        // shifted by the nearest distance: the same p, no underflow
        let mut sum = 0.0;
        for (pj, &dj) in p.iter_mut().zip(d2) {
            *pj = (-(dj - d0) * beta).exp();
            sum += *pj;
        }
        let mut h = 0.0;
        for (pj, &dj) in p.iter_mut().zip(d2) {
            *pj /= sum;
            h += *pj * (dj - d0) * beta;
        }
        // entropy of p: ln(sum) + beta * E[d - d0]
        let entropy = sum.ln() + h;
        if (entropy - target).abs() < 1e-5 {
            break;
        }
        if entropy > target {
            lo = beta;
            beta = if hi.is_finite() {
                (beta + hi) / 2.0
            } else {
                beta * 2.0
            };
        } else {
            hi = beta;
            beta = (beta + lo) / 2.0;
        }
    }
    p
}

/// The KL divergence's gradient for every point, divided by 4 (openTSNE's convention,
/// which its learning rate assumes).
fn gradient(
    p: &Affinities,
    y: &[[f64; 2]],
    exaggeration: f64,
    theta: f64,
    threads: usize,
) -> Vec<[f64; 2]> {
    let n = y.len();
    let tree = QuadTree::new(y);
    // per point: (sum of kernels to all others, unnormalised repulsion, attraction)
    let forces: Vec<(f64, [f64; 2], [f64; 2])> = par_map(n, threads, |rows| {
        rows.map(|i| {
            let yi = y[i];
            let mut attract = [0.0; 2];
            for &(j, pij) in &p.rows[i] {
                let yj = y[j as usize];
                let (dx, dy) = (yi[0] - yj[0], yi[1] - yj[1]);
                let w = pij / (1.0 + dx * dx + dy * dy);
                attract[0] += w * dx;
                attract[1] += w * dy;
            }
            let mut z = 0.0;
            let mut repulse = [0.0; 2];
            tree.repulsion(i, yi, theta * theta, &mut z, &mut repulse);
            (z, repulse, attract)
        })
        .collect()
    });
    let z: f64 = forces
        .iter()
        .map(|f| f.0)
        .sum::<f64>()
        .max(f64::MIN_POSITIVE);
    forces
        .iter()
        .map(|(_, r, a)| {
            [
                exaggeration * a[0] - r[0] / z,
                exaggeration * a[1] - r[1] / z,
            ]
        })
        .collect()
}

/// Deeper cells than this are leaves, however many points they hold (points that
/// coincide would split for ever).
const MAX_DEPTH: usize = 40;

/// A quadtree over the map's points: each cell its points' centre of mass and count.
struct QuadTree<'a> {
    y: &'a [[f64; 2]],
    cells: Vec<Cell>,
    /// The points, ordered so that each cell's are `order[cell.points]`.
    order: Vec<u32>,
}

#[derive(Clone, Default)]
struct Cell {
    centre_of_mass: [f64; 2],
    count: usize,
    /// The cell's side.
    width: f64,
    /// The first of its four children (0: a leaf; the root is cell 0).
    children: usize,
    points: Range<usize>,
}

impl<'a> QuadTree<'a> {
    fn new(y: &'a [[f64; 2]]) -> Self {
        let (mut lo, mut hi) = ([f64::INFINITY; 2], [f64::NEG_INFINITY; 2]);
        for p in y {
            for k in 0..2 {
                lo[k] = lo[k].min(p[k]);
                hi[k] = hi[k].max(p[k]);
            }
        }
        let centre = [(lo[0] + hi[0]) / 2.0, (lo[1] + hi[1]) / 2.0];
        let half = ((hi[0] - lo[0]).max(hi[1] - lo[1]) / 2.0).max(1e-12) * (1.0 + 1e-9);
        let mut tree = QuadTree {
            y,
            cells: vec![Cell::default()],
            order: (0..y.len() as u32).collect(),
        };
        tree.build(0, 0..y.len(), centre, half, 0);
        tree
    }

    fn build(
        &mut self,
        cell: usize,
        points: Range<usize>,
        centre: [f64; 2],
        half: f64,
        depth: usize,
    ) {
        let mut com = [0.0; 2];
        for &i in &self.order[points.clone()] {
            com[0] += self.y[i as usize][0];
            com[1] += self.y[i as usize][1];
        }
        let count = points.len();
        if count > 0 {
            com[0] /= count as f64;
            com[1] /= count as f64;
        }
        self.cells[cell] = Cell {
            centre_of_mass: com,
            count,
            width: 2.0 * half,
            children: 0,
            points: points.clone(),
        };
        if count <= 1 || depth >= MAX_DEPTH {
            return;
        }
        // split into the four quadrants: left/right, then each bottom/top
        let y = self.y;
        let order = &mut self.order[points.clone()];
        let mid_x = partition(order, |i| y[i as usize][0] < centre[0]);
        let mid_y_left = partition(&mut order[..mid_x], |i| y[i as usize][1] < centre[1]);
        let mid_y_right = mid_x + partition(&mut order[mid_x..], |i| y[i as usize][1] < centre[1]);
        let s = points.start;
        let bounds = [
            (s..s + mid_y_left, [-1.0, -1.0]),
            (s + mid_y_left..s + mid_x, [-1.0, 1.0]),
            (s + mid_x..s + mid_y_right, [1.0, -1.0]),
            (s + mid_y_right..points.end, [1.0, 1.0]),
        ];
        let first = self.cells.len();
        self.cells.resize(first + 4, Cell::default());
        self.cells[cell].children = first;
        let q = half / 2.0;
        for (c, (range, sign)) in bounds.into_iter().enumerate() {
            let child_centre = [centre[0] + sign[0] * q, centre[1] + sign[1] * q];
            self.build(first + c, range, child_centre, q, depth + 1);
        }
    }

    /// Adds point `i`'s kernel sum `sum_j w_ij` to `z` and `sum_j w_ij^2 (y_i - y_j)`
    /// to `force`, `w_ij = 1 / (1 + |y_i - y_j|^2)`, over every other point.
    fn repulsion(&self, i: usize, yi: [f64; 2], theta2: f64, z: &mut f64, force: &mut [f64; 2]) {
        let mut stack = vec![0usize];
        while let Some(c) = stack.pop() {
            let cell = &self.cells[c];
            if cell.count == 0 {
                continue;
            }
            if cell.children == 0 {
                for &j in &self.order[cell.points.clone()] {
                    if j as usize != i {
                        let yj = self.y[j as usize];
                        add_kernel(yi, yj, 1.0, z, force);
                    }
                }
                continue;
            }
            let (dx, dy) = (
                yi[0] - cell.centre_of_mass[0],
                yi[1] - cell.centre_of_mass[1],
            );
            let d2 = dx * dx + dy * dy;
            if cell.width * cell.width < theta2 * d2 {
                add_kernel(yi, cell.centre_of_mass, cell.count as f64, z, force);
            } else {
                stack.extend(cell.children..cell.children + 4);
            }
        }
    }
}

fn add_kernel(yi: [f64; 2], yj: [f64; 2], count: f64, z: &mut f64, force: &mut [f64; 2]) {
    let (dx, dy) = (yi[0] - yj[0], yi[1] - yj[1]);
    let w = 1.0 / (1.0 + dx * dx + dy * dy);
    *z += count * w;
    force[0] += count * w * w * dx;
    force[1] += count * w * w * dy;
}

/// Moves the elements for which `left` holds to the front; returns how many there are.
fn partition(v: &mut [u32], left: impl Fn(u32) -> bool) -> usize {
    let mut m = 0;
    for k in 0..v.len() {
        if left(v[k]) {
            v.swap(m, k);
            m += 1;
        }
    }
    m
}

/// `f` over contiguous runs of `0..n` on `threads` scoped threads, the results in
/// order.
fn par_map<T: Send>(n: usize, threads: usize, f: impl Fn(Range<usize>) -> Vec<T> + Sync) -> Vec<T> {
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        return f(0..n);
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || f(t * per..((t + 1) * per).min(n)))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a t-SNE thread panicked"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact gradient (every pair), in the same convention.
    fn exact_gradient(p: &Affinities, y: &[[f64; 2]], exaggeration: f64) -> Vec<[f64; 2]> {
        let n = y.len();
        let mut z = 0.0;
        let mut rep = vec![[0.0; 2]; n];
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    add_kernel(y[i], y[j], 1.0, &mut z, &mut rep[i]);
                }
            }
        }
        (0..n)
            .map(|i| {
                let mut a = [0.0; 2];
                for &(j, pij) in &p.rows[i] {
                    let (dx, dy) = (y[i][0] - y[j as usize][0], y[i][1] - y[j as usize][1]);
                    let w = pij / (1.0 + dx * dx + dy * dy);
                    a[0] += w * dx;
                    a[1] += w * dy;
                }
                [
                    exaggeration * a[0] - rep[i][0] / z,
                    exaggeration * a[1] - rep[i][1] / z,
                ]
            })
            .collect()
    }

    fn points(n: usize, d: usize) -> Vec<f32> {
        // a fixed, irregular cloud
        (0..n * d)
            .map(|k| ((k as f64 * 0.618_033_988_7).fract() * 4.0 + (k % 7) as f64) as f32)
            .collect()
    }

    #[test]
    fn affinities_are_symmetric_and_sum_to_one_with_the_asked_perplexity() {
        let (n, d) = (120, 5);
        let x = points(n, d);
        let p = affinities(&x, n, d, 10.0, 2);
        let total: f64 = p.rows.iter().flatten().map(|e| e.1).sum();
        assert!((total - 1.0).abs() < 1e-9, "P sums to {total}");
        for (i, row) in p.rows.iter().enumerate() {
            for &(j, pij) in row {
                let back = p.rows[j as usize]
                    .iter()
                    .find(|e| e.0 == i as u32)
                    .expect("symmetric");
                assert!((back.1 - pij).abs() < 1e-15);
            }
        }
        // a row's conditional distribution has the asked entropy
        let d2: Vec<f64> = (1..31).map(|k| k as f64 * 0.37).collect();
        let row = conditional_row(&d2, 10.0);
        let h: f64 = -row
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|p| p * p.ln())
            .sum::<f64>();
        assert!((h - 10f64.ln()).abs() < 1e-4, "entropy {h}");
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn barnes_hut_matches_the_exact_gradient() {
        let (n, d) = (300, 4);
        let x = points(n, d);
        let p = affinities(&x, n, d, 20.0, 1);
        let y: Vec<[f64; 2]> = (0..n)
            .map(|i| {
                let t = i as f64;
                [(t * 0.71).sin() * 5.0 + (t * 0.05), (t * 1.37).cos() * 3.0]
            })
            .collect();
        let exact = exact_gradient(&p, &y, 4.0);
        // theta = 0 opens every cell: the exact sums, up to rounding
        let bh0 = gradient(&p, &y, 4.0, 0.0, 2);
        for (a, b) in exact.iter().zip(&bh0) {
            for k in 0..2 {
                assert!(
                    (a[k] - b[k]).abs() < 1e-12 * (1.0 + a[k].abs()),
                    "{a:?} vs {b:?}"
                );
            }
        }
        // theta = 0.5: close to it overall
        let bh = gradient(&p, &y, 4.0, 0.5, 2);
        let err: f64 = exact
            .iter()
            .zip(&bh)
            .map(|(a, b)| (a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2))
            .sum();
        let norm: f64 = exact.iter().map(|a| a[0] * a[0] + a[1] * a[1]).sum();
        assert!(
            (err / norm).sqrt() < 0.02,
            "relative error {}",
            (err / norm).sqrt()
        );
    }

    #[test]
    fn coincident_points_and_tiny_inputs() {
        // 50 copies of one point and 50 of another: the tree stops splitting, no NaN
        let (n, d) = (100, 3);
        let x: Vec<f32> = (0..n * d)
            .map(|k| if k / d < 50 { 0.0 } else { 1.0 })
            .collect();
        let start = vec![(0.0, 0.0); n];
        let o = TsneOptions {
            exaggeration_iters: 20,
            iters: 20,
            ..TsneOptions::default()
        };
        let y = tsne_2d(&x, n, d, &start, &o).expect("a map");
        assert!(y.iter().all(|p| p.0.is_finite() && p.1.is_finite()));
        assert!(tsne_2d(&[0.0; 6], 3, 2, &[(0.0, 0.0); 3], &o).is_none());
    }
}
