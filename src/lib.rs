//! # kvpark
//!
//! kvpark parks the KV cache of suspended coding-agent sessions — GPU →
//! pinned host memory → compressed NVMe — predicts how long each gap will
//! last, and brings the blocks back before (or the moment) the next step
//! arrives. It is loaded into an unmodified vLLM through a small Python
//! connector (`python_shim/`) over this crate's C ABI.
//!
//! ## Architecture map
//!
//! ```text
//!  ffi ───────────────▶ planner (scheduler role)        mover (worker role)
//!   (C ABI only)          │ sessions, block chains        │ registered KV layout
//!                         │ plans as opaque bytes         │ executes plans
//!                         ▼                               ▼
//!                       policy ◀── predict              tier::{host, nvme}, copy, codec, index
//!                       (pure: time is an argument)
//!  sim (trace reader, generator, replay) drives planner + policy on a virtual clock
//! ```
//!
//! Dependencies point down only:
//!
//! | module       | may use                                              | never uses          |
//! |--------------|------------------------------------------------------|---------------------|
//! | [`ffi`]      | everything below                                     | —                   |
//! | [`planner`]  | policy, predict, index, block, config                | tier, copy, ffi     |
//! | [`mover`]    | tier, copy, codec, index, block, config              | policy, ffi         |
//! | [`store`]    | tier, index, block, config (chunks under caller keys: the LMCache plugin) | planner, mover, copy, ffi |
//! | [`policy`]   | predict, block                                       | tier, copy, ffi, io |
//! | [`predict`]  | (pure)                                               | everything with I/O |
//! | [`tier`]     | codec, block, error                                  | planner, policy     |
//! | [`copy`]     | block, error (`copy::cuda` implements `tier::host::PinHook`) | planner, mover |
//! | [`sim`]      | planner, policy, predict, codec (measured figures)   | ffi, tier, copy     |
//! | [`config`]   | codec, error, units, `copy::cuda::plan` (pure: the `copy_strategy` rules) | tier, planner, mover, ffi |
//!
//! `policy` and `predict` are pure code: no threads, no I/O, no clock reads.
//! The replay simulator runs the very same planner on a virtual clock, so
//! what the replay measures is what production runs.

#![warn(missing_docs)]

pub mod benchkit;
pub mod block;
pub mod codec;
pub mod config;
pub mod copy;
pub mod error;
pub mod ffi;
pub mod index;
pub mod mover;
pub mod plan;
pub mod planner;
pub mod policy;
pub mod predict;
pub mod preflight;
pub mod sim;
pub mod store;
pub mod tier;
pub mod units;

pub use error::{Error, ErrorKind, Result};
