//! The vendored x86 walk traces parse completely, with the record counts their README
//! gives, and are recognised as x86 (the HPT trace as HPT) from their content.

use revmap_trace::x86::{detect_file, marker, Kind, WalkOutcome, X86Line, X86Reader, X86Record};

fn root(p: &str) -> String {
    format!("{}/../../traces/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[derive(Default, Debug, PartialEq, Eq)]
struct Counts {
    walks: u64,
    ok: u64,
    faults: u64,
    invlpg: u64,
    flush: u64,
    cr3_changes: u64,
    ad: u64,
    markers: Vec<String>,
}

fn count(name: &str) -> Counts {
    let mut r = X86Reader::open(root(name)).unwrap_or_else(|e| panic!("{e}"));
    let mut c = Counts::default();
    let mut cr3 = None;
    while let Some(l) = r.next_line().unwrap_or_else(|e| panic!("{e}")) {
        match l {
            X86Line::Record(X86Record::Walk(w)) => {
                c.walks += 1;
                c.ad += w.ad.len() as u64;
                match w.outcome {
                    WalkOutcome::Translated { .. } => c.ok += 1,
                    WalkOutcome::PageFault { .. } => c.faults += 1,
                    WalkOutcome::Exception { .. } => panic!("no exceptions in these traces"),
                }
            }
            X86Line::Record(X86Record::Cpu(cpu)) => {
                if cr3.is_some_and(|old| old != cpu.cr3) {
                    c.cr3_changes += 1;
                }
                cr3 = Some(cpu.cr3);
            }
            X86Line::Record(X86Record::Invlpg { .. }) => c.invlpg += 1,
            X86Line::Record(X86Record::Flush { .. }) => c.flush += 1,
            X86Line::Console(text) => {
                if let Some(m) = marker(text) {
                    c.markers.push(String::from_utf8_lossy(m.name).into_owned());
                }
            }
            _ => {}
        }
    }
    c
}

#[test]
fn boot_counts_match_the_readme() {
    let c = count("x86/boot.txt.gz");
    assert_eq!((c.walks, c.ok, c.faults), (868_749, 868_299, 450));
    assert_eq!((c.invlpg, c.flush, c.ad), (40_446, 158 + 16_957 + 55, 84));
    assert_eq!(c.cr3_changes, 16_938);
    assert_eq!(c.markers.last().map(String::as_str), Some("INIT-REACHED"));
}

#[test]
fn max_boot_counts_match_the_readme() {
    let c = count("x86/max-boot.txt.gz");
    assert_eq!((c.walks, c.ok, c.faults), (960_874, 960_424, 450));
    assert_eq!(
        (c.invlpg, c.flush, c.ad),
        (40_441, 160 + 16_964 + 58 + 14, 78)
    );
    assert_eq!(c.cr3_changes, 16_946);
}

#[test]
fn formats_are_detected_from_content() {
    assert_eq!(detect_file(root("x86/boot.txt.gz")).unwrap(), Kind::X86);
    assert_eq!(detect_file(root("x86/max-boot.txt.gz")).unwrap(), Kind::X86);
    assert_eq!(detect_file(root("boot.txt.gz")).unwrap(), Kind::Hpt);
    assert_eq!(detect_file(root("x86/README.md")).unwrap(), Kind::Unknown);
    assert!(detect_file(root("x86/missing.txt.gz")).is_err());
}
