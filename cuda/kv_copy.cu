// kvpark KV block copy kernels (NVRTC-friendly: no headers, extern "C" entries).
//
// Moves blocks between vLLM's paged KV cache (device memory) and kvpark's
// canonical block records (pinned host memory mapped into the device address
// space, or a device staging buffer that is then DMA'd).
//
// Record layout (src/block.rs):  [layer][head][token][K then V]
// vLLM page of one (layer, block):
//   head-major  LBHNC: [head][token][K then V]   (identical to the record's layer slice)
//   token-major LBNHC: [token][head][K then V]   (rows are transposed)
// Every layer has its own base pointer (layers may share one storage), the
// page of block b of layer l starts at layer_base[l] + b * stride_block_bytes.
//
// Grid: x = op (one block record), y = layer (layer0 + blockIdx.y),
//       z = slice of the page (so one block still spreads over many SMs).
// Element type V: uint4 (16 B), unsigned int (4 B) or unsigned char (1 B);
// the host picks the widest V that divides every address, stride and row.

#define KVPARK_MAX_OPS 256

struct KvOps {
    // Device-usable address of each op's record (mapped host or staging).
    unsigned long long rec[KVPARK_MAX_OPS];
    // vLLM block id of each op.
    unsigned int block[KVPARK_MAX_OPS];
};

struct KvShape {
    unsigned long long stride_block_bytes; // bytes between blocks of one layer
    unsigned long long page_bytes;         // bytes of one (layer, block) page
    unsigned int heads;                    // KV heads (H)
    unsigned int tokens;                   // tokens per block (N)
    unsigned int row_bytes;                // bytes of one (head, token) row: K then V
    unsigned int head_major;               // 1 = LBHNC, 0 = LBNHC
    unsigned int layer0;                   // first layer of this launch
    unsigned int n_ops;                    // valid entries in KvOps
};

// Index (in V units) inside the vLLM page of record-page element `d`.
template <typename V>
__device__ __forceinline__ unsigned long long kv_page_index(const KvShape& s, unsigned long long d) {
    if (s.head_major) {
        return d;
    }
    const unsigned long long rv = s.row_bytes / sizeof(V);  // V per row
    const unsigned long long c = d % rv;
    const unsigned long long row = d / rv;                   // = head * N + token
    const unsigned long long t = row % s.tokens;
    const unsigned long long h = row / s.tokens;
    return (t * s.heads + h) * rv + c;
}

template <typename V, bool GATHER>
__device__ __forceinline__ void kv_move(const unsigned long long* __restrict__ layer_base,
                                        const KvOps& ops, const KvShape& s) {
    const unsigned int op = blockIdx.x;
    if (op >= s.n_ops) {
        return;
    }
    const unsigned int layer = s.layer0 + blockIdx.y;
    const unsigned long long total = s.page_bytes / sizeof(V);
    const unsigned long long per = (total + gridDim.z - 1) / gridDim.z;
    const unsigned long long begin = per * blockIdx.z;
    unsigned long long end = begin + per;
    if (end > total) {
        end = total;
    }
    V* page = reinterpret_cast<V*>(layer_base[layer] + (unsigned long long)ops.block[op] * s.stride_block_bytes);
    V* rec = reinterpret_cast<V*>(ops.rec[op] + (unsigned long long)layer * s.page_bytes);

    // Four independent loads in flight per thread before the stores: mapped
    // host memory has PCIe latency, so the loads must overlap.
    const unsigned long long step = blockDim.x;
    unsigned long long i = begin + threadIdx.x;
    for (; i + 3 * step < end; i += 4 * step) {
        V v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const unsigned long long d = i + k * step;
            v[k] = GATHER ? page[kv_page_index<V>(s, d)] : rec[d];
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const unsigned long long d = i + k * step;
            if (GATHER) {
                rec[d] = v[k];
            } else {
                page[kv_page_index<V>(s, d)] = v[k];
            }
        }
    }
    for (; i < end; i += step) {
        if (GATHER) {
            rec[i] = page[kv_page_index<V>(s, i)];
        } else {
            page[kv_page_index<V>(s, i)] = rec[i];
        }
    }
}

// Gather: vLLM pages -> records (device-to-host direction).
extern "C" __global__ void kvpark_gather_u128(const unsigned long long* layer_base, KvOps ops, KvShape s) {
    kv_move<uint4, true>(layer_base, ops, s);
}
extern "C" __global__ void kvpark_gather_u32(const unsigned long long* layer_base, KvOps ops, KvShape s) {
    kv_move<unsigned int, true>(layer_base, ops, s);
}
extern "C" __global__ void kvpark_gather_u8(const unsigned long long* layer_base, KvOps ops, KvShape s) {
    kv_move<unsigned char, true>(layer_base, ops, s);
}

// Scatter: records -> vLLM pages (host-to-device direction).
extern "C" __global__ void kvpark_scatter_u128(const unsigned long long* layer_base, KvOps ops, KvShape s) {
    kv_move<uint4, false>(layer_base, ops, s);
}
extern "C" __global__ void kvpark_scatter_u32(const unsigned long long* layer_base, KvOps ops, KvShape s) {
    kv_move<unsigned int, false>(layer_base, ops, s);
}
extern "C" __global__ void kvpark_scatter_u8(const unsigned long long* layer_base, KvOps ops, KvShape s) {
    kv_move<unsigned char, false>(layer_base, ops, s);
}
