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
//! Field rules (DESIGN §6, as the TraceLab pipeline reads rows): a token
//! count is present only when it is a JSON integer (not a float such as
//! `1100.0`, not a boolean; kvpark also reads a negative one, or one beyond
//! i64, as absent); an absent count leaves the row in the trace and makes
//! what needs it unknown. A timestamp that is not a string or does not parse is
//! absent (the row stays). An empty `tool_call_id` is absent. A row enters the
//! session walk only with a string `provider`, a non-empty string
//! `session_id` and an integer `round_index`; any other row is delivered as a
//! *loose* one-row [`Session`] that counts in per-row statistics only (rows,
//! tool calls, generation span, token and latency distributions). A key given
//! twice takes its last value.
//!
//! `human_input_wait` (§6) is walked here, in file order per session_id: the
//! time from the previous timed event of the session (events of a row sorted
//! by time) to each `user_message` event, kept when > 0; each row carries its
//! own values ([`Row::human_waits`]).
//!
//! A malformed line (not one JSON object, not UTF-8) is skipped, counted, and
//! reported with its 1-based line number.
//! So is a line longer than [`MAX_LINE_BYTES`] (16 MiB), which is never held
//! whole: memory stays bounded whatever a line's length (a 2 MB gzip can
//! expand to one 2 GB line).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

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
    /// Hash of `tool_call_id` (absent when missing, not a string, or empty).
    pub id: Option<u64>,
    /// Interned tool name (index into [`ToolNames`]).
    pub tool: u32,
    /// `result_at − emitted_at` when both are present and non-negative.
    pub dur: Option<TimeNs>,
    /// Effective tool latency (ms): `tool_internal_latency_ms` when it is an
    /// integer, else `tool_wall_latency_ms` when that is (DESIGN §6); the
    /// study keeps it when > 0.
    pub latency_ms: Option<i64>,
}

/// One parsed row, compact: derived numbers only.
#[derive(Clone, Debug)]
pub struct Row {
    /// `round_index` (0 for a row outside the session walk).
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
    /// Whether `output_tokens` is present (a JSON integer).
    pub output_known: bool,
    /// Hashes of the call ids of the leading `tool_result` events.
    pub leading_results: Vec<u64>,
    /// Tool calls the row emitted (every object of `tools`).
    pub calls: Vec<Call>,
    /// The row's `human_input_wait` values (ns, > 0), set by the reader's
    /// file-order walk per session_id (DESIGN §6).
    pub human_waits: Vec<TimeNs>,
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
    /// Which of prefix, append and output tokens are present (JSON integers).
    pub known: [bool; 3],
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
    /// `human_input_wait` values (ns, > 0) of the row's `user_message` events.
    pub human_waits: Vec<TimeNs>,
    /// 0-based position of the row in the file.
    pub file_order: u64,
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
    /// A single row outside the session walk (no string provider, no
    /// non-empty string session_id, or no integer round_index): it counts in
    /// per-row statistics only (provider and session_id are then empty).
    pub loose: bool,
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
    /// Rows parsed (JSON objects), in the session walk or not.
    pub rows: u64,
    /// Of those, rows outside the session walk (DESIGN §6 field rules).
    pub loose_rows: u64,
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
//
// Rows are read leniently, field by field, as the TraceLab pipeline reads
// them (DESIGN §6 field rules): a field of the wrong JSON type is absent, never
// a reason to drop the row. Only a line that is not one JSON object is
// malformed. A key given twice takes its last value (as `json.loads` does).

/// A JSON value as far as the reader cares: an integer, a string, or
/// anything else (float, boolean, null, array, object — drained unread).
#[derive(Debug, Default)]
enum Lax<'a> {
    Int(i128),
    Str(Cow<'a, str>),
    #[default]
    Other,
}

impl<'a> Lax<'a> {
    fn int(&self) -> Option<i128> {
        match self {
            Lax::Int(v) => Some(*v),
            _ => None,
        }
    }
    fn str(&self) -> Option<&str> {
        match self {
            Lax::Str(s) => Some(s),
            _ => None,
        }
    }
}

struct LaxVisitor;

impl<'de> Visitor<'de> for LaxVisitor {
    type Value = Lax<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Lax<'de>, E> {
        Ok(Lax::Int(v as i128))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Lax<'de>, E> {
        Ok(Lax::Int(v as i128))
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<Lax<'de>, E> {
        Ok(Lax::Other)
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<Lax<'de>, E> {
        Ok(Lax::Other)
    }
    fn visit_unit<E>(self) -> std::result::Result<Lax<'de>, E> {
        Ok(Lax::Other)
    }
    fn visit_none<E>(self) -> std::result::Result<Lax<'de>, E> {
        Ok(Lax::Other)
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Lax<'de>, E> {
        Ok(Lax::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Lax<'de>, E> {
        Ok(Lax::Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Lax<'de>, E> {
        Ok(Lax::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> std::result::Result<Lax<'de>, A::Error> {
        while s.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Lax::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Lax<'de>, A::Error> {
        while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Lax::Other)
    }
}

