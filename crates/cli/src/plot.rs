//! `revmap run --plot DIR`: PNG and SVG plots of a run report (plotters): hypercall
//! latency distribution per hypercall type, rmap ring lengths, dirty pages per
//! migration round, and throughput over time with the resize points marked; for
//! `--mmu x86`, shadow faults and write-protected frames over time.
//!
//! Invariants: every plot is written as `NAME.svg` (text as SVG text, no font needed)
//! and `NAME.png` (text rendered with a system TrueType font found at run time; if no
//! font is found the PNGs are skipped and the caller is told so). Errors are returned,
//! never panicked on.

use plotters::coord::Shift;
use plotters::prelude::*;
use revmap_sim::nested::NestedRunReport;
use revmap_sim::run::{si_ns, RunReport};
use revmap_sim::x86::{X86Report, X86Sample};
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

/// Curve colours, told apart on white (plotters' palette has a pale yellow).
const COLOURS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
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

/// Creates `dir` if needed and checks that a file can be written in it (before a run,
/// so that a run's results are never lost to an unwritable directory).
pub fn check_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".revmap-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// Writes every plot into `dir` (created if needed). Returns the files written and
/// whether the PNGs were skipped for want of a font.
pub fn write_plots(report: &RunReport, dir: &Path) -> Result<(Vec<PathBuf>, bool), DynErr> {
    write_all(
        dir,
        &["latency", "rings", "dirty_pages", "throughput"],
        Plotted::Hpt(report),
    )
}

