"""Fused CPU kernels, compiled on first use with the machine's C++ compiler and cached on disk.

What is fused: the part of a single-hidden-layer MLP's evaluation that comes after the first layer's
pre-activations. Given, per point (a replica, or a grid point of a plane or path), the pre-activations
z = sum_j c_j Z_j (Z_j of shape (H, N), j < J), the kernel computes in one pass over the samples

    a = act(z),  o = W2 a + b2  (C logits),  loss = CE(o, y) or MSE,  correct = [argmax o == y]

and returns per point the sums of the loss (float64) and of the correct flags. Nothing of size
points x samples x hidden is written to memory: sample blocks of 16 (one AVX-512 vector) stay in registers
and the Z_j of a super-block of samples stay in L2 while every point of a tile reuses them. This is
what makes a 21 x 21 plane cost a few tens of milliseconds (DESIGN.md, Performance notes).

Numbers: float32 arithmetic as in the torch path; exp and log are Cephes-style polynomials (<= 2 ulp), so
per-sample losses agree with torch's to float32 roundoff (~1e-7 relative) and the means to ~1e-7.
Bits: each (point, super-block) is computed by one thread in a fixed order and the super-blocks are summed
in order, so the result does not depend on the thread count or on how the work is split.

Build: ``$CXX`` (else g++, c++ or clang++) with ``-O3 -march=native``; the library is cached under
``$LOSSGLASS_CACHE`` (else ``$XDG_CACHE_HOME/lossglass``, else ``~/.cache/lossglass``) keyed by the source,
the compiler, the flags and the CPU model, written atomically (concurrent processes are safe). When no
compiler works, or ``LOSSGLASS_NATIVE=0``, :func:`available` is False and callers use the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

#: Samples per super-block: the unit of work (with a group of points) and of the fixed summation order.
SUPER = 1024
#: Largest number of classes the kernel is built for (logits are held in registers).
MAX_CLASSES = 32
ACTS = {"relu": 0, "identity": 1}
LOSSES = {"cross_entropy": 0, "mse": 1}

_SOURCE = r"""
#include <cstdint>
#include <cmath>
#include <cstring>

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