impl<'de> de::Deserialize<'de> for Lax<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(LaxVisitor)
    }
}

/// An object type read field by field: `set` takes one value of a key.
trait LaxObject<'de>: Default {
    /// Reads the value of `key` from `m` (or skips it).
    fn set<A: MapAccess<'de>>(&mut self, key: &str, m: &mut A)
        -> std::result::Result<(), A::Error>;
}

/// Map keys as borrowed text where possible, without allocating otherwise.
struct Key<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// `Some(T)` for a JSON object, `None` for any other value.
struct Obj<T>(Option<T>);

impl<'de, T: LaxObject<'de>> de::Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: LaxObject<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Obj<T>, A::Error> {
                let mut t = T::default();
                while let Some(k) = m.next_key::<Key>()? {
                    t.set(&k.0, &mut m)?;
                }
                Ok(Obj(Some(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, s: A) -> std::result::Result<Obj<T>, A::Error> {
                LaxVisitor.visit_seq(s).map(|_| Obj(None))
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_unit<E>(self) -> std::result::Result<Obj<T>, E> {
                Ok(Obj(None))
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<Obj<T>, E> {
                Ok(Obj(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// The objects of a JSON array (other elements dropped); empty for a
/// value that is not an array.
struct List<T>(Vec<T>);

impl<T> Default for List<T> {
    fn default() -> Self {
        List(Vec::new())
    }
}

impl<'de, T: LaxObject<'de>> de::Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: LaxObject<'de>> Visitor<'de> for V<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> std::result::Result<List<T>, A::Error> {
                let mut v = Vec::new();
                while let Some(Obj(x)) = s.next_element::<Obj<T>>()? {
                    v.extend(x);
                }
                Ok(List(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> std::result::Result<List<T>, A::Error> {
                LaxVisitor.visit_map(m).map(|_| List(Vec::new()))
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<List<T>, E> {
                Ok(List(Vec::new()))
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<List<T>, E> {
                Ok(List(Vec::new()))
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<List<T>, E> {
                Ok(List(Vec::new()))
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<List<T>, E> {
                Ok(List(Vec::new()))
            }
            fn visit_unit<E>(self) -> std::result::Result<List<T>, E> {
                Ok(List(Vec::new()))
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<List<T>, E> {
                Ok(List(Vec::new()))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// The key of a row: what decides whether it enters the session walk.
#[derive(Default)]
struct RawKey<'a> {
    provider: Lax<'a>,
    session_id: Lax<'a>,
    round_index: Lax<'a>,
}

impl<'de> LaxObject<'de> for RawKey<'de> {
    fn set<A: MapAccess<'de>>(
        &mut self,
        key: &str,
        m: &mut A,
    ) -> std::result::Result<(), A::Error> {
        match key {
            "provider" => self.provider = m.next_value()?,
            "session_id" => self.session_id = m.next_value()?,
            "round_index" => self.round_index = m.next_value()?,
            _ => {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl RawKey<'_> {
    /// `(provider, session_id, round_index)` when the row enters the walk:
    /// a string provider, a non-empty string session_id, an integer
    /// round_index (within i64).
    fn walk_key(&self) -> Option<(&str, &str, i64)> {
        let p = self.provider.str()?;
        let s = self.session_id.str().filter(|s| !s.is_empty())?;
        let r = i64::try_from(self.round_index.int()?).ok()?;
        Some((p, s, r))
    }
}

#[derive(Default)]
struct RawEvent<'a> {
    event_type: Lax<'a>,
    timestamp: Lax<'a>,
    tool_call_id: Lax<'a>,
}

impl<'de> LaxObject<'de> for RawEvent<'de> {
    fn set<A: MapAccess<'de>>(
        &mut self,
        key: &str,
        m: &mut A,
    ) -> std::result::Result<(), A::Error> {
        match key {
            "event_type" => self.event_type = m.next_value()?,
            "timestamp" => self.timestamp = m.next_value()?,
            "tool_call_id" => self.tool_call_id = m.next_value()?,
            _ => {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct RawTool<'a> {
    tool_name: Lax<'a>,
    tool_call_id: Lax<'a>,
    emitted_at: Lax<'a>,
    result_at: Lax<'a>,
    tool_wall_latency_ms: Lax<'a>,
    tool_internal_latency_ms: Lax<'a>,
}

impl<'de> LaxObject<'de> for RawTool<'de> {
    fn set<A: MapAccess<'de>>(
        &mut self,
        key: &str,
        m: &mut A,
    ) -> std::result::Result<(), A::Error> {
        match key {
            "tool_name" => self.tool_name = m.next_value()?,
            "tool_call_id" => self.tool_call_id = m.next_value()?,
            "emitted_at" => self.emitted_at = m.next_value()?,
            "result_at" => self.result_at = m.next_value()?,
            "tool_wall_latency_ms" => self.tool_wall_latency_ms = m.next_value()?,
            "tool_internal_latency_ms" => self.tool_internal_latency_ms = m.next_value()?,
            _ => {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct RawRow<'a> {
    key: RawKey<'a>,
    prefix_tokens: Lax<'a>,
    newly_append_tokens: Lax<'a>,
    output_tokens: Lax<'a>,
    timing_events: List<RawEvent<'a>>,
    tools: List<RawTool<'a>>,
}

impl<'de> LaxObject<'de> for RawRow<'de> {
    fn set<A: MapAccess<'de>>(
        &mut self,
        key: &str,
        m: &mut A,
    ) -> std::result::Result<(), A::Error> {
        match key {
            "prefix_tokens" => self.prefix_tokens = m.next_value()?,
            "newly_append_tokens" => self.newly_append_tokens = m.next_value()?,
            "output_tokens" => self.output_tokens = m.next_value()?,
            "timing_events" => self.timing_events = m.next_value()?,
            "tools" => self.tools = m.next_value()?,
            _ => self.key.set(key, m)?,
        }
        Ok(())
    }
}

/// Parses a line as one JSON object of type `T`; `Err` (why) for anything else.
fn parse_obj<'a, T: LaxObject<'a>>(line: &'a str) -> std::result::Result<T, String> {
    match serde_json::from_str::<Obj<T>>(line) {
        Ok(Obj(Some(t))) => Ok(t),
        Ok(Obj(None)) => Err("not a JSON object".to_string()),
        Err(e) => Err(format!("bad JSON: {e}")),
    }
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

/// A timestamp field: absent unless a string that parses.
fn lax_ts(v: &Lax<'_>) -> Option<TimeNs> {
    v.str().and_then(parse_ts)
}

/// A token count: present only as a JSON integer (within 0..=i64::MAX; a
/// negative or larger integer is unknown too, so L never overflows).
fn lax_tokens(v: &Lax<'_>) -> Option<u64> {
    v.int()
        .filter(|x| (0..=i64::MAX as i128).contains(x))
        .map(|x| x as u64)
}

/// A `tool_call_id`: absent unless a non-empty string.
fn lax_id(v: &Lax<'_>) -> Option<u64> {
    v.str().filter(|s| !s.is_empty()).map(hash_id)
}

/// What the `human_input_wait` walk needs of a row (DESIGN §6): its timed
/// events sorted by time (stable), reduced to the first event (time, whether
/// it is a `user_message`), the last time, and the waits of the
/// `user_message` events after the first (from the event before, in the row),
/// kept when > 0.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowWaits {
    /// First event by time, and whether it is a `user_message`.
    pub first: Option<(TimeNs, bool)>,
    /// Last event time.
    pub last: Option<TimeNs>,
    /// Waits (> 0) of the later `user_message` events, within the row.
    pub inner: Vec<TimeNs>,
}

/// One parsed line.
#[derive(Clone, Debug)]
pub struct ParsedRow {
    /// `(provider, session_id)` when the row enters the session walk (a
    /// string provider, a non-empty string session_id, an integer round_index).
    pub key: Option<(String, String)>,
    /// `session_id` when it is a non-empty string (the `human_input_wait`
    /// walk goes by session_id alone, in file order).
    pub session_id: Option<String>,
    /// The compact row.
    pub row: Row,
    /// The row's part of the `human_input_wait` walk.
    pub waits: RowWaits,
}

/// Parses one JSONL line into its session key and compact row, by the field
/// rules of DESIGN §6. `Err` only for a line that is not one JSON object.
pub fn parse_row(
    line: &str,
    file_order: u64,
    tools: &mut ToolNames,
) -> std::result::Result<ParsedRow, String> {
    let raw: RawRow = parse_obj(line)?;
    let walk = raw.key.walk_key();
    let key = walk.map(|(p, s, _)| (p.to_string(), s.to_string()));
    let round_index = walk.map_or(0, |w| w.2);
    let session_id = raw
        .key
        .session_id
        .str()
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let events = &raw.timing_events.0;
    let raw_tools = &raw.tools.0;

    let mut first_activity = None;
    let mut last_activity: Option<TimeNs> = None;
    let mut last_out: Option<TimeNs> = None;
    let mut first_out: Option<TimeNs> = None;
    let mut ev_times = Vec::with_capacity(events.len());
    for e in events {
        let t = lax_ts(&e.timestamp);
        ev_times.push(t);
        if let Some(t) = t {
            if first_activity.is_none() {
                first_activity = Some(t);
            }
            last_activity = Some(last_activity.map_or(t, |l| l.max(t)));
            if matches!(e.event_type.str(), Some("reasoning" | "text" | "tool_call")) {
                // earliest and latest output event by time
                first_out = Some(first_out.map_or(t, |x| x.min(t)));
                last_out = Some(last_out.map_or(t, |l| l.max(t)));
            }
        }
    }
    let mut request_at: Option<TimeNs> = None;
    if let Some(fo) = first_out {
        for (e, t) in events.iter().zip(&ev_times) {
            if let (Some(t), true) = (
                t,
                matches!(e.event_type.str(), Some("user_message" | "tool_result")),
            ) {
                if *t <= fo {
                    request_at = Some(request_at.map_or(*t, |x| x.max(*t)));
                }
            }
        }
    }
    // the human_input_wait walk's view of the row
    let mut timed: Vec<(TimeNs, bool)> = events
        .iter()
        .zip(&ev_times)
        .filter_map(|(e, t)| t.map(|t| (t, e.event_type.str() == Some("user_message"))))
        .collect();
    timed.sort_by_key(|x| x.0); // stable: ties keep file order
    let waits = RowWaits {
        first: timed.first().copied(),
        last: timed.last().map(|x| x.0),
        inner: timed
            .windows(2)
            .filter(|w| w[1].1)
            .filter_map(|w| w[1].0.checked_sub(w[0].0))
            .filter(|&d| d > 0)
            .collect(),
    };
    let trigger = match events.first().and_then(|e| e.event_type.str()) {
        Some("user_message") => Trigger::User,
        Some("tool_result") => Trigger::Tool,
        _ => Trigger::Other,
    };
    let mut leading_results = Vec::new();
    for e in events {
        if e.event_type.str() != Some("tool_result") {
            break;
        }
        if let Some(id) = lax_id(&e.tool_call_id) {
            leading_results.push(id);
        }
    }
    let mut calls = Vec::with_capacity(raw_tools.len());
    let mut earliest_tool: Option<TimeNs> = None;
    for t in raw_tools {
        let em = lax_ts(&t.emitted_at);
        let re = lax_ts(&t.result_at);
        for x in [em, re].into_iter().flatten() {
            last_activity = Some(last_activity.map_or(x, |l| l.max(x)));
            earliest_tool = Some(earliest_tool.map_or(x, |l| l.min(x)));
        }
        let dur = match (em, re) {
            (Some(a), Some(b)) => b.checked_sub(a).filter(|&d| d >= 0),
            _ => None,
        };
        let ms = |v: &Lax<'_>| v.int().and_then(|x| i64::try_from(x).ok());
        calls.push(Call {
            id: lax_id(&t.tool_call_id),
            tool: tools.intern(t.tool_name.str().unwrap_or("?")),
            dur,
            latency_ms: ms(&t.tool_internal_latency_ms).or_else(|| ms(&t.tool_wall_latency_ms)),
        });
    }
    if first_activity.is_none() {
        first_activity = earliest_tool;
    }
    let output = lax_tokens(&raw.output_tokens);
    let row = Row {
        round_index,
        file_order,
        trigger,
        first_activity,
        last_activity,
        request_at,
        last_output: last_out,
        prefix: lax_tokens(&raw.prefix_tokens),
        append: lax_tokens(&raw.newly_append_tokens),
        output: output.unwrap_or(0),
        output_known: output.is_some(),
        leading_results,
        calls,
        human_waits: Vec::new(),
    };
    Ok(ParsedRow {
        key,
        session_id,
        row,
        waits,
    })
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
            known: [r.prefix.is_some(), r.append.is_some(), r.output_known],
            l,
            fresh,
            cacheable: l - fresh,
            output: r.output,
            gen_span: r.gen_span(),
            first_activity: r.first_activity,
            last_activity: r.last_activity,
            request_at: r.request_at,
            calls: r.calls.clone(),
            human_waits: r.human_waits.clone(),
            file_order: r.file_order,
        });
        for c in &r.calls {
            if let Some(id) = c.id {
                known.insert(id, c.dur);
            }
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
            if let Ok(k) = parse_obj::<RawKey>(s) {
                if let Some((p, id, _)) = k.walk_key() {
                    *counts.entry((p.to_string(), id.to_string())).or_default() += 1;
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
    // the human_input_wait walk: last timed event per session_id, in file order
    let mut last_event: HashMap<String, TimeNs> = HashMap::new();
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
        let p = match parse_row(s, order, &mut sum.tools) {
            Err(e) => {
                sum.bad(n, e);
                return Ok(());
            }
            Ok(p) => p,
        };
        order += 1;
        sum.rows += 1;
        let mut row = p.row;
        if let Some(sid) = p.session_id {
            let last = last_event.get(&sid).copied();
            if let (Some((t0, true)), Some(prev)) = (p.waits.first, last) {
                if let Some(w) = t0.checked_sub(prev).filter(|&w| w > 0) {
                    row.human_waits.push(w);
                }
            }
            row.human_waits.extend_from_slice(&p.waits.inner);
            if let Some(t) = p.waits.last {
                match last_event.get_mut(&sid) {
                    Some(x) => *x = t,
                    None => {
                        last_event.insert(sid, t);
                    }
                }
            }
        }
        let Some(key) = p.key else {
            // outside the session walk: a session of its own, uncounted
            sum.loose_rows += 1;
            let steps = derive_steps(vec![row]);
            return each(
                Session {
                    provider: String::new(),
                    session_id: String::new(),
                    steps,
                    loose: true,
                },
                &sum.tools,
            );
        };
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
            loose: false,
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
