// GRU pointwise kernels, one time step each, PyTorch's gate order r, z, n. See
// fastrnn_common.cuh for the notation and fastrnn_lstm.cu for the d_h_carry + d_h_gemm
// scheme of the state gradient.
//
// reset_after (PyTorch, cuDNN): n = tanh(xw_n + r * (h_prev W_hn^T + b_hn)).
//   forward:  hw = h_prev W_hh^T (cuBLAS), gru_fwd
//   backward: gru_bwd, d_h_gemm = d_a_h W_hh (cuBLAS)
//   or the whole sequence in one launch: gru_persist_fwd_{train,infer}, gru_persist_bwd
//   (fastrnn_persist.cuh)
// reset_before (Cho et al.): n = tanh(xw_n + (r * h_prev) W_hn^T), biases all in xw.
//   forward:  hw_rz = h_prev W_hrz^T, gru_rb_rz_fwd, hw_n = rh W_hn^T, gru_rb_n_fwd
//   backward: gru_rb_n_bwd, d_rh = d_a_n W_hn, gru_rb_r_bwd, d_h_gemm = d_a_rz W_hrz
#include "fastrnn_persist.cuh"

namespace fastrnn {

// reset_after forward of element k = b H + j of one step. x[g] is column g H + j of xw
// (x_t W_ih^T + b_ih + [b_hr, b_hz, 0]), hw[g] of h_prev W_hh^T; b_hn_j = b_hn[j].
//   h_prev, h_next, out [B,H]; gates [B,3H] r, z, n (Training);
//   hn [B,H] h_prev W_hn^T + b_hn (Training); row = b 3H
template <typename T, bool Training>
__device__ __forceinline__ void gru_fwd_elem(bool active, int k, int row, int H, int j,
                                             const T (&x)[3], const T (&hw)[3], T b_hn_j,
                                             const T* h_prev, T* h_next, T* out, T* gates,
                                             T* hn_out) {
    const T r = sigmoid(x[0] + hw[0]);
    const T z = sigmoid(x[1] + hw[1]);
    const T hn = hw[2] + b_hn_j;
    const T n = tanh_(x[2] + r * hn);
    const T h_p = h_prev[k];
    const T h = (T(1) - z) * n + z * h_p;
    if (active) {
        h_next[k] = h;
        out[k] = h;
    } else {
        h_next[k] = h_p;
        out[k] = T(0);
    }
    if (Training) {
        gates[row + j] = r;
        gates[row + H + j] = z;
        gates[row + 2 * H + j] = n;
        hn_out[k] = hn;
    }
}

// reset_after backward of element k of one step; d_h = d_h_carry + d_h_gemm.
//   d_out [B,H] in; d_h_carry [B,H] out
//   gates [B,3H], hn [B,H], h_prev [B,H]: forward cache of this step
//   d_a_x [B,3H] out: d_a_r, d_a_z, d_a_n (feeds W_ih, b_ih)
//   d_a_h [B,3H] out: d_a_r, d_a_z, d_hn  (feeds W_hh, b_hh)
template <typename T>
__device__ __forceinline__ void gru_bwd_elem(bool active, int k, int row, int H, int j, T d_h,
                                             const T* d_out, T* d_h_carry, const T* gates,
                                             const T* hn_in, const T* h_prev, T* d_a_x,
                                             T* d_a_h) {
    if (active) {
        const T r = gates[row + j], z = gates[row + H + j], n = gates[row + 2 * H + j];
        const T d_h_total = d_out[k] + d_h;
        const T d_a_n = d_h_total * (T(1) - z) * d_tanh(n);
        const T d_a_z = d_h_total * (h_prev[k] - n) * d_sigmoid(z);
        const T d_a_r = d_a_n * hn_in[k] * d_sigmoid(r);
        d_a_x[row + j] = d_a_r;
        d_a_x[row + H + j] = d_a_z;
        d_a_x[row + 2 * H + j] = d_a_n;
        d_a_h[row + j] = d_a_r;
        d_a_h[row + H + j] = d_a_z;
        d_a_h[row + 2 * H + j] = d_a_n * r;
        d_h_carry[k] = d_h_total * z;
    } else {
        d_a_x[row + j] = T(0);
        d_a_x[row + H + j] = T(0);
        d_a_x[row + 2 * H + j] = T(0);
        d_a_h[row + j] = T(0);
        d_a_h[row + H + j] = T(0);
        d_a_h[row + 2 * H + j] = T(0);
        d_h_carry[k] = d_h;
    }
}

// reset_after stepwise forward of one step.
//   xw [B,3H] x_t W_ih^T + b_ih + [b_hr, b_hz, 0]     hw [B,3H] h_prev W_hh^T
//   b_hn [H] (zeros without bias); the rest as gru_fwd_elem
template <typename T, bool Training>
__device__ __forceinline__ void gru_fwd(int B, int H, int t, const int* lengths, const T* xw,
                                        const T* hw, const T* b_hn, const T* h_prev,
                                        T* h_next, T* out, T* gates, T* hn_out) {
    const int n_elems = B * H;
    for (int k = first_index(); k < n_elems; k += index_stride()) {
        const int b = k / H, j = k - b * H;
        const int row = b * 3 * H;
        const T x[3] = {xw[row + j], xw[row + H + j], xw[row + 2 * H + j]};
        const T h[3] = {hw[row + j], hw[row + H + j], hw[row + 2 * H + j]};
        gru_fwd_elem<T, Training>(t < lengths[b], k, row, H, j, x, h, b_hn[j], h_prev, h_next,
                                  out, gates, hn_out);
    }
}

// reset_after stepwise backward of one step. d_h_gemm [B,H]: d_a_h of the step processed
// before, times W_hh (0 at first); d_h_carry [B,H] in/out.
template <typename T>
__device__ __forceinline__ void gru_bwd(int B, int H, int t, const int* lengths,
                                        const T* d_out, const T* d_h_gemm, T* d_h_carry,
                                        const T* gates, const T* hn_in, const T* h_prev,
                                        T* d_a_x, T* d_a_h) {
    const int n_elems = B * H;
    for (int k = first_index(); k < n_elems; k += index_stride()) {
        const int b = k / H, j = k - b * H;
        gru_bwd_elem<T>(t < lengths[b], k, b * 3 * H, H, j, d_h_carry[k] + d_h_gemm[k], d_out,
                        d_h_carry, gates, hn_in, h_prev, d_a_x, d_a_h);
    }
}

// reset_after persistent steps of one element. Whole-sequence arrays: xw [T,B,3H],
// out, hns, d_out [T,B,H], gates, d_a_x, d_a_h [T,B,3H], hs [T+1,B,H]; b_hn [H].
template <typename T, bool Training>
struct GruForward {
    int B, H;
    const int* lengths;
    const T *xw, *b_hn;
    T *out, *gates, *hns;

