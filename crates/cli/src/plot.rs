//! `revmap run --plot DIR`: PNG and SVG plots of a run report (plotters): hypercall
//! latency distribution, rmap ring lengths, dirty pages per migration round, and
//! throughput over time with the resize points marked.
//!
//! Invariants: every plot is written as `NAME.svg` (text as SVG text, no font needed)
//! and `NAME.png` (text rendered with a system TrueType font found at run time; if no
//! font is found the PNGs are skipped and the caller is told so). Errors are returned,
//! never panicked on.

use plotters::coord::Shift;
use plotters::prelude::*;
use revmap_sim::run::RunReport;
use std::path::{Path, PathBuf};

/// Fonts tried for the PNG text, in order.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

const W: u32 = 900;
const H: u32 = 540;

type DynErr = Box<dyn std::error::Error>;

fn register_font() -> bool {
    for p in FONT_PATHS {
        if let Ok(bytes) = std::fs::read(p) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Writes every plot into `dir` (created if needed). Returns the files written and
/// whether the PNGs were skipped for want of a font.
pub fn write_plots(report: &RunReport, dir: &Path) -> Result<(Vec<PathBuf>, bool), DynErr> {
    std::fs::create_dir_all(dir)?;
    let png = register_font();
    let mut files = Vec::new();
    for (i, name) in ["latency", "rings", "dirty_pages", "throughput"]
        .into_iter()
        .enumerate()
    {
        let svg = dir.join(format!("{name}.svg"));
        {
            let root = SVGBackend::new(&svg, (W, H)).into_drawing_area();
            draw_one(i, report, &root)?;
            root.present()?;
        }
        files.push(svg);
        if png {
            let p = dir.join(format!("{name}.png"));
            {
                let root = BitMapBackend::new(&p, (W, H)).into_drawing_area();
                draw_one(i, report, &root)?;
                root.present()?;
            }
            files.push(p);
        }
    }
    Ok((files, !png))
}

fn draw_one<DB: DrawingBackend>(
    i: usize,
    r: &RunReport,
    root: &DrawingArea<DB, Shift>,
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    match i {
        0 => latency(r, root),
        1 => rings(r, root),
        2 => dirty(r, root),
        _ => throughput(r, root),
    }
}

fn latency<DB: DrawingBackend>(r: &RunReport, root: &DrawingArea<DB, Shift>) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let pts: Vec<(f64, f64)> = r
        .latency_buckets
        .iter()
        .filter(|(_, c)| *c > 0)
        .map(|&(v, c)| (v.max(1) as f64, c as f64))
        .collect();
    let xmax = pts.iter().map(|p| p.0).fold(10.0, f64::max) * 1.5;
    let ymax = pts.iter().map(|p| p.1).fold(10.0, f64::max) * 2.0;
    let mut ch = ChartBuilder::on(root)
        .caption("Hypercall latency distribution", ("sans-serif", 26))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..xmax).log_scale(), (0.5..ymax).log_scale())?;
    ch.configure_mesh()
        .x_desc("latency (ns, log)")
        .y_desc("calls per bucket (log)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    ch.draw_series(LineSeries::new(pts.iter().copied(), &BLUE))?;
    ch.draw_series(pts.iter().map(|&p| Circle::new(p, 2, BLUE.filled())))?;
    if let Some(p) = r.latency_ns.get("all") {
        for (q, v, c) in [
            ("p50", p.p50, GREEN),
            ("p99", p.p99, RED),
            ("p99.9", p.p999, MAGENTA),
        ] {
            let x = v.max(1) as f64;
            ch.draw_series(LineSeries::new([(x, 0.5), (x, ymax)], c.stroke_width(1)))?
                .label(format!("{q} = {v} ns"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c));
        }
        ch.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

fn rings<DB: DrawingBackend>(r: &RunReport, root: &DrawingArea<DB, Shift>) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let h = &r.rings.histogram;
    let xmax = h.keys().copied().max().unwrap_or(1) as f64 + 1.0;
    let ymax = h.values().copied().max().unwrap_or(1) as f64 * 2.0;
    let mut ch = ChartBuilder::on(root)
        .caption(
            format!(
                "rmap ring lengths at the end ({} chains, {} mappings)",
                r.rings.chains, r.rings.members
            ),
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5..xmax, (0.5..ymax.max(2.0)).log_scale())?;
    ch.configure_mesh()
        .x_desc("ring length (HPTEs per guest frame)")
        .y_desc("rings (log)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    ch.draw_series(h.iter().map(|(&len, &n)| {
        let x = len as f64;
        Rectangle::new([(x - 0.4, 0.5), (x + 0.4, n as f64)], BLUE.filled())
    }))?;
    Ok(())
}

fn dirty<DB: DrawingBackend>(r: &RunReport, root: &DrawingArea<DB, Shift>) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let d = &r.migration.dirty_pages_per_round;
    let xmax = (d.len() as f64).max(2.0);
    let ymax = d.iter().copied().max().unwrap_or(1) as f64 * 1.1 + 1.0;
    let mut ch = ChartBuilder::on(root)
        .caption("Dirty pages per migration round", ("sans-serif", 26))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
    ch.configure_mesh()
        .x_desc("dirty-log round")
        .y_desc("4 KiB pages harvested")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    ch.draw_series(LineSeries::new(
        d.iter()
            .enumerate()
            .map(|(i, &n)| (i as f64 + 1.0, n as f64)),
        &RED,
    ))?;
    Ok(())
}

fn throughput<DB: DrawingBackend>(
    r: &RunReport,
    root: &DrawingArea<DB, Shift>,
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let t = &r.timeline;
    let xmax = t.iter().map(|s| s.t).fold(1.0, f64::max);
    let ymax = t.iter().map(|s| s.hcalls_per_s).fold(1.0, f64::max) * 1.15;
    let mut ch = ChartBuilder::on(root)
        .caption("Hypercall throughput (resizes marked)", ("sans-serif", 26))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
    ch.configure_mesh()
        .x_desc("time (s)")
        .y_desc("hypercalls per second")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    ch.draw_series(LineSeries::new(
        t.iter().map(|s| (s.t, s.hcalls_per_s)),
        &BLUE,
    ))?
    .label("hypercalls/s")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE));
    for z in &r.resize {
        let label = format!("resize {} -> {}", z.from_order, z.order_after);
        ch.draw_series(LineSeries::new(
            [(z.at_s, 0.0), (z.at_s, ymax)],
            RED.stroke_width(2),
        ))?;
        ch.draw_series(std::iter::once(Text::new(
            label,
            (z.at_s, ymax * 0.95),
            ("sans-serif", 16).into_font().color(&RED),
        )))?;
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
