// Top-k selection on CPU: per row of a row-major [rows, cols] fp32 or bf16 matrix, the k largest values
// and their column indices, in no particular order (torch.topk(x, k, dim=-1, sorted=False) as sets).
//
// torch.topk keeps a scalar heap per row (std::partial_sort for small k), about 2 ns a column. Here a row
// takes two vectorised passes (the second from L1/L2) and a few small selections:
//  1. A threshold t0 with at least k entries at or above it: split the columns into G >= k interleaved
//     groups (column c in group c % G), take one entry of each (its max, give or take NaN: any entry of the
//     group would do) and let t0 be the k-th largest of those G. On random rows only about 1.3 k entries
//     rank above it.
//  2. Every entry that ranks strictly above t0 becomes a candidate: each 16 columns compared with t0 into a
//     mask that compresses their column numbers onto the candidate list, with no branch (about half the
//     64-column blocks of a random row hold a candidate: a branch on them would mispredict). Should the
//     list fill, it is cut to its k largest and the threshold rises to the k-th of them.
//  3. The k largest candidates; if fewer than k ranked above t0, the first columns tied with t0 make up
//     the rest (at least k entries rank at or above it).
// Rows no wider than the buffer go straight to step 3.
//
// The k-th largest of n values (steps 1 and 3) is found on order keys, unsigned integers that sort as the
// values do (sign-magnitude flipped; every NaN one key above +inf): the largest key T with at least k
// keys >= T, built bit by bit from the top, each bit one vector count over the n keys. That is 32 * n / 16
// compares with no data-dependent branch, where std::nth_element's comparisons mispredict.
//
// Order: torch.topk's, where NaN ranks above every number (all NaNs tie) and -0.0 ties with 0.0 (the keys
// put -0.0 just below 0.0: an order within torch's ties, which is all a selection needs). The filter
// "!(x <= t)" passes x > t and NaN; with t itself NaN (k NaNs held) nothing ranks above it and the row
// stops early. Entries tied with the threshold are dropped once k held entries rank at or above it, so
// the values returned are always those of torch's answer (ties may pick other columns).
//
// Plain C ABI (called through ctypes), no torch headers, OpenMP over rows. AVX-512 intrinsics where the
// compiler targets it (-march=native); elsewhere plain loops that the compiler vectorises (the "portable"
// path: built without AVX-512 on an AVX-512 host, 1.3-2x the AVX-512 path's time, 2-2.5x faster than
// torch.topk).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxK = 1024;  // MAX_K in topk_cpu.py
constexpr int64_t kBlock = 64;   // columns per step-2 block; the list keeps room for one past its capacity
constexpr int64_t kLanes = 16;

struct bf16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  uint32_t bits = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Order keys: a ranks above b in torch's order => key(a) > key(b). Real values map to [0x007FFFFF (-inf),
// 0xFF800000 (+inf)], every NaN to 0xFFFFFFFF; 0 pads the vector loops below every value.
constexpr uint32_t kNaNKey = 0xFFFFFFFFu;
inline uint32_t key_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return v != v ? kNaNKey : bits ^ (uint32_t(int32_t(bits) >> 31) | 0x80000000u);
}
inline float value_of(uint32_t key) {  // key_of's inverse (a NaN for kNaNKey)
  uint32_t bits = key & 0x80000000u ? key ^ 0x80000000u : ~key;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// above(v, t) for a threshold t that is not NaN: v > t, or v NaN
inline bool passes(float v, float t) { return !(v <= t); }
// tied with t in torch's order
inline bool tied(float v, float t) { return t != t ? v != v : v == t; }

// The number of the n16 (a multiple of kLanes) keys that are >= t.
inline int64_t count_at_least(const uint32_t* keys, int64_t n16, uint32_t t) {
#if defined(__AVX512F__)
  const __m512i tv = _mm512_set1_epi32(int32_t(t));
  int64_t count = 0;
  for (int64_t i = 0; i < n16; i += kLanes) {
    count += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + i), tv));
  }
  return count;
#else
  uint32_t count = 0;  // a plain loop: the compiler vectorises it
  for (int64_t i = 0; i < n16; ++i) count += keys[i] >= t;
  return count;
#endif
}

