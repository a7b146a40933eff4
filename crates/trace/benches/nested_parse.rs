//! Parse throughput on the decompressed nested-basic trace (MB/s of text).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use flate2::read::MultiGzDecoder;
use revmap_trace::nested::{for_each_nested_record, NestedReader, NestedRecord};
use std::io::Read;

fn basic_text() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../traces/nested/nested-basic.txt.gz"
    );
    let f = std::fs::File::open(path).expect("vendored nested-basic trace");
    let mut text = Vec::new();
    MultiGzDecoder::new(f)
        .read_to_end(&mut text)
        .expect("decompress");
    text
}

fn checksum(r: &NestedRecord) -> u64 {
    match r {
        NestedRecord::L2Access { gpa, .. } => *gpa,
        NestedRecord::L1Store { val, .. } => *val,
        other => other.line(),
    }
}

fn parse(c: &mut Criterion) {
    let text = basic_text();
    let mut g = c.benchmark_group("nested_parse");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("basic/slice", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            let n = for_each_nested_record(black_box(&text), "basic", |r| acc ^= checksum(&r))
                .expect("parses");
            black_box((n, acc))
        })
    });
    g.bench_function("basic/reader", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            let r = NestedReader::new(std::io::Cursor::new(black_box(&text[..])), "basic")
                .expect("header");
            for rec in r {
                acc ^= checksum(&rec.expect("parses"));
            }
            black_box(acc)
        })
    });
    g.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
