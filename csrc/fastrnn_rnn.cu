// Elman RNN (tanh or ReLU) pointwise kernels, one time step each. See fastrnn_common.cuh.
//
// Host loop, forward:  hw = h_prev W_hh^T (cuBLAS), then rnn_fwd.
// Host loop, backward: rnn_bwd, then d_h_gemm = d_a W_hh (cuBLAS); the state gradient
// after a step is d_h_carry + d_h_gemm (see fastrnn_lstm.cu).
#include "fastrnn_common.cuh"

namespace fastrnn {

// Forward of one step. The RNN's cache is its state buffer alone, so training and
// inference share this body.
//   xw [B,H] x_t W_ih^T + b_ih + b_hh    hw [B,H] h_prev W_hh^T
//   h_prev, h_next, out [B,H]; h_next may alias h_prev.
template <typename T, bool Relu>
__device__ __forceinline__ void rnn_fwd(int B, int H, int t, const int* lengths, const T* xw,
                                        const T* hw, const T* h_prev, T* h_next, T* out) {
    const int n = B * H;
    for (int k = first_index(); k < n; k += index_stride()) {
        const int b = k / H;
        const T a = xw[k] + hw[k];
        const T h = Relu ? relu(a) : tanh_(a);
        if (t < lengths[b]) {
            h_next[k] = h;
            out[k] = h;
        } else {
            h_next[k] = h_prev[k];
            out[k] = T(0);
        }
    }
}

// Backward of one step; h [B,H] is the state after the step (hs[t + 1 - r]).
//   d_out, d_h_gemm [B,H] in; d_h_carry [B,H] in/out; d_a [B,H] out (0 where inactive).
template <typename T, bool Relu>
__device__ __forceinline__ void rnn_bwd(int B, int H, int t, const int* lengths,
                                        const T* d_out, const T* d_h_gemm, T* d_h_carry,
                                        const T* h, T* d_a) {
    const int n = B * H;
    for (int k = first_index(); k < n; k += index_stride()) {
        const int b = k / H;
        const T d_h = d_h_carry[k] + d_h_gemm[k];
        if (t < lengths[b]) {
            const T d_h_total = d_out[k] + d_h;
            const T y = h[k];
            d_a[k] = Relu ? (y > T(0) ? d_h_total : T(0)) : d_h_total * d_tanh(y);
            d_h_carry[k] = T(0);
        } else {
            d_a[k] = T(0);
            d_h_carry[k] = d_h;
        }
    }
}

}  // namespace fastrnn

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
    }

FASTRNN_RNN_KERNELS(rnn_tanh, false, float, f32)
FASTRNN_RNN_KERNELS(rnn_tanh, false, double, f64)
FASTRNN_RNN_KERNELS(rnn_relu, true, float, f32)
FASTRNN_RNN_KERNELS(rnn_relu, true, double, f64)