// The k-th largest of keys[0, n), 1 <= k <= n; keys[n, n16) must be 0 (n16 = n rounded up to kLanes).
inline uint32_t kth_largest(const uint32_t* keys, int64_t n16, int64_t k) {
  uint32_t t = 0;
  for (uint32_t bit = 0x80000000u; bit != 0; bit >>= 1) {
    uint32_t trial = t | bit;
    t = count_at_least(keys, n16, trial) >= k ? trial : t;
  }
  return t;
}

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

#if defined(__AVX512F__)
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const bf16* x) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif

// Step 2 on the kBlock columns from c: appends those that pass t (not NaN), !(x <= t), to cols and returns
// how many. Room for kBlock more at cols.
template <typename T>
inline int64_t collect_block(const T* x, int64_t c, float t, int32_t* cols) {
#if defined(__AVX512F__)
  const __m512 tv = _mm512_set1_ps(t);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t m = 0;
  for (int v = 0; v < kBlock / kLanes; ++v) {
    __m512 xv = load16(x + c + v * kLanes);
    __mmask16 pass = _mm512_cmp_ps_mask(xv, tv, _CMP_NLE_UQ);  // not (x <= t): true for NaN
    __m512i col = _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(c + v * kLanes)));
    _mm512_storeu_si512(cols + m, _mm512_maskz_compress_epi32(pass, col));
    m += __builtin_popcount(pass);
  }
  return m;
#else
  // Plain loops the compiler vectorises: a test per kLanes columns, branch-free appends where one passes.
  int64_t m = 0;
  for (int64_t v = c; v < c + kBlock; v += kLanes) {
    bool any = false;
    for (int64_t j = v; j < v + kLanes; ++j) any |= passes(to_float(x[j]), t);
    if (!any) continue;
    for (int64_t j = v; j < v + kLanes; ++j) {
      cols[m] = int32_t(j);
      m += passes(to_float(x[j]), t);
    }
  }
  return m;
#endif
}

// Per-thread buffers: candidate columns (room for a block past capacity), their keys, and the cut.
struct Scratch {
  int64_t capacity;
  std::vector<uint32_t> keys;
  std::vector<int32_t> cols, kept;
  explicit Scratch(int64_t capacity)
      : capacity(capacity), keys(capacity + kLanes), cols(capacity + kBlock), kept(capacity) {}
};

// Cuts the n >= k candidate columns of row x to their k largest (s.cols[0, k)); returns the k-th largest value.
template <typename T>
inline float keep_top(const T* x, Scratch& s, int64_t n, int64_t k) {
  uint32_t* keys = s.keys.data();
  int32_t* cols = s.cols.data();
  for (int64_t i = 0; i < n; ++i) keys[i] = key_of(to_float(x[cols[i]]));
  std::fill(keys + n, keys + round_up(n), 0u);
  const uint32_t t = kth_largest(keys, round_up(n), k);
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {  // those above t, then those at t up to k: branch-free appends
    s.kept[m] = cols[i];
    m += keys[i] > t;
  }
  for (int64_t i = 0; i < n && m < k; ++i) {
    s.kept[m] = cols[i];
    m += keys[i] == t;
  }
  std::memcpy(cols, s.kept.data(), k * sizeof *cols);
  return value_of(t);
}

// Step 1: the k-th largest key of one entry per group, G = NV * kLanes groups (G <= cols), the accumulators
// in registers; NV = 0 (and any NV without AVX-512) takes G = groups (a multiple of kLanes), kept in acc.
template <int NV, typename T>
uint32_t group_threshold(const T* x, int64_t cols, int64_t k, int64_t groups, uint32_t* acc_keys) {
  float* acc = reinterpret_cast<float*>(acc_keys);  // the same buffer: keys overwrite their values
  int64_t c = 0;
#if defined(__AVX512F__)
  if (NV > 0) {
    groups = NV * kLanes;
    __m512 a[NV > 0 ? NV : 1];
    for (int v = 0; v < NV; ++v) a[v] = load16(x + v * kLanes);
    for (c = groups; c + groups <= cols; c += groups) {
      for (int v = 0; v < NV; ++v) a[v] = _mm512_max_ps(load16(x + c + v * kLanes), a[v]);  // NaN in x keeps a
    }
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + v * kLanes, a[v]);
  }
