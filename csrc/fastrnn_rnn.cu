// Elman RNN (tanh or ReLU) kernels. See fastrnn_common.cuh for the notation.
//
// Stepwise, one time step per launch:
//   forward:  hw = h_prev W_hh^T (cuBLAS), then rnn_fwd.
//   backward: rnn_bwd, then d_h_gemm = d_a W_hh (cuBLAS); the state gradient after a step
//             is d_h_carry + d_h_gemm (see fastrnn_lstm.cu).
// Persistent, the whole sequence in one launch (fastrnn_persist.cuh): rnn_persist_fwd_*,
// rnn_persist_bwd.
#include "fastrnn_persist.cuh"

namespace fastrnn {

// Forward of element k = b H + j of one step from its pre-activation a.
//   h_prev, h_next, out [B,H]; h_next may alias h_prev.
template <typename T, bool Relu>
__device__ __forceinline__ void rnn_fwd_elem(bool active, int k, T a, const T* h_prev,
                                             T* h_next, T* out) {
    const T h = Relu ? relu(a) : tanh_(a);
    if (active) {
        h_next[k] = h;
        out[k] = h;
    } else {
        h_next[k] = h_prev[k];
        out[k] = T(0);
    }
}

// Backward of element k of one step; d_h = d_h_carry + d_h_gemm, h [B,H] the state after
// the step (hs[t + 1 - r]). d_h_carry [B,H] out; d_a [B,H] out (0 where inactive).
template <typename T, bool Relu>
__device__ __forceinline__ void rnn_bwd_elem(bool active, int k, T d_h, const T* d_out,
                                             T* d_h_carry, const T* h, T* d_a) {
    if (active) {
        const T d_h_total = d_out[k] + d_h;
        const T y = h[k];
        d_a[k] = Relu ? (y > T(0) ? d_h_total : T(0)) : d_h_total * d_tanh(y);
        d_h_carry[k] = T(0);
    } else {
        d_a[k] = T(0);
        d_h_carry[k] = d_h;
    }
}

// Stepwise forward of one step. The RNN's cache is its state buffer alone, so training
// and inference share this body.
//   xw [B,H] x_t W_ih^T + b_ih + b_hh    hw [B,H] h_prev W_hh^T
template <typename T, bool Relu>
__device__ __forceinline__ void rnn_fwd(int B, int H, int t, const int* lengths, const T* xw,
                                        const T* hw, const T* h_prev, T* h_next, T* out) {
    const int n = B * H;
    for (int k = first_index(); k < n; k += index_stride())
        rnn_fwd_elem<T, Relu>(t < lengths[k / H], k, xw[k] + hw[k], h_prev, h_next, out);
}

// Stepwise backward of one step. d_out, d_h_gemm [B,H] in; d_h_carry [B,H] in/out.
template <typename T, bool Relu>
__device__ __forceinline__ void rnn_bwd(int B, int H, int t, const int* lengths,
                                        const T* d_out, const T* d_h_gemm, T* d_h_carry,
                                        const T* h, T* d_a) {
    const int n = B * H;
    for (int k = first_index(); k < n; k += index_stride())
        rnn_bwd_elem<T, Relu>(t < lengths[k / H], k, d_h_carry[k] + d_h_gemm[k], d_out,
                              d_h_carry, h, d_a);
}

// Persistent steps of one element. Whole-sequence arrays: xw, out, d_out, d_a [T,B,H];
// hs [T+1,B,H] (backward reads the state after step t).
template <typename T, bool Relu>
struct RnnForward {
    int B, H;
    const int* lengths;
    const T* xw;
    T* out;

    __device__ __forceinline__ void operator()(int t, int, int b, int j, const T (&hw)[1],
                                               const T* h_prev, T* h_next) const {
        const size_t BH = (size_t)B * H;
        const int k = b * H + j;
        rnn_fwd_elem<T, Relu>(t < lengths[b], k, xw[t * BH + k] + hw[0], h_prev, h_next,
                              out + t * BH);
    }
};

template <typename T, bool Relu>
struct RnnBackward {
    int B, H, reverse;
    const int* lengths;
    const T *d_out, *hs;
    T *d_h_carry, *d_a;

