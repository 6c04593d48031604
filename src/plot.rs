//! `--plot PATH.png`: the per-layer relative output error of COMQ and of RTN, on a log scale.
//!
//! Drawn with plotters' bitmap backend and an embedded DejaVu Sans (no system fonts, no Python).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::pipeline::LayerReport;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidOption(format!(
        "--plot {}: the chart could not be drawn: {e}",
        path.display()
    ))
}

/// Refuses a `--plot` path the chart cannot be written to (before a run, not after it).
pub fn check_path(path: &Path) -> Result<()> {
    if path.extension().is_none_or(|e| e != "png") {
        return Err(Error::InvalidOption(format!(
            "--plot {} must end in .png",
            path.display()
        )));
    }
    Ok(())
}

/// Draws the chart to `path` (PNG), atomically.
pub fn plot_errors(path: &Path, title: &str, layers: &[LayerReport]) -> Result<()> {
    check_path(path)?;
    REGISTER.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            log::error!("the embedded plot font did not load");
        }
    });
    const SIZE: (u32, u32) = (1200, 600);
    // Drawn in memory, then encoded and written atomically: a drawing error is about the chart,
    // a write error names the file, and a failed write leaves nothing behind.
    let mut pixels = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    let n = layers.len().max(1);
    let vals = layers
        .iter()
        .flat_map(|l| [l.rel_error, l.rel_error_rtn])
        .filter(|v| *v > 0.0);
    let (lo, hi) = vals.fold((f64::INFINITY, 0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        (lo / 2.0, hi * 2.0)
    } else {
        (1e-6, 1.0)
    };
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo..hi).log_scale())
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("layer (file order)")
            .y_desc("relative output error ‖(W−Q)Xᵀ‖² / ‖WXᵀ‖²")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0e}"))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| plot_err(path, e))?;
        let series = [("RTN", RED, true), ("COMQ", BLUE, false)];
        for (name, color, rtn) in series {
            let pts: Vec<(f64, f64)> = layers
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    (
                        i as f64,
                        if rtn { l.rel_error_rtn } else { l.rel_error }.max(lo),
                    )
                })
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| plot_err(path, e))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(|e| plot_err(path, e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    let img =
        image::RgbImage::from_raw(SIZE.0, SIZE.1, pixels).expect("buffer of the chart's size");
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| plot_err(path, format!("encoding the PNG failed: {e}")))?;
    crate::io::writer::write_atomic(path, png.get_ref())
}
