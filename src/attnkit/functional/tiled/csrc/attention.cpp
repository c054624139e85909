// attnkit's native tiled attention forward: one parallel loop over (batch, head, query block)
// work items, block GEMMs, online softmax, masks evaluated arithmetically on edge blocks only.
//
// The mask is what attnkit.functional.tiled.plan.native_params describes, per batch element b:
//   allowed(b, i, j) = dlo[b] <= j - i <= dhi[b]  and  j < klen[b]  and  (no ids or qids[b, i] == kids[b, j])
// and the bias is ALiBi: -slopes[h] * |i + aoff[b] - j| (none when slopes is empty).
// Returns out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) in the compute dtype (float for bfloat16 and
// half inputs, whose block GEMMs run on oneDNN's low-precision micro-kernels); a row with no allowed key
// has out 0, lse -inf.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int W = 32 / sizeof(T);
  static inline type load(const T* p) { type v; std::memcpy(&v, p, sizeof(v)); return v; }
  static inline void store(T* p, type v) { std::memcpy(p, &v, sizeof(v)); }
  static inline type splat(T x) { type v = {}; return v + x; }
};

// exp(x) for 8 floats: Cephes' degree-5 polynomial on x - n ln2, times 2^n; 0 below -87 (and for -inf).
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
inline v8f vexp(v8f x) {
  const v8f lo = Vec<float>::splat(-87.0f), hi = Vec<float>::splat(88.0f);
  v8f xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const v8f t = xc * 1.44269504088896341f + 0.5f;
  v8i ni = __builtin_convertvector(t, v8i);  // truncation; then floor
  ni += (v8i)(__builtin_convertvector(ni, v8f) > t);
  const v8f n = __builtin_convertvector(ni, v8f);
  const v8f r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  v8f p = Vec<float>::splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  v8f y = p * r * r + r + 1.0f;
  v8f scale;
  const v8i bits = (ni + 127) << 23;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  return x < lo ? Vec<float>::splat(0.0f) : y;
}

// row[c] = exp(row[c] - mx) for c < n; returns their sum.
template <typename T>
T exp_row(T* row, int64_t n, T mx) {
  T sum = 0;
  int64_t c = 0;
  if constexpr (std::is_same<T, float>::value) {
    v8f acc = {};
    for (; c + 8 <= n; c += 8) {
      v8f e = vexp(Vec<float>::load(row + c) - mx);
      Vec<float>::store(row + c, e);
      acc += e;
    }
    for (int x = 0; x < 8; ++x) sum += acc[x];
  }
  for (; c < n; ++c) {
    row[c] = std::exp(row[c] - mx);
    sum += row[c];
  }
  return sum;
}

// S[r, c] = sum_d q[r, d] * kt[d, c] for r < nr, c < ncp (ncp a multiple of 2W; kt has row stride ldk).
template <typename T>
void qk_block(const T* q, int64_t D, const T* kt, int64_t ldk, T* s, int64_t lds, int64_t nr, int64_t ncp) {
  using V = Vec<T>;
  constexpr int W = V::W;
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) {
    for (int64_t c = 0; c < ncp; c += 2 * W) {
      typename V::type a[4][2] = {};
      for (int64_t d = 0; d < D; ++d) {
        auto k0 = V::load(kt + d * ldk + c), k1 = V::load(kt + d * ldk + c + W);
        for (int x = 0; x < 4; ++x) {
          auto qq = V::splat(q[(r + x) * D + d]);
          a[x][0] += qq * k0;
          a[x][1] += qq * k1;
        }
      }
      for (int x = 0; x < 4; ++x) {
        V::store(s + (r + x) * lds + c, a[x][0]);
        V::store(s + (r + x) * lds + c + W, a[x][1]);
      }
    }
  }
  for (; r < nr; ++r) {
    for (int64_t c = 0; c < ncp; c += 2 * W) {
      typename V::type a0 = {}, a1 = {};
      for (int64_t d = 0; d < D; ++d) {
        auto qq = V::splat(q[r * D + d]);
        a0 += qq * V::load(kt + d * ldk + c);
        a1 += qq * V::load(kt + d * ldk + c + W);
      }
      V::store(s + r * lds + c, a0);
      V::store(s + r * lds + c + W, a1);
    }
  }
}

