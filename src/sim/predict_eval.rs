//! `kvpark trace predict`: replays a trace's suspends in time order through
//! the gap predictors online and scores them.
//!
//! A *suspend* is the end of step k of a session that has a step k + 1: at
//! the step's last activity (wall clock, UTC) each predictor predicts the
//! coming gap — the §6 gap before step k + 1 (the longest pending tool call,
//! or the human wait), else the wall time between the two steps — and learns
//! it once it has elapsed (at suspend + gap, or at the next suspend if that
//! is earlier). A session ends (its state is freed) after its last gap.
//! Suspends whose time or gap is unknown are skipped and counted.
//!
//! What a predictor is told: the session, the names of the tool calls the
//! step emitted, whether it emitted any, the wall clock; and, with hints (the
//! default, as `kvpark replay` gives them), the awaiting kind from the next
//! step's trigger. Without hints (`--no-hints`) the kind is inferred from the
//! tool calls. Scores are per true kind (next step's trigger): the share of
//! gaps at or below the predicted p10/p50/p90 (ideal 0.10/0.50/0.90) and the
//! mean pinball loss at p10/p50/p90 in log10 seconds (gaps under 1 ms read as
//! 1 ms). A suspend is scored when every predictor has a prediction.

use crate::predict::{log10_s, pinball, GapContext, GapPredictor, GlobalHist, Kind, Learned};
use crate::session::{Awaiting, Hint, Nanos};

use super::trace::{Session, TimeNs, ToolNames, Trigger};

/// One suspend, compact.
#[derive(Clone, Debug)]
struct Suspend {
    session: u64,
    at: TimeNs,
    observe_at: TimeNs,
    gap: Nanos,
    /// 0 tool, 1 human, 2 other (the next step's trigger).
    truth: u8,
    tools: Vec<u32>,
}

/// The suspends of a trace, gathered session by session.
#[derive(Clone, Debug, Default)]
pub struct Suspends {
    list: Vec<Suspend>,
    /// (time, session) of each session's end.
    ends: Vec<(TimeNs, u64)>,
    sessions: u64,
    /// Suspends skipped: time or gap unknown.
    pub skipped: u64,
}

impl Suspends {
    /// Adds a session's suspends.
    pub fn push(&mut self, s: &Session) {
        if s.loose || s.steps.len() < 2 {
            return;
        }
        let id = self.sessions;
        self.sessions += 1;
        let mut last = None;
        for pair in s.steps.windows(2) {
            let (cur, next) = (&pair[0], &pair[1]);
            let wall = match (next.first_activity, cur.last_activity) {
                (Some(a), Some(b)) => a.checked_sub(b).filter(|&d| d >= 0),
                _ => None,
            };
            let gap = next.gap.filter(|&g| g >= 0).or(wall);
            let (Some(at), Some(gap)) = (cur.last_activity, gap) else {
                self.skipped += 1;
                continue;
            };
            let mut observe_at = at.saturating_add(gap);
            // learned before the session's next suspend, whatever the gap says
            if let Some(n) = next.last_activity {
                observe_at = observe_at.min(n.max(at));
            }
            last = Some(last.map_or(observe_at, |l: TimeNs| l.max(observe_at)));
            self.list.push(Suspend {
                session: id,
                at,
                observe_at,
                gap: gap as Nanos,
                truth: match next.trigger {
                    Trigger::Tool => 0,
                    Trigger::User => 1,
                    Trigger::Other => 2,
                },
                tools: cur.calls.iter().map(|c| c.tool).collect(),
            });
        }
        if let Some(t) = last {
            self.ends.push((t, id));
        }
    }

    /// Suspends gathered (scored or not yet).
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// No suspends.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// Scores of one predictor on one kind of gap.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    /// Gaps scored.
    pub n: u64,
    /// Gaps at or below the predicted p10, p50, p90.
    pub below: [u64; 3],
    /// Summed pinball loss at p10, p50, p90 (log10 s).
    pub pinball: [f64; 3],
}

impl Score {
    /// Share of gaps at or below the predicted p10/p50/p90.
    pub fn calibration(&self) -> [f64; 3] {
        self.below.map(|b| b as f64 / (self.n.max(1)) as f64)
    }
    /// Mean pinball loss at p10/p50/p90 (log10 s).
    pub fn mean_pinball(&self) -> [f64; 3] {
        self.pinball.map(|l| l / (self.n.max(1)) as f64)
    }
    /// Mean over the three probabilities of [`Score::mean_pinball`].
    pub fn pinball_avg(&self) -> f64 {
        self.mean_pinball().iter().sum::<f64>() / 3.0
    }
}