    __device__ __forceinline__ void operator()(int t, int, int b, int j, const T (&hw)[3],
                                               const T* h_prev, T* h_next) const {
        const size_t BH = (size_t)B * H, BG = 3 * BH;
        const int k = b * H + j, row = b * 3 * H;
        const T* xt = xw + t * BG;
        const T x[3] = {xt[row + j], xt[row + H + j], xt[row + 2 * H + j]};
        gru_fwd_elem<T, Training>(t < lengths[b], k, row, H, j, x, hw, b_hn[j], h_prev, h_next,
                                  out + t * BH, Training ? gates + t * BG : gates,
                                  Training ? hns + t * BH : hns);
    }
};

template <typename T>
struct GruBackward {
    int B, H, reverse;
    const int* lengths;
    const T *d_out, *gates, *hns, *hs;
    T *d_h_carry, *d_a_x, *d_a_h;

    __device__ __forceinline__ void operator()(int t, int b, int j, T d_h_gemm) const {
        const size_t BH = (size_t)B * H, BG = 3 * BH;
        const int k = b * H + j;
        gru_bwd_elem<T>(t < lengths[b], k, b * 3 * H, H, j, d_h_carry[k] + d_h_gemm,
                        d_out + t * BH, d_h_carry, gates + t * BG, hns + t * BH,
                        hs + (t + reverse) * BH, d_a_x + t * BG, d_a_h + t * BG);
    }
};

// reset_before forward, first half: r and z, and the GEMM input r * h_prev.
//   xw [B,3H] x_t W_ih^T + b_ih + b_hh   hw_rz [B,2H] h_prev W_hrz^T   h_prev [B,H]
//   gates [B,3H] out: r, z (n comes from gru_rb_n_fwd)   rh [B,H] out: r * h_prev
template <typename T>
__device__ __forceinline__ void gru_rb_rz_fwd(int B, int H, const T* xw, const T* hw_rz,
                                              const T* h_prev, T* gates, T* rh) {
    const int n_elems = B * H;
    for (int k = first_index(); k < n_elems; k += index_stride()) {
        const int b = k / H, j = k - b * H;
        const int row = b * 3 * H, row_rz = b * 2 * H;
        const T r = sigmoid(xw[row + j] + hw_rz[row_rz + j]);
        const T z = sigmoid(xw[row + H + j] + hw_rz[row_rz + H + j]);
        gates[row + j] = r;
        gates[row + H + j] = z;
        rh[k] = r * h_prev[k];
    }
}

// reset_before forward, second half: n and the state update.
//   xw [B,3H] as above   hw_n [B,H] (r * h_prev) W_hn^T   gates [B,3H] in: r, z; out: n
//   h_prev, h_next, out [B,H]
template <typename T>
__device__ __forceinline__ void gru_rb_n_fwd(int B, int H, int t, const int* lengths,
                                             const T* xw, const T* hw_n, const T* h_prev,
                                             T* gates, T* h_next, T* out) {
    const int n_elems = B * H;
    for (int k = first_index(); k < n_elems; k += index_stride()) {
        const int b = k / H, j = k - b * H;
        const int row = b * 3 * H;
        const T z = gates[row + H + j];
        const T n = tanh_(xw[row + 2 * H + j] + hw_n[k]);
        const T h_p = h_prev[k];
        const T h = (T(1) - z) * n + z * h_p;
        gates[row + 2 * H + j] = n;
        if (t < lengths[b]) {
            h_next[k] = h;
            out[k] = h;
        } else {
            h_next[k] = h_p;
            out[k] = T(0);
        }
    }
}

// reset_before backward, first half: d_a_n, d_a_z, and d_h_carry = d_h_total * z.
//   d_out, d_h_gemm [B,H] in; d_h_carry [B,H] in/out; gates [B,3H], h_prev [B,H] cache
//   d_a_rz [B,2H] out: column block z (block r comes from gru_rb_r_bwd); d_a_n [B,H] out
template <typename T>
__device__ __forceinline__ void gru_rb_n_bwd(int B, int H, int t, const int* lengths,
                                             const T* d_out, const T* d_h_gemm, T* d_h_carry,
                                             const T* gates, const T* h_prev, T* d_a_rz,
                                             T* d_a_n) {
    const int n_elems = B * H;
    for (int k = first_index(); k < n_elems; k += index_stride()) {
        const int b = k / H, j = k - b * H;
        const int row = b * 3 * H, row_rz = b * 2 * H;
        const T d_h = d_h_carry[k] + d_h_gemm[k];
        if (t < lengths[b]) {
            const T z = gates[row + H + j], n = gates[row + 2 * H + j];
            const T d_h_total = d_out[k] + d_h;
            d_a_n[k] = d_h_total * (T(1) - z) * d_tanh(n);
            d_a_rz[row_rz + H + j] = d_h_total * (h_prev[k] - n) * d_sigmoid(z);
            d_h_carry[k] = d_h_total * z;
        } else {
            d_a_n[k] = T(0);
            d_a_rz[row_rz + H + j] = T(0);
            d_h_carry[k] = d_h;
        }
    }
}

// reset_before backward, second half, after d_rh = d_a_n W_hn:
//   d_a_r = d_rh * h_prev * r(1 - r) and d_h_carry += d_rh * r where active.
template <typename T>
__device__ __forceinline__ void gru_rb_r_bwd(int B, int H, int t, const int* lengths,
                                             const T* d_rh, const T* gates, const T* h_prev,
                                             T* d_h_carry, T* d_a_rz) {
    const int n_elems = B * H;
    for (int k = first_index(); k < n_elems; k += index_stride()) {
        const int b = k / H, j = k - b * H;
        const int row = b * 3 * H, row_rz = b * 2 * H;
        if (t < lengths[b]) {
            const T r = gates[row + j];
            d_a_rz[row_rz + j] = d_rh[k] * h_prev[k] * d_sigmoid(r);
            d_h_carry[k] += d_rh[k] * r;
        } else {
            d_a_rz[row_rz + j] = T(0);
        }
    }
}

}  // namespace fastrnn