// acc[r, :] += sum_c p[r, c] * v[c, :] for r < nr, c < nc.
template <typename T>
void pv_block(const T* p, int64_t ldp, const T* v, int64_t Dv, T* acc, int64_t nr, int64_t nc) {
  using V = Vec<T>;
  constexpr int W = V::W;
  const int64_t vec_cols = Dv / (2 * W) * (2 * W);
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) {
    for (int64_t e = 0; e < vec_cols; e += 2 * W) {
      typename V::type a[4][2];
      for (int x = 0; x < 4; ++x) {
        a[x][0] = V::load(acc + (r + x) * Dv + e);
        a[x][1] = V::load(acc + (r + x) * Dv + e + W);
      }
      for (int64_t c = 0; c < nc; ++c) {
        auto v0 = V::load(v + c * Dv + e), v1 = V::load(v + c * Dv + e + W);
        for (int x = 0; x < 4; ++x) {
          auto pp = V::splat(p[(r + x) * ldp + c]);
          a[x][0] += pp * v0;
          a[x][1] += pp * v1;
        }
      }
      for (int x = 0; x < 4; ++x) {
        V::store(acc + (r + x) * Dv + e, a[x][0]);
        V::store(acc + (r + x) * Dv + e + W, a[x][1]);
      }
    }
  }
  for (; r < nr; ++r) {
    for (int64_t e = 0; e < vec_cols; e += 2 * W) {
      auto a0 = V::load(acc + r * Dv + e), a1 = V::load(acc + r * Dv + e + W);
      for (int64_t c = 0; c < nc; ++c) {
        auto pp = V::splat(p[r * ldp + c]);
        a0 += pp * V::load(v + c * Dv + e);
        a1 += pp * V::load(v + c * Dv + e + W);
      }
      V::store(acc + r * Dv + e, a0);
      V::store(acc + r * Dv + e + W, a1);
    }
  }
  for (r = 0; r < nr; ++r)  // columns left over when Dv is not a multiple of 2W
    for (int64_t e = vec_cols; e < Dv; ++e) {
      T a = acc[r * Dv + e];
      for (int64_t c = 0; c < nc; ++c) a += p[r * ldp + c] * v[c * Dv + e];
      acc[r * Dv + e] = a;
    }
}

// Largest element of row[0, n).
template <typename T>
T max_row(const T* row, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
  int64_t c = 0;
  if constexpr (std::is_same<T, float>::value) {
    v8f a = Vec<float>::splat(mx);
    for (; c + 8 <= n; c += 8) {
      const v8f x = Vec<float>::load(row + c);
      a = a > x ? a : x;
    }
    for (int x = 0; x < 8; ++x) mx = std::max(mx, a[x]);
  }
  for (; c < n; ++c) mx = std::max(mx, row[c]);
  return mx;
}

// The two block GEMMs. float: oneDNN's JIT micro-kernels through ATen's brgemm (ATen falls
// back to its own GEMM on CPUs oneDNN has none for); double: the hand-written loops above;
// bfloat16 / half (the low-precision path, see forward_impl): oneDNN's micro-kernels with fp32
// accumulation (AMX or AVX512-BF16 / -FP16 instructions), their right operand in VNNI layout:
// element (k, n) at ((k / 2) * ldb + n) * 2 + k % 2, K even.
// scores: s[r, c] = sum_d q[r, d] * kt[d, c], r < nr, c < nc (s has row stride lds, kt ldk).
inline void scores(const float* q, int64_t D, const float* kt, int64_t ldk, float* s, int64_t lds, int64_t nr,
                   int64_t nc) {
  at::native::cpublas::brgemm(nr, nc, D, D, ldk, lds, false, q, kt, s, false);
}
inline void scores(const double* q, int64_t D, const double* kt, int64_t ldk, double* s, int64_t lds, int64_t nr,
                   int64_t nc) {
  constexpr int64_t w = 2 * Vec<double>::W;
  qk_block<double>(q, D, kt, ldk, s, lds, nr, (nc + w - 1) / w * w);
}
template <typename In>
inline void scores(const In* q, int64_t D, const In* kt, int64_t ldk, float* s, int64_t lds, int64_t nr,
                   int64_t nc) {
  at::native::cpublas::brgemm(nr, nc, D, D, ldk, lds, false, q, kt, s, true);
}
// accumulate: acc[r, :] += sum_c p[r, c] * v[c, :], r < nr, c < nc (p has row stride ldp).
inline void accumulate(const float* p, int64_t ldp, const float* v, int64_t Dv, float* acc, int64_t nr, int64_t nc) {
  at::native::cpublas::brgemm(nr, Dv, nc, ldp, Dv, Dv, true, p, v, acc, false);
}
inline void accumulate(const double* p, int64_t ldp, const double* v, int64_t Dv, double* acc, int64_t nr,
                       int64_t nc) {
  pv_block<double>(p, ldp, v, Dv, acc, nr, nc);
}
template <typename In>
inline void accumulate(const In* p, int64_t ldp, const In* v, int64_t Dv, float* acc, int64_t nr, int64_t nc) {
  at::native::cpublas::brgemm(nr, Dv, nc, ldp, Dv, Dv, true, p, v, acc, true);
}

