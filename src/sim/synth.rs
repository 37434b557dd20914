//! The calibrated synthetic generator (`kvpark trace synth`): TraceLab JSONL
//! whose distributions match the published TraceLab figures (DESIGN §1).
//!
//! Model, per session (each session draws from its own stream
//! `Rng::fork(seed, index)`, so the output is a pure function of
//! `(sessions, seed)`; rows are written session after session):
//! - provider: Claude-like with p = 0.63, else Codex-like; 55% of the
//!   Claude-like sessions run a 1M-token window (contexts up to ≈ 960k);
//! - start: a day in `[0, sessions / 36)` (the study's 4,265 sessions over
//!   about four months), an hour drawn from a daily rhythm (quiet nights,
//!   busy afternoons UTC), uniform within the hour;
//! - requests R: 1 with p = 0.5, else 1 + ⌊LogNormal(4.2, σ 1.69)⌋
//!   (mean ≈ 9.3, p90 18, p99 ≈ 137);
//! - tool-initiated steps per request T: 0 (p 0.31), 1 (p 0.23), else
//!   1 + ⌊LogNormal(m, σ 1.15)⌋ with m = 4.2 (Claude) or 14.5 (Codex): Codex
//!   runs the longer agent loops, so ≈ 37% / 63% of the steps come from 63% /
//!   37% of the sessions (study: ≈140k / ≈217k steps); together mean ≈ 7.8,
//!   p50 1, p90 ≈ 19;
//! - tool calls per tool-emitting step: 1 + Poisson(0.2);
//! - tools: per-provider mixes (Claude: Bash, Read, Edit, ...; Codex:
//!   exec_command, apply_patch, write_stdin, ...), each a fast log-normal
//!   mode plus, for shells and subagents, a slow mode (builds, tests) whose
//!   probability grows with the context up to 1.4 × 130k (long sessions run
//!   the long jobs); together p50 ≈ 0.22 s, p90 ≈ 13 s, p99 ≈ 3.3 min,
//!   ≈ 3.5% over 1 min;
//! - human wait before a user message: LogNormal(76 s, σ 1.75) with p = 0.955,
//!   else LogNormal(7.5 h, σ 0.8) (overnight): p50 ≈ 84 s, p90 ≈ 20 min,
//!   p99 ≈ 14 h;
//! - generation span LogNormal(5.3 s, σ 1.0), or with p = 0.05 LogNormal(70 s,
//!   σ 0.6) (long generations): p50 ≈ 5.7 s, p90 ≈ 22–26 s;
//! - tokens: 50% of the Claude-like and 20% of the Codex-like sessions
//!   continue earlier work with a long context (system prompt +
//!   LogNormal(110k, σ 0.45)); the context grows by the previous output
//!   (LogNormal(214, σ 1.2)) plus new input (tool results LogNormal(380,
//!   σ 1.45) × √calls, user messages LogNormal(300, σ 1.5)); a context past
//!   the window's cap (Claude 190k or 960k, Codex 250k, near its 258k window)
//!   is compacted to the system prompt plus a summary of ≈ 6k tokens
//!   (≈ 12% of the sessions);
//! - the provider's prompt cache: prefix = previous context (Claude: less
//!   0–2 tokens; Codex: rounded down to 128) unless the cache lost the
//!   session, which happens when the gap before the step (the human wait, or
//!   the longest tool call the step waited for) exceeds the session's cache
//!   retention (Claude: 5 min or 1 h, even odds; Codex: LogNormal(15 min,
//!   σ 1.0) within 5 min..2 h), or otherwise with p = 0.009 (a replica
//!   without the prefix); then only the shared system prompt is still cached
//!   (p 0.7) or nothing. Real hit ≈ 84% on user steps and ≈ 97.6% on tool
//!   steps, observed amplification ≈ 5.7 (study: 84%, 97.5%, 5.3).

use std::io::Write;

use super::rng::Rng;
use super::trace::{fmt_ts, TimeNs};
use crate::error::{Result, ResultExt};

