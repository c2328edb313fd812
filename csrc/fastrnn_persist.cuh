// fastrnn_persist.cuh: the persistent time loop, one kernel launch per sequence.
//
// The stepwise host loop (fastrnn/backends/cuda.py) costs two launches per step: cuBLAS for
// h_prev W_hh^T, then the cell's pointwise kernel. A persistent kernel runs the whole loop
// in one cooperative launch instead:
//
//  * Block q owns the hidden units j0 = q J .. j0 + J - 1 of every gate and keeps, in shared
//    memory for the whole sequence, the rows of W_hh that produce them (forward) or the
//    columns of W_hh that their state gradient needs (backward).
//  * Per step, each block forms its part of h_prev W_hh^T (backward: of d_a W_hh) from the
//    whole previous state, read from L2, then runs the cell's pointwise step on its own
//    units, which needs nothing from other blocks.
//  * One grid barrier per step publishes the new state before any block reads it. The grid
//    must be co-resident: the host launches at most one block per SM, cooperatively
//    (cuLaunchCooperativeKernel), so a grid that cannot be resident fails to launch
//    instead of deadlocking.
//
// Threads: thread t of a block works on unit u = t % J, batch group bg = (t / J) % groups
// (batches bg*BT .. bg*BT + BT - 1) and K split ks = t / (J * groups), every splits-th
// 16-byte vector of the dot products' K. The host uses several splits only when BT = 1
// (small B J); their partial sums meet in shared memory, in a fixed order.
//
// Shared memory: the weight rows, each padded to `stride` elements, chosen by the host so
// that stride * sizeof(T) is 16 bytes more than a multiple of 128 (the 16-byte loads of
// consecutive rows then fall in different banks); after them, when splits > 1, the partial
// sums: (splits - 1) * J * groups * NG * BT elements.
//
// Dot products read 16-byte vectors: H % 4 == 0 for float, H % 2 == 0 for double.
#ifndef FASTRNN_PERSIST_CUH
#define FASTRNN_PERSIST_CUH

#include "fastrnn_common.cuh"

namespace fastrnn {

// A 16-byte vector of T and the dot product that accumulates it.
template <typename T> struct Vec;

template <> struct Vec<float> {
    typedef float4 type;
    enum { width = 4 };
    static __device__ __forceinline__ float dot(const float4& a, const float4& b, float acc) {
        acc += a.x * b.x;
        acc += a.y * b.y;
        acc += a.z * b.z;
        return acc + a.w * b.w;
    }
};

template <> struct Vec<double> {
    typedef double2 type;
    enum { width = 2 };
    static __device__ __forceinline__ double dot(const double2& a, const double2& b,
                                                 double acc) {
        acc += a.x * b.x;
        return acc + a.y * b.y;
    }
};

// The launch geometry (the same for every block) and this thread's share of it.
struct Share {
    int B, H, J, groups, splits, stride;  // as launched
    int u, bg, ks;                        // unit in the block, batch group, K split
    int j;                                // hidden unit, blockIdx.x * J + u
    bool works;                           // it has a unit (j < H) and a split (ks < splits)
    bool owns;                            // it holds the final sums of its unit (ks == 0)
};

__device__ __forceinline__ Share share_of_thread(int B, int H, int J, int groups, int splits,
                                                 int stride) {
    Share s;
    s.B = B;
    s.H = H;
    s.J = J;
    s.groups = groups;
    s.splits = splits;
    s.stride = stride;
    const int t = threadIdx.x;
    s.u = t % J;
    s.bg = (t / J) % groups;
    s.ks = t / (J * groups);
    s.j = blockIdx.x * J + s.u;
    s.works = s.j < H && s.ks < splits;
    s.owns = s.works && s.ks == 0;
    return s;
}

// acc[g][i] = sum over this thread's split of k of w_s[(g J + u) stride + k] * state[b K + k],
// b = bg BT + i. Split ks takes the vectors ks, ks + splits, ... (interleaved, so threads of
// different splits read different banks). Batches past B read row 0; their sums are unused.
template <typename T, int NG, int BT>
__device__ __forceinline__ void dots(const T* w_s, const T* state, int K, const Share& s,
                                     T (&acc)[NG][BT]) {
    typedef typename Vec<T>::type V;
    const int n_vec = s.works ? K / Vec<T>::width : 0;
    const V* rows[BT];
#pragma unroll
    for (int i = 0; i < BT; ++i) {
        const int b = s.bg * BT + i;
        rows[i] = reinterpret_cast<const V*>(state + (size_t)(b < s.B ? b : 0) * K);
    }
    const V* w[NG];
#pragma unroll
    for (int g = 0; g < NG; ++g) {
        w[g] = reinterpret_cast<const V*>(w_s + (size_t)(g * s.J + s.u) * s.stride);
#pragma unroll
        for (int i = 0; i < BT; ++i) acc[g][i] = T(0);
    }
    for (int c = s.ks; c < n_vec; c += s.splits) {
        V wv[NG];
#pragma unroll
        for (int g = 0; g < NG; ++g) wv[g] = w[g][c];
#pragma unroll
        for (int i = 0; i < BT; ++i) {
            const V hv = load_from_l2(rows[i] + c);
#pragma unroll
            for (int g = 0; g < NG; ++g) acc[g][i] = Vec<T>::dot(wv[g], hv, acc[g][i]);
        }
    }
}

// Split 0 gets the sums of every split (splits > 1; every thread of the block calls it).
template <typename T, int NG, int BT>
__device__ __forceinline__ void reduce_splits(T (&acc)[NG][BT], T* partial, const Share& s) {
    const int per_split = s.J * s.groups;
    const int slot = (int)(threadIdx.x % per_split);  // u + J bg
    const int n = NG * BT;
    if (s.ks > 0 && s.ks < s.splits) {
#pragma unroll
        for (int g = 0; g < NG; ++g)
#pragma unroll
            for (int i = 0; i < BT; ++i)
                partial[((s.ks - 1) * per_split + slot) * n + g * BT + i] = acc[g][i];
    }
    __syncthreads();
    if (s.ks == 0) {
        for (int k = 1; k < s.splits; ++k) {
#pragma unroll
            for (int g = 0; g < NG; ++g)
#pragma unroll
                for (int i = 0; i < BT; ++i)
                    acc[g][i] += partial[((k - 1) * per_split + slot) * n + g * BT + i];
        }
    }
}

// All blocks wait here until every block has arrived. `arrived` counts the arrivals of this
// launch (the host zeroes it); `target` is the count this block waits for, gridDim.x times
// the barriers it has passed.
__device__ __forceinline__ void grid_barrier(unsigned* arrived, unsigned& target) {
    __syncthreads();
    target += gridDim.x;
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(arrived, 1u);
        // signed difference: still right once the count wraps past 2^32 (T * blocks)
        while ((int)(load_volatile(arrived) - target) < 0) spin_pause();
        __threadfence();
    }
    __syncthreads();
}

