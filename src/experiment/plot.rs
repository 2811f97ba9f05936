//! `best_reward.png`: best reward found against environment steps, one panel per spec (thin lines
//! per seed, a thick line for the mean over seeds) and, with several specs, a panel with the mean
//! over specs (the paper's Figure 3).

use std::path::Path;

use plotters::coord::ranged1d::{AsRangedCoord, DefaultFormatting, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::summary::SpecStats;
use super::ExperimentError;

const PANEL_W: u32 = 480;
const PANEL_H: u32 = 340;

/// Draws the figure into `path` (PNG); each panel's x-axis runs over its spec's budget k.
pub fn best_reward_png(path: &Path, stats: &[SpecStats]) -> Result<(), ExperimentError> {
    draw(path, stats).map_err(|e| ExperimentError::Plot { path: path.to_path_buf(), message: e.to_string() })
}

struct Panel {
    title: String,
    k: u32,
    seeds: Vec<Vec<f64>>,
    seed_names: Vec<u64>,
    mean: Vec<(u32, f64)>,
}

fn panels(stats: &[SpecStats]) -> Vec<Panel> {
    let mut out: Vec<Panel> = stats
        .iter()
        .map(|spec| Panel {
            title: spec.spec.clone(),
            k: spec.k,
            seeds: spec.seeds.iter().map(|s| s.best_curve.clone()).collect(),
            seed_names: spec.seeds.iter().map(|s| s.seed).collect(),
            mean: (1..=spec.k as usize).filter_map(|t| spec.mean_best_at(t).map(|v| (t as u32, v))).collect(),
        })
        .collect();
    if stats.len() > 1 {
        // Mean over specs of the per-spec mean, at the steps every spec reached.
        let k = stats.iter().map(|s| s.k).min().unwrap_or(1);
        let mean = (1..=k as usize)
            .map_while(|t| {
                let values: Option<Vec<f64>> = stats.iter().map(|s| s.mean_best_at(t)).collect();
                values.map(|v| (t as u32, v.iter().sum::<f64>() / v.len() as f64))
            })
            .collect();
        out.push(Panel {
            title: format!("mean over {} specs", stats.len()),
            k,
            seeds: Vec::new(),
            seed_names: Vec::new(),
            mean,
        });
    }
    out
}

fn draw(path: &Path, stats: &[SpecStats]) -> Result<(), Box<dyn std::error::Error>> {
    let panels = panels(stats);
    let n = panels.len().max(1);
    let cols = n.min(3);
    let rows = n.div_ceil(cols);
    let root = BitMapBackend::new(path, (PANEL_W * cols as u32, PANEL_H * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows, cols));
    let all: Vec<f64> =
        panels.iter().flat_map(|p| p.seeds.iter().flatten().copied().chain(p.mean.iter().map(|m| m.1))).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let y_min = if lo.is_finite() { (lo - 0.05).min(0.5) } else { 0.0 };
    let y_max = 1.0_f64.max(all.iter().copied().fold(f64::NEG_INFINITY, f64::max) + 0.02);
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let mut chart = steps_chart(area, &panel.title, 1u32..panel.k.max(2), y_min..y_max, "best reward")?;
        for (i, curve) in panel.seeds.iter().enumerate() {
            let color = Palette99::pick(i).mix(0.6);
            chart
                .draw_series(LineSeries::new(
                    curve.iter().enumerate().map(|(t, v)| ((t + 1) as u32, *v)),
                    color.stroke_width(1),
                ))?
                .label(format!("seed {}", panel.seed_names[i]))
                .legend(legend_mark(color.stroke_width(1)));
        }
        let mean_label = if panel.seeds.is_empty() { "mean of the specs' means" } else { "mean over seeds" };
        chart
            .draw_series(LineSeries::new(panel.mean.iter().copied(), BLUE.stroke_width(2)))?
            .label(mean_label)
            .legend(legend_mark(BLUE.stroke_width(2)));
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    }
    root.present()?;
    Ok(())
}

