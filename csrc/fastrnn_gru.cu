// GRU pointwise kernels, one time step each, PyTorch's gate order r, z, n. See
// fastrnn_common.cuh for the notation and fastrnn_lstm.cu for the d_h_carry + d_h_gemm
// scheme of the state gradient.
//
// reset_after (PyTorch, cuDNN): n = tanh(xw_n + r * (h_prev W_hn^T + b_hn)).
//   forward:  hw = h_prev W_hh^T (cuBLAS), gru_fwd
//   backward: gru_bwd, d_h_gemm = d_a_h W_hh (cuBLAS)
// reset_before (Cho et al.): n = tanh(xw_n + (r * h_prev) W_hn^T), biases all in xw.
//   forward:  hw_rz = h_prev W_hrz^T, gru_rb_rz_fwd, hw_n = rh W_hn^T, gru_rb_n_fwd
//   backward: gru_rb_n_bwd, d_rh = d_a_n W_hn, gru_rb_r_bwd, d_h_gemm = d_a_rz W_hrz
#include "fastrnn_common.cuh"

namespace fastrnn {

// reset_after forward of one step.
//   xw [B,3H] x_t W_ih^T + b_ih + [b_hr, b_hz, 0]     hw [B,3H] h_prev W_hh^T
//   b_hn [H] (zeros without bias)                      h_prev, h_next, out [B,H]
//   gates [B,3H] r, z, n (Training)                    hn [B,H] h_prev W_hn^T + b_hn (Training)
template <typename T, bool Training>
__device__ __forceinline__ void gru_fwd(int B, int H, int t, const int* lengths, const T* xw,
                                        const T* hw, const T* b_hn, const T* h_prev,
                                        T* h_next, T* out, T* gates, T* hn_out) {
    const int n_elems = B * H;
    for (int k = first_index(); k < n_elems; k += index_stride()) {
        const int b = k / H, j = k - b * H;
        const int row = b * 3 * H;
        const T r = sigmoid(xw[row + j] + hw[row + j]);
        const T z = sigmoid(xw[row + H + j] + hw[row + H + j]);
        const T hn = hw[row + 2 * H + j] + b_hn[j];
        const T n = tanh_(xw[row + 2 * H + j] + r * hn);
        const T h_p = h_prev[k];
        const T h = (T(1) - z) * n + z * h_p;
        if (t < lengths[b]) {
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
}

// reset_after backward of one step.
//   d_out, d_h_gemm [B,H] in; d_h_carry [B,H] in/out
//   gates [B,3H], hn [B,H], h_prev [B,H]: forward cache of this step
//   d_a_x [B,3H] out: d_a_r, d_a_z, d_a_n (feeds W_ih, b_ih)
//   d_a_h [B,3H] out: d_a_r, d_a_z, d_hn  (feeds W_hh, b_hh)
template <typename T>
__device__ __forceinline__ void gru_bwd(int B, int H, int t, const int* lengths,
                                        const T* d_out, const T* d_h_gemm, T* d_h_carry,
                                        const T* gates, const T* hn_in, const T* h_prev,
                                        T* d_a_x, T* d_a_h) {
    const int n_elems = B * H;
    for (int k = first_index(); k < n_elems; k += index_stride()) {
        const int b = k / H, j = k - b * H;
        const int row = b * 3 * H;
        const T d_h = d_h_carry[k] + d_h_gemm[k];
        if (t < lengths[b]) {
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
}

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