#define FASTRNN_GRU_KERNELS(T, SUFFIX)                                                          \
    extern "C" __global__ void fastrnn_gru_fwd_train_##SUFFIX(                                  \
        int B, int H, int t, const int* lengths, const T* xw, const T* hw, const T* b_hn,       \
        const T* h_prev, T* h_next, T* out, T* gates, T* hn) {                                  \
        fastrnn::gru_fwd<T, true>(B, H, t, lengths, xw, hw, b_hn, h_prev, h_next, out, gates,   \
                                  hn);                                                          \
    }                                                                                           \
    extern "C" __global__ void fastrnn_gru_fwd_infer_##SUFFIX(                                  \
        int B, int H, int t, const int* lengths, const T* xw, const T* hw, const T* b_hn,       \
        const T* h_prev, T* h_next, T* out) {                                                   \
        fastrnn::gru_fwd<T, false>(B, H, t, lengths, xw, hw, b_hn, h_prev, h_next, out, (T*)0,  \
                                   (T*)0);                                                      \
    }                                                                                           \
    extern "C" __global__ void fastrnn_gru_bwd_##SUFFIX(                                        \
        int B, int H, int t, const int* lengths, const T* d_out, const T* d_h_gemm,             \
        T* d_h_carry, const T* gates, const T* hn, const T* h_prev, T* d_a_x, T* d_a_h) {       \
        fastrnn::gru_bwd<T>(B, H, t, lengths, d_out, d_h_gemm, d_h_carry, gates, hn, h_prev,    \
                            d_a_x, d_a_h);                                                      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(FASTRNN_PERSIST_THREADS, 1)                    \
        fastrnn_gru_persist_fwd_train_##SUFFIX(FASTRNN_PERSIST_PARAMS, const int* lengths,      \
                                               const T* xw, const T* w_hh, const T* b_hn,       \
                                               T* hs, T* out, T* gates, T* hns,                 \
                                               unsigned* barrier) {                             \
        const fastrnn::GruForward<T, true> cell = {B, H, lengths, xw, b_hn, out, gates, hns};   \
        FASTRNN_WITH_BT(bt, fastrnn::persistent_forward<T, 3, BT_, true>(                       \
                                steps, reverse, FASTRNN_SHARE, w_hh, hs, barrier, cell))        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(FASTRNN_PERSIST_THREADS, 1)                    \
        fastrnn_gru_persist_fwd_infer_##SUFFIX(FASTRNN_PERSIST_PARAMS, const int* lengths,      \
                                               const T* xw, const T* w_hh, const T* b_hn,       \
                                               T* hs, T* out, unsigned* barrier) {              \
        const fastrnn::GruForward<T, false> cell = {B, H, lengths, xw, b_hn, out, (T*)0,        \
                                                    (T*)0};                                     \
        FASTRNN_WITH_BT(bt, fastrnn::persistent_forward<T, 3, BT_, false>(                      \
                                steps, reverse, FASTRNN_SHARE, w_hh, hs, barrier, cell))        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(FASTRNN_PERSIST_THREADS, 1)                    \
        fastrnn_gru_persist_bwd_##SUFFIX(FASTRNN_PERSIST_PARAMS, const int* lengths,            \
                                         const T* w_hh, const T* d_out, T* d_h_carry,           \
                                         const T* gates, const T* hns, const T* hs, T* d_a_x,   \
                                         T* d_a_h, T* d_h_gemm, unsigned* barrier) {            \
        const fastrnn::GruBackward<T> cell = {B, H, reverse, lengths, d_out, gates, hns, hs,    \
                                              d_h_carry, d_a_x, d_a_h};                         \
        FASTRNN_WITH_BT(bt, fastrnn::persistent_backward<T, 3, BT_>(                            \
                                steps, reverse, FASTRNN_SHARE, w_hh, d_a_h, d_h_gemm, barrier,  \
                                cell))                                                          \
    }                                                                                           \
    extern "C" __global__ void fastrnn_gru_rb_rz_fwd_##SUFFIX(                                  \
        int B, int H, const T* xw, const T* hw_rz, const T* h_prev, T* gates, T* rh) {          \
        fastrnn::gru_rb_rz_fwd<T>(B, H, xw, hw_rz, h_prev, gates, rh);                          \
    }                                                                                           \
    extern "C" __global__ void fastrnn_gru_rb_n_fwd_##SUFFIX(                                   \
        int B, int H, int t, const int* lengths, const T* xw, const T* hw_n, const T* h_prev,   \
        T* gates, T* h_next, T* out) {                                                          \
        fastrnn::gru_rb_n_fwd<T>(B, H, t, lengths, xw, hw_n, h_prev, gates, h_next, out);       \
    }                                                                                           \
    extern "C" __global__ void fastrnn_gru_rb_n_bwd_##SUFFIX(                                   \
        int B, int H, int t, const int* lengths, const T* d_out, const T* d_h_gemm,             \
        T* d_h_carry, const T* gates, const T* h_prev, T* d_a_rz, T* d_a_n) {                   \
        fastrnn::gru_rb_n_bwd<T>(B, H, t, lengths, d_out, d_h_gemm, d_h_carry, gates, h_prev,   \
                                 d_a_rz, d_a_n);                                                \
    }                                                                                           \
    extern "C" __global__ void fastrnn_gru_rb_r_bwd_##SUFFIX(                                   \
        int B, int H, int t, const int* lengths, const T* d_rh, const T* gates,                 \
        const T* h_prev, T* d_h_carry, T* d_a_rz) {                                             \
        fastrnn::gru_rb_r_bwd<T>(B, H, t, lengths, d_rh, gates, h_prev, d_h_carry, d_a_rz);     \
    }

FASTRNN_GRU_KERNELS(float, f32)
FASTRNN_GRU_KERNELS(double, f64)