/// Predictors compared, in table order.
pub const PREDICTORS: [&str; 3] = ["global", "kind-hist", "kvpark"];
/// Kinds reported, in table order (index 2 counts every gap).
pub const KINDS: [&str; 3] = ["tool", "human", "all"];
const PS: [f64; 3] = [0.1, 0.5, 0.9];

/// The outcome of [`evaluate`].
#[derive(Clone, Debug, Default)]
pub struct Eval {
    /// `scores[predictor][kind]`, in [`PREDICTORS`] × [`KINDS`] order.
    pub scores: [[Score; 3]; 3],
    /// Scored gaps whose next step was neither tool- nor user-initiated.
    pub other: u64,
    /// Suspends not scored because a predictor had nothing yet.
    pub unscored: u64,
    /// Skipped suspends (time or gap unknown).
    pub skipped: u64,
    /// Whether the awaiting kind came from hints.
    pub hints: bool,
    /// Most sessions the learned predictor held at once.
    pub max_tracked: usize,
    /// Sessions it held at the end (0: every end freed its state).
    pub tracked_at_end: usize,
    /// Whether the learned predictor ended up shifting by the session's own
    /// gaps, for tool and for human gaps.
    pub session_shift: [bool; 2],
}

/// Replays `sus` in time order through the predictors (see the module
/// docs); `hints`: the awaiting kind comes from the trace.
pub fn evaluate(sus: &Suspends, tools: &ToolNames, hints: bool) -> Eval {
    // (time, class, index); at one instant: gaps that ended (0), then
    // predictions (2), then a gap of length 0 (3: after its own
    // prediction), then session ends (4: after their last gap)
    let mut ev: Vec<(TimeNs, u8, usize)> = Vec::with_capacity(sus.list.len() * 2 + sus.ends.len());
    for (i, s) in sus.list.iter().enumerate() {
        ev.push((s.at, 2, i));
        ev.push((s.observe_at, if s.observe_at > s.at { 0 } else { 3 }, i));
    }
    for (i, e) in sus.ends.iter().enumerate() {
        ev.push((e.0, 4, i));
    }
    ev.sort_unstable();
    let (mut global, mut by_kind, mut learned) =
        (GlobalHist::new(), GlobalHist::by_kind(), Learned::default());
    let mut out = Eval {
        skipped: sus.skipped,
        hints,
        ..Eval::default()
    };
    let no_hint = Hint::default();
    let mut names: Vec<&str> = Vec::new();
    for &(_, class, i) in &ev {
        let mut preds: [&mut dyn GapPredictor; 3] = [&mut global, &mut by_kind, &mut learned];
        if class == 4 {
            for p in preds.iter_mut() {
                p.end(sus.ends[i].1);
            }
            continue;
        }
        let s = &sus.list[i];
        names.clear();
        names.extend(s.tools.iter().map(|&t| tools.name(t)));
        let hint = if hints {
            Hint {
                awaiting: match s.truth {
                    0 => Awaiting::Tool,
                    1 => Awaiting::User,
                    _ => Awaiting::Unknown,
                },
                tool: None,
            }
        } else {
            no_hint.clone()
        };
        let ctx = GapContext {
            session: s.session,
            hint: &hint,
            tools: &names,
            ended_with_tool_calls: (!hints).then_some(!s.tools.is_empty()),
            now: 0,
            wall_ns: Some(s.at),
        };
        if class != 2 {
            for p in preds.iter_mut() {
                p.observe(&ctx, s.gap);
            }
            out.max_tracked = out.max_tracked.max(preds[2].tracked_sessions());
            continue;
        }
        let dists: Vec<_> = preds.iter().map(|p| p.predict(&ctx)).collect();
        if dists.iter().any(|d| d.is_none()) {
            out.unscored += 1;
            continue;
        }
        let y = log10_s(s.gap);
        if s.truth == 2 {
            out.other += 1;
        }
        for (pi, d) in dists.iter().enumerate() {
            let d = d.as_ref().expect("checked above");
            let kinds: &[usize] = match s.truth {
                0 => &[0, 2],
                1 => &[1, 2],
                _ => &[2],
            };
            for &k in kinds {
                let sc = &mut out.scores[pi][k];
                sc.n += 1;
                for (j, &p) in PS.iter().enumerate() {
                    let q = d.quantile(p).expect("predictors give PROBS");
                    sc.below[j] += (s.gap <= q) as u64;
                    sc.pinball[j] += pinball(p, log10_s(q), y);
                }
            }
        }
    }
    out.tracked_at_end = learned.tracked_sessions();
    out.session_shift = [Kind::Tool, Kind::User].map(|k| learned.uses_session(k));
    out
}

