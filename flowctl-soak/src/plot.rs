//! SVG charts of buffered bytes and RSS over time, with the bounds drawn in.

use std::path::Path;

use plotters::prelude::*;

use crate::monitor::Sample;

/// Writes `DIR/<scenario>-buffered.svg` and `DIR/<scenario>-rss.svg`.
pub(crate) fn write(
    dir: &Path,
    scenario: &str,
    samples: &[Sample],
    bound: usize,
    rss_bound: u64,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let t_max = samples.last().map_or(1.0, |s| s.t).max(0.1);
    let stages: Vec<String> = samples
        .iter()
        .flat_map(|s| s.buffered.iter().map(|(n, _)| n.clone()))
        .fold(Vec::new(), |mut v, n| {
            if !v.contains(&n) {
                v.push(n);
            }
            v
        });
    let mut series = Vec::new();
    for stage in &stages {
        let points: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|s| {
                s.buffered
                    .iter()
                    .find(|(n, _)| n == stage)
                    .map(|(_, b)| (s.t, *b as f64 / 1024.0))
            })
            .collect();
        series.push((format!("{stage} buffered (KiB)"), points));
    }
    chart(
        &dir.join(format!("{scenario}-buffered.svg")),
        &format!("{scenario}: buffered bytes per stage"),
        t_max,
        series,
        (
            "bound (high + one item per producer)",
            bound as f64 / 1024.0,
        ),
    )?;
    let rss: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (s.t, s.rss as f64 / 1048576.0))
        .collect();
    chart(
        &dir.join(format!("{scenario}-rss.svg")),
        &format!("{scenario}: process RSS (MiB)"),
        t_max,
        vec![("RSS (MiB)".into(), rss)],
        ("RSS bound", rss_bound as f64 / 1048576.0),
    )
}

fn chart(
    path: &Path,
    title: &str,
    t_max: f64,
    series: Vec<(String, Vec<(f64, f64)>)>,
    bound: (&str, f64),
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(bound.1, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max.max(1.0))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .draw()
        .map_err(|e| err(&e))?;
    let colors = [BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, points)) in series.into_iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(points, color))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, bound.1), (t_max, bound.1)],
            RED.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(bound.0)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
