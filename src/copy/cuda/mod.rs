//! The CUDA copy engine: kernels from `cuda/` and batched DMA between vLLM's
//! device KV cache and kvpark's pinned host records.
//!
//! | file          | what                                                                    | needs a GPU |
//! |---------------|-------------------------------------------------------------------------|-------------|
//! | [`plan`]      | strategy selector (default table, config rules), DMA lists, launch shape | no          |
//! | [`kernels`]   | the embedded `cuda/*.cu` sources, entry names, parameter mirrors       | no          |
//! | [`nvrtc`]     | NVRTC opened by explicit path; compiles the sources                     | no          |
//! | [`pin`]       | `cuMemHostRegister` hook, chunked background [`pin::PinningJob`]         | register fn |
//! | [`driver`]    | fallible driver loading, error mapping, context guard, device buffers  | yes         |
//! | [`engine`]    | [`CudaEngine`]: `CopyEngine` + async onload/offload handles             | yes         |
//! | `bench`       | self-test and GB/s benchmark entry points (features `cli`, `gpu-bench`) | yes         |
//!
//! The types exist in every build. Without `libcuda.so.1`, [`CudaEngine::new`]
//! returns an [`ErrorKind::Cuda`](crate::ErrorKind::Cuda) error ("no CUDA
//! driver (libcuda.so.1 not found)"), never a panic; without NVRTC likewise.
//!
//! Mechanisms and how one is picked per transfer shape: see [`plan`].

#[cfg(any(feature = "cli", feature = "gpu-bench"))]
pub mod bench;
pub mod dl;
pub mod driver;
pub mod engine;
pub mod kernels;
pub mod nvrtc;
pub mod pin;
pub mod plan;

pub use engine::{CudaEngine, CudaStats, HostRecord, OffloadHandle, OnloadHandle};
pub use pin::{CudaPinner, PinHook, PinningJob};
pub use plan::{Direction, Selector, Strategy};