// Forward weights: shared row g J + u holds W_hh row g H + j0 + u (zeros past H).
template <typename T>
__device__ __forceinline__ void load_gate_rows(T* w_s, const T* w_hh, int n_gates,
                                               const Share& s) {
    const int j0 = blockIdx.x * s.J, H = s.H;
    const int n = n_gates * s.J * H;
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
        const int row = e / H, k = e - row * H;
        const int g = row / s.J, u = row - g * s.J;
        w_s[(size_t)row * s.stride + k] =
            j0 + u < H ? w_hh[(size_t)(g * H + j0 + u) * H + k] : T(0);
    }
    __syncthreads();
}

// Backward weights: shared row u, column c holds W_hh[c, j0 + u], c < G (zeros past H).
template <typename T>
__device__ __forceinline__ void load_unit_columns(T* w_s, const T* w_hh, int G,
                                                  const Share& s) {
    const int j0 = blockIdx.x * s.J, H = s.H;
    const int n = G * s.J;
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
        const int c = e / s.J, u = e - c * s.J;
        w_s[(size_t)u * s.stride + c] = j0 + u < H ? w_hh[(size_t)c * H + j0 + u] : T(0);
    }
    __syncthreads();
}

// State slots: training keeps every state (hs[T + 1]; step t reads hs[t + reverse] and
// writes hs[t + 1 - reverse], as the stepwise loop); inference alternates two buffers.
template <bool Training>
__device__ __forceinline__ int read_slot(int t, int step, int reverse) {
    return Training ? t + reverse : (step & 1);
}
template <bool Training>
__device__ __forceinline__ int write_slot(int t, int step, int reverse) {
    return Training ? t + 1 - reverse : ((step + 1) & 1);
}

