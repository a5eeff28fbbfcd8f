/* lbcc C runtime kernels; see lbcc_kernels.h for the numerics contract. Plain C99. */
#include "lbcc_kernels.h"

#include <math.h>
#include <string.h>

/* round half to even for |v| < 2^22 under the default rounding mode: adding 1.5 * 2^23 moves v
 * to a binade whose spacing is 1, so the addition itself rounds to the nearest even integer
 * (what _mm_cvtps_epi32 / lrintf do). Callers clamp v to the 8-bit range first. */
static float lbcc_rne(float v)
{
    const float magic = 12582912.0f; /* 0x1.8p23 */
    return (v + magic) - magic;
}

static int32_t lbcc_saturate(float v, int32_t zp, int32_t qmin, int32_t qmax)
{
    const float lo = (float)(qmin - zp), hi = (float)(qmax - zp);
    v = v > lo ? v : lo; /* also maps NaN to lo */
    v = v < hi ? v : hi;
    return (int32_t)lbcc_rne(v) + zp;
}

void lbcc_quantize_u8(const float *x, uint8_t *y, int32_t n, float scale, int32_t zp)
{
    int32_t i;
    for (i = 0; i < n; ++i)
        y[i] = (uint8_t)lbcc_saturate(x[i] / scale, zp, 0, 255);
}

void lbcc_quantize_s8(const float *x, int8_t *y, int32_t n, float scale, int32_t zp)
{
    int32_t i;
    for (i = 0; i < n; ++i)
        y[i] = (int8_t)lbcc_saturate(x[i] / scale, zp, -128, 127);
}

void lbcc_dequantize_u8(const uint8_t *x, float *y, int32_t n, float scale, int32_t zp)
{
    int32_t i;
    for (i = 0; i < n; ++i)
        y[i] = (float)((int32_t)x[i] - zp) * scale;
}

void lbcc_dequantize_s8(const int8_t *x, float *y, int32_t n, float scale, int32_t zp)
{
    int32_t i;
    for (i = 0; i < n; ++i)
        y[i] = (float)((int32_t)x[i] - zp) * scale;
}

static int32_t lbcc_load8(const void *x, int is_signed, size_t i)
{
    return is_signed ? (int32_t)((const int8_t *)x)[i] : (int32_t)((const uint8_t *)x)[i];
}

/* sum_k a[k] * w[k] with a uint8 or int8: the raw product; the zero-point term is subtracted by
 * the caller as a_zp * wsum (integer arithmetic, exact either way) */
#if defined(__ARM_FEATURE_SIMD32) && !defined(LBCC_NO_SIMD32)
/* Cortex-M4/M7/M33 fast path (CMSIS-NN style): four bytes a load, widened to two pairs of 16-bit
 * lanes (bytes 0,2 and 1,3) and accumulated with SMLAD (two 16x16 products and an add into the
 * 32-bit sum). Integer arithmetic throughout, so the sum is identical to the plain loop's. */
#include <arm_acle.h>

static uint32_t lbcc_load4(const void *p)
{
    uint32_t v;
    memcpy(&v, p, 4); /* LDR: unaligned loads are fine on these cores */
    return v;
}

static uint32_t lbcc_ror8(uint32_t x)
{
    return (x >> 8) | (x << 24); /* one ROR instruction */
}

static int32_t lbcc_dot4(const void *a, int a_signed, const int8_t *w, int32_t k, int32_t *done)
{
    int32_t acc = 0, i;
    for (i = 0; i + 4 <= k; i += 4) {
        const uint32_t av = lbcc_load4((const uint8_t *)a + i), wv = lbcc_load4(w + i);
        const int16x2_t a02 = a_signed ? __sxtb16((int8x4_t)av)
                                       : (int16x2_t)__uxtb16((uint8x4_t)av);
        const int16x2_t a13 = a_signed ? __sxtb16((int8x4_t)lbcc_ror8(av))
                                       : (int16x2_t)__uxtb16((uint8x4_t)lbcc_ror8(av));
        acc = __smlad(a02, __sxtb16((int8x4_t)wv), acc);
        acc = __smlad(a13, __sxtb16((int8x4_t)lbcc_ror8(wv)), acc);
    }
    *done = i;
    return acc;
}
#endif