// (rows, cols) row-major, row stride ld, into VNNI pairs of rows: out[((r / 2) * cols + c) * 2 + r % 2];
// out holds rows rounded up to even, and the padding row stays as the caller zeroed it.
template <typename In>
void pack_vnni(const In* in, int64_t ld, int64_t rows, int64_t cols, In* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[((r / 2) * cols + c) * 2 + r % 2] = in[r * ld + c];
}

// The operands every work item reads, laid out once per call. Full precision (In == T): K transposed,
// (B, Hkv, D, Lk + pad), q scaled as it is copied, v as given. Low precision: K^T in VNNI layout
// (B, Hkv, De / 2, Lk + pad, 2) with De = D rounded up to even, v in VNNI layout (B, Hkv, Lke / 2, Dv, 2)
// with Lke = Lk rounded up to even; the padding is zero.
template <typename T, typename In>
struct Operands {
  static constexpr bool low = !std::is_same<T, In>::value;
  int64_t De, ldk;
  at::Tensor kt, vv;
  Operands(const at::Tensor& k, const at::Tensor& v, int64_t bkp) {
    const int64_t B = k.size(0), Hkv = k.size(1), Lk = k.size(2), D = k.size(3), Dv = v.size(3);
    De = low ? D + D % 2 : D;
    ldk = Lk + bkp;  // rows padded so a padded key block never reads past the end
    if constexpr (!low) {
      kt = at::zeros({B, Hkv, D, ldk}, k.options());
      if (Lk > 0) kt.narrow(3, 0, Lk).copy_(k.transpose(2, 3));
      vv = v;
    } else {
      const int64_t Lke = Lk + Lk % 2;
      kt = at::zeros({B, Hkv, De / 2, ldk, 2}, k.options());
      vv = at::zeros({B, Hkv, Lke / 2, Dv, 2}, v.options());
      const In *kp = k.data_ptr<In>(), *vp = v.data_ptr<In>();
      In *ktp = kt.data_ptr<In>(), *vvp = vv.data_ptr<In>();
      at::parallel_for(0, B * Hkv, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t bh = b0; bh < b1; ++bh) {
          In* ktb = ktp + bh * De * ldk;
          const In* kb = kp + bh * Lk * D;
          for (int64_t j = 0; j < Lk; ++j)  // kt[d, j] = k[j, d]
            for (int64_t d = 0; d < D; ++d) ktb[((d / 2) * ldk + j) * 2 + d % 2] = kb[j * D + d];
          pack_vnni<In>(vp + bh * Lk * Dv, Dv, Lk, Dv, vvp + bh * Lke * Dv);
        }
      });
    }
  }
  // Key block j0 of head (b, kh)'s K^T and v, as the block GEMMs read them.
  const In* kt_block(int64_t bkh, int64_t j0) const {
    return kt.data_ptr<In>() + bkh * De * ldk + (low ? 2 * j0 : j0);
  }
  const In* v_block(int64_t bkh, int64_t Lk, int64_t Dv, int64_t j0) const {
    return vv.data_ptr<In>() + bkh * (low ? Lk + Lk % 2 : Lk) * Dv + j0 * Dv;
  }
};

