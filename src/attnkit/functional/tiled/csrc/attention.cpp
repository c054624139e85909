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
#include <array>
#include <atomic>
#include <mutex>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <utility>
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

// Releases the calling thread's oneDNN micro-kernel state (AMX tiles) when its part of a parallel loop ends, thrown
// out of or not (`on`: whether it ran any; float64 runs none).
struct BrgemmRelease {
  bool on, low;
  BrgemmRelease(bool on_, bool low_) : on(on_), low(low_) {}
  ~BrgemmRelease() {
    if (on) at::native::cpublas::brgemm_release(low);
  }
};

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

// The mask and bias of native_params, per batch element b: keys j with lo[b] <= j - i <= hi[b] and j < klen[b],
// documents (qids, kids; a batch of one broadcasts) and ALiBi slopes per head (none when empty).
template <typename T>
struct Band {
  const int64_t *lo, *hi, *klen, *aoff, *qids = nullptr, *kids = nullptr;
  int64_t qis = 0, kis = 0;
  const T* slopes = nullptr;
  bool docs, alibi;
  Band(const at::Tensor& dlo, const at::Tensor& dhi, const at::Tensor& klen_, const at::Tensor& qids_,
       const at::Tensor& kids_, const at::Tensor& slopes_, const at::Tensor& aoff_, int64_t B, int64_t H, int64_t Lq,
       int64_t Lk)
      : lo(dlo.data_ptr<int64_t>()), hi(dhi.data_ptr<int64_t>()), klen(klen_.data_ptr<int64_t>()),
        aoff(aoff_.data_ptr<int64_t>()), docs(qids_.numel() > 0), alibi(slopes_.numel() > 0) {
    for (const at::Tensor* t : {&dlo, &dhi, &klen_, &aoff_})
      TORCH_CHECK(t->is_cpu() && t->is_contiguous() && t->numel() == B, "dlo, dhi, klen, aoff: contiguous CPU (B,)");
    TORCH_CHECK(!alibi || (slopes_.is_cpu() && slopes_.is_contiguous() && slopes_.numel() == H),
                "slopes: contiguous CPU (H,) or empty");
    TORCH_CHECK(!docs || (qids_.is_cpu() && kids_.is_cpu() && qids_.is_contiguous() && kids_.is_contiguous() &&
                          qids_.dim() == 2 && kids_.dim() == 2 && (qids_.size(0) == 1 || qids_.size(0) == B) &&
                          (kids_.size(0) == 1 || kids_.size(0) == B) && qids_.size(1) == Lq && kids_.size(1) == Lk),
                "document ids: contiguous CPU (1|B, Lq) and (1|B, Lk), or both empty");
    if (docs) {
      qids = qids_.data_ptr<int64_t>();
      kids = kids_.data_ptr<int64_t>();
      qis = qids_.size(0) > 1 ? Lq : 0;
      kis = kids_.size(0) > 1 ? Lk : 0;
    }
    if (alibi) slopes = slopes_.data_ptr<T>();
  }
  const int64_t* qid(int64_t b, int64_t i) const { return qids + b * qis + i; }
  const int64_t* kid(int64_t b, int64_t j) const { return kids + b * kis + j; }
};

// The smallest and largest of ids[0, n).
inline std::pair<int64_t, int64_t> id_range(const int64_t* ids, int64_t n) {
  const auto mm = std::minmax_element(ids, ids + n);
  return {*mm.first, *mm.second};
}

