// LSTM kernels, PyTorch's gate order i, f, g, o. See fastrnn_common.cuh for the notation.
//
// Stepwise, one time step per launch:
//   forward (per step t):   hw = h_prev W_hh^T (cuBLAS), then lstm_fwd.
//   backward (per step t):  lstm_bwd, then d_h_gemm = d_a W_hh (cuBLAS).
// Persistent, the whole sequence in one launch (fastrnn_persist.cuh):
//   lstm_persist_fwd_{train,infer}, lstm_persist_bwd.
// The state gradient after step t is d_h_carry + d_h_gemm: rows of inactive steps have
// d_a = 0, hence d_h_gemm = 0 there, and their d_h_carry holds the passed-through gradient.
//
// With the projection (torch's proj_size = P; stepwise only): m_t = o tanh(c_t), h_t = m_t W_hr^T,
// h and its gradients [B,P], c [B,H]. The LSTM kernels run unchanged, with m for h:
//   forward:  hw = h_prev W_hh^T, lstm_fwd (m_t as its out, a [B,H] scratch as its h state),
//             hp = m_t W_hr^T (cuBLAS), lstm_proj_fwd (the masking of h_t and out_t).
//   backward: lstm_proj_bwd (d_hp = dL/dh_t), d_m = d_hp W_hr (cuBLAS), lstm_bwd (d_m as
//             its d_out, one zero [B,H] buffer as its d_h_gemm and d_h_carry),
//             d_h_gemm = d_a W_hh (cuBLAS).
#include "fastrnn_persist.cuh"