static int32_t lbcc_dot(const void *a, int a_signed, const int8_t *w, int32_t k)
{
    int32_t acc = 0, i = 0;
#if defined(__ARM_FEATURE_SIMD32) && !defined(LBCC_NO_SIMD32)
    acc = lbcc_dot4(a, a_signed, w, k, &i);
    a = (const uint8_t *)a + i;
    w += i;
    k -= i;
    i = 0;
#endif
    if (a_signed) {
        const int8_t *p = (const int8_t *)a;
        for (i = 0; i < k; ++i)
            acc += (int32_t)p[i] * (int32_t)w[i];
    } else {
        const uint8_t *p = (const uint8_t *)a;
        for (i = 0; i < k; ++i)
            acc += (int32_t)p[i] * (int32_t)w[i];
    }
    return acc;
}

/* sum_k (a[k] - a_zp) * w[j, k] over row j of w [n, k], as the raw dot product less
 * a_zp * wsum[j] (wsum[j] = sum_k w[j, k]): integer arithmetic, exact */
static int32_t lbcc_qdot(const void *a, int a_signed, int32_t a_zp, const int8_t *w,
                         const int32_t *wsum, int32_t j, int32_t k)
{
    return lbcc_dot(a, a_signed, w + (size_t)j * (size_t)k, k) - a_zp * wsum[j];
}

/* y[o] = clamp(round_half_even(v) + zp) into the 8-bit range of y (int8 when y_signed, else
 * uint8): the float32 requantization of lbcc_saturate */
static void lbcc_requant8(void *y, int y_signed, size_t o, float v, int32_t zp)
{
    if (y_signed)
        ((int8_t *)y)[o] = (int8_t)lbcc_saturate(v, zp, -128, 127);
    else
        ((uint8_t *)y)[o] = (uint8_t)lbcc_saturate(v, zp, 0, 255);
}

static const void *lbcc_row(const void *base, int32_t index)
{
    return (const void *)((const uint8_t *)base + index);
}

void lbcc_qmatmul_f32(const void *a, int a_signed, int32_t a_zp, const int8_t *w,
                      const int32_t *wsum, const float *mult, const float *bias, float *y,
                      int32_t m, int32_t k, int32_t n)
{
    int32_t i, j;
    for (i = 0; i < m; ++i) {
        const void *row = lbcc_row(a, i * k);
        for (j = 0; j < n; ++j) {
            const int32_t acc = lbcc_qdot(row, a_signed, a_zp, w, wsum, j, k);
            float v = (float)acc * mult[j];
            if (bias)
                v = v + bias[j];
            y[(size_t)i * (size_t)n + (size_t)j] = v;
        }
    }
}

void lbcc_qmatmul_q8(const void *a, int a_signed, int32_t a_zp, const int8_t *w,
                     const int32_t *wsum, const float *mult, void *y, int y_signed, int32_t y_zp,
                     int32_t m, int32_t k, int32_t n)
{
    int32_t i, j;
    for (i = 0; i < m; ++i) {
        const void *row = lbcc_row(a, i * k);
        for (j = 0; j < n; ++j) {
            const int32_t acc = lbcc_qdot(row, a_signed, a_zp, w, wsum, j, k);
            lbcc_requant8(y, y_signed, (size_t)i * (size_t)n + (size_t)j, (float)acc * mult[j],
                          y_zp);
        }
    }
}


