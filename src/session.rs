//! The vocabulary the planner, the policies and the predictors share:
//! time, session ids, kvpark's tiers, suspension hints, capacity and the
//! actions handed to the mover. A leaf: it uses nothing of the crate, so
//! `policy` and `predict` depend on it instead of on the planner that calls
//! them. [`crate::planner::core`] re-exports every name.

/// Virtual or monotonic time in nanoseconds, always an argument.
pub type Nanos = u64;
/// A session (a chain of LLM steps sharing a growing prefix).
pub type SessionId = u64;

/// kvpark's tiers; the GPU is vLLM's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Tier {
    /// Pinned host memory.
    Host,
    /// Compressed NVMe segments.
    Nvme,
}

/// What a suspended session waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Awaiting {
    /// A tool result.
    Tool,
    /// A human.
    User,
    /// Not known.
    #[default]
    Unknown,
}

/// Optional knowledge from the harness about a suspension.
#[derive(Clone, Debug, Default)]
pub struct Hint {
    /// What the session waits for.
    pub awaiting: Awaiting,
    /// The pending tool's name.
    pub tool: Option<String>,
}

/// Capacity of kvpark's tiers in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// Host (pinned) bytes.
    pub host_bytes: u64,
    /// NVMe bytes.
    pub nvme_bytes: u64,
}

/// Work for the mover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Copy `bytes` of the session's KV into `to` (save GPU->host when from is None; demote host->nvme; prefetch nvme->host).
    Copy {
        /// The session.
        session: SessionId,
        /// Source tier; `None` = the GPU.
        from: Option<Tier>,
        /// Destination tier.
        to: Tier,
        /// Bytes copied (the missing suffix).
        bytes: u64,
    },
    /// Drop the session's copy in `tier`.
    Drop {
        /// The session.
        session: SessionId,
        /// The tier.
        tier: Tier,
        /// Bytes freed.
        bytes: u64,
    },
}
