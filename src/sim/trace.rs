//! TraceLab JSONL reader and the derived per-step quantities of DESIGN §6.
//!
//! One JSON object per LLM step, `.jsonl` or `.jsonl.gz` (by name or by the
//! gzip magic). Rows are grouped by `(provider, session_id)`; a session's rows
//! may be spread over the file. The reader streams the file twice: the first
//! pass only counts rows per session, the second keeps a compact [`Row`] (derived
//! numbers, hashed call ids, never raw JSON) per row of each *open* session and
//! hands the session to the consumer as soon as its last row has been read.
//! Memory is therefore proportional to the sessions open at once in the file
//! (one, for a file grouped by session) plus one counter per session.
//!
//! Invariants and counting rules (DESIGN §6, so two implementations agree to
//! the last digit):
//! - rows of a session are sorted by `(round_index, first activity, file order)`;
//!   first activity = first timestamp in `timing_events` (else the earliest tool
//!   time); last activity = latest of the event timestamps and the tools'
//!   `emitted_at`/`result_at`.
//! - trigger = `timing_events[0].event_type`.
//! - a step is *counted* when its trigger is `user_message` or `tool_result`,
//!   prefix and append are present with prefix + append > 0, it has a
//!   predecessor row, and its gap is measurable: user step: first activity −
//!   predecessor's last activity ≥ 0; tool step: the longest wall duration
//!   (`result_at − emitted_at`) among the leading `tool_result` events whose
//!   call is known from an *earlier* row of the session (a missing or negative
//!   duration is unknown).
//! - L = prefix + append; fresh = clamp(max(0, L − L_prev) − output_prev, 0, append)
//!   (a predecessor's missing token counts read as 0); cacheable = L − fresh.
//! - generation span = last output event − last input event at or before the
//!   first output event, kept when > 0. Input events: `user_message`,
//!   `tool_result`; output events: `reasoning`, `text`, `tool_call`. The span sum
//!   runs over every row, counted or not.
//!
//! A time difference (span, tool duration, gap) that does not fit in i64
//! nanoseconds (ends more than 292 years apart) is unknown, like one whose
//! timestamps are missing.
//!
//! Call ids are kept as 64-bit hashes (SipHash of the id string); a collision
//! inside one session would need ~2^32 calls.
//!
//! A malformed line (bad JSON, missing `provider`/`session_id`, unparsable
//! timestamp) is skipped, counted, and reported with its 1-based line number.
//! So is a line longer than [`MAX_LINE_BYTES`] (16 MiB), which is never held
//! whole: memory stays bounded whatever a line's length (a 2 MB gzip can
//! expand to one 2 GB line).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result, ResultExt};

/// Nanoseconds since the Unix epoch (signed: traces are data, not clocks).
pub type TimeNs = i64;

/// What opened a step (`timing_events[0].event_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Trigger {
    /// `user_message`: a human turn.
    User,
    /// `tool_result`: the agent continues after tool calls.
    Tool,
    /// Anything else (or no events).
    Other,
}

/// One tool call of a row, compact.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// Hash of `tool_call_id`.
    pub id: u64,
    /// Interned tool name (index into [`ToolNames`]).
    pub tool: u32,
    /// `result_at − emitted_at` when both are present and non-negative.
    pub dur: Option<TimeNs>,
}

/// One parsed row, compact: derived numbers only.
#[derive(Clone, Debug)]
pub struct Row {
    /// `round_index` (missing reads as 0).
    pub round_index: i64,
    /// 0-based position of the row in the file (ties in sorting).
    pub file_order: u64,
    /// First event type.
    pub trigger: Trigger,
    /// First timestamp in `timing_events`, else the earliest tool time.
    pub first_activity: Option<TimeNs>,
    /// Latest of events and tool times.
    pub last_activity: Option<TimeNs>,
    /// Last input event at or before the first output event (when the request reached the model).
    pub request_at: Option<TimeNs>,
    /// Last output event.
    pub last_output: Option<TimeNs>,
    /// `prefix_tokens`.
    pub prefix: Option<u64>,
    /// `newly_append_tokens`.
    pub append: Option<u64>,
    /// `output_tokens` (missing reads as 0).
    pub output: u64,
    /// Hashes of the call ids of the leading `tool_result` events.
    pub leading_results: Vec<u64>,
    /// Tool calls the row emitted.
    pub calls: Vec<Call>,
}

