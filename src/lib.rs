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
//!   (with `--blocks` the block planner too, its plans run by a modelled worker)
//! ```
//!
//! Dependencies point down only. The table lists every module and every
//! module it may name (`crate::…`), in code and in its tests alike;
//! `tests/arch.rs` reads it and fails on any other arrow. A `a::b` entry
//! allows only that submodule.
//!
//! | module        | may use                                                              |
//! |---------------|----------------------------------------------------------------------|
//! | [`ffi`]       | planner, mover, store, preflight, config, copy::cuda, block, error   |
//! | [`planner`]   | policy, predict, session, plan, index, tier::parked, block, config, error |
//! | [`mover`]     | tier, copy, codec, index, plan, block, config, units, error          |
//! | [`store`]     | tier, index, block, config, error                                    |
//! | [`preflight`] | tier, config, units, error                                           |
//! | `sim`         | planner, policy, predict, session, plan, block, codec, config, units, error |
//! | [`policy`]    | predict, session, units, error                                       |
//! | [`predict`]   | session                                                              |
//! | [`plan`]      | block, error                                                         |
//! | [`index`]     | tier, block, error                                                   |
//! | [`tier`]      | codec, block, units, error, benchkit                                 |
//! | [`copy`]      | tier, block, error, benchkit                                         |
//! | [`codec`]     | error, benchkit                                                      |
//! | [`config`]    | codec, copy::select, policy, units, error                            |
//! | `benchkit`    | —                                                                    |
//! | [`block`]     | error                                                                |
//! | [`units`]     | error                                                                |
//! | [`session`]   | —                                                                    |
//! | [`error`]     | —                                                                    |
//!
//! Notes: `copy::cuda` implements `tier::host::PinHook`, and `index` names
//! host slots by `tier::host::SlotId`; `ffi` reaches `copy::cuda` only for
//! the `gpu-bench` exports. [`session`] is the vocabulary `planner`,
//! `policy` and `predict` share ([`planner::core`] re-exports it);
//! [`copy::select`] is the pure half of the CUDA strategy choice that
//! `config` validates `copy_strategy` with, as [`policy::Knobs`] is what
//! it validates the `kvpark` policy's knobs with.
//!
//! ## What the library carries
//!
//! The library vLLM loads (`cargo build --release --lib`) is the connector
//! only. Cargo feature `cli` adds `sim` (trace reader, generator, replay),
//! the benchmarks (`benchkit`, `*::bench`) and the `kvpark` binary; feature
//! `gpu-bench` adds the `kvpark_cuda_*` test and benchmark C exports that
//! `scripts/gpu/` drives.
//!
//! `policy` and `predict` are pure code: no threads, no I/O, no clock reads
//! (`tests/arch.rs` checks them, [`session`] and [`copy::select`]).
//! The replay simulator runs the very same planner on a virtual clock, so
//! what the replay measures is what production runs.

#![warn(missing_docs)]

#[cfg(any(test, feature = "cli", feature = "gpu-bench"))]
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
pub mod session;
#[cfg(feature = "cli")]
pub mod sim;
pub mod store;
pub mod tier;
pub mod units;

pub use error::{Error, ErrorKind, Result};
