//! The trace reader never holds an over-long line whole: a gzip that expands
//! to one line a few times `MAX_LINE_BYTES` is skipped and counted, the lines
//! around it are read, and the peak heap of the read stays far below the
//! line's length. A test binary of its own: the counting allocator measures
//! the whole process, so nothing else may run beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use kvpark::sim::trace::{read_file, MAX_LINE_BYTES};

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = NOW.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        NOW.fetch_sub(l.size(), Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                let now = NOW.fetch_add(new - l.size(), Relaxed) + new - l.size();
                PEAK.fetch_max(now, Relaxed);
            } else {
                NOW.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static A: Counting = Counting;

const ROW: &str = r#"{"provider":"p","session_id":"s","round_index":0,"prefix_tokens":10,"newly_append_tokens":5,"output_tokens":3,"timing_events":[{"event_type":"user_message","timestamp":"2026-01-01T00:00:00Z"},{"event_type":"text","timestamp":"2026-01-01T00:00:02Z"}]}"#;

#[test]
fn a_line_longer_than_the_cap_is_skipped_unread() {
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("long.jsonl.gz");
    let long = 3 * MAX_LINE_BYTES + 17;
    {
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        writeln!(enc, "{ROW}").unwrap();
        // A valid JSON row but for its length: read whole, it would parse.
        let head = r#"{"provider":"p","session_id":"s","round_index":1,"pad":""#;
        enc.write_all(head.as_bytes()).unwrap();
        let pad = vec![b'a'; 1 << 20];
        let mut left = long - head.len() - 2;
        while left > 0 {
            let n = left.min(pad.len());
            enc.write_all(&pad[..n]).unwrap();
            left -= n;
        }
        enc.write_all(b"\"}\n").unwrap();
        writeln!(
            enc,
            "{}",
            ROW.replace("\"round_index\":0", "\"round_index\":2")
        )
        .unwrap();
        enc.finish().unwrap();
    }
    assert!(
        std::fs::metadata(&gz).unwrap().len() < (1 << 20),
        "small gzip"
    );
    let base = NOW.load(Relaxed);
    PEAK.store(base, Relaxed);
    let mut rounds = Vec::new();
    let sum = read_file(&gz, |s, _| {
        rounds.extend(s.steps.iter().map(|st| st.round_index));
        Ok(())
    })
    .unwrap();
    let peak = PEAK.load(Relaxed) - base;
    assert_eq!(sum.rows, 2, "the rows around the long line are read");
    assert_eq!(rounds, vec![0, 2]);
    assert_eq!(sum.bad_lines, 1);
    assert_eq!(sum.long_lines, 1);
    assert_eq!(sum.bad[0].line, 2);
    assert!(
        sum.bad[0].reason.contains(&format!("{long} bytes"))
            && sum.bad[0].reason.contains("16 MiB"),
        "{}",
        sum.bad[0].reason
    );
    // At most one capped line plus the reader's buffers, never the line.
    assert!(
        peak < MAX_LINE_BYTES + (8 << 20),
        "peak heap {peak} bytes while reading a {long}-byte line"
    );
}
