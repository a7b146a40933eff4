//! Parse throughput on the decompressed boot trace (MB/s of text).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use flate2::read::MultiGzDecoder;
use revmap_trace::{for_each_record, Record, TraceReader};
use std::io::Read;

fn boot_text() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../traces/boot.txt.gz");
    let f = std::fs::File::open(path).expect("vendored boot trace");
    let mut text = Vec::new();
    MultiGzDecoder::new(f)
        .read_to_end(&mut text)
        .expect("decompress");
    text
}

fn checksum(r: &Record) -> u64 {
    match r {
        Record::Hcall(h) => h.args[1] ^ h.expected.outs[0],
        other => other.line(),
    }
}

fn parse(c: &mut Criterion) {
    let text = boot_text();
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("boot/slice", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            let n =
                for_each_record(black_box(&text), "boot", |r| acc ^= checksum(&r)).expect("parses");
            black_box((n, acc))
        })
    });
    g.bench_function("boot/reader", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for r in TraceReader::new(std::io::Cursor::new(black_box(&text[..])), "boot") {
                acc ^= checksum(&r.expect("parses"));
            }
            black_box(acc)
        })
    });
    g.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
