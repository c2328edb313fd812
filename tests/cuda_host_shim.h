// CUDA's keywords and device primitives for a host (C++) build of csrc/*.cu, used by
// tests/test_cuda.py to run the kernels without a GPU.
//
// Stepwise kernels are called directly, on the calling thread: their grid-stride loops
// then run with one block of one thread. Persistent kernels are run as a real grid: the
// test starts one OS thread per CUDA thread, each calls fastrnn_host_enter() to take its
// block and thread index, then the kernel. __syncthreads() is a barrier of the block's
// threads, shared memory is one buffer per block (filled with NaN bytes, so a read of
// anything not written first shows up in the results), and atomics and fences are the
// compiler's.
//
// What this cannot check: the GPU's memory model beyond these fences (L1 coherence of
// ld.global.cg, warp scheduling), resource limits, and speed.
#define FASTRNN_HOST_SHIM 1

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct fastrnn_host_dim3 { unsigned x, y, z; };
struct float4 { float x, y, z, w; };
struct double2 { double x, y; };

static thread_local fastrnn_host_dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0};
static thread_local fastrnn_host_dim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};

struct fastrnn_host_grid {
    unsigned blocks, threads;
    size_t shared_bytes;
    unsigned char* shared;       // blocks * shared_bytes
    pthread_barrier_t* barriers;  // one per block
};

static thread_local fastrnn_host_grid* fastrnn_host_current = 0;

extern "C" void* fastrnn_host_grid_new(unsigned blocks, unsigned threads, size_t shared_bytes) {
    fastrnn_host_grid* g = (fastrnn_host_grid*)calloc(1, sizeof(fastrnn_host_grid));
    g->blocks = blocks;
    g->threads = threads;
    g->shared_bytes = shared_bytes;
    g->shared = (unsigned char*)malloc(blocks * shared_bytes + 16);
    memset(g->shared, 0xFF, blocks * shared_bytes + 16);  // NaN in float and double
    g->barriers = (pthread_barrier_t*)calloc(blocks, sizeof(pthread_barrier_t));
    for (unsigned b = 0; b < blocks; ++b) pthread_barrier_init(&g->barriers[b], 0, threads);
    return g;
}

extern "C" void fastrnn_host_grid_free(void* grid) {
    fastrnn_host_grid* g = (fastrnn_host_grid*)grid;
    for (unsigned b = 0; b < g->blocks; ++b) pthread_barrier_destroy(&g->barriers[b]);
    free(g->barriers);
    free(g->shared);
    free(g);
}

// The calling OS thread becomes thread `thread` of block `block` of `grid` (NULL: back to
// the one-thread grid of the stepwise kernels).
extern "C" void fastrnn_host_enter(void* grid, unsigned block, unsigned thread) {
    fastrnn_host_grid* g = (fastrnn_host_grid*)grid;
    fastrnn_host_current = g;
    const fastrnn_host_dim3 zero = {0, 0, 0}, one = {1, 1, 1};
    threadIdx = zero;
    blockIdx = zero;
    blockDim = one;
    gridDim = one;
    if (g) {
        threadIdx.x = thread;
        blockIdx.x = block;
        blockDim.x = g->threads;
        gridDim.x = g->blocks;
    }
}

static inline void __syncthreads() {
    if (fastrnn_host_current)
        pthread_barrier_wait(&fastrnn_host_current->barriers[blockIdx.x]);
}
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}

namespace fastrnn {
inline unsigned char* dynamic_shared_memory() {
    return fastrnn_host_current->shared + blockIdx.x * fastrnn_host_current->shared_bytes;
}
template <typename V> inline V load_from_l2(const V* p) { return *p; }
inline unsigned load_volatile(const unsigned* p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
inline void spin_pause() { sched_yield(); }
}  // namespace fastrnn