void lbcc_qconv2d(const lbcc_conv_shape *s, const void *x, int x_signed, int32_t x_zp,
                  const int8_t *w, const int32_t *bias32, const float *mult,
                  void *y8, int y_signed, int32_t y_zp, float *y_float)
{
    const int32_t cin_g = s->c_in / s->group, cout_g = s->c_out / s->group;
    int32_t b, o, oy, ox, c, ky, kx;
    for (b = 0; b < s->n; ++b)
        for (o = 0; o < s->c_out; ++o) {
            const int32_t g = o / cout_g;
            const int8_t *wo = w + (size_t)o * (size_t)(cin_g * s->kh * s->kw);
            for (oy = 0; oy < s->oh; ++oy)
                for (ox = 0; ox < s->ow; ++ox) {
                    int32_t acc = bias32 ? bias32[o] : 0;
                    size_t out;
                    for (c = 0; c < cin_g; ++c) {
                        const size_t plane = ((size_t)b * (size_t)s->c_in + (size_t)(g * cin_g + c))
                                             * (size_t)s->h * (size_t)s->w;
                        for (ky = 0; ky < s->kh; ++ky) {
                            const int32_t iy = oy * s->sh - s->pt + ky * s->dh;
                            if (iy < 0 || iy >= s->h)
                                continue; /* padding holds x_zp: contributes zero */
                            for (kx = 0; kx < s->kw; ++kx) {
                                const int32_t ix = ox * s->sw - s->pl + kx * s->dw;
                                if (ix < 0 || ix >= s->w)
                                    continue;
                                acc += (lbcc_load8(x, x_signed, plane + (size_t)iy * (size_t)s->w
                                                   + (size_t)ix) - x_zp)
                                       * (int32_t)wo[(c * s->kh + ky) * s->kw + kx];
                            }
                        }
                    }
                    out = (((size_t)b * (size_t)s->c_out + (size_t)o) * (size_t)s->oh
                           + (size_t)oy) * (size_t)s->ow + (size_t)ox;
                    if (y_float)
                        y_float[out] = (float)acc * mult[o];
                    else
                        lbcc_requant8(y8, y_signed, out, (float)acc * mult[o], y_zp);
                }
        }
}

/* Row-major walk over an output of `rank` dims (`shape`), the offsets of up to two inputs kept
 * alongside: lbcc_walk_start zeroes the index `idx` and returns the element count;
 * lbcc_walk_next steps idx by one (the last dim fastest), adds each input's stride of every
 * dim it steps and takes back stride * shape[d] of every dim that wraps to 0, so *ia (and *ib,
 * unless b_strides is NULL) stays sum_d idx[d] * strides[d] (a stride of 0 broadcasts). */
static size_t lbcc_walk_start(int32_t *idx, const int32_t *shape, int rank)
{
    size_t total = 1;
    int d;
    for (d = 0; d < rank; ++d) {
        idx[d] = 0;
        total *= (size_t)shape[d];
    }
    return total;
}

static void lbcc_walk_next(int32_t *idx, const int32_t *shape, int rank,
                           const int32_t *a_strides, size_t *ia,
                           const int32_t *b_strides, size_t *ib)
{
    int d;
    for (d = rank - 1; d >= 0; --d) {
        *ia += (size_t)a_strides[d];
        if (b_strides)
            *ib += (size_t)b_strides[d];
        if (++idx[d] < shape[d])
            break;
        *ia -= (size_t)a_strides[d] * (size_t)shape[d];
        if (b_strides)
            *ib -= (size_t)b_strides[d] * (size_t)shape[d];
        idx[d] = 0;
    }
}

void lbcc_qmul_q8(const void *a, const int32_t *a_strides, int32_t a_zp, const void *b,
                  const int32_t *b_strides, int32_t b_zp, int in_signed, float ratio, void *y,
                  int y_signed, int32_t y_zp, const int32_t *shape, int rank)
{
    int32_t idx[LBCC_MAX_RANK];
    size_t ia = 0, ib = 0, o;
    const size_t total = lbcc_walk_start(idx, shape, rank);
    for (o = 0; o < total; ++o) {
        const int32_t prod = (lbcc_load8(a, in_signed, ia) - a_zp) * (lbcc_load8(b, in_signed, ib) - b_zp);
        /* ORT: cvtps(mul(prod, ratio) + zp), saturated: two roundings, then to nearest even */
        float v = (float)prod * ratio + (float)y_zp;
        const float lo = y_signed ? -128.0f : 0.0f, hi = y_signed ? 127.0f : 255.0f;
        v = v > lo ? v : lo;
        v = v < hi ? v : hi;
        if (y_signed)
            ((int8_t *)y)[o] = (int8_t)lbcc_rne(v);
        else
            ((uint8_t *)y)[o] = (uint8_t)lbcc_rne(v);
        lbcc_walk_next(idx, shape, rank, a_strides, &ia, b_strides, &ib);
    }
}

void lbcc_matmul_f32(const float *a, const float *b, float *y, int32_t batch, int32_t m,
                     int32_t k, int32_t n, int32_t a_batch_stride, int32_t b_batch_stride)
{
    int32_t t, i, j, p;
    for (t = 0; t < batch; ++t) {
        const float *at = a + (size_t)t * (size_t)a_batch_stride;
        const float *bt = b + (size_t)t * (size_t)b_batch_stride;
        float *yt = y + (size_t)t * (size_t)m * (size_t)n;
        for (i = 0; i < m; ++i)
            for (j = 0; j < n; ++j) {
                float acc = 0.0f;
                for (p = 0; p < k; ++p)
                    acc += at[(size_t)i * (size_t)k + (size_t)p] * bt[(size_t)p * (size_t)n + (size_t)j];
                yt[(size_t)i * (size_t)n + (size_t)j] = acc;
            }
    }
}

