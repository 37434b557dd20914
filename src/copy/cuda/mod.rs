//! CUDA copy engine (kernels from `cuda/`, batched DMA).
pub mod dl;
pub mod kernels;
pub mod nvrtc;
pub mod plan;