impl Row {
    /// Generation span (> 0) as §6 defines it.
    pub fn gen_span(&self) -> Option<TimeNs> {
        match (self.request_at, self.last_output) {
            (Some(a), Some(b)) => b.checked_sub(a).filter(|&d| d > 0),
            _ => None,
        }
    }
}

/// One derived step of a session (after sorting).
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// `round_index`.
    pub round_index: i64,
    /// First event type.
    pub trigger: Trigger,
    /// Whether the step enters the §6 sweep.
    pub counted: bool,
    /// The §6 gap before the step, when measurable (also for uncounted steps).
    pub gap: Option<TimeNs>,
    /// `prefix_tokens` (0 when missing).
    pub prefix: u64,
    /// `newly_append_tokens` (0 when missing).
    pub append: u64,
    /// L = prefix + append (0 when missing).
    pub l: u64,
    /// Fresh tokens (0 for the first row).
    pub fresh: u64,
    /// Cacheable tokens = L − fresh.
    pub cacheable: u64,
    /// Output tokens.
    pub output: u64,
    /// Generation span (> 0) when known.
    pub gen_span: Option<TimeNs>,
    /// First activity.
    pub first_activity: Option<TimeNs>,
    /// Last activity.
    pub last_activity: Option<TimeNs>,
    /// When the request reached the model.
    pub request_at: Option<TimeNs>,
    /// Tool calls emitted by the step.
    pub calls: Vec<Call>,
}

/// A finished session: its key and its derived steps in order.
#[derive(Clone, Debug)]
pub struct Session {
    /// `provider`.
    pub provider: String,
    /// `session_id`.
    pub session_id: String,
    /// Steps sorted by (round_index, first activity, file order).
    pub steps: Vec<Step>,
}

/// Interned tool names (stable ids in first-seen order).
#[derive(Clone, Debug, Default)]
pub struct ToolNames {
    names: Vec<String>,
    ids: HashMap<String, u32>,
}

impl ToolNames {
    /// The id of `name`, interning it.
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.ids.get(name) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), i);
        i
    }
    /// The name of `id`.
    pub fn name(&self, id: u32) -> &str {
        self.names
            .get(id as usize)
            .map(|s| s.as_str())
            .unwrap_or("?")
    }
    /// Number of names.
    pub fn len(&self) -> usize {
        self.names.len()
    }
    /// No names yet.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// A skipped line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number.
    pub line: u64,
    /// What was wrong.
    pub reason: String,
}

/// What a read saw besides the sessions.
#[derive(Clone, Debug, Default)]
pub struct ReadSummary {
    /// Rows parsed.
    pub rows: u64,
    /// Sessions delivered.
    pub sessions: u64,
    /// Malformed lines skipped (all counted; the first 100 kept with reasons).
    pub bad_lines: u64,
    /// Of those, lines longer than [`MAX_LINE_BYTES`] (skipped unread).
    pub long_lines: u64,
    /// The first skipped lines.
    pub bad: Vec<BadLine>,
    /// Largest number of sessions open at once during the read.
    pub max_open_sessions: usize,
    /// Tool names seen.
    pub tools: ToolNames,
}

impl ReadSummary {
    fn bad(&mut self, line: u64, reason: String) {
        self.bad_lines += 1;
        if self.bad.len() < 100 {
            self.bad.push(BadLine { line, reason });
        }
    }
}

// ---------------------------------------------------------------- parsing