// One row of a score block, along t < n: ALiBi's -slope * |d0 + step * t| (the distance i + aoff - j), then -inf
// outside the allowed run [tl, th) (clamped to the row) and, with documents, where other_ids[t] != own_id.
template <typename T>
void bias_and_mask_row(T* row, int64_t n, bool alibi, T slope, int64_t d0, int64_t step, bool full, int64_t tl,
                       int64_t th, const int64_t* other_ids, int64_t own_id) {
  if (alibi)
    for (int64_t t = 0; t < n; ++t) row[t] -= slope * T(std::abs(d0 + step * t));
  if (full) return;
  const T ninf = -std::numeric_limits<T>::infinity();
  tl = std::clamp<int64_t>(tl, 0, n);
  th = std::clamp<int64_t>(th, tl, n);
  std::fill(row, row + tl, ninf);
  std::fill(row + th, row + n, ninf);
  if (other_ids)
    for (int64_t t = tl; t < th; ++t) row[t] = other_ids[t] == own_id ? row[t] : ninf;
}

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
  const Band<T> band(dlo, dhi, klen, qids, kids, slopes, aoff, B, H, Lq, Lk);
  const bool docs = band.docs, alibi = band.alibi;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t total = B * H * nq;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  // One task per thread; each takes work items from a shared counter (dynamic scheduling: a
  // descheduled thread takes fewer items), last query blocks first (they have the most keys under causal).
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const BrgemmRelease release(!std::is_same<T, double>::value, low);
    std::vector<T> s(BQ * bkp), acc(BQ * Dv), m(BQ), l(BQ);
    std::vector<In> qs(BQ * De, In(0)), ps(low ? BQ * bkp : 0, In(0));  // ps: the probabilities, rounded to In
    for (int64_t w = next++; w < total; w = next++) {
      const int64_t qb = nq - 1 - w / (B * H), bh = w % (B * H), b = bh / H, h = bh % H, kh = h / G;
      const int64_t i0 = qb * BQ, i1 = std::min(i0 + BQ, Lq), nr = i1 - i0;
      const In* qblk = qp + (bh * Lq + i0) * D;
      for (int64_t r = 0; r < nr; ++r)  // full precision: the scores come out scaled
        for (int64_t d = 0; d < D; ++d) qs[r * De + d] = low ? qblk[r * D + d] : In(qblk[r * D + d] * T(scale));
      const int64_t bkh = b * Hkv + kh;
      const int64_t lo = band.lo[b], hi = band.hi[b];
      const int64_t jlo = std::max<int64_t>(0, i0 + lo) / BK * BK;  // key blocks aligned to BK
      const int64_t jhi = std::min<int64_t>({Lk, band.klen[b], i1 - 1 + hi + 1});
      std::fill(acc.begin(), acc.begin() + nr * Dv, T(0));
      std::fill(m.begin(), m.begin() + nr, ninf);
      std::fill(l.begin(), l.begin() + nr, T(0));
      const auto [qmin, qmax] = docs ? id_range(band.qid(b, i0), nr) : std::pair<int64_t, int64_t>{0, 0};
      const T slope = alibi ? band.slopes[h] : T(0);
      const int64_t off = band.aoff[b];
      for (int64_t j0 = jlo; j0 < jhi; j0 += BK) {
        const int64_t j1 = std::min(j0 + BK, jhi), nc = j1 - j0;
        bool full = j0 - (i1 - 1) >= lo && (j1 - 1) - i0 <= hi;
        if (docs) {
          const auto [kmin, kmax] = id_range(band.kid(b, j0), nc);
          if (kmax < qmin || kmin > qmax) continue;  // no document in common: an empty block
          full = full && qmin == qmax && kmin == kmax && qmin == kmin;
        }
        scores(qs.data(), De, ops.kt_block(bkh, j0), ldk, s.data(), bkp, nr, nc);
        for (int64_t r = 0; r < nr; ++r) {
          T* row = s.data() + r * bkp;
          const int64_t i = i0 + r;
          if (low)
            for (int64_t c = 0; c < nc; ++c) row[c] *= T(scale);
          // keys j0 + c with lo <= j - i <= hi: the columns [i + lo - j0, i + hi - j0 + 1)
          bias_and_mask_row<T>(row, nc, alibi, slope, i + off - j0, -1, full, i + lo - j0, i + hi - j0 + 1,
                               docs ? band.kid(b, j0) : nullptr, docs ? *band.qid(b, i) : 0);
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
          if constexpr (low)
            for (int64_t c = 0; c < nc; ++c) ps[r * bkp + c] = In(row[c]);
        }
        if constexpr (low) {
          // Key pairs through the micro-kernel; an odd block's last key by hand, so that its pair partner (a key
          // past the block: past the window, or padding past klen, whose v may hold anything) is never read.
          const int64_t ne = nc - nc % 2;
          if (ne > 0) accumulate(ps.data(), bkp, ops.v_block(bkh, Lk, Dv, j0), Dv, acc.data(), nr, ne);
          if (nc % 2) {
            const In* vl = ops.v_block(bkh, Lk, Dv, j0 + ne);  // key j0 + ne is even: the first of its pair
            for (int64_t r = 0; r < nr; ++r) {
              const T p = T(ps[r * bkp + ne]);
              for (int64_t e = 0; e < Dv; ++e) acc[r * Dv + e] += p * T(vl[2 * e]);
            }
          }
        } else
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
  });
}

