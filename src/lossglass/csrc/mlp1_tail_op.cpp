// The typed torch operator around the fused kernel of mlp1_tail_kernel.cpp (what it computes: mlp1_tail.h).
//
// lossglass._native builds this folder with torch.utils.cpp_extension.load, once per number of classes
// (-DLG_NCLASS=C -DLG_SUPER=1024 -DLG_NS=<a namespace unique to the build>, flags -O3 -march=native
// -fno-math-errno), and loads it with torch.ops.load_library; the operator is then
// torch.ops.<LG_NS>.mlp1_tail(z, coef, w2t, b2, y, per_basis, act, loss) -> (loss sums, correct sums).
//
// It checks every argument (device, dtype, shape, layout) before touching memory, spreads the tiles over torch's
// own intra-op threads (at::parallel_for, so torch.set_num_threads governs it) and raises when the kernel returns
// a non-zero status. The bits do not depend on the thread count: each (point, super-block) has its own slot.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>

#include "mlp1_tail.h"

#ifndef LG_NCLASS
#error "build with -DLG_NCLASS=<number of classes>"
#endif
#ifndef LG_SUPER
#error "build with -DLG_SUPER=<samples per super-block>"
#endif
#ifndef LG_NS
#error "build with -DLG_NS=<operator namespace>"
#endif

static const char* status_text(int code) {
    switch (code) {
        case LG_NO_MAPS: return "no pre-activation maps (J = 0)";
        default: return "unknown status";
    }
}

// z (B, J, H, N) float32 with unit stride along N; coef (G, J), w2t (G, H, C), b2 (G, C) float32 contiguous;
// y (N,) int32 contiguous, labels in [0, C) (the caller checks them); point g uses basis g / per_basis;
// act 0 relu / 1 identity; loss 0 cross entropy / 1 mse. Returns the per-point, per-super-block sums
// (G, ceil(N / LG_SUPER)) float64 of the loss and of the correct flags.
static std::tuple<at::Tensor, at::Tensor> mlp1_tail(const at::Tensor& z, const at::Tensor& coef,
                                                    const at::Tensor& w2t, const at::Tensor& b2, const at::Tensor& y,
                                                    int64_t per_basis, int64_t act, int64_t loss) {
    const int64_t C = LG_NCLASS;
    for (const at::Tensor* t : {&z, &coef, &w2t, &b2, &y})
        TORCH_CHECK(t->defined() && t->device().is_cpu(), "mlp1_tail: every argument must be a CPU tensor");
    TORCH_CHECK(z.scalar_type() == at::kFloat && coef.scalar_type() == at::kFloat &&
                    w2t.scalar_type() == at::kFloat && b2.scalar_type() == at::kFloat,
                "mlp1_tail: z, coef, w2t and b2 must be float32");
    TORCH_CHECK(y.scalar_type() == at::kInt, "mlp1_tail: the labels y must be int32");
    TORCH_CHECK(z.dim() == 4 && z.stride(3) == 1 && z.stride(2) >= 0 && z.stride(1) >= 0 && z.stride(0) >= 0,
                "mlp1_tail: z must be (B, J, H, N) with unit stride along N");
    TORCH_CHECK(coef.dim() == 2 && coef.is_contiguous(), "mlp1_tail: coef must be a contiguous (G, J)");
    const int64_t B = z.size(0), J = z.size(1), H = z.size(2), N = z.size(3), G = coef.size(0);
    TORCH_CHECK(coef.size(1) == J, "mlp1_tail: z has ", J, " maps per basis, coef ", coef.size(1));
    TORCH_CHECK(w2t.dim() == 3 && w2t.is_contiguous() && w2t.size(0) == G && w2t.size(1) == H && w2t.size(2) == C,
                "mlp1_tail: w2t must be a contiguous (G, H, C) = (", G, ", ", H, ", ", C, ")");
    TORCH_CHECK(b2.dim() == 2 && b2.is_contiguous() && b2.size(0) == G && b2.size(1) == C,
                "mlp1_tail: b2 must be a contiguous (G, C) = (", G, ", ", C, ")");
    TORCH_CHECK(y.dim() == 1 && y.is_contiguous() && y.size(0) == N, "mlp1_tail: y must be a contiguous (", N, ",)");
    TORCH_CHECK(per_basis >= 1 && (G + per_basis - 1) / per_basis <= B, "mlp1_tail: ", G, " points at ", per_basis,
                " per basis need more than the ", B, " bases of z");
    TORCH_CHECK(act == 0 || act == 1, "mlp1_tail: act must be 0 (relu) or 1 (identity)");
    TORCH_CHECK(loss == 0 || loss == 1, "mlp1_tail: loss must be 0 (cross_entropy) or 1 (mse)");
    TORCH_CHECK(H <= INT32_MAX && J <= INT32_MAX, "mlp1_tail: too many hidden units or maps");

    const int64_t n_super = (N + LG_SUPER - 1) / LG_SUPER;
    at::Tensor out_l = at::zeros({G, n_super}, at::kDouble);
    at::Tensor out_c = at::zeros({G, n_super}, at::kDouble);
    if (G == 0 || N == 0) return {out_l, out_c};
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    // points per tile: enough tiles for every thread, few enough that a super-block of Z is reused in L2
    const int64_t group = std::max<int64_t>(1, std::min<int64_t>(G, (G * n_super + 4 * threads - 1) / (4 * threads)));
    const int64_t n_tiles = n_super * ((G + group - 1) / group);

    const float* zp = z.const_data_ptr<float>();
    const float* cp = coef.const_data_ptr<float>();
    const float* wp = w2t.const_data_ptr<float>();
    const float* bp = b2.const_data_ptr<float>();
    const int32_t* yp = y.const_data_ptr<int32_t>();
    double* lp = out_l.mutable_data_ptr<double>();
    double* op = out_c.mutable_data_ptr<double>();
    const int64_t ldz = z.stride(2), ldj = z.stride(1), ldb = z.stride(0);
    std::atomic<int> status{LG_OK};
    // torch's intra-op pool; one chunk of tiles per thread (grain 1), run inline when already inside a parallel region
    at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
        const int rc = lg_mlp1_tail(zp, ldz, ldj, ldb, (int)H, (int)J, N, cp, wp, bp, yp, per_basis, G, group, t0, t1,
                                    (int)act, (int)loss, lp, op);
        if (rc != LG_OK) status.store(rc);
    });
    const int rc = status.load();
    TORCH_CHECK(rc == LG_OK, "lossglass: the fused kernel failed with status ", rc, " (", status_text(rc), ")");
    return {out_l, out_c};
}

// LG_NS is unique to each build, so two builds never register the same namespace in one process.
#define LG_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
LG_LIBRARY(LG_NS, m) {
    m.def("mlp1_tail(Tensor z, Tensor coef, Tensor w2t, Tensor b2, Tensor y, int per_basis, int act, int loss)"
          " -> (Tensor, Tensor)",
          &mlp1_tail);
    m.def("n_classes() -> int", []() -> int64_t { return LG_NCLASS; });
    m.def("super_block() -> int", []() -> int64_t { return LG_SUPER; });
}