/// One labelled line of [`curves_png`]: its `(environment step, value)` points.
pub type Curve = (String, Vec<(u32, f64)>);

/// One line per labelled curve of `(step, value)` points (the best reward against steps of
/// several algorithms: `etpo experiment`'s Figure 3).
pub fn curves_png(path: &Path, title: &str, curves: &[Curve]) -> Result<(), ExperimentError> {
    draw_curves(path, title, curves)
        .map_err(|e| ExperimentError::Plot { path: path.to_path_buf(), message: e.to_string() })
}

fn draw_curves(path: &Path, title: &str, curves: &[Curve]) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (PANEL_W * 3 / 2, PANEL_H * 3 / 2)).into_drawing_area();
    root.fill(&WHITE)?;
    let k = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.0)).max().unwrap_or(1).max(2);
    let values: Vec<f64> = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.1)).collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let y_min = if lo.is_finite() { (lo - 0.05).min(0.5) } else { 0.0 };
    let y_max = 1.0_f64.max(values.iter().copied().fold(f64::NEG_INFINITY, f64::max) + 0.02);
    let mut chart = steps_chart(&root, title, 1u32..k, y_min..y_max, "best reward")?;
    for (i, (label, points)) in curves.iter().enumerate() {
        let color = Palette99::pick(i);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(label.clone())
            .legend(legend_mark(color.stroke_width(2)));
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present()?;
    Ok(())
}

/// A chart with x coordinates `X` and a float y-axis.
pub(crate) type StepsChart<'a, DB, X> = ChartContext<'a, DB, Cartesian2d<X, RangedCoordf64>>;

/// A chart in the style of the run's figures: a title, environment steps on the x-axis, and y
/// labels with one decimal.
pub(crate) fn steps_chart<'a, DB, XR>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    x: XR,
    y: std::ops::Range<f64>,
    y_desc: &str,
) -> Result<StepsChart<'a, DB, XR::CoordDescType>, DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: DrawingBackend + 'a,
    XR: AsRangedCoord,
    XR::CoordDescType:
        Ranged<FormatOption = DefaultFormatting> + ValueFormatter<<XR::CoordDescType as Ranged>::ValueType>,
    <XR::CoordDescType as Ranged>::ValueType: std::fmt::Debug,
{
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc("environment steps")
        .y_desc(y_desc)
        // Avoid "-0.0" on the axis.
        .y_label_formatter(&|v| format!("{:.1}", if v.abs() < 1e-9 { 0.0 } else { *v }))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    Ok(chart)
}

/// A legend entry's mark: a short line in the series' style.
pub(crate) fn legend_mark<DB: DrawingBackend>(
    style: ShapeStyle,
) -> impl Fn((i32, i32)) -> DynElement<'static, DB, (i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style).into_dyn()
}

/// Draws the legend of `chart`'s labelled series at `position`.
pub(crate) fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 11))
        .draw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::record::StepRecord;

    #[test]
    fn draws_a_png() {
        let mut a = SpecStats::new("a", &[0, 1], 3);
        let mut b = SpecStats::new("b", &[0], 4);
        let rec = |reward: f64| StepRecord {
            spec: String::new(),
            seed: 0,
            member: 0,
            episode: 0,
            step: 0,
            env_step: 0,
            prompt_sha256: String::new(),
            generation: String::new(),
            action: String::new(),
            reward,
            ran: reward >= 0.0,
            terminated: true,
            truncated: false,
            error: String::new(),
            wall_s: 0.0,
            cpu_s: 0.0,
            peak_rss_mb: 0.0,
            gen_s: 0.0,
        };
        for r in [-1.0, 0.6, 0.8] {
            a.seeds[0].push(&rec(r));
            b.seeds[0].push(&rec(r / 2.0));
        }
        a.seeds[1].push(&rec(0.7));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("best.png");
        best_reward_png(&path, &[a, b]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let ps = panels(&[SpecStats::new("only", &[0], 3)]);
        assert_eq!(ps.len(), 1);
        assert!(ps[0].mean.is_empty());
    }
}
