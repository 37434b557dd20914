//! The kernel sources of `cuda/`, embedded at build time, and the entry
//! points each one must define. The PTX test (`tests/cuda_ptx.rs`) compiles
//! every source with NVRTC and checks each `.entry`; `tests/cuda_kernels_host.rs`
//! compiles the same text as C++ and runs it on the CPU; the engine compiles
//! it at run time for the device it runs on.

/// One `.cu` file: its name, its text and the `extern "C"` entries it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name under `cuda/`.
    pub file: &'static str,
    /// The source text.
    pub text: &'static str,
    /// Entry points (`extern "C" __global__`) the file must define.
    pub entries: &'static [&'static str],
}

/// Gather/scatter of KV blocks: `cuda/kv_copy.cu`.
pub const KV_COPY: KernelSource = KernelSource {
    file: "kv_copy.cu",
    text: include_str!("../../../cuda/kv_copy.cu"),
    entries: &[
        "kvpark_gather_u128",
        "kvpark_gather_u32",
        "kvpark_gather_u8",
        "kvpark_scatter_u128",
        "kvpark_scatter_u32",
        "kvpark_scatter_u8",
    ],
};

/// Every kernel source kvpark ships.
pub const ALL: &[KernelSource] = &[KV_COPY];

/// Ops per launch: must equal `KVPARK_MAX_OPS` in `cuda/kv_copy.cu`.
pub const MAX_OPS: usize = 256;

/// Mirror of `struct KvOps` in `cuda/kv_copy.cu` (passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KvOps {
    /// Device-usable address of each op's record.
    pub rec: [u64; MAX_OPS],
    /// vLLM block id of each op.
    pub block: [u32; MAX_OPS],
}

/// Mirror of `struct KvShape` in `cuda/kv_copy.cu` (passed by value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvShape {
    /// Bytes between blocks of one layer.
    pub stride_block_bytes: u64,
    /// Bytes of one (layer, block) page.
    pub page_bytes: u64,
    /// KV heads.
    pub heads: u32,
    /// Tokens per block.
    pub tokens: u32,
    /// Bytes of one (head, token) row.
    pub row_bytes: u32,
    /// 1 = LBHNC, 0 = LBNHC.
    pub head_major: u32,
    /// First layer of the launch.
    pub layer0: u32,
    /// Valid entries in [`KvOps`].
    pub n_ops: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_mirrors_match_the_kernel_source() {
        assert!(KV_COPY
            .text
            .contains(&format!("#define KVPARK_MAX_OPS {MAX_OPS}")));
        // C layout: 256 * 8 + 256 * 4 bytes, no padding at the end (8-aligned).
        assert_eq!(std::mem::size_of::<KvOps>(), MAX_OPS * 12);
        assert_eq!(std::mem::size_of::<KvShape>(), 16 + 6 * 4);
        // the whole parameter list stays under CUDA's 4 KiB launch limit
        assert!(8 + std::mem::size_of::<KvOps>() + std::mem::size_of::<KvShape>() <= 4096);
        for e in KV_COPY.entries {
            assert!(
                KV_COPY.text.contains(&format!("void {e}(")),
                "{e} not in source"
            );
        }
    }
}