impl Eval {
    /// The table `kvpark trace predict` prints.
    pub fn render(&self, label: &str) -> String {
        use std::fmt::Write;
        let all = &self.scores[0][2];
        let mut s = String::new();
        let _ = writeln!(
            s,
            "gap predictor on {label}: {} gaps scored (tool {}, human {}, other {}); {} not \
             scored (no prediction yet), {} skipped (time or gap unknown)",
            all.n,
            self.scores[0][0].n,
            self.scores[0][1].n,
            self.other,
            self.unscored,
            self.skipped
        );
        let _ = writeln!(
            s,
            "awaiting kind: {}; pinball loss in log10 seconds; ≤pX: share of gaps at or below \
             the predicted pX (ideal 0.10 / 0.50 / 0.90)\n",
            if self.hints {
                "from hints (the next step's trigger)"
            } else {
                "inferred (tool calls → tool)"
            }
        );
        let _ = writeln!(
            s,
            "| kind | predictor | gaps | ≤p10 | ≤p50 | ≤p90 | pinball p10 | pinball p50 | pinball p90 | pinball mean |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (k, kind) in KINDS.iter().enumerate() {
            for (p, name) in PREDICTORS.iter().enumerate() {
                let sc = &self.scores[p][k];
                let c = sc.calibration();
                let l = sc.mean_pinball();
                let _ = writeln!(
                    s,
                    "| {kind} | {name} | {} | {:.3} | {:.3} | {:.3} | {:.4} | {:.4} | {:.4} | {:.4} |",
                    sc.n,
                    c[0],
                    c[1],
                    c[2],
                    l[0],
                    l[1],
                    l[2],
                    sc.pinball_avg()
                );
            }
        }
        let _ = writeln!(s);
        let ratio = |k: usize, base: usize| {
            let b = self.scores[base][k].pinball_avg();
            if b > 0.0 {
                format!("{:.1}%", 100.0 * self.scores[2][k].pinball_avg() / b)
            } else {
                "-".into()
            }
        };
        let _ = writeln!(
            s,
            "kvpark mean pinball vs global: tool {}, human {}, all {}; vs kind-hist: tool {}, \
             human {}, all {}",
            ratio(0, 0),
            ratio(1, 0),
            ratio(2, 0),
            ratio(0, 1),
            ratio(1, 1),
            ratio(2, 1)
        );
        let _ = writeln!(
            s,
            "kvpark session state: at most {} sessions at once, {} left after the last end; \
             shifts by the session's own gaps: tool {}, human {}",
            self.max_tracked,
            self.tracked_at_end,
            yes_no(self.session_shift[0]),
            yes_no(self.session_shift[1])
        );
        s
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `kvpark trace predict FILE [--no-hints]`: reads, replays, prints.
pub fn run_file(path: &std::path::Path, hints: bool) -> crate::Result<()> {
    let mut sus = Suspends::default();
    let sum = super::trace::read_file(path, |s, _| {
        sus.push(&s);
        Ok(())
    })?;
    if sum.rows == 0 {
        return Err(super::trace::empty_trace(path, &sum));
    }
    if sum.long_lines > 0 {
        eprintln!(
            "{}",
            super::trace::long_lines_warning(&path.display(), &sum)
        );
    }
    if sum.bad_lines > 0 {
        eprintln!(
            "{}: {} malformed lines skipped",
            path.display(),
            sum.bad_lines
        );
    }
    let e = evaluate(&sus, &sum.tools, hints);
    print!("{}", e.render(&path.display().to_string()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::synth::{generate, SynthConfig};
    use crate::sim::trace::read_bytes;

    fn gather(sessions: u64, seed: u64) -> (Suspends, ToolNames, u64) {
        let (data, sum) = generate(&SynthConfig::new(sessions, seed));
        let mut sus = Suspends::default();
        let r = read_bytes(&data, |s, _| {
            sus.push(&s);
            Ok(())
        })
        .unwrap();
        (sus, r.tools, sum.steps)
    }

    /// A workload unlike the generator's: each human has their own pace
    /// (median 60 s times 10^N(0, 0.5)), suspends after 21:00 UTC end the
    /// day (8 h) half the time, and two tools differ by a factor 100.
    fn varied_workload() -> (Suspends, ToolNames) {
        let mut tools = ToolNames::default();
        let (a, b) = (tools.intern("A"), tools.intern("B"));
        let mut r = crate::sim::rng::Rng::new(77);
        let mut sus = Suspends::default();
        for id in 0..800u64 {
            let pace = 10f64.powf(0.5 * r.normal());
            let mut t: TimeNs = (r.below(30 * 24) as i64) * 3_600_000_000_000;
            let steps = 5 + r.below(60);
            for _ in 0..steps {
                let tool = r.chance(0.7);
                let hour = t.div_euclid(3_600_000_000_000).rem_euclid(24);
                let secs = if tool {
                    if r.chance(0.5) {
                        r.lognormal(0.2, 0.3)
                    } else {
                        r.lognormal(20.0, 0.5)
                    }
                } else if hour >= 21 && r.chance(0.5) {
                    r.lognormal(8.0 * 3600.0, 0.3)
                } else {
                    r.lognormal(60.0 * pace, 0.8)
                };
                let gap = (secs * 1e9) as Nanos;
                let called = if tool {
                    vec![if secs < 2.0 { a } else { b }]
                } else {
                    vec![]
                };
                sus.list.push(Suspend {
                    session: id,
                    at: t,
                    observe_at: t + gap as TimeNs,
                    gap,
                    truth: if tool { 0 } else { 1 },
                    tools: called,
                });
                t += gap as TimeNs + 5_000_000_000;
            }
            sus.ends.push((t, id));
            sus.sessions += 1;
        }
        (sus, tools)
    }

    #[test]
    fn session_pace_and_hour_count_where_the_workload_has_them() {
        let (sus, tools) = varied_workload();
        let e = evaluate(&sus, &tools, true);
        let [_, kh, l] = [0, 1, 2].map(|p| e.scores[p]);
        let msg = e.render("varied");
        assert!(e.session_shift[1], "{msg}");
        assert!(l[1].pinball_avg() < 0.85 * kh[1].pinball_avg(), "{msg}");
        assert!(l[0].pinball_avg() < 0.5 * kh[0].pinball_avg(), "{msg}");
        let c = l[2].calibration();
        assert!(
            (c[1] - 0.5).abs() < 0.03 && (c[2] - 0.9).abs() < 0.03,
            "{msg}"
        );
        let c = l[1].calibration();
        assert!(
            (c[1] - 0.5).abs() < 0.05 && (c[2] - 0.9).abs() < 0.05,
            "{msg}"
        );
        assert_eq!(e.tracked_at_end, 0);
    }

    #[test]
    fn a_gap_is_predicted_before_it_is_learned() {
        // a 1 s gap, then a 1000 s one whose learning time was clamped to
        // its own suspend (as when the next step's activity precedes it):
        // the 1000 s gap must still be predicted from the 1 s one alone
        let mut tools = ToolNames::default();
        let x = tools.intern("X");
        let mut sus = Suspends::default();
        let s = 1_000_000_000i64;
        for (at, gap, observe_at) in [(0, s, s), (10 * s, 1000 * s, 10 * s)] {
            sus.list.push(Suspend {
                session: 0,
                at,
                observe_at,
                gap: gap as Nanos,
                truth: 0,
                tools: vec![x],
            });
        }
        sus.ends.push((10 * s, 0));
        let e = evaluate(&sus, &tools, true);
        let g = e.scores[0][0];
        assert_eq!((g.n, e.unscored), (1, 1));
        assert_eq!(g.below, [0, 0, 0], "learned before predicted");
        assert_eq!(e.tracked_at_end, 0, "the end comes after the last gap");
    }

    #[test]
    fn learned_beats_the_global_histogram_on_a_generated_trace() {
        let (sus, tools, steps) = gather(400, 4242);
        // every step but each session's first is a suspend with a known gap
        assert!(sus.len() as u64 + sus.skipped < steps);
        assert!(sus.len() > 10_000, "{}", sus.len());
        for hints in [true, false] {
            let e = evaluate(&sus, &tools, hints);
            let [g, kh, l] = [0, 1, 2].map(|p| e.scores[p]);
            // the kinds add up, for every predictor alike
            assert_eq!(l[0].n + l[1].n + e.other, l[2].n);
            assert_eq!(g[2].n, l[2].n);
            assert_eq!(l[2].n + e.unscored, sus.len() as u64);
            // better than one histogram of every gap, and than one per kind
            // where the tool's name says something
            assert!(
                l[2].pinball_avg() < 0.85 * g[2].pinball_avg(),
                "{}",
                e.render("test")
            );
            assert!(l[0].pinball_avg() < 0.95 * kh[0].pinball_avg());
            assert!(
                l[1].pinball_avg() < 1.02 * kh[1].pinball_avg(),
                "{}",
                e.render("test")
            );
            // calibrated: p50 and p90 within ±0.03 overall, ±0.05 per kind
            let c = l[2].calibration();
            assert!(
                (c[1] - 0.5).abs() < 0.03 && (c[2] - 0.9).abs() < 0.03,
                "{c:?}"
            );
            for k in [0, 1] {
                let c = l[k].calibration();
                assert!(
                    (c[1] - 0.5).abs() < 0.05 && (c[2] - 0.9).abs() < 0.05,
                    "{k}: {c:?}"
                );
            }
            // every session's state was freed at its end
            assert!(e.max_tracked > 0);
            assert_eq!(e.tracked_at_end, 0);
        }
    }
}
