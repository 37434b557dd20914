//! The block model: keys, KV geometry, and the canonical layout of a parked block.
//!
//! A **block** is `tokens_per_block` tokens of KV for every layer. vLLM names a
//! full block by its chained block hash (opaque bytes; sha256 by default, stable
//! across restarts). kvpark's [`BlockKey`] is a 32-byte digest of the cache salt
//! and that hash, so a block is never served across salts even if two salts
//! ever produced the same vLLM hash bytes.
//!
//! A **parked block** is one contiguous record holding all layers in canonical
//! head-major order, whatever vLLM's physical order is:
//!
//! ```text
//! record = [layer 0][layer 1]...[layer L-1]
//! layer  = [head 0][head 1]...[head H-1]            (H = KV heads)
//! head   = [token 0]...[token N-1]                  (N = tokens per block)
//! token  = [K: head_size_k elems][V: head_size_v elems]
//! ```
//!
//! so a record written from a token-major (`LBNHC`) engine loads into a
//! head-major (`LBHNC`) one and back. The copy engine gathers (save) and
//! scatters (load) between this order and vLLM's strided views.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// A parked block's identity: the vLLM block hash under a namespace of
/// (domain, model, salt, hash length).
///
/// vLLM's block hashes cover tokens (and LoRA, multimodal inputs, the cache
/// salt) but not the model, so the key also covers a [`ModelNs`]: blocks
/// parked by one model are never found by another, whatever store they sit in.
/// See [`BlockKey::derive_in`] for the construction.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(C)]
pub struct BlockKey(pub [u8; 32]);

/// The model a block belongs to, as a 32-byte digest of its identity
/// (config key `model_identity`: model name or path, revision, dtypes, KV
/// geometry, vLLM's block-hash algorithm) and kvpark's key format.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct ModelNs(pub [u8; 32]);

impl ModelNs {
    /// No model named (a C ABI user that gives no `model_identity`).
    pub const UNNAMED: ModelNs = ModelNs([0; 32]);

    /// The namespace of an identity string; empty = [`ModelNs::UNNAMED`].
    pub fn of(identity: &str) -> Self {
        if identity.is_empty() {
            return Self::UNNAMED;
        }
        let mut h = Sha256::new();
        h.update(b"kvpark-model-v1");
        h.update((identity.len() as u64).to_le_bytes());
        h.update(identity.as_bytes());
        ModelNs(h.finalize().into())
    }
}

impl BlockKey {
    /// Derives the key of a vLLM block hash under a cache salt (empty = no
    /// salt) for no named model ([`ModelNs::UNNAMED`]).
    pub fn derive(salt: &[u8], vllm_hash: &[u8]) -> Self {
        Self::derive_in(&ModelNs::UNNAMED, salt, vllm_hash)
    }

    /// Derives the key of a vLLM block hash under a cache salt for a model
    /// (see [`KeyDeriver`]).
    pub fn derive_in(model: &ModelNs, salt: &[u8], vllm_hash: &[u8]) -> Self {
        KeyDeriver::new(model, salt, vllm_hash.len()).key(vllm_hash)
    }

    /// First 8 bytes as an integer (for sharding and short display).
    pub fn short(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().unwrap())
    }

    /// Lowercase hex of the whole key.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Derives the [`BlockKey`]s of one request's vLLM block hashes (one
/// model, one cache salt, one hash length).
///
/// The namespace digest `d` = SHA-256 over (domain `kvpark-block-v3`, the
/// [`ModelNs`], the length-prefixed salt, the hash length) is computed once;
/// a hash of up to 32 bytes becomes `d` XOR the hash (zero-padded), a
/// longer one SHA-256 over (`d`, hash). So a block's key costs a 32-byte XOR
/// instead of a SHA-256 per block (the scheduler derives every block of
/// every request it matches). Within a namespace two keys are equal exactly
/// when the hashes are; across namespaces `d` differs, so a shorter hash
/// never meets another namespace's keys (the padding bytes are `d`'s), and a
/// 32-byte one would need two vLLM hashes (SHA-256 digests) whose XOR is a
/// given value, a 2^128 search.
#[derive(Clone, Copy, Debug)]
pub struct KeyDeriver {
    d: [u8; 32],
}

