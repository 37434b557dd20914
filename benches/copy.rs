//! `cargo bench --features cli --bench copy [-- --quick] [-- N ...]`: CPU gather / scatter
//! of scattered vLLM blocks into host-arena slots, each beside a contiguous
//! memcpy of the same bytes measured in the same run.

use kvpark::benchkit::header;
use kvpark::copy::bench::bench_copy;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![64, 1024];
    }
    println!("{}", header());
    for n in sizes {
        for f in bench_copy(n, quick) {
            println!("{}", f.row());
        }
    }
}