static float lbcc_apply_binary(int op, float a, float b)
{
    switch (op) {
    case LBCC_ADD: return a + b;
    case LBCC_SUB: return a - b;
    case LBCC_MUL: return a * b;
    case LBCC_DIV: return a / b;
    case LBCC_MAX: return a > b ? a : b;
    default: return a < b ? a : b;
    }
}

void lbcc_binary_f32(int op, const float *a, const int32_t *a_strides, const float *b,
                     const int32_t *b_strides, float *y, const int32_t *shape, int rank)
{
    int32_t idx[LBCC_MAX_RANK];
    size_t ia = 0, ib = 0, o;
    const size_t total = lbcc_walk_start(idx, shape, rank);
    for (o = 0; o < total; ++o) {
        y[o] = lbcc_apply_binary(op, a[ia], b[ib]);
        lbcc_walk_next(idx, shape, rank, a_strides, &ia, b_strides, &ib);
    }
}

void lbcc_unary_f32(int op, const float *x, float *y, int32_t n, float lo, float hi)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        const float v = x[i];
        float r;
        switch (op) {
        case LBCC_RELU: r = v > 0.0f ? v : 0.0f; break;
        case LBCC_CLIP: r = v < lo ? lo : (v > hi ? hi : v); break;
        case LBCC_SIGMOID: r = 1.0f / (1.0f + expf(-v)); break;
        case LBCC_TANH: r = tanhf(v); break;
        case LBCC_EXP: r = expf(v); break;
        case LBCC_NEG: r = -v; break;
        case LBCC_SQRT: r = sqrtf(v); break;
        case LBCC_RECIPROCAL: r = 1.0f / v; break;
        case LBCC_ABS: r = fabsf(v); break;
        default: r = v; break;
        }
        y[i] = r;
    }
}

void lbcc_copy(const void *x, void *y, size_t bytes)
{
    if (x != y)
        memmove(y, x, bytes);
}

void lbcc_transpose(const void *x, void *y, size_t elem, const int32_t *out_shape,
                    const int32_t *in_strides, int rank)
{
    int32_t idx[LBCC_MAX_RANK];
    size_t o, src = 0;
    const size_t total = lbcc_walk_start(idx, out_shape, rank);
    for (o = 0; o < total; ++o) {
        memcpy((uint8_t *)y + o * elem, (const uint8_t *)x + src * elem, elem);
        lbcc_walk_next(idx, out_shape, rank, in_strides, &src, NULL, NULL);
    }
}

void lbcc_concat_part(const void *x, void *y, size_t elem, int32_t outer, int32_t x_block,
                      int32_t y_block, int32_t y_offset)
{
    int32_t i;
    for (i = 0; i < outer; ++i)
        memcpy((uint8_t *)y + ((size_t)i * (size_t)y_block + (size_t)y_offset) * elem,
               (const uint8_t *)x + (size_t)i * (size_t)x_block * elem, (size_t)x_block * elem);
}

void lbcc_softmax_f32(const float *x, float *y, int32_t rows, int32_t cols)
{
    int32_t r, c;
    for (r = 0; r < rows; ++r) {
        const float *xr = x + (size_t)r * (size_t)cols;
        float *yr = y + (size_t)r * (size_t)cols;
        float mx = xr[0], sum = 0.0f;
        for (c = 1; c < cols; ++c)
            mx = xr[c] > mx ? xr[c] : mx;
        for (c = 0; c < cols; ++c) {
            yr[c] = expf(xr[c] - mx);
            sum += yr[c];
        }
        for (c = 0; c < cols; ++c)
            yr[c] = yr[c] / sum;
    }
}