#endif
  if (c == 0) {
    for (int64_t g = 0; g < groups; ++g) acc[g] = to_float(x[g]);
    for (c = groups; c + groups <= cols; c += groups) {
      for (int64_t g = 0; g < groups; ++g) {
        float v = to_float(x[c + g]);
        acc[g] = v > acc[g] ? v : acc[g];  // NaN in x keeps acc: any entry of the group will do
      }
    }
  }
  for (int64_t g = 0; c < cols; ++c, ++g) {
    float v = to_float(x[c]);
    acc[g] = v > acc[g] ? v : acc[g];
  }
  for (int64_t g = 0; g < groups; ++g) acc_keys[g] = key_of(acc[g]);
  return kth_largest(acc_keys, groups, k);
}

template <int NV, typename T>
void select_row(const T* x, int64_t cols, int64_t k, int64_t groups, Scratch& s, uint32_t* acc, T* values,
                int64_t* indices) {
  int32_t* cand = s.cols.data();
  if (cols <= s.capacity) {
    for (int64_t c = 0; c < cols; ++c) cand[c] = int32_t(c);
    keep_top(x, s, cols, k);
  } else {
    const float t0 = value_of(group_threshold<NV>(x, cols, k, groups, acc));
    float t = t0;
    int64_t n = 0;
    bool cut = false;
    if (t0 == t0) {  // with t0 NaN nothing ranks above it: k NaNs are tied at the top
      int64_t c = 0;
      for (; c + kBlock <= cols; c += kBlock) {
        n += collect_block(x, c, t, cand + n);
        if (n + kBlock > s.capacity) {  // rare: keep room for the next block
          t = keep_top(x, s, n, k);
          n = k;
          cut = true;
          if (t != t) break;  // k NaNs
        }
      }
      for (; c < cols && t == t; ++c) {  // the last columns (fewer than kBlock: room left for them)
        cand[n] = int32_t(c);
        n += passes(to_float(x[c]), t);
      }
    }
    if (n > k) {
      keep_top(x, s, n, k);
      n = k;
    }
    if (n < k && !cut) {  // step 3's make-up: the first columns tied with t0, none of them a candidate
      for (int64_t c = 0; c < cols && n < k; ++c) {
        if (tied(to_float(x[c]), t0)) cand[n++] = int32_t(c);
      }
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    values[i] = x[cand[i]];
    indices[i] = cand[i];
  }
}

template <typename T>
void select_rows(const T* x, int64_t rows, int64_t cols, int64_t k, T* values, int64_t* indices, int n_threads) {
  // Groups: enough that t0 sits close to the k-th largest (G = 2k: ~1.3 k candidates on random rows); buffer:
  // room for them several times over, and at least G (narrower rows skip step 1).
  const int64_t groups = round_up(std::max<int64_t>(2 * k, 64));
  const int64_t capacity = std::max<int64_t>(4 * k, 256);
#pragma omp parallel num_threads(n_threads)
  {
    Scratch s(capacity);
    std::vector<uint32_t> acc(groups);
    auto run = [&](auto nv) {
#pragma omp for schedule(dynamic, 16)  // a busy core (shared machines) leaves its rows to the others
      for (int64_t r = 0; r < rows; ++r) {
        select_row<decltype(nv)::value>(x + r * cols, cols, k, groups, s, acc.data(), values + r * k,
                                        indices + r * k);
      }
    };
    if (groups == 64) run(std::integral_constant<int, 4>{});
    else if (groups == 128) run(std::integral_constant<int, 8>{});
    else run(std::integral_constant<int, 0>{});
  }
}

}  // namespace

extern "C" {

// dtype: 0 fp32, 1 bf16. values [rows, k] of that dtype, indices [rows, k] int64, both row-major.
// Returns 0, or 1 if k is not in [1, min(cols, kMaxK)] or cols >= 2^31, or 2 for an unknown dtype.
int rsae_topk(const void* x, int dtype, int64_t rows, int64_t cols, int64_t k, void* values, int64_t* indices,
              int n_threads) {
  if (k < 1 || k > cols || k > kMaxK || cols > INT32_MAX) return 1;
  if (n_threads < 1) n_threads = 1;
  if (dtype == 0) {
    select_rows(static_cast<const float*>(x), rows, cols, k, static_cast<float*>(values), indices, n_threads);
  } else if (dtype == 1) {
    select_rows(static_cast<const bf16*>(x), rows, cols, k, static_cast<bf16*>(values), indices, n_threads);
  } else {
    return 2;
  }
  return 0;
}

int64_t rsae_topk_max_k() { return kMaxK; }

// 1 where this build compares with AVX-512, 0 for the plain-loop path.
int rsae_topk_avx512() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