/// Generator settings.
#[derive(Clone, Copy, Debug)]
pub struct SynthConfig {
    /// Number of sessions.
    pub sessions: u64,
    /// Seed.
    pub seed: u64,
    /// Session starts per day (sets the trace's span and the overlap).
    pub sessions_per_day: f64,
    /// Every human wait is multiplied by this (1: calibrated; a shifted
    /// workload for robustness checks, e.g. 3 = humans three times slower).
    pub human_scale: f64,
    /// Every tool call's latency is multiplied by this (1: calibrated).
    pub tool_scale: f64,
}

impl SynthConfig {
    /// `sessions` sessions from `seed`, [`SESSIONS_PER_DAY`] a day.
    pub fn new(sessions: u64, seed: u64) -> Self {
        SynthConfig {
            sessions,
            seed,
            sessions_per_day: SESSIONS_PER_DAY,
            human_scale: 1.0,
            tool_scale: 1.0,
        }
    }
}

/// Session starts per day: the study's 4,265 sessions over about four
/// months (its example rows lie in March and June 2026).
pub const SESSIONS_PER_DAY: f64 = 36.0;

/// What was written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynthSummary {
    /// Sessions.
    pub sessions: u64,
    /// Rows (steps).
    pub steps: u64,
}

/// 2026-03-02T00:00:00Z.
const EPOCH: TimeNs = 1_772_409_600 * 1_000_000_000;

/// Relative session-start intensity per UTC hour.
const DAY: [f64; 24] = [
    0.25, 0.2, 0.15, 0.12, 0.12, 0.15, 0.25, 0.4, 0.6, 0.8, 0.9, 0.95, 0.9, 1.0, 1.0, 1.0, 0.95,
    0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3,
];

/// Probability that the provider's cache misses a step whose gap it would
/// have kept (routing to a replica without the prefix, early eviction).
const P_MISS: f64 = 0.009;

struct Tool {
    name: &'static str,
    share: f64,
    /// fast mode: median (s), log-σ
    fast: (f64, f64),
    /// probability of the slow mode (builds, tests, subagents)
    p_slow: f64,
    /// slow mode: median (s), log-σ
    slow: (f64, f64),
}

const fn tool(
    name: &'static str,
    share: f64,
    fast: (f64, f64),
    p_slow: f64,
    slow: (f64, f64),
) -> Tool {
    Tool {
        name,
        share,
        fast,
        p_slow,
        slow,
    }
}

const CLAUDE_TOOLS: [Tool; 8] = [
    tool("Bash", 0.48, (0.2, 1.2), 0.2, (11.0, 1.8)),
    tool("Read", 0.30, (0.12, 0.9), 0.0, (1.0, 1.0)),
    tool("Edit", 0.09, (0.15, 0.9), 0.0, (1.0, 1.0)),
    tool("Grep", 0.04, (0.3, 1.0), 0.0, (1.0, 1.0)),
    tool("Write", 0.03, (0.12, 0.9), 0.0, (1.0, 1.0)),
    tool("WebSearch", 0.02, (12.0, 0.6), 0.0, (1.0, 1.0)),
    tool("WebFetch", 0.01, (5.0, 1.0), 0.0, (1.0, 1.0)),
    tool("Task", 0.03, (1.0, 1.0), 1.0, (80.0, 0.9)),
];

const CODEX_TOOLS: [Tool; 4] = [
    tool("exec_command", 0.90, (0.14, 1.3), 0.16, (9.0, 1.8)),
    tool("apply_patch", 0.05, (0.1, 0.8), 0.0, (1.0, 1.0)),
    tool("write_stdin", 0.04, (5.0, 1.6), 0.0, (1.0, 1.0)),
    tool("update_plan", 0.01, (0.01, 0.5), 0.0, (1.0, 1.0)),
];

fn secs(x: f64) -> TimeNs {
    // millisecond resolution, like the real trace
    ((x * 1e3).round() as TimeNs) * 1_000_000
}

fn poisson(r: &mut Rng, lambda: f64) -> u32 {
    let l = (-lambda).exp();
    let (mut k, mut p) = (0, 1.0);
    loop {
        p *= r.f64();
        if p <= l {
            return k;
        }
        k += 1;
    }
}

struct Ev {
    kind: &'static str,
    t: TimeNs,
    call: Option<usize>,
}

struct PendingCall {
    id: String,
    tool: &'static str,
    emitted: TimeNs,
    result: TimeNs,
}

