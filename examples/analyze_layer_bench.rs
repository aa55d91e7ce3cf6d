//! Times `analyze_layer` on one layer file: `cargo run --release --example
//! analyze_layer_bench -- LAYER` (plain tar, gzip or zstd). Prints the stats and the
//! throughput; run it under `/usr/bin/time -v` for peak memory.

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: analyze_layer_bench LAYER");
    let file = std::fs::File::open(&path).expect("open");
    let t = std::time::Instant::now();
    let stats = stowage::app::layer::analyze_layer(file).expect("analyze");
    let secs = t.elapsed().as_secs_f64();
    println!("{stats:?}");
    println!(
        "{:.2}s: {:.0} MB/s compressed, {:.0} MB/s uncompressed",
        secs,
        stats.archive_size as f64 / secs / 1e6,
        stats.tar_size as f64 / secs / 1e6
    );
}