// The forward time loop. hs holds the state slots above ([T + 1, B, H] or [2, B, H]);
// cell(t, step, b, j, hw, h_prev, h_next) runs the pointwise step of unit j of batch b,
// hw[g] being row g H + j of h_prev W_hh^T.
template <typename T, int NG, int BT, bool Training, class Cell>
__device__ __forceinline__ void persistent_forward(int steps, int reverse, const Share& s,
                                                   const T* w_hh, T* hs, unsigned* barrier,
                                                   const Cell& cell) {
    T* w_s = reinterpret_cast<T*>(dynamic_shared_memory());
    T* partial = w_s + (size_t)NG * s.J * s.stride;
    load_gate_rows(w_s, w_hh, NG, s);
    const size_t BH = (size_t)s.B * s.H;
    unsigned target = 0;
    for (int step = 0; step < steps; ++step) {
        const int t = reverse ? steps - 1 - step : step;
        const T* h_prev = hs + read_slot<Training>(t, step, reverse) * BH;
        T* h_next = hs + write_slot<Training>(t, step, reverse) * BH;
        T acc[NG][BT];
        dots<T, NG, BT>(w_s, h_prev, s.H, s, acc);
        if (s.splits > 1) reduce_splits<T, NG, BT>(acc, partial, s);
        if (s.owns) {
#pragma unroll
            for (int i = 0; i < BT; ++i) {
                const int b = s.bg * BT + i;
                if (b < s.B) {
                    T hw[NG];
#pragma unroll
                    for (int g = 0; g < NG; ++g) hw[g] = acc[g][i];
                    cell(t, step, b, s.j, hw, h_prev, h_next);
                }
            }
        }
        grid_barrier(barrier, target);
    }
}

// The backward time loop, in the opposite time order. d_a_rec [T, B, NG H] is the
// pre-activation gradient that feeds W_hh, written by cell(t, b, j, d_h_gemm) for step t;
// d_h_gemm is d_a_rec of the step processed before, times W_hh (0 at the first). After the
// loop, d_h_gemm_out [B, H] gets that product for the last step processed.
template <typename T, int NG, int BT, class Cell>
__device__ __forceinline__ void persistent_backward(int steps, int reverse, const Share& s,
                                                    const T* w_hh, const T* d_a_rec,
                                                    T* d_h_gemm_out, unsigned* barrier,
                                                    const Cell& cell) {
    const int G = NG * s.H;
    T* w_s = reinterpret_cast<T*>(dynamic_shared_memory());
    T* partial = w_s + (size_t)s.J * s.stride;
    load_unit_columns(w_s, w_hh, G, s);
    unsigned target = 0;
    int t_prev = 0;
    for (int step = 0; step <= steps; ++step) {
        T acc[1][BT];
        if (step == 0) {
#pragma unroll
            for (int i = 0; i < BT; ++i) acc[0][i] = T(0);
        } else {
            dots<T, 1, BT>(w_s, d_a_rec + (size_t)t_prev * s.B * G, G, s, acc);
            if (s.splits > 1) reduce_splits<T, 1, BT>(acc, partial, s);
        }
        const int t = reverse ? step : steps - 1 - step;
        if (s.owns) {
#pragma unroll
            for (int i = 0; i < BT; ++i) {
                const int b = s.bg * BT + i;
                if (b < s.B) {
                    if (step == steps)
                        d_h_gemm_out[(size_t)b * s.H + s.j] = acc[0][i];
                    else
                        cell(t, b, s.j, acc[0][i]);
                }
            }
        }
        if (step == steps) break;
        grid_barrier(barrier, target);
        t_prev = t;
    }
}

}  // namespace fastrnn

// Calls __VA_ARGS__ with the compile-time constant BT_ equal to bt (1, 2, 4 or 8).
#define FASTRNN_WITH_BT(bt, ...)                   \
    switch (bt) {                                  \
        case 1: {                                  \
            constexpr int BT_ = 1;                 \
            __VA_ARGS__;                           \
        } break;                                   \
        case 2: {                                  \
            constexpr int BT_ = 2;                 \
            __VA_ARGS__;                           \
        } break;                                   \
        case 4: {                                  \
            constexpr int BT_ = 4;                 \
            __VA_ARGS__;                           \
        } break;                                   \
        default: {                                 \
            constexpr int BT_ = 8;                 \
            __VA_ARGS__;                           \
        } break;                                   \
    }

// Threads per block of a persistent launch (the host may launch fewer, never more).
#define FASTRNN_PERSIST_THREADS 256

// The launch geometry every persistent kernel takes first.
#define FASTRNN_PERSIST_PARAMS \
    int steps, int B, int H, int J, int groups, int splits, int bt, int stride, int reverse
#define FASTRNN_SHARE fastrnn::share_of_thread(B, H, J, groups, splits, stride)

#endif  // FASTRNN_PERSIST_CUH
