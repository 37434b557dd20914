//! The TraceLab reader on the 19 real example rows, malformed lines, gzip.
//!
//! Expected values were computed independently of kvpark, once, by a short
//! Python script that follows DESIGN §6 literally: `json.loads` each line,
//! group by (provider, session_id), sort by (round_index, first event time,
//! line), parse timestamps with `datetime.fromisoformat` to milliseconds,
//! gap = first event − previous row's max(event/tool time) for user steps and
//! max(result_at − emitted_at) of the leading tool_result calls seen in earlier
//! rows for tool steps, fresh = min(max(max(0, L − L_prev) − out_prev, 0), append),
//! span = max(output event) − max(input event ≤ min(output event)).
//! The sweep sums (ΣL = 472416, Σfresh = 8809, Σspan = 139078 ms) and the
//! τ = 10 s figures come from the same script.

use std::io::Write;
use std::path::Path;

use kvpark::sim::stats::TraceStats;
use kvpark::sim::trace::{read_all, read_bytes, Trigger};

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/tracelab-example.jsonl"
);

/// (provider, round, trigger, counted, gap ms, L, fresh, cacheable, span ms)
#[allow(clippy::type_complexity)]
const EXPECTED: [(&str, i64, Trigger, bool, Option<i64>, u64, u64, u64, i64); 19] = [
    (
        "claude",
        0,
        Trigger::User,
        false,
        None,
        32272,
        5055,
        27217,
        11496,
    ),
    (
        "claude",
        1,
        Trigger::Tool,
        true,
        Some(19291),
        35740,
        2537,
        33203,
        13924,
    ),
    (
        "claude",
        2,
        Trigger::Tool,
        true,
        Some(12688),
        38592,
        1836,
        36756,
        26465,
    ),
    (
        "claude",
        3,
        Trigger::Tool,
        true,
        Some(21467),
        41131,
        64,
        41067,
        2681,
    ),
    (
        "claude",
        4,
        Trigger::Tool,
        true,
        Some(145),
        41589,
        341,
        41248,
        15112,
    ),
    (
        "claude",
        5,
        Trigger::User,
        true,
        Some(19913),
        42876,
        12,
        42864,
        3489,
    ),
    (
        "claude",
        6,
        Trigger::Tool,
        true,
        Some(16113),
        44901,
        1752,
        43149,
        3315,
    ),
    (
        "claude",
        7,
        Trigger::Tool,
        true,
        Some(2521),
        45279,
        146,
        45133,
        20299,
    ),
    (
        "claude",
        8,
        Trigger::Tool,
        true,
        Some(130),
        47508,
        67,
        47441,
        1619,
    ),
    (
        "claude",
        9,
        Trigger::Tool,
        true,
        Some(187),
        48305,
        707,
        47598,
        10829,
    ),
    (
        "codex",
        0,
        Trigger::User,
        false,
        None,
        9324,
        2412,
        6912,
        6200,
    ),
    (
        "codex",
        1,
        Trigger::Tool,
        true,
        Some(1176),
        9917,
        149,
        9768,
        1674,
    ),
    (
        "codex",
        2,
        Trigger::Tool,
        true,
        Some(5002),
        10058,
        47,
        10011,
        1246,
    ),
    (
        "codex",
        3,
        Trigger::Tool,
        true,
        Some(8),
        10152,
        35,
        10117,
        3852,
    ),
    (
        "codex",
        4,
        Trigger::Tool,
        true,
        Some(176),
        10472,
        87,
        10385,
        4703,
    ),
    (
        "codex",
        5,
        Trigger::User,
        true,
        Some(6333),
        10436,
        0,
        10436,
        3841,
    ),
    (
        "codex",
        6,
        Trigger::Tool,
        true,
        Some(62),
        11636,
        938,
        10698,
        3241,
    ),
    (
        "codex",
        7,
        Trigger::User,
        true,
        Some(18362),
        11727,
        0,
        11727,
        3940,
    ),
    (
        "codex",
        8,
        Trigger::Tool,
        true,
        Some(58),
        12097,
        91,
        12006,
        1152,
    ),
];

