/* C smoke test of the kvpark ABI, compiled against include/kvpark.h and run
 * under valgrind (or AddressSanitizer) by scripts/test.sh.
 *
 * 1. Misuse: NULL pointers, undersized buffers, inconsistent geometry, free(NULL)
 *    -> status codes with a message, no crash.
 * 2. A full park/load round trip through planner and mover on a fake
 *    head-major KV cache in host memory: the loaded block equals the saved one,
 *    byte for byte. */
#define _POSIX_C_SOURCE 200809L
#include "kvpark.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int failures = 0;
#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            char e_[512];                                                       \
            kvpark_last_error(e_, sizeof e_);                                   \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                \
            fprintf(stderr, __VA_ARGS__);                                       \
            fprintf(stderr, " (last error: %s)\n", e_);                         \
            failures++;                                                         \
        }                                                                       \
    } while (0)

static int last_error_contains(const char *needle) {
    char buf[512];
    size_t n = kvpark_last_error(buf, sizeof buf);
    return n > 0 && strstr(buf, needle) != NULL;
}

/* Whether kvpark's bytes (not NUL-terminated) contain `needle`. */
static int buf_contains(const KvparkBuf *b, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; b->ptr != NULL && i + k <= b->len; i++)
        if (memcmp(b->ptr + i, needle, k) == 0) return 1;
    return 0;
}

enum { LAYERS = 2, HEADS = 2, TOKENS = 4, HEAD = 8, BLOCKS = 16 };
#define ROW (2 * HEAD)
#define PAGE (HEADS * TOKENS * ROW)