// ---- The backward (FlashAttention-2): probabilities recomputed from the saved lse, O(L) extra memory -----------
//
// Work items are (batch, kv head, key block): each owns its keys' dk and dv and walks every query block of every
// query head in its group that can see them, in the transposed layout (rows = keys, columns = queries) so that all
// five block GEMMs read their operands as stored:
//   S^T = K Q^T * scale (+ ALiBi, mask)       P^T = exp(S^T - lse)         dV += P^T dO
//   dP^T = V dO^T                              dS^T = scale * P^T (dP^T - delta)
//   dK += dS^T Q                               dQ^T = K^T dS^T, added into dq in key-block order (see turn).
// delta = rowsum(dO * O) - dlse comes from the caller, and so does lse with +inf for a row with no key (its P is 0).

// C[m, n] (+)= sum_k A[m, k] * B[k, n], every operand row-major with its own row stride.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
}
inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                 double* C, int64_t ldc, bool add) {
  for (int64_t m = 0; m < M; ++m) {
    double* c = C + m * ldc;
    if (!add) std::fill(c, c + N, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[m * lda + k];
      const double* b = B + k * ldb;
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// row[r] = exp(row[r] - lse[r]) for r < n.
template <typename T>
void exp_minus(T* row, const T* lse, int64_t n) {
  int64_t r = 0;
  if constexpr (std::is_same<T, float>::value)
    for (; r + 8 <= n; r += 8) Vec<float>::store(row + r, vexp(Vec<float>::load(row + r) - Vec<float>::load(lse + r)));
  for (; r < n; ++r) row[r] = std::exp(row[r] - lse[r]);
}

// (rows, cols) -> (cols, rows) per leading index, times `mul`: the transposed operands of the backward's GEMMs.
inline at::Tensor transposed(const at::Tensor& x, double mul) {
  return (x.transpose(-1, -2) * mul).contiguous();
}

template <typename T>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                   const at::Tensor& lse, const at::Tensor& delta, double scale, const at::Tensor& dlo,
                   const at::Tensor& dhi, const at::Tensor& klen, const at::Tensor& qids, const at::Tensor& kids,
                   const at::Tensor& slopes, const at::Tensor& aoff, int64_t BQ, int64_t BK, bool deterministic,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3), G = H / Hkv;
  const int64_t nq = (Lq + BQ - 1) / BQ, nk = (Lk + BK - 1) / BK;
  const at::Tensor qt = transposed(q, scale), dot = transposed(dout, 1.0), kt = transposed(k, 1.0);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *dop = dout.data_ptr<T>();
  const T *qtp = qt.data_ptr<T>(), *dotp = dot.data_ptr<T>(), *ktp = kt.data_ptr<T>();
  const T *lsep = lse.data_ptr<T>(), *dlp = delta.data_ptr<T>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  const Band<T> band(dlo, dhi, klen, qids, kids, slopes, aoff, B, H, Lq, Lk);
  const bool docs = band.docs, alibi = band.alibi;
  // Key block kb of batch element b: its keys' end j1 and the queries [ilo, ihi) that may see them (none: ilo >= ihi).
  auto span = [&](int64_t b, int64_t kb) {
    const int64_t j0 = kb * BK, j1 = std::min<int64_t>({j0 + BK, Lk, band.klen[b]});
    if (j1 <= j0) return std::array<int64_t, 3>{j0, 0, 0};  // keys past this sequence's length: gradients stay 0
    return std::array<int64_t, 3>{j1, std::max<int64_t>(0, j0 - band.hi[b]), std::min<int64_t>(Lq, j1 - band.lo[b])};
  };
  // Deterministic (torch.use_deterministic_algorithms): dq is summed over key blocks in key-block order, whatever the
  // schedule, so it is the same bits on every run and thread count. Otherwise each addition takes the query block's
  // lock, in whatever order the work arrives (as FlashAttention's atomic adds): no thread waits for a descheduled
  // one, which matters on a busy machine. The key blocks that visit a query block are consecutive (both ends of span() grow with kb), so
  // turn[bh, qb] is the next one to add, starting from first[b, qb]. A work item waits only for smaller key blocks,
  // taken earlier by running threads, so the waits end; if a thread throws, `failed` releases the others.
  std::vector<int64_t> first(B * nq, -1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kb = nk - 1; kb >= 0; --kb) {
      const auto [j1, ilo, ihi] = span(b, kb);
      for (int64_t qb = ilo / BQ; ilo < ihi && qb * BQ < ihi; ++qb) first[b * nq + qb] = kb;
    }
  std::vector<std::atomic<int64_t>> turn(B * H * nq);
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t qb = 0; qb < nq; ++qb) turn[bh * nq + qb].store(first[bh / H * nq + qb], std::memory_order_relaxed);
  std::vector<std::mutex> locks(deterministic ? 0 : B * H * nq);
  std::atomic<bool> failed{false};
  const int64_t total = B * Hkv * nk;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  // Dynamic scheduling as in the forward, in key-block order (under causal the first blocks see the most queries).
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const BrgemmRelease release(std::is_same<T, float>::value, false);
    std::vector<T> st(BK * BQ), dpt(BK * BQ), dka(BK * D), dva(BK * Dv), dqt(D * BQ);
    for (int64_t w = next++; w < total; w = next++) try {
      const int64_t kb = w / (B * Hkv), bkh = w % (B * Hkv), b = bkh / Hkv, kh = bkh % Hkv;
      const int64_t lo = band.lo[b], hi = band.hi[b], j0 = kb * BK;
      const auto [j1, ilo, ihi] = span(b, kb);
      const int64_t nc = j1 - j0;
      if (ilo >= ihi) continue;
      const auto [kmin, kmax] = docs ? id_range(band.kid(b, j0), nc) : std::pair<int64_t, int64_t>{0, 0};
      std::fill(dka.begin(), dka.begin() + nc * D, T(0));
      std::fill(dva.begin(), dva.begin() + nc * Dv, T(0));
      const T* kblk = kp + (bkh * Lk + j0) * D;
      const T* vblk = vp + (bkh * Lk + j0) * Dv;
      for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
        const int64_t bh = b * H + h;
        const T slope = alibi ? band.slopes[h] : T(0);
        for (int64_t qb = ilo / BQ; qb * BQ < ihi; ++qb) {
          const int64_t i0 = qb * BQ, i1 = std::min(i0 + BQ, Lq), nr = i1 - i0;
          bool full = j0 - (i1 - 1) >= lo && (j1 - 1) - i0 <= hi, skip = false;
          if (docs) {
            const auto [qmin, qmax] = id_range(band.qid(b, i0), nr);
            skip = kmax < qmin || kmin > qmax;  // no document in common: nothing to add, but its turn passes
            full = full && qmin == qmax && kmin == kmax && qmin == kmin;
          }
          if (!skip) {
            gemm(nc, nr, D, kblk, D, qtp + bh * D * Lq + i0, Lq, st.data(), BQ, false);  // S^T, scaled
            const T* lrow = lsep + bh * Lq + i0;
            for (int64_t c = 0; c < nc; ++c) {
              T* row = st.data() + c * BQ;
              const int64_t j = j0 + c;
              // queries i0 + r with lo <= j - i <= hi: the columns [j - hi - i0, j - lo - i0 + 1)
              bias_and_mask_row<T>(row, nr, alibi, slope, i0 + band.aoff[b] - j, 1, full, j - hi - i0,
                                   j - lo - i0 + 1, docs ? band.qid(b, i0) : nullptr, docs ? *band.kid(b, j) : 0);
              exp_minus<T>(row, lrow, nr);  // P^T
            }
            const T* doblk = dop + (bh * Lq + i0) * Dv;
            gemm(nc, Dv, nr, st.data(), BQ, doblk, Dv, dva.data(), Dv, true);  // dV += P^T dO
            gemm(nc, nr, Dv, vblk, Dv, dotp + bh * Dv * Lq + i0, Lq, dpt.data(), BQ, false);  // dP^T = V dO^T
            const T* drow = dlp + bh * Lq + i0;
            for (int64_t c = 0; c < nc; ++c) {  // dS^T = scale * P^T (dP^T - delta), over dP^T
              const T* p = st.data() + c * BQ;
              T* g = dpt.data() + c * BQ;
              for (int64_t r = 0; r < nr; ++r) g[r] = T(scale) * p[r] * (g[r] - drow[r]);
            }
            gemm(nc, D, nr, dpt.data(), BQ, qp + (bh * Lq + i0) * D, D, dka.data(), D, true);  // dK += dS^T Q
            gemm(D, nr, nc, ktp + bkh * D * Lk + j0, Lk, dpt.data(), BQ, dqt.data(), BQ, false);  // dQ^T = K^T dS^T
          }
          T* dqblk = dqp + (bh * Lq + i0) * D;
          auto add_dq = [&] {
            for (int64_t r = 0; r < nr && !skip; ++r)
              for (int64_t d = 0; d < D; ++d) dqblk[r * D + d] += dqt[d * BQ + r];
          };
          if (!deterministic) {
            if (!skip) {
              const std::lock_guard<std::mutex> hold(locks[bh * nq + qb]);
              add_dq();
            }
            continue;
          }
          std::atomic<int64_t>& t = turn[bh * nq + qb];
          while (t.load(std::memory_order_acquire) != kb) {
            if (failed.load(std::memory_order_relaxed)) return;  // another thread threw; parallel_for rethrows it
            std::this_thread::yield();
          }
          add_dq();
          t.store(kb + 1, std::memory_order_release);
        }
      }
      std::copy(dka.begin(), dka.begin() + nc * D, dkp + (bkh * Lk + j0) * D);
      std::copy(dva.begin(), dva.begin() + nc * Dv, dvp + (bkh * Lk + j0) * Dv);
    } catch (...) {
      failed = true;
      throw;
    }
  });
}