impl KeyDeriver {
    /// The deriver of `hash_len`-byte hashes under `salt` for `model`.
    pub fn new(model: &ModelNs, salt: &[u8], hash_len: usize) -> Self {
        let mut h = Sha256::new();
        h.update(b"kvpark-block-v3");
        h.update(model.0);
        h.update((salt.len() as u64).to_le_bytes());
        h.update(salt);
        h.update((hash_len as u64).to_le_bytes());
        KeyDeriver {
            d: h.finalize().into(),
        }
    }

    /// The key of one vLLM block hash (of the length given to [`Self::new`]).
    #[inline]
    pub fn key(&self, vllm_hash: &[u8]) -> BlockKey {
        if vllm_hash.len() > 32 {
            let mut h = Sha256::new();
            h.update(self.d);
            h.update(vllm_hash);
            return BlockKey(h.finalize().into());
        }
        let mut k = self.d;
        // fixed lengths (vLLM's: 32-byte SHA-256, 8-byte ints) unrolled
        if let Ok(h) = <&[u8; 32]>::try_from(vllm_hash) {
            for (a, b) in k.iter_mut().zip(h) {
                *a ^= b;
            }
        } else if let Ok(h) = <&[u8; 8]>::try_from(vllm_hash) {
            for (a, b) in k.iter_mut().zip(h) {
                *a ^= b;
            }
        } else {
            for (a, b) in k.iter_mut().zip(vllm_hash) {
                *a ^= b;
            }
        }
        BlockKey(k)
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({:016x})", self.short())
    }
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Dtype {
    /// IEEE half.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
    /// IEEE single (the CPU backend's test models).
    F32 = 3,
    /// 8-bit float KV (e4m3 / e5m2).
    Fp8 = 4,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
            Dtype::Fp8 => 1,
        }
    }

    /// From the C ABI / on-disk code.
    pub fn from_code(c: u8) -> Result<Self> {
        Ok(match c {
            1 => Dtype::F16,
            2 => Dtype::Bf16,
            3 => Dtype::F32,
            4 => Dtype::Fp8,
            _ => return Err(Error::invalid(format!("unknown dtype code {c}"))),
        })
    }

    /// Parses "bf16", "float16", "fp32", ...
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().trim_start_matches("torch.") {
            "f16" | "fp16" | "float16" | "half" => Dtype::F16,
            "bf16" | "bfloat16" => Dtype::Bf16,
            "f32" | "fp32" | "float32" | "float" => Dtype::F32,
            "fp8" | "float8_e4m3fn" | "float8_e5m2" | "uint8" | "int8" => Dtype::Fp8,
            _ => return Err(Error::invalid(format!("unsupported KV dtype {s:?}"))),
        })
    }
}

/// Physical order of one layer's `[blocks, heads, tokens, content]` view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum KvLayout {
    /// Head-major (`HND`): block page is `[H, N, C]` (CPU backend, offloading).
    Lbhnc = 1,
    /// Token-major (`NHD`): block page is `[N, H, C]` (FlashAttention default).
    Lbnhc = 2,
}

impl KvLayout {
    /// Both orders, in the order [`LayerView::layout`] tries them.
    pub const ALL: [KvLayout; 2] = [KvLayout::Lbhnc, KvLayout::Lbnhc];

    /// Element strides `(head, token)` of a page stored in this order, for
    /// `g` (`C` = K + V elements of a row): LBHNC `(N·C, C)`, LBNHC
    /// `(C, H·C)`. kvpark's one mapping between a layout and a view's
    /// strides: [`LayerView::layout`] classifies vLLM's views by it and
    /// [`LayerView::packed`] builds views (benchmarks, tests) with it. In
    /// `u128`: any `u32` dimensions multiply without wrapping.
    pub fn strides(self, g: &Geometry) -> (u128, u128) {
        let h = g.kv_heads as u128;
        let n = g.block_tokens as u128;
        let c = g.head_size_k as u128 + g.head_size_v as u128;
        match self {
            KvLayout::Lbhnc => (n * c, c),
            KvLayout::Lbnhc => (c, h * c),
        }
    }
}