/// A report whose plots [`write_all`] draws.
#[derive(Clone, Copy)]
enum Plotted<'a> {
    /// `revmap run` (HPT).
    Hpt(&'a RunReport),
    /// `revmap run --mmu nested`.
    Nested(&'a NestedRunReport),
    /// `revmap run --mmu x86`.
    X86(&'a X86Report),
}

impl Plotted<'_> {
    /// The size of every plot of the report (the x86 plot stacks two charts).
    fn size(self) -> (u32, u32) {
        match self {
            Plotted::Hpt(_) | Plotted::Nested(_) => (W, H),
            Plotted::X86(_) => (W, H + H / 2),
        }
    }
}

/// Draws plot `i` of `r` on `root`, filled white first.
fn draw<DB: DrawingBackend>(
    r: Plotted<'_>,
    i: usize,
    root: &DrawingArea<DB, Shift>,
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    match r {
        Plotted::Hpt(r) => draw_one(i, r, root),
        Plotted::Nested(r) => nested(r, i, root),
        Plotted::X86(r) => x86_shadow(r, root),
    }
}

/// Writes plot `i` of `names` as `NAME.svg` and (with a font) `NAME.png` into `dir`.
fn write_all(
    dir: &Path,
    names: &[&str],
    report: Plotted<'_>,
) -> Result<(Vec<PathBuf>, bool), DynErr> {
    std::fs::create_dir_all(dir)?;
    let png = register_font();
    let mut files = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let svg = dir.join(format!("{name}.svg"));
        {
            let root = SVGBackend::new(&svg, report.size()).into_drawing_area();
            draw(report, i, &root)?;
            root.present()?;
        }
        files.push(svg);
        if png {
            let p = dir.join(format!("{name}.png"));
            {
                let root = BitMapBackend::new(&p, report.size()).into_drawing_area();
                draw(report, i, &root)?;
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

/// Draws the legend of `ch` at `pos`, on a translucent white box with a black border.
fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    ch: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    ch.configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A chart builder on `root` in the house frame: `caption` in `size`-point
/// sans-serif, a 12 px margin, a 45 px x-label area and a `y_area` px y-label area.
fn framed<'a, 'b, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, Shift>,
    caption: impl AsRef<str>,
    size: u32,
    y_area: u32,
) -> ChartBuilder<'a, 'b, DB> {
    let mut b = ChartBuilder::on(root);
    b.caption(caption, ("sans-serif", size))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(y_area);
    b
}

fn latency<DB: DrawingBackend>(r: &RunReport, root: &DrawingArea<DB, Shift>) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    let curves: Vec<(&str, Vec<(f64, f64)>)> = r
        .latency_buckets_by_kind
        .iter()
        .map(|(k, b)| {
            let pts = b
                .iter()
                .filter(|(_, c)| *c > 0)
                .map(|&(v, c)| (v.max(1) as f64, c as f64))
                .collect();
            (*k, pts)
        })
        .collect();
    let all = curves.iter().flat_map(|c| c.1.iter());
    let xmin = all.clone().map(|p| p.0).fold(f64::MAX, f64::min).min(100.0) / 1.5;
    let xmax = all.clone().map(|p| p.0).fold(1000.0, f64::max) * 1.5;
    let ymax = all.map(|p| p.1).fold(10.0, f64::max) * 20.0;
    let mut ch = framed(root, "Hypercall latency distribution per type", 26, 70)
        .build_cartesian_2d((xmin.max(1.0)..xmax).log_scale(), (0.5..ymax).log_scale())?;
    ch.configure_mesh()
        .x_desc("latency per call (log scale)")
        .y_desc("calls per bucket (log; buckets 1.25x wide)")
        .x_label_formatter(&|v| si_ns(v.round() as u64))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, (kind, pts)) in curves.iter().enumerate() {
        let c = COLOURS.get(i % COLOURS.len()).copied().unwrap_or(BLACK);
        let p = r.latency_ns.get(kind).copied().unwrap_or_default();
        ch.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(format!(
                "{kind}: {} calls, p50 {}, p99 {}",
                p.count,
                si_ns(p.p50),
                si_ns(p.p99)
            ))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
        ch.draw_series(pts.iter().map(|&p| Circle::new(p, 2, c.filled())))?;
    }
    legend(&mut ch, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

fn rings<DB: DrawingBackend>(r: &RunReport, root: &DrawingArea<DB, Shift>) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    let h = &r.rings.histogram;
    let longest = h.keys().copied().max().unwrap_or(1).max(1);
    let ymax = h.values().copied().max().unwrap_or(1) as f64 * 2.0;
    let mut ch = framed(
        root,
        format!(
            "rmap ring lengths at the end ({} guest frames mapped, {} HPTEs)",
            r.rings.chains, r.rings.members
        ),
        24,
        70,
    )
    .build_cartesian_2d(
        (1u64..longest).into_segmented(),
        (0.5..ymax.max(2.0)).log_scale(),
    )?;
    ch.configure_mesh()
        .disable_x_mesh()
        .x_labels((longest as usize).min(20))
        .x_desc("ring length (HPTEs mapping one guest frame)")
        .y_desc("guest frames (log)")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(n) => n.to_string(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    ch.draw_series(
        Histogram::vertical(&ch)
            .style(BLUE.filled())
            .margin(4)
            .baseline(0.5)
            .data(h.iter().map(|(&len, &n)| (len, n as f64))),
    )?;
    if h.is_empty() {
        root.draw(&Text::new(
            "no HPTE mapped guest memory at the end of the run",
            (W as i32 / 3, H as i32 / 2),
            ("sans-serif", 20).into_font(),
        ))?;
    }
    Ok(())
}

fn dirty<DB: DrawingBackend>(r: &RunReport, root: &DrawingArea<DB, Shift>) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    let d = &r.migration.dirty_pages_per_round;
    // Rounds sit at 1..=len, inside the axis (0..len + 1), so none is cut at an edge.
    let rounds = d.len() as u64 + 1;
    let ymax = d.iter().copied().max().unwrap_or(1) as f64 * 1.1 + 1.0;
    let backing = r.migration.frames_per_backing_page.max(1) * 4;
    let mut ch = framed(
        root,
        format!("Dirty pages per migration round (a store dirties its {backing} KiB host page)"),
        24,
        80,
    )
    .build_cartesian_2d(0u64..rounds, 0.0..ymax)?;
    ch.configure_mesh()
        .x_labels((rounds as usize + 1).min(12))
        .x_desc("dirty-log round")
        .y_desc("dirty 4 KiB guest frames harvested")
        .x_label_formatter(&|v| v.to_string())
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let pts = d.iter().enumerate().map(|(i, &n)| (i as u64 + 1, n as f64));
    ch.draw_series(LineSeries::new(pts.clone(), RED.stroke_width(2)))?;
    // A point per round: a run with a single round still shows it (a line needs two).
    ch.draw_series(pts.map(|p| Circle::new(p, 7, RED.filled())))?;
    Ok(())
}

fn throughput<DB: DrawingBackend>(
    r: &RunReport,
    root: &DrawingArea<DB, Shift>,
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    let t = &r.timeline;
    let xmax = t.iter().map(|s| s.t).fold(1.0, f64::max);
    let top = t.iter().map(|s| s.hcalls_per_s).fold(1.0, f64::max);
    // Head room above the line for the resize labels and the legend.
    let ymax = top * 1.35;
    let mut ch = framed(root, "Hypercall throughput (resizes marked)", 26, 90)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
    ch.configure_mesh()
        .x_desc("time (s)")
        .y_desc("hypercalls per second")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    ch.draw_series(LineSeries::new(
        t.iter().map(|s| (s.t, s.hcalls_per_s)),
        BLUE.stroke_width(2),
    ))?
    .label("hypercalls/s (all vCPUs, per 100 ms tick)")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE.stroke_width(2)));
    for z in &r.resize {
        let label = format!("resize {} -> {}", z.from_order, z.order_after);
        ch.draw_series(LineSeries::new(
            [(z.at_s, 0.0), (z.at_s, top * 1.12)],
            RED.stroke_width(2),
        ))?;
        ch.draw_series(std::iter::once(Text::new(
            label,
            (z.at_s, top * 1.2),
            ("sans-serif", 16).into_font().color(&RED),
        )))?;
    }
    legend(&mut ch, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

/// Writes the plots of a nested run into `dir`: `nested_rmap` (the nested rmap's memory
/// high-water mark, its entries and its longest list against the bound, over the run)
/// and `nested_throughput` (L2 accesses and nested faults per second). Returns the
/// files written and whether the PNGs were skipped for want of a font.
pub fn write_nested_plots(
    report: &NestedRunReport,
    dir: &Path,
) -> Result<(Vec<PathBuf>, bool), DynErr> {
    write_all(
        dir,
        &["nested_rmap", "nested_throughput"],
        Plotted::Nested(report),
    )
}

/// A labelled curve: legend, colour, points.
type Curve = (String, RGBColor, Vec<(f64, f64)>);

/// Plot `i` of a nested run: 0 the rmap, 1 the throughput.
fn nested<DB: DrawingBackend>(
    r: &NestedRunReport,
    i: usize,
    root: &DrawingArea<DB, Shift>,
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    let t = &r.timeline;
    let xmax = t.iter().map(|s| s.t).fold(1.0, f64::max);
    let xdesc = if r.deterministic {
        "scheduler step"
    } else {
        "time (s)"
    };
    let rate = if r.deterministic {
        "per step"
    } else {
        "per second"
    };
    let series: Vec<Curve> = if i == 0 {
        let bound = r.nested.rmap_bound as f64;
        vec![
            (
                "rmap memory high-water mark (bytes)".into(),
                BLUE,
                t.iter().map(|s| (s.t, s.rmap_bytes_max as f64)).collect(),
            ),
            (
                "rmap entries now (all L1 gfns)".into(),
                RGBColor(44, 160, 44),
                t.iter().map(|s| (s.t, s.rmap_entries as f64)).collect(),
            ),
            (
                "longest rmap list so far (entries per L1 gfn)".into(),
                RED,
                t.iter()
                    .map(|s| (s.t, s.rmap_entries_max_per_gfn as f64))
                    .collect(),
            ),
            (
                format!("bound ({bound:.0} entries per L1 gfn)"),
                BLACK,
                vec![(0.0, bound), (xmax, bound)],
            ),
        ]
    } else {
        vec![
            (
                format!("L2 accesses {rate}"),
                BLUE,
                t.iter().map(|s| (s.t, s.accesses_per_s)).collect(),
            ),
            (
                format!("nested faults {rate}"),
                RED,
                t.iter().map(|s| (s.t, s.faults_per_s)).collect(),
            ),
        ]
    };
    let top = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let caption = if i == 0 {
        format!(
            "Nested rmap{}: max {} entries per gfn, {} B high-water",
            if r.hostile { " under a hostile L1" } else { "" },
            r.nested.counters.rmap_entries_max_per_gfn,
            r.nested.counters.rmap_bytes_max
        )
    } else {
        "L2 accesses and nested faults".to_owned()
    };
    let mut ch = framed(root, caption, 24, 90)
        .build_cartesian_2d(0.0..xmax, (0.5..top * 3.0).log_scale())?;
    ch.configure_mesh()
        .x_desc(xdesc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc(if i == 0 {
            "bytes / entries (log)"
        } else {
            rate
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (label, c, pts) in series {
        let pts: Vec<(f64, f64)> = pts.into_iter().map(|(x, y)| (x, y.max(0.5))).collect();
        ch.draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    legend(&mut ch, SeriesLabelPosition::LowerRight)?;
    Ok(())
}

/// `revmap run --mmu x86 --plot DIR`: `x86_shadow.svg` and `x86_shadow.png` (the PNG
/// only with a font): shadow page faults and guest accesses per second over time (top),
/// write-protected guest frames and shadow pages over time (bottom). In deterministic
/// mode time is the scheduler step. Returns the files written and whether the PNG was
/// skipped for want of a font.
pub fn write_x86_plots(r: &X86Report, dir: &Path) -> Result<(Vec<PathBuf>, bool), DynErr> {
    write_all(dir, &["x86_shadow"], Plotted::X86(r))
}

/// One counter of a timeline sample.
type SampleField = fn(&X86Sample) -> u64;

fn x86_shadow<DB: DrawingBackend>(
    r: &X86Report,
    root: &DrawingArea<DB, Shift>,
) -> Result<(), DynErr>
where
    DB::ErrorType: 'static,
{
    let (top, bottom) = root.split_vertically(H * 3 / 4);
    let t = &r.timeline;
    let (unit, per) = if r.deterministic {
        ("scheduler step", "per step")
    } else {
        ("time (s)", "per second")
    };
    let xmax = t.iter().map(|s| s.t).fold(1.0, f64::max);
    // Rates over each sample interval, at its end.
    let rate = |f: SampleField| -> Vec<(f64, f64)> {
        t.windows(2)
            .filter(|w| w[1].t > w[0].t)
            .map(|w| {
                let d = f(&w[1]).saturating_sub(f(&w[0])) as f64;
                (w[1].t, d / (w[1].t - w[0].t))
            })
            .collect()
    };
    let faults = rate(|s| s.page_faults);
    let accesses = rate(|s| s.accesses);
    let ymax = faults
        .iter()
        .chain(&accesses)
        .map(|p| p.1)
        .fold(1.0, f64::max)
        * 1.3;
    let mut ch = ChartBuilder::on(&top)
        .caption(
            format!(
                "x86 shadow MMU: {} guest accesses, {} shadow page faults",
                r.accesses, r.shadow.page_faults
            ),
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
    let x_fmt = |v: &f64| {
        if xmax >= 20.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    ch.configure_mesh()
        .x_desc(unit)
        .y_desc(per)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&|v| {
            if ymax >= 20.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .draw()?;
    for (i, (name, pts)) in [
        ("shadow page faults", &faults),
        ("guest accesses", &accesses),
    ]
    .into_iter()
    .enumerate()
    {
        let c = COLOURS.get(i).copied().unwrap_or(BLACK);
        ch.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(format!("{name} {per}"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    legend(&mut ch, SeriesLabelPosition::UpperRight)?;
    let ymax = t
        .iter()
        .map(|s| s.write_protected_gfns.max(s.shadow_pages) as f64)
        .fold(1.0, f64::max)
        * 1.3;
    let mut ch = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
    ch.configure_mesh()
        .x_desc(unit)
        .y_desc("count")
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let series: [(&str, SampleField); 2] = [
        ("write-protected guest frames (shadowed page tables)", |s| {
            s.write_protected_gfns
        }),
        ("shadow pages", |s| s.shadow_pages),
    ];
    for (i, (name, f)) in series.into_iter().enumerate() {
        let c = COLOURS.get(i + 2).copied().unwrap_or(BLACK);
        ch.draw_series(LineSeries::new(
            t.iter().map(|s| (s.t, f(s) as f64)),
            c.stroke_width(2),
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    legend(&mut ch, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}