static void misuse(void) {
    KvparkPlanner *p = NULL;
    KvparkMover *m = NULL;
    KvparkBuf out = {0};

    CHECK(kvpark_abi_version() == KVPARK_ABI_VERSION, "abi version");
    CHECK(kvpark_planner_new(NULL, 0, 16, 0, 1, NULL) == KVPARK_STATUS_NULL_POINTER, "planner_new(out=NULL)");
    CHECK(last_error_contains("`out`"), "message names the argument");
    CHECK(kvpark_config_validate((const uint8_t *)"{\"host_bytes\":\"lots\"}", 21, &out) == KVPARK_STATUS_CONFIG,
          "bad config value");
    CHECK(out.ptr == NULL && out.len == 0, "no output on failure");
    CHECK(last_error_contains("host_bytes"), "config error names the key");
    CHECK(kvpark_planner_match(NULL, NULL, 0, 0, 0, NULL) == KVPARK_STATUS_NULL_POINTER, "match(NULL)");
    CHECK(kvpark_mover_start_load(NULL) == KVPARK_STATUS_NULL_POINTER, "start_load(NULL)");
    CHECK(kvpark_mover_set_stream(NULL, 0) == KVPARK_STATUS_NULL_POINTER, "set_stream(NULL)");
    CHECK(kvpark_planner_tick_moves(NULL, 0, &out) == KVPARK_STATUS_NULL_POINTER, "tick_moves(NULL)");
    CHECK(kvpark_planner_next_wakeup(NULL, NULL) == KVPARK_STATUS_NULL_POINTER, "next_wakeup(NULL)");
    CHECK(kvpark_planner_expect_block_bytes(NULL, 4096) == KVPARK_STATUS_NULL_POINTER, "expect_block_bytes(NULL)");
    CHECK(kvpark_mover_run_moves(NULL, NULL, 0) == KVPARK_STATUS_NULL_POINTER, "run_moves(NULL)");
    CHECK(kvpark_planner_hear_gpu_events(NULL) == KVPARK_STATUS_NULL_POINTER, "hear_gpu_events(NULL)");
    CHECK(kvpark_planner_gpu_removed(NULL, NULL, 0, NULL) == KVPARK_STATUS_NULL_POINTER, "gpu_removed(NULL)");
    CHECK(kvpark_planner_gpu_cleared(NULL, NULL) == KVPARK_STATUS_NULL_POINTER, "gpu_cleared(NULL)");

    /* undersized last-error buffer: truncated, NUL-terminated, full length returned */
    char tiny[4];
    size_t n = kvpark_last_error(tiny, sizeof tiny);
    CHECK(n > 3 && tiny[3] == '\0', "truncated last error");
    CHECK(kvpark_last_error(NULL, 0) == n, "length query");

    CHECK(kvpark_planner_new((const uint8_t *)"{}", 2, 0, 0, 1, &p) == KVPARK_STATUS_INVALID_ARGUMENT, "block_size 0");
    CHECK(kvpark_planner_new((const uint8_t *)"{}", 2, TOKENS, 0, 1, &p) == KVPARK_STATUS_OK, "planner_new");

    /* a request whose hash bytes pointer is NULL but claims hashes */
    KvparkRequest r = {(const uint8_t *)"r", 1, NULL, 0, NULL, 8, 3, NULL, 0};
    KvparkMatch mt = {7, 7};
    CHECK(kvpark_planner_match(p, &r, 0, 100, 0, &mt) == KVPARK_STATUS_NULL_POINTER, "hashes NULL");
    CHECK(mt.external_tokens == 7, "output untouched on failure");
    /* an undersized plan buffer is rejected as corrupt */
    CHECK(kvpark_mover_new((const uint8_t *)"{\"host_bytes\":\"1MiB\"}", 21, 0, &m) == KVPARK_STATUS_OK, "mover_new");
    const uint8_t junk[3] = {'K', 'V', 'P'};
    CHECK(kvpark_mover_bind(m, junk, sizeof junk) == KVPARK_STATUS_CORRUPT, "short plan");
    CHECK(kvpark_mover_run_moves(m, junk, sizeof junk) == KVPARK_STATUS_CORRUPT, "short idle plan");
    /* nothing scheduled yet: no wakeup, an empty idle plan */
    uint64_t wake = 0;
    CHECK(kvpark_planner_next_wakeup(p, &wake) == KVPARK_STATUS_OK && wake == UINT64_MAX, "no wakeup");
    CHECK(kvpark_planner_tick_moves(p, 1, &out) == KVPARK_STATUS_OK && out.len == 0, "empty idle plan");
    kvpark_buf_free(out);
    out = (KvparkBuf){0};
    CHECK(kvpark_planner_expect_block_bytes(p, 4096) == KVPARK_STATUS_OK, "expect_block_bytes");
    /* GPU-eviction news: ids NULL with a count; ids nothing parked has */
    uint64_t gone = 7;
    CHECK(kvpark_planner_hear_gpu_events(p) == KVPARK_STATUS_OK, "hear_gpu_events");
    CHECK(kvpark_planner_gpu_removed(p, NULL, 2, &gone) == KVPARK_STATUS_NULL_POINTER && gone == 7, "removed ids NULL");
    const uint64_t removed[2] = {1, 2};
    CHECK(kvpark_planner_gpu_removed(p, removed, 2, &gone) == KVPARK_STATUS_OK && gone == 0, "unknown ids");
    CHECK(kvpark_planner_gpu_cleared(p, &gone) == KVPARK_STATUS_OK && gone == 0, "cleared, nothing parked");

    /* inconsistent geometry: 2 layers declared, 1 view given; strides of neither order */
    float *kv = calloc((size_t)BLOCKS * PAGE, sizeof(float));
    KvparkGeometry g = {LAYERS, HEADS, TOKENS, HEAD, HEAD, 3};
    KvparkLayerView v = {(uint64_t)(uintptr_t)kv, BLOCKS, PAGE, TOKENS * ROW, ROW};
    CHECK(kvpark_mover_register(m, &g, &v, 1, 0) == KVPARK_STATUS_INVALID_ARGUMENT, "layer count mismatch");
    KvparkLayerView bad[2] = {v, v};
    bad[1].stride_token = 3;
    CHECK(kvpark_mover_register(m, &g, bad, 2, 0) == KVPARK_STATUS_INVALID_ARGUMENT, "bad strides");
    g.dtype = 99;
    KvparkLayerView ok2[2] = {v, v};
    CHECK(kvpark_mover_register(m, &g, ok2, 2, 0) == KVPARK_STATUS_INVALID_ARGUMENT, "bad dtype");
    CHECK(kvpark_mover_register(m, NULL, ok2, 2, 0) == KVPARK_STATUS_NULL_POINTER, "geometry NULL");
    /* KV claimed on CUDA device 0: without a driver this is a typed CUDA error, not a crash */
    g.dtype = 3;
    KvparkStatus st = kvpark_mover_register(m, &g, ok2, 2, 1);
    CHECK(st == KVPARK_STATUS_CUDA || st == KVPARK_STATUS_OK, "register on device: status %d", (int)st);
    if (st == KVPARK_STATUS_CUDA) CHECK(last_error_contains("CUDA"), "message says CUDA");

    kvpark_planner_free(p);
    kvpark_mover_free(m);
    kvpark_planner_free(NULL);
    kvpark_mover_free(NULL);
    kvpark_buf_free((KvparkBuf){NULL, 0});
    free(kv);
}

