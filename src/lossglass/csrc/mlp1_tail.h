// The fused tail of a single-hidden-layer MLP on the CPU, for C = LG_NCLASS logits.
//
// Per point g (a replica, or a grid point of a plane or path) with pre-activations z = sum_j c_j Z_j
// (Z_j of shape (H, N), j < J, point g using basis g / per_basis) the kernel computes in one pass over the samples
//
//     a = act(z)  (relu: max(z, 0), NaN kept; or identity),   o = W2 a + b2   (C logits),
//     loss = logsumexp(o) - o_y   (cross entropy)   or   |o - onehot(y)|^2 / 2   (mse),
//     correct = [argmax o == y]   (a NaN logit wins the argmax, as in torch)
//
// and writes, per point and per super-block of LG_SUPER samples, the sums of the loss (float64) and of the correct
// flags into out_loss / out_corr (n_points, ceil(n_samples / LG_SUPER)). Sample blocks of 16 (one AVX-512 vector)
// stay in registers; the Z_j of a super-block stay in L2 while the `group` points of a tile reuse them.
// exp and log are Cephes-style polynomials (<= 2 ulp), so per-sample losses agree with torch's to float32 roundoff.
//
// Work: tiles [t0, t1) of n_super * ceil(n_points / group) (super-block major). Each (point, super-block) is
// computed by one call in a fixed order and written to its own slot, so the bits do not depend on how the tiles are
// split between threads.
//
// Returns 0, or -1 when jn < 1 (no pre-activation maps).

#pragma once
#include <cstdint>

extern "C" __attribute__((visibility("hidden"))) int lg_mlp1_tail(
    const float* Z, int64_t ldz, int64_t ldj, int64_t ldb, int H, int jn, int64_t n_samples, const float* coef,
    const float* W2, const float* b2, const int32_t* y, int64_t per_basis, int64_t n_points, int64_t group,
    int64_t t0, int64_t t1, int act, int loss, double* out_loss, double* out_corr);

#define LG_OK 0
#define LG_NO_MAPS (-1)