// q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv): 4-D, contiguous, on the CPU, one dtype, H a multiple of Hkv.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t block_q, int64_t block_k) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->is_cpu(), "the native kernel runs on the CPU; got a tensor on ", t->device());
    TORCH_CHECK(t->is_contiguous(), "q, k, v must be contiguous");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "q, k, v dtypes differ");
  }
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(3) == q.size(3) &&
              v.size(1) == k.size(1) && v.size(2) == k.size(2), "q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(block_q > 0 && block_k > 0, "block sizes must be positive");
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& delta, double scale,
                                 const at::Tensor& dlo, const at::Tensor& dhi, const at::Tensor& klen,
                                 const at::Tensor& qids, const at::Tensor& kids, const at::Tensor& slopes,
                                 const at::Tensor& aoff, int64_t block_q, int64_t block_k, bool deterministic) {
  check_qkv(q, k, v, block_q, block_k);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "the backward computes in float or double");
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), v.size(3)}), "dout must be (B, H, Lq, Dv)");
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3) && delta.sizes() == q.sizes().slice(0, 3),
              "lse and delta must be (B, H, Lq)");
  for (const at::Tensor* t : {&dout, &lse, &delta}) {
    TORCH_CHECK(t->is_cpu() && t->is_contiguous(), "dout, lse, delta must be contiguous CPU tensors");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "the backward's tensors must share q's dtype");
  }
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attnkit_native_backward", [&] {
    backward_impl<scalar_t>(q, k, v, dout, lse, delta, scale, dlo, dhi, klen, qids, kids, slopes, aoff, block_q,
                            block_k, deterministic, dq, dk, dv);
  });
  return {dq, dk, dv};
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                const at::Tensor& dlo, const at::Tensor& dhi, const at::Tensor& klen,
                                const at::Tensor& qids, const at::Tensor& kids, const at::Tensor& slopes,
                                const at::Tensor& aoff, int64_t block_q, int64_t block_k) {
  check_qkv(q, k, v, block_q, block_k);
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
  m.def("backward", &backward, "attnkit native tiled attention backward from out's delta and lse: (dq, dk, dv)");
}
