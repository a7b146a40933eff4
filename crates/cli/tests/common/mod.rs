//! Helpers shared by the integration tests that run the built `revmap` binary.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs the built `revmap` binary with `args` and collects its output.
pub fn revmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_revmap"))
        .args(args)
        .output()
        .expect("run revmap")
}

/// The standard error of `o`, lossily decoded.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The standard output of `o`, lossily decoded.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts that the run did not panic.
pub fn no_panic(o: &Output) {
    let e = stderr(o);
    assert!(
        !e.contains("panicked") && !e.contains("RUST_BACKTRACE"),
        "{e}"
    );
}

/// A PNG written by --plot: its size and that it is not blank.
pub fn check_png(path: &std::path::Path) {
    let file = std::fs::File::open(path).unwrap();
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (900, 540), "{}", path.display());
    let px = info.color_type.samples();
    assert!(px >= 3, "{:?}", info.color_type);
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    let inked = pixels
        .iter()
        .filter(|p| p[..3].iter().any(|&c| c < 200))
        .count();
    let frac = inked as f64 / pixels.len() as f64;
    // Axes, labels and data: more than a blank image, far from all of it (a bar chart
    // with a few wide bars, such as the ring lengths, inks up to about two thirds).
    assert!((0.01..0.85).contains(&frac), "{}: {frac}", path.display());
    let colored = pixels
        .iter()
        .filter(|p| {
            let (mx, mn) = (p[..3].iter().max().unwrap(), p[..3].iter().min().unwrap());
            mx - mn > 80
        })
        .count();
    assert!(colored > 100, "{}: no data drawn in colour", path.display());
}

/// Checks the plots `names` written into `dir` by a run whose output is `o`: each SVG,
/// and each PNG unless the run said it found no font.
pub fn check_plots(o: &Output, dir: &std::path::Path, names: &[&str]) {
    let fonts = !stderr(o).contains("no TrueType font");
    for name in names {
        let svg = std::fs::read_to_string(dir.join(format!("{name}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.len() > 1000, "{name}");
        if fonts {
            check_png(&dir.join(format!("{name}.png")));
        }
    }
}
