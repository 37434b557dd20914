//! CUDA copy engine (kernels from `cuda/`, batched DMA). See issue: CUDA data path.