/* pooling windows: the output (oy, ox) reads rows oy*sh - pt .. + kh, clipped to the image */
#define LBCC_POOL_LOOP(BODY_INIT, BODY_ACC, BODY_OUT)                                       \
    int32_t b, c, oy, ox, ky, kx;                                                          \
    for (b = 0; b < s->n; ++b)                                                             \
        for (c = 0; c < s->c; ++c) {                                                       \
            const size_t plane = ((size_t)b * (size_t)s->c + (size_t)c) * (size_t)s->h * (size_t)s->w; \
            const size_t oplane = ((size_t)b * (size_t)s->c + (size_t)c) * (size_t)s->oh * (size_t)s->ow; \
            for (oy = 0; oy < s->oh; ++oy)                                                 \
                for (ox = 0; ox < s->ow; ++ox) {                                           \
                    BODY_INIT;                                                             \
                    for (ky = 0; ky < s->kh; ++ky) {                                       \
                        const int32_t iy = oy * s->sh - s->pt + ky;                        \
                        if (iy < 0 || iy >= s->h)                                          \
                            continue;                                                      \
                        for (kx = 0; kx < s->kw; ++kx) {                                   \
                            const int32_t ix = ox * s->sw - s->pl + kx;                    \
                            size_t at;                                                     \
                            if (ix < 0 || ix >= s->w)                                      \
                                continue;                                                  \
                            at = plane + (size_t)iy * (size_t)s->w + (size_t)ix;           \
                            BODY_ACC;                                                      \
                        }                                                                  \
                    }                                                                      \
                    BODY_OUT;                                                              \
                }                                                                          \
        }

void lbcc_maxpool_f32(const lbcc_pool_shape *s, const float *x, float *y)
{
    LBCC_POOL_LOOP(float m = -INFINITY,
                   m = x[at] > m ? x[at] : m,
                   y[oplane + (size_t)oy * (size_t)s->ow + (size_t)ox] = m)
}

void lbcc_maxpool_q8(const lbcc_pool_shape *s, const void *x, int is_signed, void *y)
{
    LBCC_POOL_LOOP(int32_t m = -129,
                   { int32_t v = lbcc_load8(x, is_signed, at); m = v > m ? v : m; },
                   { size_t o = oplane + (size_t)oy * (size_t)s->ow + (size_t)ox;
                     if (is_signed) ((int8_t *)y)[o] = (int8_t)m;
                     else ((uint8_t *)y)[o] = (uint8_t)m; })
}

void lbcc_avgpool_f32(const lbcc_pool_shape *s, const float *x, float *y)
{
    LBCC_POOL_LOOP(float acc = 0.0f; int32_t cnt = 0,
                   { acc += x[at]; ++cnt; },
                   { int32_t div = s->count_include_pad ? s->kh * s->kw : cnt;
                     y[oplane + (size_t)oy * (size_t)s->ow + (size_t)ox] = acc / (float)div; })
}

/* the row a Gather id names: negative ids count from the end (id + n_rows); an id still out of
 * range reads row 0 rather than memory outside the table */
static size_t lbcc_row_id(int64_t id, int32_t n_rows)
{
    const int64_t r = id < 0 ? id + n_rows : id;
    return r < 0 || r >= n_rows ? 0u : (size_t)r;
}

void lbcc_gather_rows(const void *table, const int64_t *ids, void *y, size_t row_bytes,
                      int32_t n_ids, int32_t n_rows)
{
    int32_t i;
    for (i = 0; i < n_ids; ++i)
        memcpy((uint8_t *)y + (size_t)i * row_bytes,
               (const uint8_t *)table + lbcc_row_id(ids[i], n_rows) * row_bytes, row_bytes);
}

void lbcc_gather_dq_s8(const int8_t *table, const float *scales, const int64_t *ids, float *y,
                       int32_t cols, int32_t n_ids, int32_t n_rows)
{
    int32_t i, c;
    for (i = 0; i < n_ids; ++i) {
        const size_t r = lbcc_row_id(ids[i], n_rows);
        const int8_t *row = table + r * (size_t)cols;
        for (c = 0; c < cols; ++c)
            y[(size_t)i * (size_t)cols + (size_t)c] = (float)row[c] * scales[r];
    }
}

void lbcc_argmax_last_f32(const float *x, int64_t *y, int32_t rows, int32_t cols)
{
    int32_t r, c;
    for (r = 0; r < rows; ++r) {
        const float *xr = x + (size_t)r * (size_t)cols;
        int32_t best = 0;
        for (c = 1; c < cols; ++c)
            if (xr[c] > xr[best])
                best = c;
        y[r] = best;
    }
}
