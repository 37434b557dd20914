//! `kvpark trace predict` through `kvpark::sim::cli::run`, parsed as the
//! `kvpark` binary parses it, and the evaluation it prints on the TraceLab
//! example.

use kvpark::sim::predict_eval::{evaluate, Suspends};

#[path = "common/cli.rs"]
mod cli;
use cli::kvpark;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/tracelab-example.jsonl"
);

#[test]
fn predict_runs_with_and_without_hints_and_refuses_an_empty_trace() {
    kvpark(&["trace", "predict", EXAMPLE]).unwrap();
    kvpark(&["trace", "predict", EXAMPLE, "--no-hints"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, b"not json\n").unwrap();
    let e = kvpark(&["trace", "predict", empty.to_str().unwrap()]).unwrap_err();
    assert!(e.to_string().contains("no valid rows"), "{e}");
    assert!(kvpark(&["trace", "predict", "/nonexistent/trace.jsonl"]).is_err());
}

#[test]
fn every_suspend_of_the_example_is_scored_or_accounted_for() {
    let mut sus = Suspends::default();
    let mut steps = 0usize;
    let mut sessions = 0usize;
    let sum = kvpark::sim::trace::read_file(std::path::Path::new(EXAMPLE), |s, _| {
        if !s.loose && !s.steps.is_empty() {
            steps += s.steps.len();
            sessions += 1;
        }
        sus.push(&s);
        Ok(())
    })
    .unwrap();
    // one suspend between each two consecutive steps of a session
    assert_eq!(sus.len() as u64 + sus.skipped, (steps - sessions) as u64);
    for hints in [true, false] {
        let e = evaluate(&sus, &sum.tools, hints);
        let all = e.scores[2][2];
        assert_eq!(all.n + e.unscored, sus.len() as u64);
        assert_eq!(e.scores[2][0].n + e.scores[2][1].n + e.other, all.n);
        assert!(all.n > 0);
        // shares are shares, and p10 ≤ p50 ≤ p90 holds for the counts
        for p in 0..3 {
            let b = e.scores[p][2].below;
            assert!(b[0] <= b[1] && b[1] <= b[2] && b[2] <= all.n, "{b:?}");
        }
        assert_eq!(e.tracked_at_end, 0);
        assert!(e.render("example").contains("| all | kvpark |"));
    }
}