static void round_trip(void) {
    const char *cfg = "{\"host_bytes\":\"1MiB\"}";
    KvparkPlanner *p = NULL;
    KvparkMover *m = NULL;
    CHECK(kvpark_planner_new((const uint8_t *)cfg, strlen(cfg), TOKENS, 0, 1, &p) == KVPARK_STATUS_OK, "planner");
    CHECK(kvpark_mover_new((const uint8_t *)cfg, strlen(cfg), 0, &m) == KVPARK_STATUS_OK, "mover");

    /* one storage, two layers (as vLLM shares one KVCacheTensor) */
    size_t n = (size_t)LAYERS * BLOCKS * PAGE;
    float *kv = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) kv[i] = (float)i * 0.5f;
    KvparkGeometry g = {LAYERS, HEADS, TOKENS, HEAD, HEAD, 3};
    KvparkLayerView views[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        KvparkLayerView v = {(uint64_t)(uintptr_t)(kv + (size_t)l * BLOCKS * PAGE), BLOCKS, PAGE, TOKENS * ROW, ROW};
        views[l] = v;
    }
    CHECK(kvpark_mover_register(m, &g, views, LAYERS, 0) == KVPARK_STATUS_OK, "register");

    /* turn 1 ends: 3 full blocks in GPU blocks 5, 6, 7 */
    uint8_t hashes[3 * 8];
    for (int i = 0; i < 24; i++) hashes[i] = (uint8_t)(i * 7 + 1);
    KvparkRequest r1 = {(const uint8_t *)"turn-1", 6, NULL, 0, hashes, 8, 3, NULL, 0};
    uint32_t ids1[3] = {5, 6, 7};
    uint8_t delay = 0;
    CHECK(kvpark_planner_request_finished(p, &r1, ids1, 3, 3 * TOKENS, 1, &delay) == KVPARK_STATUS_OK, "finished");
    CHECK(delay == 1, "delay free while saving");
    KvparkBuf plan = {0};
    CHECK(kvpark_planner_build_meta(p, 2, &plan) == KVPARK_STATUS_OK, "build_meta");
    CHECK(kvpark_mover_bind(m, plan.ptr, plan.len) == KVPARK_STATUS_OK, "bind");
    kvpark_buf_free(plan);
    CHECK(kvpark_mover_start_load(m) == KVPARK_STATUS_OK, "start_load");
    CHECK(kvpark_mover_wait_for_save(m) == KVPARK_STATUS_OK, "wait_for_save");
    /* the save runs on the mover's saver thread: vLLM polls get_finished
       every step until the request is reported sent (here: up to 10 s) */
    int sent = 0;
    for (int i = 0; i < 10000 && !sent; i++) {
        KvparkBuf fin = {0};
        CHECK(kvpark_mover_get_finished(m, &fin) == KVPARK_STATUS_OK, "get_finished");
        sent = buf_contains(&fin, "\"sending\":[\"turn-1\"]");
        kvpark_buf_free(fin);
        if (!sent) {
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
        }
    }
    CHECK(sent, "turn-1 reported sent");
    KvparkBuf meta = {0};
    CHECK(kvpark_mover_take_worker_meta(m, &meta) == KVPARK_STATUS_OK && meta.len > 0, "worker meta");
    CHECK(kvpark_planner_on_worker_meta(p, meta.ptr, meta.len, 3) == KVPARK_STATUS_OK, "on_worker_meta");
    kvpark_buf_free(meta);

    /* vLLM evicts the blocks: overwrite them */
    for (int l = 0; l < LAYERS; l++)
        for (int b = 5; b <= 7; b++) memset(kv + ((size_t)l * BLOCKS + b) * PAGE, 0, PAGE * sizeof(float));

    /* turn 2: same prefix + more; vLLM has no local hit; new blocks 9, 10, 11, 12 */
    KvparkRequest r2 = {(const uint8_t *)"turn-2", 6, NULL, 0, hashes, 8, 3, NULL, 0};
    KvparkMatch mt = {0};
    CHECK(kvpark_planner_match(p, &r2, 0, 3 * TOKENS + 2, 4, &mt) == KVPARK_STATUS_OK, "match");
    CHECK(mt.external_tokens == 3 * TOKENS && mt.load_async == 0, "sync hit of 3 blocks (got %u)", mt.external_tokens);
    uint32_t ids2[4] = {9, 10, 11, 12};
    CHECK(kvpark_planner_on_alloc(p, (const uint8_t *)"turn-2", 6, ids2, 4, mt.external_tokens) == KVPARK_STATUS_OK, "alloc");
    CHECK(kvpark_planner_build_meta(p, 5, &plan) == KVPARK_STATUS_OK, "build_meta 2");
    /* host-memory caches have no stream: accepted and ignored */
    CHECK(kvpark_mover_set_stream(m, 0) == KVPARK_STATUS_OK, "set_stream(0)");
    CHECK(kvpark_mover_bind(m, plan.ptr, plan.len) == KVPARK_STATUS_OK, "bind 2");
    kvpark_buf_free(plan);
    CHECK(kvpark_mover_start_load(m) == KVPARK_STATUS_OK, "load");
    for (int l = 0; l < LAYERS; l++) CHECK(kvpark_mover_wait_layer(m, l) == KVPARK_STATUS_OK, "wait layer");
    CHECK(kvpark_mover_wait_layer(m, LAYERS) == KVPARK_STATUS_INVALID_ARGUMENT, "layer out of range");

    /* block 9 must hold what block 5 held, in every layer */
    for (int l = 0; l < LAYERS; l++)
        for (int j = 0; j < 3; j++) {
            const float *dst = kv + ((size_t)l * BLOCKS + ids2[j]) * PAGE;
            size_t src0 = ((size_t)l * BLOCKS + ids1[j]) * PAGE;
            int same = 1;
            for (int i = 0; i < PAGE; i++) same &= dst[i] == (float)(src0 + i) * 0.5f;
            CHECK(same, "layer %d block %u holds the parked bytes of block %u", l, ids2[j], ids1[j]);
        }
    KvparkBuf mj = {0};
    CHECK(kvpark_planner_metrics(p, &mj) == KVPARK_STATUS_OK, "metrics");
    CHECK(buf_contains(&mj, "\"hit_tokens\":12"), "hit tokens counted: %.*s", (int)mj.len, mj.ptr);
    kvpark_buf_free(mj);

    kvpark_mover_free(m);
    kvpark_planner_free(p);
    free(kv);
}

int main(void) {
    misuse();
    round_trip();
    if (failures) {
        fprintf(stderr, "abi_smoke: %d failed\n", failures);
        return 1;
    }
    printf("abi_smoke: all checks passed\n");
    return 0;
}