#[derive(Deserialize)]
struct KeyOnly<'a> {
    #[serde(borrow)]
    provider: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    session_id: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    event_type: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    timestamp: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    tool_call_id: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawTool<'a> {
    #[serde(borrow)]
    tool_name: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    tool_call_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    emitted_at: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    result_at: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawRow<'a> {
    #[serde(borrow)]
    provider: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    session_id: Option<std::borrow::Cow<'a, str>>,
    round_index: Option<i64>,
    prefix_tokens: Option<i64>,
    newly_append_tokens: Option<i64>,
    output_tokens: Option<i64>,
    #[serde(borrow, default)]
    timing_events: Option<Vec<RawEvent<'a>>>,
    #[serde(borrow, default)]
    tools: Option<Vec<RawTool<'a>>>,
}

/// Parses an RFC 3339 UTC-or-offset timestamp ("2026-06-01T05:40:20.151Z")
/// into nanoseconds since the Unix epoch. An instant outside the i64
/// nanosecond range (1677-09-21T00:12:43.145224192Z to
/// 2262-04-11T23:47:16.854775807Z) does not parse: `None`, never a wrapped value.
pub fn parse_ts(s: &str) -> Option<TimeNs> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let mut v = 0i64;
        for &c in &b[r] {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + (c - b'0') as i64;
        }
        Some(v)
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac = 0i64;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let mut digits = 0;
        while i < b.len() && b[i].is_ascii_digit() {
            if digits < 9 {
                frac = frac * 10 + (b[i] - b'0') as i64;
                digits += 1;
            }
            i += 1;
        }
        if digits == 0 {
            return None;
        }
        for _ in digits..9 {
            frac *= 10;
        }
    }
    let mut off = 0i64;
    match b.get(i) {
        Some(b'Z') | Some(b'z') if i + 1 == b.len() => {}
        Some(&c) if (c == b'+' || c == b'-') && b.len() == i + 6 && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            off = (oh * 3600 + om * 60) * if c == b'+' { 1 } else { -1 };
        }
        None => {}
        _ => return None,
    }
    // i128: the seconds of an in-range instant times 10^9 can leave the i64
    // range before the fraction brings them back (1677-09-21T00:12:43.2Z).
    let days = days_from_civil(y, mo, d)? as i128;
    let secs = days * 86400 + (h * 3600 + mi * 60 + sec - off) as i128;
    TimeNs::try_from(secs * 1_000_000_000 + frac as i128).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm); `None` when the result leaves the i64 range.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> Option<i64> {
    let y = if m <= 2 { y.checked_sub(1)? } else { y };
    let era = if y >= 0 { y } else { y.checked_sub(399)? } / 400;
    let yoe = y - era * 400; // 0..=399, cannot overflow
    let mp = (m.checked_add(9)?) % 12;
    let doy = (153i64.checked_mul(mp)?.checked_add(2)? / 5)
        .checked_add(d)?
        .checked_sub(1)?;
    let doe = (yoe * 365 + yoe / 4 - yoe / 100).checked_add(doy)?;
    era.checked_mul(146097)?
        .checked_add(doe)?
        .checked_sub(719468)
}

/// Formats nanoseconds since the epoch as "YYYY-MM-DDTHH:MM:SS.mmmZ".
pub fn fmt_ts(t: TimeNs, out: &mut String) {
    use std::fmt::Write;
    let ms = t.div_euclid(1_000_000);
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    // civil_from_days
    let z = days + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        ms.rem_euclid(1000)
    );
}