/// Shape of the KV cache of one engine rank: what a block is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    /// Attention layers that hold KV.
    pub layers: u32,
    /// KV heads on this rank.
    pub kv_heads: u32,
    /// Tokens per block (vLLM `block_size`).
    pub block_tokens: u32,
    /// K head size in elements.
    pub head_size_k: u32,
    /// V head size in elements.
    pub head_size_v: u32,
    /// Element type.
    pub dtype: Dtype,
}

impl Geometry {
    /// Checks that every dimension is non-zero and the block fits in 4 GiB.
    ///
    /// The sizes come from outside (the C ABI), so they are multiplied in
    /// `u128`, where `u32` factors cannot overflow: once this returns `Ok`,
    /// every size method below fits its `usize` result without wrapping.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("layers", self.layers),
            ("kv_heads", self.kv_heads),
            ("block_tokens", self.block_tokens),
            ("head_size_k", self.head_size_k),
        ];
        for (name, v) in dims {
            if v == 0 {
                return Err(Error::invalid(format!("geometry: {name} must be > 0")));
            }
        }
        let bytes = self.block_bytes_u128();
        if bytes > u32::MAX as u128 {
            return Err(Error::invalid(format!(
                "geometry: a block of {bytes} bytes ({} layers x {} KV heads x {} tokens x ({} + {}) elements of {} bytes) exceeds 4 GiB",
                self.layers,
                self.kv_heads,
                self.block_tokens,
                self.head_size_k,
                self.head_size_v,
                self.dtype.size()
            )));
        }
        Ok(())
    }

    /// Bytes of one parked block, computed without overflow (any `u32` dimensions).
    pub fn block_bytes_u128(&self) -> u128 {
        self.layers as u128 * self.page_elems_u128() * self.dtype.size() as u128
    }

    /// Elements of one layer's page (`kv_heads × block_tokens × row`), without overflow.
    pub fn page_elems_u128(&self) -> u128 {
        self.kv_heads as u128
            * self.block_tokens as u128
            * (self.head_size_k as u128 + self.head_size_v as u128)
    }

    /// Elements per (head, token) row: K then V.
    pub fn row_elems(&self) -> usize {
        self.head_size_k as usize + self.head_size_v as usize
    }

    /// Bytes per (head, token) row.
    pub fn row_bytes(&self) -> usize {
        self.row_elems() * self.dtype.size()
    }

    /// Bytes of one layer of one block.
    pub fn layer_page_bytes(&self) -> usize {
        self.kv_heads as usize * self.block_tokens as usize * self.row_bytes()
    }

    /// Bytes of one parked block (all layers).
    pub fn block_bytes(&self) -> usize {
        self.layers as usize * self.layer_page_bytes()
    }

    /// KV bytes per token over all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.block_bytes() / self.block_tokens as usize
    }

    /// Byte offset of (layer, head, token) in the canonical record.
    pub fn record_offset(&self, layer: usize, head: usize, token: usize) -> usize {
        ((layer * self.kv_heads as usize + head) * self.block_tokens as usize + token)
            * self.row_bytes()
    }
}

/// One layer of vLLM's KV cache as a strided 4-D view in memory kvpark does not own.
///
/// Strides are in **elements** of the view's dtype, in the logical order
/// `[block, head, token, content]`; the content stride must be 1. Several
/// layers may point into the same storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct LayerView {
    /// Address of element `[0, 0, 0, 0]`.
    pub base: u64,
    /// Number of blocks in the view (block ids are `< num_blocks`).
    pub num_blocks: u64,
    /// Stride between blocks, in elements.
    pub stride_block: u64,
    /// Stride between KV heads, in elements.
    pub stride_head: u64,
    /// Stride between tokens, in elements.
    pub stride_token: u64,
}