// T: the compute type (the softmax statistics, the accumulator, lse); In: q, k, v and out's type. In == T
// (float, double) computes in T throughout; In = bfloat16 / half (the low-precision path) runs the block
// GEMMs on In operands with fp32 accumulation: the scores come out in fp32 and are scaled there, and the
// probabilities are rounded to In for the second GEMM, as PyTorch's own flash kernel does.
template <typename T, typename In>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                  const at::Tensor& dlo, const at::Tensor& dhi, const at::Tensor& klen, const at::Tensor& qids,
                  const at::Tensor& kids, const at::Tensor& slopes, const at::Tensor& aoff, int64_t BQ, int64_t BK,
                  at::Tensor& out, at::Tensor& lse) {
  using V = Vec<T>;
  constexpr bool low = Operands<T, In>::low;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3), G = H / Hkv;
  const int64_t nq = (Lq + BQ - 1) / BQ;
  const int64_t bkp = (BK + 2 * V::W - 1) / (2 * V::W) * (2 * V::W);  // padded key block
  const Operands<T, In> ops(k, v, bkp);
  const int64_t De = ops.De, ldk = ops.ldk;
  const In* qp = q.data_ptr<In>();
  In* op = out.data_ptr<In>();
  T* lp = lse.data_ptr<T>();
  const int64_t *dlop = dlo.data_ptr<int64_t>(), *dhip = dhi.data_ptr<int64_t>(), *klp = klen.data_ptr<int64_t>();
  const int64_t *aop = aoff.data_ptr<int64_t>();
  const bool docs = qids.numel() > 0, alibi = slopes.numel() > 0;
  const int64_t *qip = docs ? qids.data_ptr<int64_t>() : nullptr, *kip = docs ? kids.data_ptr<int64_t>() : nullptr;
  const int64_t qis = docs && qids.size(0) > 1 ? Lq : 0, kis = docs && kids.size(0) > 1 ? Lk : 0;
  const T* slp = alibi ? slopes.data_ptr<T>() : nullptr;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t total = B * H * nq;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  // One task per thread; each takes work items from a shared counter (dynamic scheduling: a
  // descheduled thread takes fewer items), last query blocks first (they have the most keys under causal).
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<T> s(BQ * bkp), acc(BQ * Dv), m(BQ), l(BQ);
    std::vector<In> qs(BQ * De, In(0)), ps(low ? BQ * bkp : 0, In(0));  // ps: the probabilities, rounded to In
    for (int64_t w = next++; w < total; w = next++) {
      const int64_t qb = nq - 1 - w / (B * H), bh = w % (B * H), b = bh / H, h = bh % H, kh = h / G;
      const int64_t i0 = qb * BQ, i1 = std::min(i0 + BQ, Lq), nr = i1 - i0;
      const In* qblk = qp + (bh * Lq + i0) * D;
      for (int64_t r = 0; r < nr; ++r)  // full precision: the scores come out scaled
        for (int64_t d = 0; d < D; ++d) qs[r * De + d] = low ? qblk[r * D + d] : In(qblk[r * D + d] * T(scale));
      const int64_t bkh = b * Hkv + kh;
      const int64_t lo = dlop[b], hi = dhip[b];
      const int64_t jlo = std::max<int64_t>(0, i0 + lo) / BK * BK;  // key blocks aligned to BK
      const int64_t jhi = std::min<int64_t>({Lk, klp[b], i1 - 1 + hi + 1});
      std::fill(acc.begin(), acc.begin() + nr * Dv, T(0));
      std::fill(m.begin(), m.begin() + nr, ninf);
      std::fill(l.begin(), l.begin() + nr, T(0));
      int64_t qmin = 0, qmax = 0;
      if (docs) {
        const int64_t* ids = qip + b * qis + i0;
        qmin = *std::min_element(ids, ids + nr);
        qmax = *std::max_element(ids, ids + nr);
      }
      const T slope = alibi ? slp[h] : T(0);
      const int64_t off = aop[b];
      for (int64_t j0 = jlo; j0 < jhi; j0 += BK) {
        const int64_t j1 = std::min(j0 + BK, jhi), nc = j1 - j0;
        bool full = j0 - (i1 - 1) >= lo && (j1 - 1) - i0 <= hi;
        if (docs) {
          const int64_t* ids = kip + b * kis + j0;
          const int64_t kmin = *std::min_element(ids, ids + nc), kmax = *std::max_element(ids, ids + nc);
          if (kmax < qmin || kmin > qmax) continue;  // no document in common: an empty block
          full = full && qmin == qmax && kmin == kmax && qmin == kmin;
        }
        scores(qs.data(), De, ops.kt_block(bkh, j0), ldk, s.data(), bkp, nr, nc);
        for (int64_t r = 0; r < nr; ++r) {
          T* row = s.data() + r * bkp;
          const int64_t i = i0 + r;
          if (low)
            for (int64_t c = 0; c < nc; ++c) row[c] *= T(scale);
          if (alibi)
            for (int64_t c = 0; c < nc; ++c) row[c] -= slope * T(std::abs(i + off - (j0 + c)));
          if (!full) {  // keys j0 + c with lo <= j - i <= hi: the columns [cl, ch)
            const int64_t cl = std::clamp<int64_t>(i + lo - j0, 0, nc), ch = std::clamp<int64_t>(i + hi - j0 + 1, cl, nc);
            std::fill(row, row + cl, ninf);
            std::fill(row + ch, row + nc, ninf);
            if (docs) {
              const int64_t qid = qip[b * qis + i];
              const int64_t* kid = kip + b * kis + j0;
              for (int64_t c = cl; c < ch; ++c) row[c] = kid[c] == qid ? row[c] : ninf;
            }
          }
          const T mnew = std::max(m[r], max_row<T>(row, nc));
          if (mnew == ninf) {  // nothing allowed so far in this row: the block adds nothing
            std::fill(row, row + nc, T(0));
          } else {
            const T alpha = std::exp(m[r] - mnew);
            const T sum = exp_row<T>(row, nc, mnew);
            l[r] = l[r] * alpha + sum;
            m[r] = mnew;
            if (alpha != T(1))
              for (int64_t e = 0; e < Dv; ++e) acc[r * Dv + e] *= alpha;
          }
          if constexpr (low)  // column nc (an odd block's pair partner) stays 0 from the last fill
            for (int64_t c = 0; c < nc + nc % 2; ++c) ps[r * bkp + c] = c < nc ? In(row[c]) : In(0);
        }
        if constexpr (low)
          accumulate(ps.data(), bkp, ops.v_block(bkh, Lk, Dv, j0), Dv, acc.data(), nr, nc + nc % 2);
        else
          accumulate(s.data(), bkp, ops.v_block(bkh, Lk, Dv, j0), Dv, acc.data(), nr, nc);
      }
      In* oblk = op + (bh * Lq + i0) * Dv;
      T* lblk = lp + bh * Lq + i0;
      for (int64_t r = 0; r < nr; ++r) {
        const bool any = l[r] > T(0);
        const T inv = any ? T(1) / l[r] : T(0);
        for (int64_t e = 0; e < Dv; ++e) oblk[r * Dv + e] = In(acc[r * Dv + e] * inv);
        lblk[r] = any ? m[r] + std::log(l[r]) : ninf;
      }
    }
    if constexpr (!std::is_same<T, double>::value) at::native::cpublas::brgemm_release(low);
  });
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                const at::Tensor& dlo, const at::Tensor& dhi, const at::Tensor& klen,
                                const at::Tensor& qids, const at::Tensor& kids, const at::Tensor& slopes,
                                const at::Tensor& aoff, int64_t block_q, int64_t block_k) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(block_q > 0 && block_k > 0, "block sizes must be positive");
  const bool low = q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf;
  TORCH_CHECK(!low || block_k % 2 == 0, "bfloat16/half need an even key block (VNNI pairs of keys)");
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(low ? at::kFloat : q.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attnkit_native_forward", [&] {
    using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    forward_impl<T, scalar_t>(q, k, v, scale, dlo, dhi, klen, qids, kids, slopes, aoff, block_q, block_k,
                              out, lse);
  });
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "attnkit native tiled attention forward: (out, lse)");
}