fn hash_id(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

fn opt_ts(
    s: &Option<std::borrow::Cow<'_, str>>,
    what: &str,
) -> std::result::Result<Option<TimeNs>, String> {
    match s {
        None => Ok(None),
        Some(v) => parse_ts(v)
            .map(Some)
            .ok_or_else(|| format!("bad timestamp {what} {v:?}")),
    }
}

fn tokens(v: Option<i64>, what: &str) -> std::result::Result<Option<u64>, String> {
    match v {
        None => Ok(None),
        Some(x) if x >= 0 => Ok(Some(x as u64)),
        Some(x) => Err(format!("negative {what} {x}")),
    }
}

/// Parses one JSONL line into its session key and compact row.
pub fn parse_row(
    line: &str,
    file_order: u64,
    tools: &mut ToolNames,
) -> std::result::Result<((String, String), Row), String> {
    let raw: RawRow = serde_json::from_str(line).map_err(|e| format!("bad JSON: {e}"))?;
    let provider = raw.provider.ok_or("missing provider")?.into_owned();
    let session_id = raw.session_id.ok_or("missing session_id")?.into_owned();
    let events = raw.timing_events.unwrap_or_default();
    let raw_tools = raw.tools.unwrap_or_default();

    let mut first_activity = None;
    let mut last_activity: Option<TimeNs> = None;
    let mut first_out: Option<TimeNs> = None;
    let mut last_out: Option<TimeNs> = None;
    let mut ev_times = Vec::with_capacity(events.len());
    for e in &events {
        let t = opt_ts(&e.timestamp, "in timing_events")?;
        ev_times.push(t);
        if let Some(t) = t {
            if first_activity.is_none() {
                first_activity = Some(t);
            }
            last_activity = Some(last_activity.map_or(t, |l| l.max(t)));
            let et = e.event_type.as_deref().unwrap_or("");
            if matches!(et, "reasoning" | "text" | "tool_call") {
                if first_out.is_none() {
                    first_out = Some(t);
                }
                last_out = Some(last_out.map_or(t, |l| l.max(t)));
            }
        }
    }
    // earliest output event by time (events are normally in time order; be exact anyway)
    if let Some(_fo) = first_out {
        let mut m = None;
        for (e, t) in events.iter().zip(&ev_times) {
            if let (Some(t), true) = (
                t,
                matches!(
                    e.event_type.as_deref(),
                    Some("reasoning" | "text" | "tool_call")
                ),
            ) {
                m = Some(m.map_or(*t, |x: TimeNs| x.min(*t)));
            }
        }
        first_out = m;
    }
    let mut request_at: Option<TimeNs> = None;
    if let Some(fo) = first_out {
        for (e, t) in events.iter().zip(&ev_times) {
            if let (Some(t), true) = (
                t,
                matches!(
                    e.event_type.as_deref(),
                    Some("user_message" | "tool_result")
                ),
            ) {
                if *t <= fo {
                    request_at = Some(request_at.map_or(*t, |x| x.max(*t)));
                }
            }
        }
    }
    let trigger = match events.first().and_then(|e| e.event_type.as_deref()) {
        Some("user_message") => Trigger::User,
        Some("tool_result") => Trigger::Tool,
        _ => Trigger::Other,
    };
    let mut leading_results = Vec::new();
    for e in &events {
        if e.event_type.as_deref() != Some("tool_result") {
            break;
        }
        if let Some(id) = &e.tool_call_id {
            leading_results.push(hash_id(id));
        }
    }
    let mut calls = Vec::with_capacity(raw_tools.len());
    let mut earliest_tool: Option<TimeNs> = None;
    for t in &raw_tools {
        let em = opt_ts(&t.emitted_at, "emitted_at")?;
        let re = opt_ts(&t.result_at, "result_at")?;
        for x in [em, re].into_iter().flatten() {
            last_activity = Some(last_activity.map_or(x, |l| l.max(x)));
            earliest_tool = Some(earliest_tool.map_or(x, |l| l.min(x)));
        }
        let dur = match (em, re) {
            (Some(a), Some(b)) => b.checked_sub(a).filter(|&d| d >= 0),
            _ => None,
        };
        if let Some(id) = &t.tool_call_id {
            calls.push(Call {
                id: hash_id(id),
                tool: tools.intern(t.tool_name.as_deref().unwrap_or("?")),
                dur,
            });
        }
    }
    if first_activity.is_none() {
        first_activity = earliest_tool;
    }
    let row = Row {
        round_index: raw.round_index.unwrap_or(0),
        file_order,
        trigger,
        first_activity,
        last_activity,
        request_at,
        last_output: last_out,
        prefix: tokens(raw.prefix_tokens, "prefix_tokens")?,
        append: tokens(raw.newly_append_tokens, "newly_append_tokens")?,
        output: tokens(raw.output_tokens, "output_tokens")?.unwrap_or(0),
        leading_results,
        calls,
    };
    Ok(((provider, session_id), row))
}

/// Sorts a session's rows and derives its steps (§6).
pub fn derive_steps(mut rows: Vec<Row>) -> Vec<Step> {
    rows.sort_by(|a, b| {
        (a.round_index, a.first_activity, a.file_order).cmp(&(
            b.round_index,
            b.first_activity,
            b.file_order,
        ))
    });
    let mut known: HashMap<u64, Option<TimeNs>> = HashMap::new();
    let mut out: Vec<Step> = Vec::with_capacity(rows.len());
    let mut prev: Option<&Row> = None;
    for r in &rows {
        let l = r.prefix.unwrap_or(0) + r.append.unwrap_or(0);
        let has_tokens = r.prefix.is_some() && r.append.is_some() && l > 0;
        let mut gap = None;
        let fresh;
        if let Some(p) = prev {
            gap = match r.trigger {
                Trigger::User | Trigger::Other => match (r.first_activity, p.last_activity) {
                    (Some(a), Some(b)) => a.checked_sub(b).filter(|&g| g >= 0),
                    _ => None,
                },
                Trigger::Tool => r
                    .leading_results
                    .iter()
                    .filter_map(|id| known.get(id).copied().flatten())
                    .max(),
            };
            let l_prev = p.prefix.unwrap_or(0) + p.append.unwrap_or(0);
            let grow = l.saturating_sub(l_prev);
            fresh = grow.saturating_sub(p.output).min(r.append.unwrap_or(0));
        } else {
            fresh = r.append.unwrap_or(0).min(l);
        }
        let counted = prev.is_some() && has_tokens && r.trigger != Trigger::Other && gap.is_some();
        out.push(Step {
            round_index: r.round_index,
            trigger: r.trigger,
            counted,
            gap,
            prefix: r.prefix.unwrap_or(0),
            append: r.append.unwrap_or(0),
            l,
            fresh,
            cacheable: l - fresh,
            output: r.output,
            gen_span: r.gen_span(),
            first_activity: r.first_activity,
            last_activity: r.last_activity,
            request_at: r.request_at,
            calls: r.calls.clone(),
        });
        for c in &r.calls {
            known.insert(c.id, c.dur);
        }
        prev = Some(r);
    }
    out
}

/// Longest line the reader takes (16 MiB, newline excluded). A longer line
/// is skipped and counted in [`ReadSummary::long_lines`] (and as a malformed
/// line) without ever being held whole: the reader keeps at most this many
/// bytes of a line, plus one buffer of input, whatever the line's length. The
/// longest real TraceLab row is a few hundred KiB.
pub const MAX_LINE_BYTES: usize = 16 << 20;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

fn reader<'a>(r: impl Read + 'a, gzip: bool) -> Box<dyn BufRead + 'a> {
    if gzip {
        Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::read::MultiGzDecoder::new(r),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 20, r))
    }
}

