//! Figures as SVG (plotters' SVG backend: text stays text, no fonts needed): the lambda
//! sweep (test accuracy against failure-scenario accuracy, one point per lambda) and
//! the 2-D projection of the failure codes coloured by scenario.
use std::path::Path;

use plotters::prelude::*;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid("plot", format!("{}: {e}", path.display()))
}

/// One correction of the sweep.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SweepPoint {
    pub lambda: f64,
    pub test_accuracy: f64,
    pub scenario_accuracy: f64,
}

/// `points` (fractions) as a line through the lambdas, plus the classifier before
/// correction (`before`: test, scenario accuracy).
pub fn sweep_svg(
    path: &Path,
    title: &str,
    points: &[SweepPoint],
    before: (f64, f64),
) -> Result<()> {
    let pct = |x: f64| 100.0 * x;
    let xs = points
        .iter()
        .map(|p| pct(p.scenario_accuracy))
        .chain([pct(before.1)]);
    let ys = points
        .iter()
        .map(|p| pct(p.test_accuracy))
        .chain([pct(before.0)]);
    // room on the right for the labels of points at 100%
    let (x_lo, x_hi) = padded(xs, 2.0, 0.0, 100.0);
    let x_hi = x_hi + 0.12 * (x_hi - x_lo);
    let (y_lo, y_hi) = padded(ys, 0.1, 0.0, 100.0);
    let root = SVGBackend::new(path, (720, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("failure-scenario test accuracy (%)")
        .y_desc("test accuracy (%)")
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let line: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (pct(p.scenario_accuracy), pct(p.test_accuracy)))
        .collect();
    chart
        .draw_series(LineSeries::new(line.clone(), BLUE.stroke_width(2)))
        .map_err(|e| plot_err(path, e))?
        .label("after correction, by lambda")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    // points that share an x get their labels staggered, so they stay readable
    let offsets: Vec<i32> = line
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let k = line[..i]
                .iter()
                .filter(|(x2, _)| (x2 - x).abs() < 1.0)
                .count();
            -14 + 13 * (k as i32 % 4)
        })
        .collect();
    chart
        .draw_series(
            points
                .iter()
                .zip(&line)
                .zip(&offsets)
                .map(|((p, &(x, y)), &dy)| {
                    EmptyElement::at((x, y))
                        + Circle::new((0, 0), 4, BLUE.filled())
                        + Text::new(format!("λ={}", p.lambda), (8, dy), ("sans-serif", 13))
                }),
        )
        .map_err(|e| plot_err(path, e))?;
    chart
        .draw_series(std::iter::once(
            EmptyElement::at((pct(before.1), pct(before.0)))
                + Cross::new((0, 0), 6, RED.stroke_width(2))
                + Text::new("before", (8, 4), ("sans-serif", 13)),
        ))
        .map_err(|e| plot_err(path, e))?
        .label("before correction")
        .legend(|(x, y)| Cross::new((x + 8, y), 5, RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}

fn padded(v: impl Iterator<Item = f64>, pad: f64, lo: f64, hi: f64) -> (f64, f64) {
    let (mut a, mut b) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v {
        a = a.min(x);
        b = b.max(x);
    }
    if !a.is_finite() {
        return (lo, hi);
    }
    ((a - pad).max(lo), (b + pad).min(hi).max(a + pad))
}

/// The first two principal components of the rows of `codes` (N x D): N x 2.
pub fn pca_2d(codes: &Tensor) -> Result<Vec<(f64, f64)>> {
    let x = codes.to_kind(Kind::Double);
    let n = x.size()[0];
    if n == 0 {
        return Ok(vec![]);
    }
    let centred = &x - x.mean_dim(0, true, Kind::Double);
    let cov = centred.transpose(0, 1).matmul(&centred) / (n.max(2) - 1) as f64;
    let (_, vecs) = cov.f_linalg_eigh("L").map_err(Error::Torch)?;
    // eigh sorts ascending: the last two columns, largest first
    let d = vecs.size()[1];
    let top = if d >= 2 {
        Tensor::stack(&[vecs.select(1, d - 1), vecs.select(1, d - 2)], 1)
    } else {
        Tensor::cat(
            &[
                vecs.select(1, 0).unsqueeze(1),
                Tensor::zeros([1, 1], (Kind::Double, x.device())),
            ],
            1,
        )
    };
    let p = centred.matmul(&top);
    let flat = Vec::<f64>::try_from(p.flatten(0, -1)).map_err(Error::Torch)?;
    Ok(flat.chunks(2).map(|c| (c[0], c[1])).collect())
}

/// Points coloured by group (`None`: in no scenario, drawn grey and first); the axes
/// are `<axis> 1` and `<axis> 2`.
pub fn projection_svg(
    path: &Path,
    title: &str,
    axis: &str,
    xy: &[(f64, f64)],
    group: &[Option<usize>],
    names: &[String],
) -> Result<()> {
    let (x_lo, x_hi) = padded(xy.iter().map(|p| p.0), 0.2, f64::MIN, f64::MAX);
    let (y_lo, y_hi) = padded(xy.iter().map(|p| p.1), 0.2, f64::MIN, f64::MAX);
    let root = SVGBackend::new(path, (760, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(format!("{axis} 1"))
        .y_desc(format!("{axis} 2"))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let others: Vec<(f64, f64)> = xy
        .iter()
        .zip(group)
        .filter(|(_, g)| g.is_none())
        .map(|(p, _)| *p)
        .collect();
    if !others.is_empty() {
        chart
            .draw_series(
                others
                    .iter()
                    .map(|&p| Circle::new(p, 2, RGBColor(190, 190, 190).filled())),
            )
            .map_err(|e| plot_err(path, e))?
            .label("in no scenario")
            .legend(|(x, y)| Circle::new((x + 8, y), 4, RGBColor(190, 190, 190).filled()));
    }
    for (k, name) in names.iter().enumerate() {
        let colour = Palette99::pick(k).to_rgba();
        let pts: Vec<(f64, f64)> = xy
            .iter()
            .zip(group)
            .filter(|(_, g)| **g == Some(k))
            .map(|(p, _)| *p)
            .collect();
        let series = chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 2, colour.filled())))
            .map_err(|e| plot_err(path, e))?;
        // a legend for the heaviest scenarios only: it would cover the plot otherwise
        if k < 12 {
            series
                .label(name.clone())
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, colour.filled()));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}
