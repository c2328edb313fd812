// fastrnn_common.cuh: notation, activations and indexing shared by every fastrnn kernel.
//
// Notation (the same as fastrnn/backends/__init__.py): T time steps, B batch, I input
// features, H hidden features, G gate rows (H for the RNN, 4H for the LSTM with gates
// i, f, g, o, 3H for the GRU with gates r, z, n, in PyTorch's order). Arrays are C-ordered:
// the rightmost dimension changes the fastest. A pointer argument documents its shape as
// [B,G], [B,H] or [H]; every kernel works on ONE time step, so its pointers are already
// offset to that step by the host.
//
// Threads: one thread per (b, j) element of a [B,H] state, b = k / H, j = k % H, in a
// grid-stride loop, so any grid size is correct (the host uses a fixed 256-thread block).
//
// Masking: step t of sequence b is active when t < lengths[b]. An inactive step leaves the
// state unchanged, writes 0 to out, and, in backward, passes the state gradient through and
// writes 0 to every pre-activation gradient. The host passes lengths = T for every sequence
// when there are no lengths.
//
// This header and the .cu files include nothing: the same text compiles under nvcc, under
// NVRTC (which has no host headers) and, for the host-side tests, as plain C++.
#ifndef FASTRNN_COMMON_CUH
#define FASTRNN_COMMON_CUH

namespace fastrnn {

// Accurate libm-style functions (no fast math): float32 results must stay within a few
// ulp of the float64 reference.
template <typename T> struct Math;

template <> struct Math<float> {
    static __device__ __forceinline__ float exp(float a) { return expf(a); }
    static __device__ __forceinline__ float tanh(float a) { return tanhf(a); }
    static __device__ __forceinline__ float abs(float a) { return fabsf(a); }
};

template <> struct Math<double> {
    static __device__ __forceinline__ double exp(double a) { return ::exp(a); }
    static __device__ __forceinline__ double tanh(double a) { return ::tanh(a); }
    static __device__ __forceinline__ double abs(double a) { return fabs(a); }
};

// sigmoid(a) with exp of a non-positive argument only: no overflow for any finite a.
template <typename T> __device__ __forceinline__ T sigmoid(T a) {
    const T e = Math<T>::exp(-Math<T>::abs(a));
    const T one = T(1);
    return a >= T(0) ? one / (one + e) : e / (one + e);
}

template <typename T> __device__ __forceinline__ T tanh_(T a) { return Math<T>::tanh(a); }

template <typename T> __device__ __forceinline__ T relu(T a) { return a > T(0) ? a : T(0); }

// Derivatives written with the activation's output y, as backward only has that.
template <typename T> __device__ __forceinline__ T d_sigmoid(T y) { return y * (T(1) - y); }
template <typename T> __device__ __forceinline__ T d_tanh(T y) { return T(1) - y * y; }

__device__ __forceinline__ int first_index() { return blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int index_stride() { return blockDim.x * gridDim.x; }

// Device primitives of the persistent kernels (fastrnn_persist.cuh). The host build of the
// tests (FASTRNN_HOST_SHIM) supplies its own, with blocks and threads as OS threads.
#ifndef FASTRNN_HOST_SHIM
// The dynamic shared memory of the block (size given at launch).
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
    extern __shared__ __align__(16) unsigned char fastrnn_shared[];
    return fastrnn_shared;
}
// A load that bypasses L1 (ld.global.cg): state written by other blocks during the same
// launch is read from L2, never from a stale L1 line.
template <typename V> __device__ __forceinline__ V load_from_l2(const V* p) { return __ldcg(p); }
__device__ __forceinline__ unsigned load_volatile(const unsigned* p) {
    return *(const volatile unsigned*)p;
}
__device__ __forceinline__ void spin_pause() {
#if __CUDA_ARCH__ >= 700
    __nanosleep(32);  // sm_70+; older GPUs (NVRTC only) just spin
#endif
}
#endif

}  // namespace fastrnn

#endif  // FASTRNN_COMMON_CUH