/// Writes one session's rows to `out`; returns the number of rows.
fn session(cfg: &SynthConfig, index: u64, out: &mut String) -> u64 {
    let mut r = Rng::fork(cfg.seed, index);
    let claude = r.chance(0.63);
    // 55% of the Claude-like sessions run a 1M-token context window
    let big_window = claude && r.chance(0.55);
    let days = (cfg.sessions as f64 / cfg.sessions_per_day).ceil().max(1.0) as u64;
    let day = r.below(days) as TimeNs;
    let hour = r.pick(&DAY) as TimeNs;
    let mut t: TimeNs =
        EPOCH + day * 86_400 * 1_000_000_000 + hour * 3_600_000_000_000 + secs(r.f64() * 3600.0);
    let provider = if claude { "claude" } else { "codex" };
    let sid = format!(
        "{provider}:{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        r.next_u64() as u32,
        r.next_u64() as u16,
        r.next_u64() as u16,
        r.next_u64() as u16,
        r.next_u64() & 0xffff_ffff_ffff
    );
    let project = format!("project_{:08x}", r.next_u64() as u32);
    let model = match (claude, big_window) {
        (true, true) => "claude-opus-4-8[1m]",
        (true, false) => "claude-opus-4-8",
        _ => "gpt-5.4",
    };
    let tools: &[Tool] = if claude { &CLAUDE_TOOLS } else { &CODEX_TOOLS };
    let shares: Vec<f64> = tools.iter().map(|x| x.share).collect();
    let cap: u64 = match (claude, big_window) {
        (true, true) => 960_000,
        (true, false) => 190_000,
        _ => 250_000,
    };
    // Codex-like sessions run longer agent loops (the study: ≈217k of its
    // 357k steps from 37% of the sessions)
    let tool_tail = if claude { 4.2 } else { 14.5 };
    // how long the provider's prompt cache keeps this session's prefix
    // (Claude: 5 min or 1 h caching; Codex: minutes to an hour)
    let keep: TimeNs = if claude {
        if r.chance(0.5) {
            secs(300.0)
        } else {
            secs(3600.0)
        }
    } else {
        secs(r.lognormal(900.0, 1.0).clamp(300.0, 7200.0))
    };

    let requests: u64 = if r.chance(0.5) {
        1
    } else {
        (1.0 + r.lognormal(4.2, 1.69).floor()).min(3000.0) as u64
    };
    let mut sys = r.lognormal(if claude { 22_000.0 } else { 7_000.0 }, 0.25) as u64;
    sys = sys.max(1000);
    // a quarter of the sessions continue earlier work with a long context
    let start_ctx = if r.chance(if claude { 0.5 } else { 0.2 }) {
        sys + r.lognormal(110_000.0, 0.45).min(160_000.0) as u64
    } else {
        sys
    };
    let mut ctx: u64 = start_ctx; // tokens in the context before the next step's new input
    let mut prev_out: u64 = 0;
    let mut round = 0u64;
    let mut pending: Vec<PendingCall> = Vec::new();
    let mut last_activity: TimeNs = t;
    let mut rows = 0;
    let mut call_seq = 0u64;
    let mut ts_buf = String::with_capacity(32);

    for req in 0..requests {
        let tool_steps: u64 = {
            let u = r.f64();
            if u < 0.31 {
                0
            } else if u < 0.54 {
                1
            } else {
                (1.0 + r.lognormal(tool_tail, 1.15).floor()).min(1500.0) as u64
            }
        };
        for k in 0..=tool_steps {
            let user = k == 0;
            let mut events: Vec<Ev> = Vec::with_capacity(8);
            let calls_in = std::mem::take(&mut pending);
            let req_at: TimeNs;
            // the gap before this step, as the provider's cache sees it
            let mut gap: TimeNs = 0;
            if user {
                if req > 0 || round > 0 {
                    let w = if r.chance(0.955) {
                        r.lognormal(76.0, 1.75)
                    } else {
                        r.lognormal(7.5 * 3600.0, 0.8)
                    } * cfg.human_scale;
                    t = last_activity + secs(w.max(0.5));
                    gap = t - last_activity;
                }
                events.push(Ev {
                    kind: "user_message",
                    t,
                    call: None,
                });
                req_at = t;
            } else {
                let mut order: Vec<usize> = (0..calls_in.len()).collect();
                order.sort_by_key(|&i| (calls_in[i].result, i));
                for &i in &order {
                    events.push(Ev {
                        kind: "tool_result",
                        t: calls_in[i].result,
                        call: Some(i),
                    });
                }
                req_at = calls_in.iter().map(|c| c.result).max().unwrap_or(t);
                gap = calls_in
                    .iter()
                    .map(|c| c.result - c.emitted)
                    .max()
                    .unwrap_or(0);
            }
            // tokens
            let new_in = if user {
                r.lognormal(300.0, 1.5)
            } else {
                r.lognormal(380.0, 1.45) * (calls_in.len().max(1) as f64).sqrt()
            }
            .min(120_000.0) as u64
                + 1;
            let mut prefix = ctx + prev_out;
            let mut append;
            if prefix + new_in > cap && round > 0 {
                // compaction: the context restarts from the system prompt and a summary
                let summary = r.lognormal(6_000.0, 0.4) as u64 + 500;
                prefix = sys;
                append = summary + new_in;
            } else {
                append = new_in + prev_out;
                prefix = ctx;
                if gap > keep || r.chance(P_MISS) {
                    // the provider's cache lost the session (evicted after an
                    // idle gap, or served by a replica without it): only the
                    // shared system prompt may still be cached
                    let full = prefix + append;
                    prefix = if r.chance(0.7) { sys.min(prefix) } else { 0 };
                    append = full - prefix;
                }
                if claude {
                    // the provider's cache boundary trails the last message a little
                    let lag = r.below(3).min(prefix);
                    prefix -= lag;
                    append += lag;
                } else {
                    let full = prefix + append;
                    prefix = (prefix / 128) * 128;
                    append = full - prefix;
                }
            }
            if round == 0 {
                prefix = start_ctx;
                append = new_in;
            }
            let output = (r.lognormal(214.0, 1.2) as u64).clamp(1, 32_000);
            let l = prefix + append;
            // timing
            let span = if r.chance(0.05) {
                r.lognormal(70.0, 0.6)
            } else {
                r.lognormal(5.3, 1.0)
            };
            let span = secs(span.clamp(0.2, 1800.0));
            let ttft = secs(r.lognormal(1.2, 0.7).clamp(0.05, 30.0)).min(span);
            let first_out = req_at + ttft;
            let last_out = req_at + span;
            events.push(Ev {
                kind: "reasoning",
                t: first_out,
                call: None,
            });
            let emits = k < tool_steps;
            let n_calls = if emits {
                1 + poisson(&mut r, 0.2) as usize
            } else {
                0
            };
            if n_calls == 0 || r.chance(0.6) {
                let tt = if n_calls == 0 {
                    last_out
                } else {
                    first_out + (last_out - first_out) / 2
                };
                events.push(Ev {
                    kind: "text",
                    t: tt,
                    call: None,
                });
            }
            let mut new_calls = Vec::with_capacity(n_calls);
            for c in 0..n_calls {
                let emitted = last_out - secs(0.05 * (n_calls - 1 - c) as f64);
                let tool = &tools[r.pick(&shares)];
                // long builds and test runs come with long contexts
                let rel = (l as f64 / 130_000.0).min(1.4);
                let p_slow = (tool.p_slow * (0.1 + 1.1 * rel * rel * rel)).min(1.0);
                let (m, sg) = if r.chance(p_slow) {
                    tool.slow
                } else {
                    tool.fast
                };
                let lat = (r.lognormal(m, sg) * cfg.tool_scale).clamp(0.002, 6.0 * 3600.0);
                call_seq += 1;
                let id = if claude {
                    format!(
                        "toolu_{:022x}",
                        (r.next_u64() as u128) << 24 | call_seq as u128
                    )
                } else {
                    format!("call_{:016x}{:08x}", r.next_u64(), call_seq)
                };
                new_calls.push(PendingCall {
                    id,
                    tool: tool.name,
                    emitted: emitted.max(first_out),
                    result: emitted.max(first_out) + secs(lat).max(1_000_000),
                });
                events.push(Ev {
                    kind: "tool_call",
                    t: emitted.max(first_out),
                    call: Some(new_calls.len() - 1),
                });
            }
            // ---- write the row
            let round_id = format!("msg_{:024x}", (r.next_u64() as u128) << 32 | round as u128);
            out.push_str("{\"provider\":\"");
            out.push_str(provider);
            out.push_str("\",\"project\":\"");
            out.push_str(&project);
            out.push_str("\",\"session_id\":\"");
            out.push_str(&sid);
            out.push_str("\",\"round_index\":");
            push_u(out, round);
            out.push_str(",\"round_id\":\"");
            out.push_str(&round_id);
            out.push_str("\",\"model\":\"");
            out.push_str(model);
            out.push_str("\",\"input_tokens_total\":");
            push_u(out, l);
            out.push_str(",\"prefix_tokens\":");
            push_u(out, prefix);
            out.push_str(",\"newly_append_tokens\":");
            push_u(out, append);
            out.push_str(",\"output_tokens\":");
            push_u(out, output);
            out.push_str(",\"timing_events\":[");
            for (i, e) in events.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str("{\"event_type\":\"");
                out.push_str(e.kind);
                out.push_str("\",\"timestamp\":\"");
                ts_buf.clear();
                fmt_ts(e.t, &mut ts_buf);
                out.push_str(&ts_buf);
                out.push('"');
                match (e.kind, e.call) {
                    ("tool_result", Some(c)) => {
                        out.push_str(",\"tool_call_id\":\"");
                        out.push_str(&calls_in[c].id);
                        out.push('"');
                    }
                    ("tool_call", Some(c)) => {
                        out.push_str(",\"tool_call_id\":\"");
                        out.push_str(&new_calls[c].id);
                        out.push_str("\",\"tool_name\":\"");
                        out.push_str(new_calls[c].tool);
                        out.push('"');
                    }
                    _ => {}
                }
                out.push('}');
            }
            out.push_str("],\"tools\":[");
            for (i, c) in new_calls.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str("{\"tool_index\":");
                push_u(out, i as u64);
                out.push_str(",\"tool_name\":\"");
                out.push_str(c.tool);
                out.push_str("\",\"tool_call_id\":\"");
                out.push_str(&c.id);
                out.push_str("\",\"emitted_at\":\"");
                ts_buf.clear();
                fmt_ts(c.emitted, &mut ts_buf);
                out.push_str(&ts_buf);
                out.push_str("\",\"result_at\":\"");
                ts_buf.clear();
                fmt_ts(c.result, &mut ts_buf);
                out.push_str(&ts_buf);
                out.push_str("\",\"tool_wall_latency_ms\":");
                push_u(out, ((c.result - c.emitted) / 1_000_000) as u64);
                out.push('}');
            }
            out.push_str("],\"first_input_event_type\":\"");
            out.push_str(if user { "user_message" } else { "tool_result" });
            out.push_str("\"}\n");
            rows += 1;
            // ---- advance
            last_activity = new_calls
                .iter()
                .map(|c| c.result)
                .max()
                .unwrap_or(last_out)
                .max(last_out);
            t = last_out;
            ctx = l;
            prev_out = output;
            round += 1;
            pending = new_calls;
        }
    }
    rows
}

fn push_u(out: &mut String, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &c in &tmp[i..] {
        out.push(c as char);
    }
}

/// Writes the trace to `out`.
pub fn write_trace(cfg: &SynthConfig, mut out: impl Write) -> Result<SynthSummary> {
    let mut buf = String::with_capacity(1 << 20);
    let mut sum = SynthSummary::default();
    for i in 0..cfg.sessions {
        sum.steps += session(cfg, i, &mut buf);
        sum.sessions += 1;
        if buf.len() > (1 << 20) {
            out.write_all(buf.as_bytes()).ctx("write trace")?;
            buf.clear();
        }
    }
    out.write_all(buf.as_bytes()).ctx("write trace")?;
    out.flush().ctx("write trace")?;
    Ok(sum)
}

/// The trace in memory.
pub fn generate(cfg: &SynthConfig) -> (Vec<u8>, SynthSummary) {
    let mut v = Vec::new();
    let sum = write_trace(cfg, &mut v).expect("writing to memory cannot fail");
    (v, sum)
}
