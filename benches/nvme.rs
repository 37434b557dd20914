//! `cargo bench --features cli --bench nvme [-- --quick] [-- --dir PATH]`: NVMe store write
//! and read throughput against raw O_DIRECT I/O on the same file system, in
//! the same run. The scratch directory defaults to `$KVPARK_BENCH_DIR`, else
//! cargo's target tmpdir (on the disk holding the build).

use kvpark::benchkit;
use kvpark::tier::nvme::bench::bench_nvme;
use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("KVPARK_BENCH_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    println!("nvme bench in {} (quick: {quick})", dir.display());
    match bench_nvme(&dir, quick) {
        Ok((figs, spreads)) => {
            println!("{}", benchkit::header());
            for f in &figs {
                println!("{}", f.row());
            }
            println!("  medians of paired rounds; per-round range:");
            for s in &spreads {
                println!("  {}", s.line());
            }
        }
        Err(e) => {
            eprintln!("nvme bench failed: {e}");
            std::process::exit(1);
        }
    }
}