impl LayerView {
    /// Classifies the view's physical order, or explains why it is unsupported.
    ///
    /// Strides are compared in `u128`, so no product of outside sizes wraps.
    pub fn layout(&self, g: &Geometry) -> Result<KvLayout> {
        let have = (self.stride_head as u128, self.stride_token as u128);
        if let Some(l) = KvLayout::ALL.into_iter().find(|l| l.strides(g) == have) {
            return Ok(l);
        }
        let row = g.head_size_k as u128 + g.head_size_v as u128;
        Err(Error::invalid(format!(
            "layer view strides (block {}, head {}, token {}) are neither LBHNC nor LBNHC for row {row}",
            self.stride_block, self.stride_head, self.stride_token
        )))
    }

    /// The view of `num_blocks` pages of `g` stored in `layout`, page `b` at
    /// `base + b × stride_block` elements: head and token strides from
    /// [`KvLayout::strides`]. Fails when they do not fit in 64 bits (a
    /// geometry that [`Geometry::validate`] refuses).
    pub fn packed(
        g: &Geometry,
        layout: KvLayout,
        base: u64,
        num_blocks: u64,
        stride_block: u64,
    ) -> Result<LayerView> {
        let (sh, st) = layout.strides(g);
        let fit = |v: u128| {
            u64::try_from(v).map_err(|_| {
                Error::invalid(format!("layer view stride of {v} elements exceeds 64 bits"))
            })
        };
        Ok(LayerView {
            base,
            num_blocks,
            stride_block,
            stride_head: fit(sh)?,
            stride_token: fit(st)?,
        })
    }

    /// Checks the view against the geometry: known order, pages inside the
    /// block stride, non-null base, and every page's last byte addressable
    /// (`base + (num_blocks - 1) × block stride + page` fits in 64 bits), so
    /// [`LayerView::page_addr`] never wraps for a block id `< num_blocks`.
    pub fn validate(&self, g: &Geometry) -> Result<KvLayout> {
        if self.base == 0 {
            return Err(Error::invalid("layer view base address is NULL"));
        }
        if self.num_blocks == 0 {
            return Err(Error::invalid("layer view has zero blocks"));
        }
        let layout = self.layout(g)?;
        let page_elems = g.page_elems_u128();
        if self.num_blocks > 1 && (self.stride_block as u128) < page_elems {
            return Err(Error::invalid(format!(
                "layer view block stride {} is smaller than a page of {page_elems} elements",
                self.stride_block
            )));
        }
        let elem = g.dtype.size() as u128;
        let end = self.base as u128
            + (self.num_blocks as u128 - 1) * self.stride_block as u128 * elem
            + page_elems * elem;
        if end > u64::MAX as u128 {
            return Err(Error::invalid(format!(
                "layer view of {} blocks (stride {} elements) at {:#x} runs past the end of the address space",
                self.num_blocks, self.stride_block, self.base
            )));
        }
        Ok(layout)
    }

    /// Views of every layer of `g` over one storage of `blocks` pages per
    /// layer, layer-major (layer `l`'s pages start `l × blocks` pages after
    /// `base`), pages packed in `layout`: how vLLM lays out one
    /// KVCacheTensor, and what the benchmarks and tests register.
    pub fn layer_major(
        g: &Geometry,
        layout: KvLayout,
        base: u64,
        blocks: u64,
    ) -> Result<Vec<LayerView>> {
        let page = u64::try_from(g.page_elems_u128())
            .map_err(|_| Error::invalid("layer page exceeds 64 bits of elements"))?;
        let layer_bytes = blocks
            .checked_mul(page)
            .and_then(|x| x.checked_mul(g.dtype.size() as u64))
            .ok_or_else(|| {
                Error::invalid(format!("{blocks} blocks of {page} elements exceed 64 bits"))
            })?;
        (0..g.layers as u64)
            .map(|l| {
                let at = l
                    .checked_mul(layer_bytes)
                    .and_then(|x| x.checked_add(base))
                    .ok_or_else(|| {
                        Error::invalid(format!("layer {l} lies past the address space"))
                    })?;
                LayerView::packed(g, layout, at, blocks, page)
            })
            .collect()
    }

