// cuda/kv_copy.cu compiled for the CPU, for tests/cuda_kernels_host.rs.
//
// The kernel source is included unchanged after a prelude that gives the CUDA
// built-ins it uses their host meaning: the qualifiers vanish, uint4 is a
// 16-byte aligned struct (as on the device, where a misaligned 16-byte access
// faults), and threadIdx / blockIdx / blockDim / gridDim are globals the
// launcher sets before it runs each thread of the grid (thread-local: tests
// may launch from several threads at once).
//
// The copy kernels share nothing between threads (no __shared__, no
// __syncthreads, every thread writes its own elements), so running the
// threads of a grid one after another produces the bytes the device produces.
//
// Built by the test: c++ -std=c++17 -O2 -fno-strict-aliasing -shared -fPIC
// -I cuda tests/c/kernel_host.cpp -o kernel_host.so

struct uint3 {
    unsigned int x, y, z;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
static thread_local uint3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline

#include "kv_copy.cu"

// emu_<entry>(grid, threads, layer table, ops, shape): one launch of <entry>.
#define KVPARK_EMU(name)                                                                        \
    extern "C" void emu_##name(const unsigned int grid[3], unsigned int threads,                \
                               const unsigned long long* table, const KvOps* ops,               \
                               const KvShape* s) {                                              \
        gridDim = {grid[0], grid[1], grid[2]};                                                  \
        blockDim = {threads, 1, 1};                                                             \
        for (unsigned int z = 0; z < grid[2]; ++z)                                              \
            for (unsigned int y = 0; y < grid[1]; ++y)                                          \
                for (unsigned int x = 0; x < grid[0]; ++x)                                      \
                    for (unsigned int t = 0; t < threads; ++t) {                                \
                        blockIdx = {x, y, z};                                                   \
                        threadIdx = {t, 0, 0};                                                  \
                        name(table, *ops, *s);                                                  \
                    }                                                                           \
    }

KVPARK_EMU(kvpark_gather_u128)
KVPARK_EMU(kvpark_gather_u32)
KVPARK_EMU(kvpark_gather_u8)
KVPARK_EMU(kvpark_scatter_u128)
KVPARK_EMU(kvpark_scatter_u32)
KVPARK_EMU(kvpark_scatter_u8)