const MS: i64 = 1_000_000;

#[test]
fn example_rows_derive_exactly() {
    let (sessions, sum) = read_all(Path::new(EXAMPLE)).unwrap();
    assert_eq!(sum.rows, 19);
    assert_eq!(sum.bad_lines, 0);
    assert_eq!(sessions.len(), 2);
    let mut got = Vec::new();
    for s in &sessions {
        for st in &s.steps {
            got.push((s.provider.clone(), st.clone()));
        }
    }
    got.sort_by(|a, b| (a.0.as_str(), a.1.round_index).cmp(&(b.0.as_str(), b.1.round_index)));
    assert_eq!(got.len(), 19);
    for ((prov, st), e) in got.iter().zip(EXPECTED.iter()) {
        let what = format!("{prov} round {}", st.round_index);
        assert_eq!((prov.as_str(), st.round_index), (e.0, e.1), "{what}");
        assert_eq!(st.trigger, e.2, "{what} trigger");
        assert_eq!(st.counted, e.3, "{what} counted");
        assert_eq!(st.gap, e.4.map(|g| g * MS), "{what} gap");
        assert_eq!(st.l, e.5, "{what} L");
        if st.counted {
            assert_eq!(st.fresh, e.6, "{what} fresh");
            assert_eq!(st.cacheable, e.7, "{what} cacheable");
        }
        assert_eq!(st.gen_span, Some(e.8 * MS), "{what} span");
    }
}

#[test]
fn example_sweep_matches_independent_sums() {
    let (sessions, sum) = read_all(Path::new(EXAMPLE)).unwrap();
    let mut st = TraceStats::new(&[10_000 * MS, 60_000 * MS]);
    for s in &sessions {
        st.add(s, &sum.tools);
    }
    assert_eq!(st.counted, 17);
    assert_eq!(st.sum_l[0], 472_416);
    assert_eq!(st.sum_fresh, 8809);
    assert_eq!(st.sum_gen_ns, 139_078 * MS as i128);
    assert_eq!(st.sum_l[1], 65_039);
    let p10 = st.at(10_000 * MS).unwrap();
    assert_eq!(st.ttl[0].hit[0], 254_841);
    assert_eq!(st.ttl[0].kept_ns, 75_798 * MS as i128);
    assert!((p10.hit - 254_841.0 / 472_416.0).abs() < 1e-15);
    assert!((p10.amplification - 24.69917130207742).abs() < 1e-12);
    assert!((p10.storage_ratio - 0.5450035232028071).abs() < 1e-12);
    let p60 = st.at(60_000 * MS).unwrap();
    assert_eq!(st.ttl[1].hit[0], 463_607);
    assert_eq!(p60.amplification, 1.0);
    assert!((p60.storage_ratio - 123_632.0 / 139_078.0).abs() < 1e-15);
    assert!((p60.hit_user - 65_027.0 / 65_039.0).abs() < 1e-15);
}

