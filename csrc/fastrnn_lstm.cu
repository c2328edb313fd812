// LSTM pointwise kernels, one time step each. See fastrnn_common.cuh for the notation.
//
// Host loop, forward (per step t):   hw = h_prev W_hh^T (cuBLAS), then lstm_fwd.
// Host loop, backward (per step t):  lstm_bwd, then d_h_gemm = d_a W_hh (cuBLAS).
// The state gradient after step t is d_h_carry + d_h_gemm: rows of inactive steps have
// d_a = 0, hence d_h_gemm = 0 there, and their d_h_carry holds the passed-through gradient.
#include "fastrnn_common.cuh"

namespace fastrnn {

// Forward of one step. Training writes the cache (gates after activation, tanh(c_t)).
//   xw      [B,4H] x_t W_ih^T + b_ih + b_hh          hw      [B,4H] h_prev W_hh^T
//   h_prev, c_prev [B,H] state before the step       h_next, c_next [B,H] state after it
//   out     [B,H]  h_t, or 0 where inactive          gates   [B,4H] i, f, g, o (Training)
//   tanh_c  [B,H]  tanh(c_t) (Training)
// h_next/c_next may alias h_prev/c_prev: each thread reads its element before writing it.
template <typename T, bool Training>
__device__ __forceinline__ void lstm_fwd(int B, int H, int t, const int* lengths,
                                         const T* xw, const T* hw,
                                         const T* h_prev, const T* c_prev,
                                         T* h_next, T* c_next, T* out,
                                         T* gates, T* tanh_c) {
    const int n = B * H;
    for (int k = first_index(); k < n; k += index_stride()) {
        const int b = k / H, j = k - b * H;
        const int row = b * 4 * H;
        const T i = sigmoid(xw[row + j] + hw[row + j]);
        const T f = sigmoid(xw[row + H + j] + hw[row + H + j]);
        const T g = tanh_(xw[row + 2 * H + j] + hw[row + 2 * H + j]);
        const T o = sigmoid(xw[row + 3 * H + j] + hw[row + 3 * H + j]);
        const T c_p = c_prev[k];
        const T c = f * c_p + i * g;
        const T tc = tanh_(c);
        const T h = o * tc;
        if (t < lengths[b]) {
            h_next[k] = h;
            c_next[k] = c;
            out[k] = h;
        } else {
            h_next[k] = h_prev[k];
            c_next[k] = c_p;
            out[k] = T(0);
        }
        if (Training) {
            gates[row + j] = i;
            gates[row + H + j] = f;
            gates[row + 2 * H + j] = g;
            gates[row + 3 * H + j] = o;
            tanh_c[k] = tc;
        }
    }
}

// Backward of one step.
//   d_out     [B,H]  dL/d out_t (ignored where inactive)
//   d_h_gemm  [B,H]  d_a of the step processed before this one, times W_hh (0 at first)
//   d_h_carry [B,H]  in/out: the rest of dL/dh_t; on return 0 where active, else dL/dh_t
//   d_c       [B,H]  in/out: dL/dc_t on entry, dL/dc_{t-1} on return
//   gates [B,4H], tanh_c [B,H], c_prev [B,H]: the forward cache of this step
//   d_a       [B,4H] out: gradient of the pre-activations, 0 where inactive
template <typename T>
__device__ __forceinline__ void lstm_bwd(int B, int H, int t, const int* lengths,
                                         const T* d_out, const T* d_h_gemm, T* d_h_carry,
                                         T* d_c, const T* gates, const T* tanh_c,
                                         const T* c_prev, T* d_a) {
    const int n = B * H;
    for (int k = first_index(); k < n; k += index_stride()) {
        const int b = k / H, j = k - b * H;
        const int row = b * 4 * H;
        const T d_h = d_h_carry[k] + d_h_gemm[k];
        if (t < lengths[b]) {
            const T i = gates[row + j], f = gates[row + H + j];
            const T g = gates[row + 2 * H + j], o = gates[row + 3 * H + j];
            const T tc = tanh_c[k];
            const T d_h_total = d_out[k] + d_h;
            const T d_c_total = d_c[k] + d_h_total * o * d_tanh(tc);
            d_a[row + j] = d_c_total * g * d_sigmoid(i);
            d_a[row + H + j] = d_c_total * c_prev[k] * d_sigmoid(f);
            d_a[row + 2 * H + j] = d_c_total * i * d_tanh(g);
            d_a[row + 3 * H + j] = d_h_total * tc * d_sigmoid(o);
            d_c[k] = d_c_total * f;
            d_h_carry[k] = T(0);
        } else {
            d_a[row + j] = T(0);
            d_a[row + H + j] = T(0);
            d_a[row + 2 * H + j] = T(0);
            d_a[row + 3 * H + j] = T(0);
            d_h_carry[k] = d_h;
        }
    }
}

}  // namespace fastrnn

#define FASTRNN_LSTM_KERNELS(T, SUFFIX)                                                         \
    extern "C" __global__ void fastrnn_lstm_fwd_train_##SUFFIX(                                 \
        int B, int H, int t, const int* lengths, const T* xw, const T* hw, const T* h_prev,     \
        const T* c_prev, T* h_next, T* c_next, T* out, T* gates, T* tanh_c) {                   \
        fastrnn::lstm_fwd<T, true>(B, H, t, lengths, xw, hw, h_prev, c_prev, h_next, c_next,    \
                                   out, gates, tanh_c);                                         \
    }                                                                                           \
    extern "C" __global__ void fastrnn_lstm_fwd_infer_##SUFFIX(                                 \
        int B, int H, int t, const int* lengths, const T* xw, const T* hw, const T* h_prev,     \
        const T* c_prev, T* h_next, T* c_next, T* out) {                                        \
        fastrnn::lstm_fwd<T, false>(B, H, t, lengths, xw, hw, h_prev, c_prev, h_next, c_next,   \
                                    out, (T*)0, (T*)0);                                         \
    }                                                                                           \
    extern "C" __global__ void fastrnn_lstm_bwd_##SUFFIX(                                       \
        int B, int H, int t, const int* lengths, const T* d_out, const T* d_h_gemm,             \
        T* d_h_carry, T* d_c, const T* gates, const T* tanh_c, const T* c_prev, T* d_a) {       \
        fastrnn::lstm_bwd<T>(B, H, t, lengths, d_out, d_h_gemm, d_h_carry, d_c, gates, tanh_c,  \
                             c_prev, d_a);                                                      \
    }

FASTRNN_LSTM_KERNELS(float, f32)
FASTRNN_LSTM_KERNELS(double, f64)