// One point over samples [s0, s1) (s1 - s0 <= SUPER): loss and correct sums. W2 is the point's (H, C) = W^T.
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
    const int64_t n_super = (n_samples + SUPER - 1) / SUPER;
    const int64_t n_groups = (n_points + group - 1) / group;
    for (int64_t t = t0; t < t1; ++t) {
        int64_t sb = t / n_groups, gr = t % n_groups;
        int64_t s0 = sb * SUPER, s1 = s0 + SUPER < n_samples ? s0 + SUPER : n_samples;
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
    run_tiles<NCLASS>(Z, ldz, ldj, ldb, H, jn, n_samples, coef, W2, b2, y, per_basis, n_points, group, t0, t1,
                      act, loss, out_loss, out_corr);
    return 0;
}
"""

_lock = threading.Lock()
_libs: dict[int, object] = {}
_failed: dict[int, str] = {}
_pool: ThreadPoolExecutor | None = None


def _cache_dir() -> Path:
    base = os.environ.get("LOSSGLASS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lossglass")
    return Path(base) / "native"


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _cpu() -> str:
    from ._determinism import _cpu_model

    return f"{_cpu_model()}|{torch.backends.cpu.get_cpu_capability()}"


FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno"]


def enabled() -> bool:
    return os.environ.get("LOSSGLASS_NATIVE", "1").strip() not in ("0", "false", "no", "off")


def _build(n_classes: int):
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    src = _SOURCE.replace("NCLASS", str(n_classes)).replace("SUPER", str(SUPER))
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        version = cxx
    key = hashlib.sha256("\0".join([src, version, " ".join(FLAGS), _cpu()]).encode()).hexdigest()[:20]
    folder = _cache_dir()
    lib = folder / f"mlp1_c{n_classes}_{key}.so"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cpp = Path(tmp) / "k.cpp"
            cpp.write_text(src)
            out = Path(tmp) / "k.so"
            res = subprocess.run([cxx, *FLAGS, str(cpp), "-o", str(out)], capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"compiling the fused kernel failed: {res.stderr[-2000:]}")
            os.replace(out, lib)  # atomic: a concurrent process sees the whole file or none
    dll = ctypes.CDLL(str(lib))
    f = dll.lg_mlp1_tail
    i64, p = ctypes.c_int64, ctypes.c_void_p
    f.argtypes = [p, i64, i64, i64, ctypes.c_int, ctypes.c_int, i64, p, p, p, p, i64, i64, i64, i64, i64,
                  ctypes.c_int, ctypes.c_int, p, p]
    f.restype = ctypes.c_int
    return f


def kernel(n_classes: int):
    """The compiled tail kernel for ``n_classes`` logits, or None (no compiler, disabled, or too many classes)."""
    if not enabled() or not (2 <= n_classes <= MAX_CLASSES):
        return None
    with _lock:
        if n_classes in _libs:
            return _libs[n_classes]
        if n_classes in _failed:
            return None
        try:
            _libs[n_classes] = _build(n_classes)
        except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
            _failed[n_classes] = f"{type(e).__name__}: {e}"
            return None
        return _libs[n_classes]


def status() -> dict:
    """What the native path did in this process: built kernels and failures (for diagnostics)."""
    return {"enabled": enabled(), "compiler": _compiler(), "built": sorted(_libs), "failed": dict(_failed),
            "cache": str(_cache_dir())}


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < n:  # noqa: SLF001
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lossglass-native")
    return _pool


def mlp1_tail(z: torch.Tensor, coef: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, y: torch.Tensor,
              per_basis: int, act: str, loss: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-point sums over the samples of the loss and of the correct flags, ``(G,)`` float64 each, or None when
    the kernel is not available (the caller then uses the torch path).

    ``z``: ``(B, J, H, N)`` float32 CPU with unit stride along N (B bases of J pre-activation maps); point g uses
    basis ``g // per_basis`` with coefficients ``coef[g]`` ``(G, J)``; ``w2`` ``(G, C, H)``, ``b2`` ``(G, C)`` the
    point's last layer; ``y`` ``(N,)`` int64 labels."""
    g_total, c, h = w2.shape
    if z.device.type != "cpu" or z.dtype != torch.float32 or act not in ACTS or loss not in LOSSES:
        return None
    f = kernel(c)
    if f is None:
        return None
    b, j, hz, n = z.shape
    if hz != h or z.stride(3) != 1 or n == 0:
        return None
    coef = coef.to(torch.float32).contiguous()
    w2 = w2.to(torch.float32).transpose(1, 2).contiguous()  # (G, H, C): the C weights of a hidden unit together
    b2 = b2.to(torch.float32).contiguous()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        return None  # let torch raise its own error for bad labels
    y = y.to(torch.int32).contiguous()
    n_super = (n + SUPER - 1) // SUPER
    out_l = torch.zeros(g_total, n_super, dtype=torch.float64)
    out_c = torch.zeros(g_total, n_super, dtype=torch.float64)
    threads = max(1, torch.get_num_threads())
    # points per tile: enough tiles for every thread, few enough that a super-block of Z is reused in L2
    group = max(1, min(g_total, (g_total * n_super + 4 * threads - 1) // (4 * threads)))
    n_groups = (g_total + group - 1) // group
    n_tiles = n_super * n_groups
    args = (z.data_ptr(), z.stride(2), z.stride(1), z.stride(0), h, j, n, coef.data_ptr(), w2.data_ptr(),
            b2.data_ptr(), y.data_ptr(), int(per_basis), g_total, group)
    tail = (ACTS[act], LOSSES[loss], out_l.data_ptr(), out_c.data_ptr())
    if threads == 1 or n_tiles == 1:
        f(*args, 0, n_tiles, *tail)
    else:
        bounds = [n_tiles * i // threads for i in range(threads + 1)]
        pool = _executor(threads - 1)
        futs = [pool.submit(f, *args, bounds[i], bounds[i + 1], *tail) for i in range(1, threads)]
        f(*args, bounds[0], bounds[1], *tail)
        for fu in futs:
            fu.result()
    return out_l.sum(1), out_c.sum(1)