namespace fastrnn {

// Forward of element k = b H + j of one step, from the pre-activations a[4] (x_t W_ih^T +
// biases + h_prev W_hh^T, gates i, f, g, o). Training writes the cache.
//   h_prev, c_prev [B,H] state before the step       h_next, c_next [B,H] state after it
//   out     [B,H]  h_t, or 0 where inactive          gates   [B,4H] i, f, g, o (Training)
//   tanh_c  [B,H]  tanh(c_t) (Training)              row = b 4H
// h_next/c_next may alias h_prev/c_prev: the element is read before it is written.
template <typename T, bool Training>
__device__ __forceinline__ void lstm_fwd_elem(bool active, int k, int row, int H, int j,
                                              const T (&a)[4], const T* h_prev,
                                              const T* c_prev, T* h_next, T* c_next, T* out,
                                              T* gates, T* tanh_c) {
    const T i = sigmoid(a[0]);
    const T f = sigmoid(a[1]);
    const T g = tanh_(a[2]);
    const T o = sigmoid(a[3]);
    const T c_p = c_prev[k];
    const T c = f * c_p + i * g;
    const T tc = tanh_(c);
    const T h = o * tc;
    if (active) {
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

// Backward of element k = b H + j of one step; d_h is the state gradient after the step
// (d_h_carry + d_h_gemm).
//   d_out     [B,H]  dL/d out_t (ignored where inactive)
//   d_h_carry [B,H]  out: 0 where active, else d_h (passed through)
//   d_c       [B,H]  in/out: dL/dc_t on entry, dL/dc_{t-1} on return
//   gates [B,4H], tanh_c [B,H], c_prev [B,H]: the forward cache of this step
//   d_a       [B,4H] out: gradient of the pre-activations, 0 where inactive
template <typename T>
__device__ __forceinline__ void lstm_bwd_elem(bool active, int k, int row, int H, int j,
                                              T d_h, const T* d_out, T* d_h_carry, T* d_c,
                                              const T* gates, const T* tanh_c,
                                              const T* c_prev, T* d_a) {
    if (active) {
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

// Stepwise forward of one step; pointers are offset to step t by the host.
//   xw [B,4H] x_t W_ih^T + b_ih + b_hh     hw [B,4H] h_prev W_hh^T     the rest as above
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
        const T a[4] = {xw[row + j] + hw[row + j], xw[row + H + j] + hw[row + H + j],
                        xw[row + 2 * H + j] + hw[row + 2 * H + j],
                        xw[row + 3 * H + j] + hw[row + 3 * H + j]};
        lstm_fwd_elem<T, Training>(t < lengths[b], k, row, H, j, a, h_prev, c_prev, h_next,
                                   c_next, out, gates, tanh_c);
    }
}

// Stepwise backward of one step. d_h_gemm [B,H] is d_a of the step processed before this
// one, times W_hh (0 at first).
template <typename T>
__device__ __forceinline__ void lstm_bwd(int B, int H, int t, const int* lengths,
                                         const T* d_out, const T* d_h_gemm, T* d_h_carry,
                                         T* d_c, const T* gates, const T* tanh_c,
                                         const T* c_prev, T* d_a) {
    const int n = B * H;
    for (int k = first_index(); k < n; k += index_stride()) {
        const int b = k / H, j = k - b * H;
        lstm_bwd_elem<T>(t < lengths[b], k, b * 4 * H, H, j, d_h_carry[k] + d_h_gemm[k],
                         d_out, d_h_carry, d_c, gates, tanh_c, c_prev, d_a);
    }
}

// The projection's forward of one step, after hp = m_t W_hr^T: the masking of the state
// and the output, which lstm_fwd applied to m_t and c_t. n = B P elements.
//   hp [B,P] in     h_prev, h_next, out [B,P]; h_next may alias h_prev
template <typename T>
__device__ __forceinline__ void lstm_proj_fwd(int B, int P, int t, const int* lengths,
                                              const T* hp, const T* h_prev, T* h_next,
                                              T* out) {
    const int n = B * P;
    for (int k = first_index(); k < n; k += index_stride()) {
        if (t < lengths[k / P]) {
            h_next[k] = hp[k];
            out[k] = hp[k];
        } else {
            h_next[k] = h_prev[k];
            out[k] = T(0);
        }
    }
}

// The projection's backward of one step, before d_m = d_hp W_hr: the gradient of h_t,
// kept whole for d_w_hr = sum_t d_hp_t^T m_t. n = B P elements.
//   d_out, d_h_gemm [B,P] in (d_h_gemm = d_a W_hh of the step processed before)
//   d_h_carry [B,P] in/out: 0 where active, else the state gradient passed through
//   d_hp      [B,P] out: dL/dh_t, 0 where inactive
template <typename T>
__device__ __forceinline__ void lstm_proj_bwd(int B, int P, int t, const int* lengths,
                                              const T* d_out, const T* d_h_gemm,
                                              T* d_h_carry, T* d_hp) {
    const int n = B * P;
    for (int k = first_index(); k < n; k += index_stride()) {
        const T d_h = d_h_carry[k] + d_h_gemm[k];
        if (t < lengths[k / P]) {
            d_hp[k] = d_out[k] + d_h;
            d_h_carry[k] = T(0);
        } else {
            d_hp[k] = T(0);
            d_h_carry[k] = d_h;
        }
    }
}

// Persistent forward step of one element. Whole-sequence arrays:
//   xw [T,B,4H]; cs [T+1,B,H] (training) or [B,H] updated in place (inference);
//   out [T,B,H]; gates [T,B,4H], tanh_cs [T,B,H] (training)
template <typename T, bool Training>
struct LstmForward {
    int B, H, reverse;
    const int* lengths;
    const T* xw;
    T *cs, *out, *gates, *tanh_cs;

    __device__ __forceinline__ void operator()(int t, int step, int b, int j, const T (&hw)[4],
                                               const T* h_prev, T* h_next) const {
        const size_t BH = (size_t)B * H, BG = 4 * BH;
        const int k = b * H + j, row = b * 4 * H;
        const T* x = xw + t * BG;
        const T a[4] = {x[row + j] + hw[0], x[row + H + j] + hw[1],
                        x[row + 2 * H + j] + hw[2], x[row + 3 * H + j] + hw[3]};
        const T* c_prev = Training ? cs + read_slot<true>(t, step, reverse) * BH : cs;
        T* c_next = Training ? cs + write_slot<true>(t, step, reverse) * BH : cs;
        lstm_fwd_elem<T, Training>(t < lengths[b], k, row, H, j, a, h_prev, c_prev, h_next,
                                   c_next, out + t * BH, Training ? gates + t * BG : gates,
                                   Training ? tanh_cs + t * BH : tanh_cs);
    }
};

// Persistent backward step of one element. Whole-sequence arrays: d_out [T,B,H],
// gates [T,B,4H], tanh_cs [T,B,H], cs [T+1,B,H], d_a [T,B,4H]; d_h_carry, d_c [B,H].
template <typename T>
struct LstmBackward {
    int B, H, reverse;
    const int* lengths;
    const T *d_out, *gates, *tanh_cs, *cs;
    T *d_h_carry, *d_c, *d_a;

    __device__ __forceinline__ void operator()(int t, int b, int j, T d_h_gemm) const {
        const size_t BH = (size_t)B * H, BG = 4 * BH;
        const int k = b * H + j;
        lstm_bwd_elem<T>(t < lengths[b], k, b * 4 * H, H, j, d_h_carry[k] + d_h_gemm,
                         d_out + t * BH, d_h_carry, d_c, gates + t * BG, tanh_cs + t * BH,
                         cs + (t + reverse) * BH, d_a + t * BG);
    }
};

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
    }                                                                                           \
    extern "C" __global__ void fastrnn_lstm_proj_fwd_##SUFFIX(                                  \
        int B, int P, int t, const int* lengths, const T* hp, const T* h_prev, T* h_next,       \
        T* out) {                                                                               \
        fastrnn::lstm_proj_fwd<T>(B, P, t, lengths, hp, h_prev, h_next, out);                   \
    }                                                                                           \
    extern "C" __global__ void fastrnn_lstm_proj_bwd_##SUFFIX(                                  \
        int B, int P, int t, const int* lengths, const T* d_out, const T* d_h_gemm,             \
        T* d_h_carry, T* d_hp) {                                                                \
        fastrnn::lstm_proj_bwd<T>(B, P, t, lengths, d_out, d_h_gemm, d_h_carry, d_hp);          \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(FASTRNN_PERSIST_THREADS, 1)                    \
        fastrnn_lstm_persist_fwd_train_##SUFFIX(FASTRNN_PERSIST_PARAMS, const int* lengths,     \
                                                const T* xw, const T* w_hh, T* hs, T* cs,       \
                                                T* out, T* gates, T* tanh_cs,                   \
                                                unsigned* barrier) {                            \
        const fastrnn::LstmForward<T, true> cell = {B, H, reverse, lengths, xw, cs, out, gates, \
                                                    tanh_cs};                                   \
        FASTRNN_WITH_BT(bt, fastrnn::persistent_forward<T, 4, BT_, true>(                       \
                                steps, reverse, FASTRNN_SHARE, w_hh, hs, barrier, cell))        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(FASTRNN_PERSIST_THREADS, 1)                    \
        fastrnn_lstm_persist_fwd_infer_##SUFFIX(FASTRNN_PERSIST_PARAMS, const int* lengths,     \
                                                const T* xw, const T* w_hh, T* hs, T* cs,       \
                                                T* out, unsigned* barrier) {                    \
        const fastrnn::LstmForward<T, false> cell = {B, H, reverse, lengths, xw, cs, out,       \
                                                     (T*)0, (T*)0};                             \
        FASTRNN_WITH_BT(bt, fastrnn::persistent_forward<T, 4, BT_, false>(                      \
                                steps, reverse, FASTRNN_SHARE, w_hh, hs, barrier, cell))        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(FASTRNN_PERSIST_THREADS, 1)                    \
        fastrnn_lstm_persist_bwd_##SUFFIX(FASTRNN_PERSIST_PARAMS, const int* lengths,           \
                                          const T* w_hh, const T* d_out, T* d_h_carry, T* d_c,  \
                                          const T* gates, const T* tanh_cs, const T* cs,        \
                                          T* d_a, T* d_h_gemm, unsigned* barrier) {             \
        const fastrnn::LstmBackward<T> cell = {B, H, reverse, lengths, d_out, gates, tanh_cs,  \
                                               cs, d_h_carry, d_c, d_a};                        \
        FASTRNN_WITH_BT(bt, fastrnn::persistent_backward<T, 4, BT_>(                            \
                                steps, reverse, FASTRNN_SHARE, w_hh, d_a, d_h_gemm, barrier,    \
                                cell))                                                          \
    }

FASTRNN_LSTM_KERNELS(float, f32)
FASTRNN_LSTM_KERNELS(double, f64)
