/* lbcc C runtime: the kernels that a generated model.c calls.
 *
 * Plain C99, no heap, no global state. Every integer kernel follows ONNX Runtime's float32
 * requantization so that results are bit-exact with ORT on the same QDQ graph:
 *
 *   QuantizeLinear        q = sat(round_half_even(clamp(x / s, qmin - zp, qmax - zp)) + zp)
 *   DequantizeLinear      x = (float)(q - zp) * s
 *   MatMulIntegerToFloat  y[m][n] = (float)acc[m][n] * (a_s * w_s[n])            (+ bias[n])
 *   QLinearMatMul/Conv    q = sat(round_half_even((float)acc * (a_s * w_s[n] / y_s)) + y_zp)
 *   with acc = sum_k (a[m][k] - a_zp) * w[n][k]   (int32, exact)
 *
 * The per-channel multipliers are computed in float32 by the code generator exactly as ORT
 * computes them, and stored in weights.c. Build with -std=c99 (or -ffp-contract=off) and never
 * -ffast-math: a fused multiply-add rounds differently from ORT.
 */
#ifndef LBCC_KERNELS_H
#define LBCC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define LBCC_MAX_RANK 6

/* ---- quantization */
void lbcc_quantize_u8(const float *x, uint8_t *y, int32_t n, float scale, int32_t zp);
void lbcc_quantize_s8(const float *x, int8_t *y, int32_t n, float scale, int32_t zp);
void lbcc_dequantize_u8(const uint8_t *x, float *y, int32_t n, float scale, int32_t zp);
void lbcc_dequantize_s8(const int8_t *x, float *y, int32_t n, float scale, int32_t zp);

/* ---- integer matrix products; w is [n][k] (one row per output channel), wsum[j] = sum_k w[j][k]
 * a_signed: 0 = a is uint8, 1 = a is int8 */
void lbcc_qmatmul_f32(const void *a, int a_signed, int32_t a_zp, const int8_t *w,
                      const int32_t *wsum, const float *mult, const float *bias, float *y,
                      int32_t m, int32_t k, int32_t n);
void lbcc_qmatmul_q8(const void *a, int a_signed, int32_t a_zp, const int8_t *w,
                     const int32_t *wsum, const float *mult, void *y, int y_signed, int32_t y_zp,
                     int32_t m, int32_t k, int32_t n);

/* ---- QLinearMul (ONNX Runtime's x86 kernel), broadcasting through strides:
 * y = sat(rne((float)((a - a_zp) * (b - b_zp)) * ratio + (float)y_zp)), ratio = s_a * s_b / s_y */
void lbcc_qmul_q8(const void *a, const int32_t *a_strides, int32_t a_zp, const void *b,
                  const int32_t *b_strides, int32_t b_zp, int in_signed, float ratio, void *y,
                  int y_signed, int32_t y_zp, const int32_t *shape, int rank);

/* ---- integer 2-D convolution, NCHW, groups (depthwise: group == c_in == c_out)
 * w is [c_out][c_in / group][kh][kw]; wsum[o] = sum of w[o]; bias32 (may be NULL) is the int32
 * bias of QLinearConv (already on the a_s * w_s scale). Output either requantized 8-bit
 * (y_float == NULL) or float (y8 == NULL). */
typedef struct {
    int32_t n, c_in, h, w, c_out, oh, ow, kh, kw, sh, sw, dh, dw, pt, pl, group;
} lbcc_conv_shape;
void lbcc_qconv2d(const lbcc_conv_shape *s, const void *x, int x_signed, int32_t x_zp,
                  const int8_t *w, const int32_t *bias32, const float *mult,
                  void *y8, int y_signed, int32_t y_zp, float *y_float);

/* ---- float matrix product y[m][n] = sum_k a[m][k] b[k][n] (weights-free fallback) */
void lbcc_matmul_f32(const float *a, const float *b, float *y, int32_t batch, int32_t m,
                     int32_t k, int32_t n, int32_t a_batch_stride, int32_t b_batch_stride);

/* ---- elementwise, with broadcasting through strides (0 on a broadcast dimension) */
enum { LBCC_ADD = 0, LBCC_SUB, LBCC_MUL, LBCC_DIV, LBCC_MAX, LBCC_MIN };
void lbcc_binary_f32(int op, const float *a, const int32_t *a_strides, const float *b,
                     const int32_t *b_strides, float *y, const int32_t *shape, int rank);
enum { LBCC_RELU = 0, LBCC_CLIP, LBCC_SIGMOID, LBCC_TANH, LBCC_EXP, LBCC_NEG, LBCC_SQRT,
       LBCC_RECIPROCAL, LBCC_ABS, LBCC_IDENTITY };
void lbcc_unary_f32(int op, const float *x, float *y, int32_t n, float lo, float hi);

/* ---- data movement */
void lbcc_copy(const void *x, void *y, size_t bytes);
void lbcc_transpose(const void *x, void *y, size_t elem, const int32_t *out_shape,
                    const int32_t *in_strides, int rank);
void lbcc_concat_part(const void *x, void *y, size_t elem, int32_t outer, int32_t x_block,
                      int32_t y_block, int32_t y_offset);

/* ---- float reductions and pooling (tolerance-bearing: exp/libm differ from ORT's) */
void lbcc_softmax_f32(const float *x, float *y, int32_t rows, int32_t cols);
typedef struct {
    int32_t n, c, h, w, oh, ow, kh, kw, sh, sw, pt, pl, pb, pr, count_include_pad;
} lbcc_pool_shape;
void lbcc_maxpool_f32(const lbcc_pool_shape *s, const float *x, float *y);
void lbcc_avgpool_f32(const lbcc_pool_shape *s, const float *x, float *y);
void lbcc_maxpool_q8(const lbcc_pool_shape *s, const void *x, int is_signed, void *y);

/* ---- misc */
void lbcc_gather_rows(const void *table, const int64_t *ids, void *y, size_t row_bytes,
                      int32_t n_ids, int32_t n_rows);
/* embedding rows of an int8 table with one scale per row: y[i][c] = (float)q[ids[i]][c] * s[ids[i]] */
void lbcc_gather_dq_s8(const int8_t *table, const float *scales, const int64_t *ids, float *y,
                       int32_t cols, int32_t n_ids, int32_t n_rows);
void lbcc_argmax_last_f32(const float *x, int64_t *y, int32_t rows, int32_t cols);

#endif /* LBCC_KERNELS_H */