#[test]
fn malformed_lines_are_counted_with_line_numbers() {
    // DESIGN §6 field rules: only a line that is not one JSON object is
    // malformed. A row without session_id stays (outside the session walk)
    // and a row with an unparsable timestamp stays with that time absent.
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut mixed = String::new();
    for (i, l) in lines.iter().enumerate() {
        mixed.push_str(l);
        mixed.push('\n');
        if i == 2 {
            mixed.push_str("{not json\n"); // line 4
        }
        if i == 10 {
            mixed.push_str("{\"provider\":\"x\"}\n"); // line 13: no session_id, a loose row
            mixed.push_str(&l.replace("2026-03-21T10:06", "2026-03-21X10:06")); // line 14: bad time
            mixed.push('\n');
        }
    }
    mixed.push_str("[1,2,3]"); // line 23, no trailing newline
    let mut seen = 0;
    let mut loose = 0;
    let sum = read_bytes(mixed.as_bytes(), |s, _| {
        seen += s.steps.len();
        loose += s.loose as usize;
        Ok(())
    })
    .unwrap();
    assert_eq!(sum.rows, 21);
    assert_eq!(seen, 21);
    assert_eq!((sum.loose_rows, loose), (1, 1));
    assert_eq!(sum.bad_lines, 2);
    let at: Vec<u64> = sum.bad.iter().map(|b| b.line).collect();
    assert_eq!(at, vec![4, 23]);
    assert!(sum.bad[0].reason.contains("JSON"), "{}", sum.bad[0].reason);
    assert!(
        sum.bad[1].reason.contains("not a JSON object"),
        "{}",
        sum.bad[1].reason
    );
}

#[test]
fn gzip_reads_the_same_and_sessions_stream() {
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("t.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    enc.write_all(&std::fs::read(EXAMPLE).unwrap()).unwrap();
    enc.finish().unwrap();
    let (a, sa) = read_all(Path::new(EXAMPLE)).unwrap();
    let (b, sb) = read_all(&gz).unwrap();
    assert_eq!(sa.rows, sb.rows);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.steps, y.steps);
    }
    // the example is grouped by session: never more than one open at once
    assert_eq!(sb.max_open_sessions, 1);
}

