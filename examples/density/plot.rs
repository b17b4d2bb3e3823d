//! The plot: memory in use over (simulated) time for the three set-ups, as SVG.

use std::path::Path;

use plotters::prelude::*;

use crate::plan::{Clock, WARMUP_S};
use crate::run::RunResult;
use crate::workload::Workload;

/// Line colours, in the order of the runs.
const COLOURS: [RGBColor; 3] = [
    RGBColor(200, 60, 40),
    RGBColor(230, 150, 20),
    RGBColor(30, 110, 200),
];

/// Writes the plot of `runs` to `path`.
pub fn write(
    path: &Path,
    runs: &[RunResult],
    w: &Workload,
    clock: &Clock,
    backend: &str,
) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    draw(path, runs, w, clock, backend).map_err(|e| format!("drawing {}: {e}", path.display()))
}

fn draw(
    path: &Path,
    runs: &[RunResult],
    w: &Workload,
    clock: &Clock,
    backend: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let minutes = |t: f64| t / 60.0;
    let x_end = runs
        .iter()
        .flat_map(|r| r.samples.last())
        .map(|s| minutes(s.t))
        .fold(1.0, f64::max);
    let y_end = runs
        .iter()
        .flat_map(|r| r.samples.iter())
        .map(|s| s.bytes as f64 / 1048576.0)
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Memory in use: {} VMs x {} MiB, {} (time compressed {:.0}x)",
                w.vms,
                w.pages / 256,
                backend,
                clock.compression
            ),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_end, 0.0..y_end)?;
    chart
        .configure_mesh()
        .x_desc("simulated time (minutes); the application period is 30 minutes")
        .y_desc("memory in use (MiB)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(0.0, 0.0), (minutes(WARMUP_S), y_end)],
            RGBColor(240, 240, 240).filled(),
        )))?
        .label("warm-up (not measured)")
        .legend(|(x, y)| {
            Rectangle::new(
                [(x, y - 5), (x + 18, y + 5)],
                RGBColor(225, 225, 225).filled(),
            )
        });
    for (r, colour) in runs.iter().zip(COLOURS) {
        chart
            .draw_series(LineSeries::new(
                r.samples
                    .iter()
                    .map(|s| (minutes(s.t), s.bytes as f64 / 1048576.0)),
                colour.stroke_width(2),
            ))?
            .label(format!(
                "{}: mean {:.0} MiB, peak {:.0} MiB",
                r.setup.name(),
                r.mean / 1048576.0,
                r.peak as f64 / 1048576.0
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
