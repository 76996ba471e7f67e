// The arithmetic of the fused tail of a single-hidden-layer MLP on the CPU (see mlp1_tail.h for what it computes).
// This translation unit includes no torch header and is compiled on its own, so its machine code is that of the
// kernel lossglass has always used (the same source, the same flags): the operator in mlp1_tail_op.cpp only checks
// the arguments and spreads the tiles over torch's threads. Built with -DLG_NCLASS=C -DLG_SUPER=1024.

#include <cstdint>
#include <cmath>
#include <cstring>

#include "mlp1_tail.h"

#ifndef LG_NCLASS
#error "build with -DLG_NCLASS=<number of classes>"
#endif
#ifndef LG_SUPER
#error "build with -DLG_SUPER=<samples per super-block>"
#endif
static_assert(LG_NCLASS >= 2 && LG_NCLASS <= 32, "2 <= LG_NCLASS <= 32");

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(64)));
#define L 16
typedef float vfu __attribute__((vector_size(64), aligned(4)));  // unaligned loads
typedef int32_t viu __attribute__((vector_size(64), aligned(4)));

static inline vf vsplat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }  // one broadcast
static inline vi isplat(int32_t x) { return (vi){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline vi vloadi(const int32_t* p) { return *reinterpret_cast<const viu*>(p); }
static inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline vf vload_n(const float* p, int n) { vf v = vsplat(0.0f); for (int i = 0; i < n; ++i) v[i] = p[i]; return v; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline vf vmin(vf a, vf b) { return a < b ? a : b; }
static inline vf bits_f(vi x) { vf r; std::memcpy(&r, &x, sizeof(r)); return r; }
static inline vi f_bits(vf x) { vi r; std::memcpy(&r, &x, sizeof(r)); return r; }

// exp(x), Cephes expf: |rel err| <= ~1 ulp; exp(+inf) = inf, exp(-inf) = 0, overflow -> inf.
static inline vf vexp(vf x) {
    vf xc = vmin(vmax(x, vsplat(-104.0f)), vsplat(89.0f));
    vf fx = xc * vsplat(1.44269504088896341f) + vsplat(0.5f);
    vi n = __builtin_convertvector(fx, vi);
    vf nf = __builtin_convertvector(n, vf);
    n = nf > fx ? n - 1 : n;  // floor
    nf = __builtin_convertvector(n, vf);
    vf r = xc - nf * vsplat(0.693359375f);
    r = r - nf * vsplat(-2.12194440e-4f);
    vf p = vsplat(1.9875691500e-4f);
    p = p * r + vsplat(1.3981999507e-3f);
    p = p * r + vsplat(8.3334519073e-3f);
    p = p * r + vsplat(4.1665795894e-2f);
    p = p * r + vsplat(1.6666665459e-1f);
    p = p * r + vsplat(5.0000001201e-1f);
    p = p * r * r + r + vsplat(1.0f);
    vi n1 = n >> 1;
    vi n2 = n - n1;
    return p * bits_f((n1 + 127) << 23) * bits_f((n2 + 127) << 23);
}

// log(x) for x >= 0, Cephes logf: log(0) = -inf, log(inf) = inf; x normal (sums of exps are >= 1 here).
static inline vf vlog(vf x) {
    vi b = f_bits(x);
    vi e = ((b >> 23) & 0xff) - 126;
    vf m = bits_f((b & 0x007fffff) | 0x3f000000);  // [0.5, 1)
    vi small = m < vsplat(0.707106781186547524f);
    e = small ? e - 1 : e;
    m = small ? m + m - vsplat(1.0f) : m - vsplat(1.0f);
    vf z = m * m;
    vf y = vsplat(7.0376836292e-2f);
    y = y * m + vsplat(-1.1514610310e-1f);
    y = y * m + vsplat(1.1676998740e-1f);
    y = y * m + vsplat(-1.2420140846e-1f);
    y = y * m + vsplat(1.4249322787e-1f);
    y = y * m + vsplat(-1.6668057665e-1f);
    y = y * m + vsplat(2.0000714765e-1f);
    y = y * m + vsplat(-2.4999993993e-1f);
    y = y * m + vsplat(3.3333331174e-1f);
    y = y * m * z;
    vf ef = __builtin_convertvector(e, vf);
    y = y + ef * vsplat(-2.12194440e-4f);
    y = y - vsplat(0.5f) * z;
    vf r = m + y + ef * vsplat(0.693359375f);
    vf inf = vsplat(INFINITY);
    r = x == inf ? inf : r;
    r = x == vsplat(0.0f) ? -inf : r;
    return r;
}

// One point over samples [s0, s1) (s1 - s0 <= LG_SUPER): loss and correct sums. W2 is the point's (H, C) = W^T.
template <int C, int J, int ACT>
static void point_block(const float* Z, int64_t ldz, int64_t ldj, int H, const float* coef, int jn,
                        const float* W2, const float* b2, const int32_t* y, int64_t s0, int64_t s1,
                        int loss, double* out_loss, double* out_corr) {
    const int jj = J > 0 ? J : jn;
    typedef float vh __attribute__((vector_size(32)));
    vd lsum0 = {0}, lsum1 = {0};
    vi csum = isplat(0);
    const vi iota = (vi){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vf c0 = vsplat(coef[0]);
    for (int64_t s = s0; s < s1; s += L) {
        const int n = (int)((s1 - s) < L ? (s1 - s) : L);
        const float* base = Z + s;
        vf acc[C];
        for (int c = 0; c < C; ++c) acc[c] = vsplat(b2[c]);
        if (n == L) {
            for (int k = 0; k < H; ++k) {
                vf z = vload(base + k * ldz) * c0;
                for (int j = 1; j < jj; ++j) z = vsplat(coef[j]) * vload(base + j * ldj + k * ldz) + z;
                vf a = ACT == 0 ? (vsplat(0.0f) > z ? vsplat(0.0f) : z) : z;  // relu; NaN stays NaN (maxps)
                const float* w = W2 + k * C;
                for (int c = 0; c < C; ++c) acc[c] = vsplat(w[c]) * a + acc[c];
            }
        } else {  // the last, partial block: the missing lanes read as 0 and are left out of the sums
            for (int k = 0; k < H; ++k) {
                vf z = vload_n(base + k * ldz, n) * c0;
                for (int j = 1; j < jj; ++j) z = vsplat(coef[j]) * vload_n(base + j * ldj + k * ldz, n) + z;
                vf a = ACT == 0 ? (vsplat(0.0f) > z ? vsplat(0.0f) : z) : z;  // relu; NaN stays NaN (maxps)
                const float* w = W2 + k * C;
                for (int c = 0; c < C; ++c) acc[c] = vsplat(w[c]) * a + acc[c];
            }
        }
        vi yl;
        if (n == L) yl = vloadi(y + s);
        else { yl = isplat(0); for (int l = 0; l < n; ++l) yl[l] = y[s + l]; }
        vi valid = iota < isplat(n);
        vi nanf = isplat(0);
        vf best = acc[0];
        vi idx = isplat(0);
        vf truel = vsplat(0.0f);
        for (int c = 0; c < C; ++c) {
            vi isn = acc[c] != acc[c];
            nanf = nanf | isn;
            if (c > 0) {
                vi take = (acc[c] > best) | (isn & (best == best));
                best = take ? acc[c] : best;
                idx = take ? isplat(c) : idx;
            }
            truel = (yl == isplat(c)) ? acc[c] : truel;
        }
        vf lv;
        if (loss == 0) {
            vf m = acc[0];
            for (int c = 1; c < C; ++c) m = vmax(m, acc[c]);
            vf inf = vsplat(INFINITY);
            vf sh = (m == inf) | (m == -inf) ? vsplat(0.0f) : m;
            vf se = vexp(acc[0] - sh);
            for (int c = 1; c < C; ++c) se = se + vexp(acc[c] - sh);
            lv = (vlog(se) + sh) - truel;
        } else {
            vf q = vsplat(0.0f);
            for (int c = 0; c < C; ++c) {
                vf d = acc[c] - ((yl == isplat(c)) ? vsplat(1.0f) : vsplat(0.0f));
                q = q + d * d;
            }
            lv = vsplat(0.5f) * q;
        }
        lv = nanf ? vsplat(NAN) : lv;
        lv = valid ? lv : vsplat(0.0f);
        csum = csum + ((valid & (idx == yl)) ? isplat(1) : isplat(0));
        vh lo, hi;
        std::memcpy(&lo, &lv, sizeof(lo));
        std::memcpy(&hi, reinterpret_cast<const char*>(&lv) + sizeof(lo), sizeof(hi));
        lsum0 = lsum0 + __builtin_convertvector(lo, vd);
        lsum1 = lsum1 + __builtin_convertvector(hi, vd);
    }
    double t = 0.0;
    for (int l = 0; l < 8; ++l) t += lsum0[l];
    for (int l = 0; l < 8; ++l) t += lsum1[l];
    int64_t cs = 0;
    for (int l = 0; l < L; ++l) cs += csum[l];
    *out_loss = t;
    *out_corr = (double)cs;
}

template <int C>
static void run_tiles(const float* Z, int64_t ldz, int64_t ldj, int64_t ldb, int H, int jn, int64_t n_samples,
                      const float* coef, const float* W2, const float* b2, const int32_t* y, int64_t per_basis,
                      int64_t n_points, int64_t group, int64_t t0, int64_t t1, int act, int loss,
                      double* out_loss, double* out_corr) {
    const int64_t n_super = (n_samples + LG_SUPER - 1) / LG_SUPER;
    const int64_t n_groups = (n_points + group - 1) / group;
    for (int64_t t = t0; t < t1; ++t) {
        int64_t sb = t / n_groups, gr = t % n_groups;
        int64_t s0 = sb * LG_SUPER, s1 = s0 + LG_SUPER < n_samples ? s0 + LG_SUPER : n_samples;
        int64_t g1 = (gr + 1) * group < n_points ? (gr + 1) * group : n_points;
        for (int64_t g = gr * group; g < g1; ++g) {
            const float* zb = Z + (g / per_basis) * ldb;
            double* ol = out_loss + g * n_super + sb;
            double* oc = out_corr + g * n_super + sb;
            const float* cf = coef + g * jn;
            const float* w = W2 + g * (int64_t)C * H;
            const float* b = b2 + g * C;
            if (act == 0) {
                switch (jn) {
                    case 1: point_block<C, 1, 0>(zb, ldz, ldj, H, cf, jn, w, b, y, s0, s1, loss, ol, oc); break;
                    case 2: point_block<C, 2, 0>(zb, ldz, ldj, H, cf, jn, w, b, y, s0, s1, loss, ol, oc); break;
                    case 3: point_block<C, 3, 0>(zb, ldz, ldj, H, cf, jn, w, b, y, s0, s1, loss, ol, oc); break;
                    default: point_block<C, 0, 0>(zb, ldz, ldj, H, cf, jn, w, b, y, s0, s1, loss, ol, oc);
                }
            } else {
                point_block<C, 0, 1>(zb, ldz, ldj, H, cf, jn, w, b, y, s0, s1, loss, ol, oc);
            }
        }
    }
}

extern "C" int lg_mlp1_tail(const float* Z, int64_t ldz, int64_t ldj, int64_t ldb, int H, int jn, int64_t n_samples,
                            const float* coef, const float* W2, const float* b2, const int32_t* y, int64_t per_basis,
                            int64_t n_points, int64_t group, int64_t t0, int64_t t1, int act, int loss,
                            double* out_loss, double* out_corr) {
    if (jn < 1) return -1;
    run_tiles<LG_NCLASS>(Z, ldz, ldj, ldb, H, jn, n_samples, coef, W2, b2, y, per_basis, n_points, group, t0, t1,
                      act, loss, out_loss, out_corr);
    return 0;
}