#[test]
fn interleaved_sessions_are_grouped() {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // claude rows 0..10 and codex rows 10..19 interleaved, and reversed
    let mut mixed = Vec::new();
    for i in 0..10 {
        mixed.push(lines[9 - i]);
        if i < 9 {
            mixed.push(lines[18 - i]);
        }
    }
    let data = mixed.join("\n");
    let mut got = Vec::new();
    let sum = read_bytes(data.as_bytes(), |s, _| {
        got.push(s);
        Ok(())
    })
    .unwrap();
    assert_eq!(sum.max_open_sessions, 2);
    let (want, _) = read_all(Path::new(EXAMPLE)).unwrap();
    got.sort_by(|a, b| a.provider.cmp(&b.provider));
    // tool-name ids are interned in first-seen order, which the shuffle
    // changes; so do the file positions and the human_input_wait walk, which
    // goes in file order (DESIGN §6)
    let strip = |v: &[kvpark::sim::trace::Step]| {
        v.iter()
            .map(|s| {
                let mut s = s.clone();
                s.calls.iter_mut().for_each(|c| c.tool = 0);
                s.file_order = 0;
                s.human_waits.clear();
                s
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(got.len(), 2);
    for (x, y) in got.iter().zip(&want) {
        assert_eq!(strip(&x.steps), strip(&y.steps));
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let e = read_all(Path::new("/nonexistent/trace.jsonl")).unwrap_err();
    assert!(
        e.message().contains("/nonexistent/trace.jsonl"),
        "{}",
        e.message()
    );
}

#[test]
fn timestamps_outside_the_i64_nanosecond_range_are_absent() {
    use kvpark::sim::trace::parse_ts;
    // the first and last instants an i64 of nanoseconds holds
    assert_eq!(parse_ts("2262-04-11T23:47:16.854775807Z"), Some(i64::MAX));
    assert_eq!(parse_ts("1677-09-21T00:12:43.145224192Z"), Some(i64::MIN));
    for s in [
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59.999999999999999999Z",
        "2300-01-01T00:00:00Z",
        "2262-04-11T23:47:16.854775808Z",
        "2262-04-11T23:47:16.999999999999999999999999Z",
        "2262-04-11T23:47:16.854775807-00:01",
        "1677-09-21T00:12:43.145224191Z",
        "1677-09-21T00:12:43Z",
        "0000-01-01T00:00:00Z",
    ] {
        assert_eq!(parse_ts(s), None, "{s}");
    }
    // an offset can bring an instant back into range
    assert_eq!(
        parse_ts("2262-04-12T00:47:16.854775807+01:00"),
        Some(i64::MAX)
    );
    // a row with such a timestamp stays, with the time absent (DESIGN §6),
    // never a wrapped one
    let line = r#"{"provider":"p","session_id":"s","round_index":0,"prefix_tokens":1,"newly_append_tokens":1,"timing_events":[{"event_type":"user_message","timestamp":"9999-12-31T23:59:59Z"}]}"#;
    let mut steps = Vec::new();
    let sum = read_bytes(line.as_bytes(), |s, _| {
        steps.extend(s.steps);
        Ok(())
    })
    .unwrap();
    assert_eq!((sum.rows, sum.bad_lines), (1, 0));
    assert_eq!(steps[0].first_activity, None);
    assert_eq!(steps[0].last_activity, None);
}

#[test]
fn differences_beyond_the_i64_nanosecond_range_are_unknown() {
    // Both ends parse, but they lie 585 years apart: no span, duration or
    // gap fits in i64 nanoseconds, so each is unknown (never a wrapped value).
    const MIN: &str = "1677-09-21T00:12:43.145224192Z";
    const MAX: &str = "2262-04-11T23:47:16.854775807Z";
    let rows = [
        format!(
            r#"{{"provider":"p","session_id":"s","round_index":0,"prefix_tokens":9223372036854775807,"newly_append_tokens":9223372036854775807,"output_tokens":9223372036854775807,"timing_events":[{{"event_type":"user_message","timestamp":"{MIN}"}},{{"event_type":"tool_call","timestamp":"{MAX}","tool_call_id":"c1"}}],"tools":[{{"tool_name":"bash","tool_call_id":"c1","emitted_at":"{MIN}","result_at":"{MAX}"}}]}}"#
        ),
        format!(
            r#"{{"provider":"p","session_id":"s","round_index":1,"prefix_tokens":1,"newly_append_tokens":1,"timing_events":[{{"event_type":"user_message","timestamp":"{MAX}"}}]}}"#
        ),
        format!(
            r#"{{"provider":"p","session_id":"s","round_index":2,"prefix_tokens":1,"newly_append_tokens":1,"timing_events":[{{"event_type":"user_message","timestamp":"{MIN}"}}]}}"#
        ),
        format!(
            r#"{{"provider":"p","session_id":"s","round_index":3,"prefix_tokens":1,"newly_append_tokens":1,"timing_events":[{{"event_type":"user_message","timestamp":"{MAX}"}}]}}"#
        ),
    ];
    let data = rows.join("\n");
    let mut steps = Vec::new();
    let mut st = TraceStats::default();
    let sum = read_bytes(data.as_bytes(), |s, tools| {
        st.add(&s, tools);
        steps.extend(s.steps);
        Ok(())
    })
    .unwrap();
    assert_eq!((sum.rows, sum.bad_lines), (4, 0));
    assert_eq!(steps[0].gen_span, None, "span of 585 years");
    assert_eq!(steps[0].calls[0].dur, None, "tool duration of 585 years");
    assert_eq!(steps[0].l, u64::MAX - 1);
    // row 1 starts at MAX, when row 0's last activity (its tool result) ended
    assert_eq!(steps[1].gap, Some(0));
    // row 2 starts 585 years before row 1 ended: negative, not measurable
    assert_eq!(steps[2].gap, None);
    // row 3 starts 585 years after row 2: too long to measure
    assert_eq!(steps[3].gap, None);
    let (peak, _) = st.overlap();
    assert_eq!(peak, 1);
    let _ = st.sweep();
    // the replay script takes the same rows
    let (script, _) = kvpark::sim::engine::Script::from_bytes(data.as_bytes()).unwrap();
    assert_eq!(script.steps.len(), 4);
    assert_eq!(script.steps[0].kv_after, u32::MAX);
}