    __device__ __forceinline__ void operator()(int t, int b, int j, T d_h_gemm) const {
        const size_t BH = (size_t)B * H;
        const int k = b * H + j;
        rnn_bwd_elem<T, Relu>(t < lengths[b], k, d_h_carry[k] + d_h_gemm, d_out + t * BH,
                              d_h_carry, hs + (t + 1 - reverse) * BH, d_a + t * BH);
    }
};

}  // namespace fastrnn

#define FASTRNN_RNN_PERSIST_FWD(NAME, MODE, TRAINING, RELU, T, SUFFIX)                          \
    extern "C" __global__ void __launch_bounds__(FASTRNN_PERSIST_THREADS, 1)                    \
        fastrnn_##NAME##_persist_fwd_##MODE##_##SUFFIX(FASTRNN_PERSIST_PARAMS,                  \
                                                       const int* lengths, const T* xw,         \
                                                       const T* w_hh, T* hs, T* out,            \
                                                       unsigned* barrier) {                     \
        const fastrnn::RnnForward<T, RELU> cell = {B, H, lengths, xw, out};                     \
        FASTRNN_WITH_BT(bt, fastrnn::persistent_forward<T, 1, BT_, TRAINING>(                   \
                                steps, reverse, FASTRNN_SHARE, w_hh, hs, barrier, cell))        \
    }

#define FASTRNN_RNN_KERNELS(NAME, RELU, T, SUFFIX)                                              \
    extern "C" __global__ void fastrnn_##NAME##_fwd_train_##SUFFIX(                             \
        int B, int H, int t, const int* lengths, const T* xw, const T* hw, const T* h_prev,     \
        T* h_next, T* out) {                                                                    \
        fastrnn::rnn_fwd<T, RELU>(B, H, t, lengths, xw, hw, h_prev, h_next, out);               \
    }                                                                                           \
    extern "C" __global__ void fastrnn_##NAME##_fwd_infer_##SUFFIX(                             \
        int B, int H, int t, const int* lengths, const T* xw, const T* hw, const T* h_prev,     \
        T* h_next, T* out) {                                                                    \
        fastrnn::rnn_fwd<T, RELU>(B, H, t, lengths, xw, hw, h_prev, h_next, out);               \
    }                                                                                           \
    extern "C" __global__ void fastrnn_##NAME##_bwd_##SUFFIX(                                   \
        int B, int H, int t, const int* lengths, const T* d_out, const T* d_h_gemm,             \
        T* d_h_carry, const T* h, T* d_a) {                                                     \
        fastrnn::rnn_bwd<T, RELU>(B, H, t, lengths, d_out, d_h_gemm, d_h_carry, h, d_a);        \
    }                                                                                           \
    FASTRNN_RNN_PERSIST_FWD(NAME, train, true, RELU, T, SUFFIX)                                 \
    FASTRNN_RNN_PERSIST_FWD(NAME, infer, false, RELU, T, SUFFIX)                                \
    extern "C" __global__ void __launch_bounds__(FASTRNN_PERSIST_THREADS, 1)                    \
        fastrnn_##NAME##_persist_bwd_##SUFFIX(FASTRNN_PERSIST_PARAMS, const int* lengths,       \
                                              const T* w_hh, const T* d_out, T* d_h_carry,      \
                                              const T* hs, T* d_a, T* d_h_gemm,                 \
                                              unsigned* barrier) {                              \
        const fastrnn::RnnBackward<T, RELU> cell = {B, H, reverse, lengths, d_out, hs,          \
                                                    d_h_carry, d_a};                            \
        FASTRNN_WITH_BT(bt, fastrnn::persistent_backward<T, 1, BT_>(                            \
                                steps, reverse, FASTRNN_SHARE, w_hh, d_a, d_h_gemm, barrier,    \
                                cell))                                                          \
    }

FASTRNN_RNN_KERNELS(rnn_tanh, false, float, f32)
FASTRNN_RNN_KERNELS(rnn_tanh, false, double, f64)
FASTRNN_RNN_KERNELS(rnn_relu, true, float, f32)
FASTRNN_RNN_KERNELS(rnn_relu, true, double, f64)