fn open(path: &Path) -> Result<Box<dyn BufRead>> {
    let mut f = std::fs::File::open(path).ctx(format!("open trace {}", path.display()))?;
    let mut magic = [0u8; 2];
    let n = f
        .read(&mut magic)
        .ctx(format!("read trace {}", path.display()))?;
    drop(f);
    let f = std::fs::File::open(path).ctx(format!("open trace {}", path.display()))?;
    Ok(reader(f, n == 2 && magic == GZIP_MAGIC))
}

/// One line as [`for_each_line`] hands it over.
enum Line<'a> {
    /// The text of a line within [`MAX_LINE_BYTES`].
    Text(&'a str),
    /// Not UTF-8 (why).
    BadUtf8(String),
    /// Longer than the limit: its length in bytes, newline excluded.
    TooLong(u64),
}

/// Calls `f` for every non-blank line (1-based number, line), holding at
/// most `max_line` bytes of a line at a time.
fn for_each_line(
    mut r: impl BufRead,
    max_line: usize,
    mut f: impl FnMut(u64, Line<'_>) -> Result<()>,
) -> Result<()> {
    let mut buf = Vec::with_capacity(max_line.min(1 << 16));
    let mut n = 0u64;
    loop {
        buf.clear();
        // Bytes of the current line seen so far (all of them, kept or not).
        let mut len = 0u64;
        let mut any = false;
        loop {
            let chunk = r.fill_buf().ctx("read trace")?;
            if chunk.is_empty() {
                break;
            }
            any = true;
            let (take, eol) = match chunk.iter().position(|&c| c == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            len += take as u64;
            if len <= max_line as u64 {
                buf.extend_from_slice(&chunk[..take]);
            } else if !buf.is_empty() {
                // over the limit: drop what was kept, count the rest
                buf.clear();
                buf.shrink_to(1 << 16);
            }
            r.consume(take + eol as usize);
            if eol {
                break;
            }
        }
        if !any {
            return Ok(());
        }
        n += 1;
        if len > max_line as u64 {
            f(n, Line::TooLong(len))?;
            continue;
        }
        while matches!(buf.last(), Some(b'\r')) {
            buf.pop();
        }
        if buf.iter().all(|c| c.is_ascii_whitespace()) {
            continue;
        }
        match std::str::from_utf8(&buf) {
            Ok(s) => f(n, Line::Text(s))?,
            Err(e) => f(n, Line::BadUtf8(format!("invalid UTF-8: {e}")))?,
        }
    }
}

/// Reads a TraceLab file (`.jsonl` or gzip), calling `each` with every
/// session as soon as its last row has been read (in the order sessions
/// complete). Two streaming passes; see the module docs for the memory bound.
pub fn read_file(
    path: &Path,
    each: impl FnMut(Session, &ToolNames) -> Result<()>,
) -> Result<ReadSummary> {
    let counts = count_rows(open(path)?)?;
    read_with_counts(open(path)?, counts, each)
}

/// [`read_file`] over bytes in memory (the embedded default trace, tests).
/// Gzip data (by its magic) is decompressed as it is read.
pub fn read_bytes(
    data: &[u8],
    each: impl FnMut(Session, &ToolNames) -> Result<()>,
) -> Result<ReadSummary> {
    let gzip = data.starts_with(&GZIP_MAGIC);
    let counts = count_rows(reader(data, gzip))?;
    read_with_counts(reader(data, gzip), counts, each)
}

fn count_rows(r: impl BufRead) -> Result<HashMap<(String, String), u64>> {
    let mut counts: HashMap<(String, String), u64> = HashMap::new();
    for_each_line(r, MAX_LINE_BYTES, |_, line| {
        if let Line::Text(s) = line {
            if let Ok(k) = serde_json::from_str::<KeyOnly>(s) {
                if let (Some(p), Some(id)) = (k.provider, k.session_id) {
                    *counts.entry((p.into_owned(), id.into_owned())).or_default() += 1;
                }
            }
        }
        Ok(())
    })?;
    Ok(counts)
}

fn read_with_counts(
    r: impl BufRead,
    mut counts: HashMap<(String, String), u64>,
    mut each: impl FnMut(Session, &ToolNames) -> Result<()>,
) -> Result<ReadSummary> {
    let mut sum = ReadSummary::default();
    let mut open: HashMap<(String, String), Vec<Row>> = HashMap::new();
    let mut order = 0u64;
    for_each_line(r, MAX_LINE_BYTES, |n, line| {
        let s = match line {
            Line::Text(s) => s,
            Line::BadUtf8(e) => {
                sum.bad(n, e);
                return Ok(());
            }
            Line::TooLong(len) => {
                sum.long_lines += 1;
                sum.bad(
                    n,
                    format!(
                        "line of {len} bytes is longer than the {} MiB limit; skipped",
                        MAX_LINE_BYTES >> 20
                    ),
                );
                return Ok(());
            }
        };
        match parse_row(s, order, &mut sum.tools) {
            Err(e) => {
                // a line whose key parsed in pass 1 but whose body is bad still
                // counts toward its session's row total
                if let Ok(k) = serde_json::from_str::<KeyOnly>(s) {
                    if let (Some(p), Some(id)) = (k.provider, k.session_id) {
                        let key = (p.into_owned(), id.into_owned());
                        if let Some(c) = counts.get_mut(&key) {
                            *c -= 1;
                            if *c == 0 {
                                counts.remove(&key);
                                if let Some(rows) = open.remove(&key) {
                                    deliver(key, rows, &mut sum, &mut each)?;
                                }
                            }
                        }
                    }
                }
                sum.bad(n, e);
            }
            Ok((key, row)) => {
                order += 1;
                sum.rows += 1;
                let left = counts.get_mut(&key).map(|c| {
                    *c -= 1;
                    *c
                });
                let rows = open.entry(key.clone()).or_default();
                rows.push(row);
                sum.max_open_sessions = sum.max_open_sessions.max(open.len());
                if left.unwrap_or(0) == 0 {
                    counts.remove(&key);
                    let rows = open.remove(&key).unwrap_or_default();
                    deliver(key, rows, &mut sum, &mut each)?;
                }
            }
        }
        Ok(())
    })?;
    // Sessions whose count was off (file changed between passes): flush at EOF.
    let mut rest: Vec<_> = open.into_iter().collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, rows) in rest {
        deliver(key, rows, &mut sum, &mut each)?;
    }
    Ok(sum)
}

fn deliver(
    key: (String, String),
    rows: Vec<Row>,
    sum: &mut ReadSummary,
    each: &mut impl FnMut(Session, &ToolNames) -> Result<()>,
) -> Result<()> {
    sum.sessions += 1;
    let steps = derive_steps(rows);
    each(
        Session {
            provider: key.0,
            session_id: key.1,
            steps,
        },
        &sum.tools,
    )
}

/// Reads a whole file into memory as sessions (tests, small files).
pub fn read_all(path: &Path) -> Result<(Vec<Session>, ReadSummary)> {
    let mut v = Vec::new();
    let sum = read_file(path, |s, _| {
        v.push(s);
        Ok(())
    })?;
    Ok((v, sum))
}

/// The warning for a read that skipped lines over [`MAX_LINE_BYTES`].
pub fn long_lines_warning(what: &dyn std::fmt::Display, sum: &ReadSummary) -> String {
    format!(
        "warning: {what}: {} lines longer than {} MiB skipped unread (not TraceLab rows; \
         the limit keeps the reader's memory bounded)",
        sum.long_lines,
        MAX_LINE_BYTES >> 20
    )
}

/// An error for a trace file that yielded nothing usable.
pub fn empty_trace(path: &Path, sum: &ReadSummary) -> Error {
    let first = sum
        .bad
        .first()
        .map(|b| format!("; line {}: {}", b.line, b.reason))
        .unwrap_or_default();
    Error::invalid(format!(
        "trace {}: no valid rows ({} malformed lines{first})",
        path.display(),
        sum.bad_lines
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_exactly() {
        assert_eq!(parse_ts("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_ts("1970-01-01T00:00:01.5Z"), Some(1_500_000_000));
        // 2026-06-01 is day 20605 since the epoch (2026-01-01 = 20454, + 151 days).
        assert_eq!(
            parse_ts("2026-06-01T05:40:20.151Z"),
            Some((20605 * 86400 + 5 * 3600 + 40 * 60 + 20) * 1_000_000_000 + 151_000_000)
        );
        assert_eq!(parse_ts("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_ts("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_ts("yesterday"), None);
        let mut s = String::new();
        fmt_ts(parse_ts("2026-03-21T10:06:05.480Z").unwrap(), &mut s);
        assert_eq!(s, "2026-03-21T10:06:05.480Z");
    }
}