    /// Address of block `b`'s page.
    pub fn page_addr(&self, g: &Geometry, b: u64) -> u64 {
        self.base + b * self.stride_block * g.dtype.size() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama8b() -> Geometry {
        Geometry {
            layers: 32,
            kv_heads: 8,
            block_tokens: 16,
            head_size_k: 128,
            head_size_v: 128,
            dtype: Dtype::Bf16,
        }
    }

    /// Each layout's strides place every (head, token, element) of a page at
    /// its own offset inside the page, in the order the layout names, and a
    /// view built with them is classified as that layout again.
    #[test]
    fn layout_strides_pack_the_page_and_classify_back() {
        let g = Geometry {
            layers: 3,
            kv_heads: 3,
            block_tokens: 5,
            head_size_k: 2,
            head_size_v: 2,
            dtype: Dtype::F16,
        };
        let (h, n, c) = (3u128, 5u128, 4u128);
        for layout in KvLayout::ALL {
            let (sh, st) = layout.strides(&g);
            let mut offs: Vec<(u128, (u128, u128))> = Vec::new();
            for hh in 0..h {
                for t in 0..n {
                    for e in 0..c {
                        offs.push((hh * sh + t * st + e, (hh, t)));
                    }
                }
            }
            offs.sort();
            let flat: Vec<u128> = offs.iter().map(|o| o.0).collect();
            assert_eq!(flat, (0..h * n * c).collect::<Vec<_>>(), "{layout:?}");
            // the outer index of the physical order changes slowest
            let outer: Vec<u128> = offs
                .iter()
                .step_by((c * if layout == KvLayout::Lbhnc { n } else { h }) as usize)
                .map(|o| {
                    if layout == KvLayout::Lbhnc {
                        o.1 .0
                    } else {
                        o.1 .1
                    }
                })
                .collect();
            let want = if layout == KvLayout::Lbhnc { h } else { n };
            assert_eq!(outer, (0..want).collect::<Vec<_>>(), "{layout:?}");
            let v = LayerView::packed(&g, layout, 4096, 2, (h * n * c) as u64).unwrap();
            assert_eq!(v.validate(&g).unwrap(), layout);
            let views = LayerView::layer_major(&g, layout, 4096, 7).unwrap();
            let bases: Vec<u64> = views.iter().map(|v| v.base).collect();
            let layer_bytes = 7 * (h * n * c) as u64 * 2;
            assert_eq!(bases, [4096, 4096 + layer_bytes, 4096 + 2 * layer_bytes]);
            assert!(views.iter().all(|x| x.layout(&g).unwrap() == layout));
        }
        // sizes past 64 bits are an error, not a wrapped stride or address
        let huge = Geometry {
            kv_heads: u32::MAX,
            block_tokens: u32::MAX,
            head_size_k: u32::MAX,
            head_size_v: u32::MAX,
            ..g
        };
        assert!(LayerView::packed(&huge, KvLayout::Lbhnc, 4096, 1, 1).is_err());
        assert!(LayerView::layer_major(&g, KvLayout::Lbhnc, u64::MAX - 8, 7).is_err());
    }

    #[test]
    fn llama8b_is_128_kib_per_token() {
        let g = llama8b();
        assert_eq!(g.bytes_per_token(), 128 * 1024);
        assert_eq!(g.block_bytes(), 2 * 1024 * 1024);
    }

    #[test]
    fn model_changes_key() {
        let h = [7u8; 32];
        let a = ModelNs::of(r#"{"model":"/m/base"}"#);
        let b = ModelNs::of(r#"{"model":"/m/instruct"}"#);
        assert_ne!(a, b);
        assert_ne!(a, ModelNs::UNNAMED);
        assert_eq!(ModelNs::of(""), ModelNs::UNNAMED);
        assert_ne!(
            BlockKey::derive_in(&a, b"", &h),
            BlockKey::derive_in(&b, b"", &h)
        );
        assert_ne!(BlockKey::derive_in(&a, b"", &h), BlockKey::derive(b"", &h));
        assert_eq!(
            BlockKey::derive_in(&ModelNs::UNNAMED, b"s", &h),
            BlockKey::derive(b"s", &h)
        );
    }

    #[test]
    fn keys_are_equal_exactly_when_namespace_and_hash_are() {
        let m = ModelNs::of("m");
        let h32 = [7u8; 32];
        let mut h32b = h32;
        h32b[31] ^= 1;
        let d = KeyDeriver::new(&m, b"s", 32);
        assert_eq!(d.key(&h32), BlockKey::derive_in(&m, b"s", &h32));
        assert_ne!(d.key(&h32), d.key(&h32b));
        // a hash and its zero-padded longer form: different namespaces
        assert_ne!(
            BlockKey::derive_in(&m, b"", &[1]),
            BlockKey::derive_in(&m, b"", &[1, 0])
        );
        // long hashes: every byte counts
        let long: Vec<u8> = (0..40).collect();
        let mut long2 = long.clone();
        long2[39] ^= 1;
        assert_ne!(
            BlockKey::derive_in(&m, b"", &long),
            BlockKey::derive_in(&m, b"", &long2)
        );
        // an 8-byte hash leaves the namespace digest in the other 24 bytes
        let a = BlockKey::derive_in(&m, b"a", &[1; 8]);
        let b = BlockKey::derive_in(&m, b"b", &[1; 8]);
        assert_ne!(a.0[8..], b.0[8..]);
    }

    #[test]
    fn salt_changes_key() {
        let h = [7u8; 32];
        assert_ne!(BlockKey::derive(b"", &h), BlockKey::derive(b"a", &h));
        assert_eq!(BlockKey::derive(b"a", &h), BlockKey::derive(b"a", &h));
        // length prefixes keep (salt, hash) boundaries unambiguous
        assert_ne!(BlockKey::derive(b"ab", b"c"), BlockKey::derive(b"a", b"bc"));
    }

    #[test]
    fn overflowing_geometry_is_refused() {
        // kv_heads × block_tokens × 2 wraps a 64-bit product to 4096
        let g = Geometry {
            layers: 1,
            kv_heads: 2_470_091_528,
            block_tokens: 3_734_020_352,
            head_size_k: 1,
            head_size_v: 1,
            dtype: Dtype::Fp8,
        };
        let e = g.validate().unwrap_err();
        assert!(e.message().contains("exceeds 4 GiB"), "{e}");
        assert_eq!(g.block_bytes_u128(), 2_470_091_528u128 * 3_734_020_352 * 2);
        // head sizes whose u32 sum wraps to a 1-element row
        let g = Geometry {
            layers: 1,
            kv_heads: 1,
            block_tokens: 1,
            head_size_k: u32::MAX,
            head_size_v: 2,
            dtype: Dtype::Fp8,
        };
        assert_eq!(g.row_elems(), u32::MAX as usize + 2);
        assert!(g.validate().is_err());
        // a token-major view with those sizes is not taken for a valid layout
        let v = LayerView {
            base: 4096,
            num_blocks: 1,
            stride_block: 4096,
            stride_head: 1,
            stride_token: 1,
        };
        assert!(v.layout(&g).is_err());
    }

    #[test]
    fn view_past_the_address_space_is_refused() {
        let g = llama8b();
        let row = 256u64;
        let v = LayerView {
            base: u64::MAX - 4096,
            num_blocks: 2,
            stride_block: 8 * 16 * row,
            stride_head: 16 * row,
            stride_token: row,
        };
        let e = v.validate(&g).unwrap_err();
        assert!(e.message().contains("address space"), "{e}");
        let huge = LayerView {
            base: 4096,
            num_blocks: u64::MAX,
            stride_block: u64::MAX / 2,
            ..v
        };
        assert!(huge.validate(&g).is_err());
    }

    #[test]
    fn layouts_are_classified() {
        let g = llama8b();
        let row = 256u64;
        let hnd = LayerView {
            base: 64,
            num_blocks: 4,
            stride_block: 8 * 16 * row,
            stride_head: 16 * row,
            stride_token: row,
        };
        assert_eq!(hnd.validate(&g).unwrap(), KvLayout::Lbhnc);
        let nhd = LayerView {
            stride_head: row,
            stride_token: 8 * row,
            ..hnd
        };
        assert_eq!(nhd.validate(&g).unwrap(), KvLayout::Lbnhc);
        let bad = LayerView {
            stride_token: 3,
            ..hnd
        };
        assert!(bad.validate(&g).is_err());
    }
}
