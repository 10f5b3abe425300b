// The rational gate's CPU kernels: one pass over memory forward, one pass backward.
//
// Same math, in the same order, as rsae/rational.py's bodies (see its docstring); only the memory
// traffic differs. Inductor computes the backward's per-column sums in a second loop that re-reads x
// and grad, because it will not fuse the grad_x store into a reduction down the rows of a row-major
// tensor. Here each thread streams its rows once, writes grad_x and adds every per-column sum into
// its own [n, F] fp32 slice (3 x F floats with shared coefficients: stays in L2), and keeps the
// shared coefficient sums in per-lane accumulators for the row, added into doubles at its end. The
// caller adds the threads' slices.
//
// Plain C ABI (called through ctypes), GCC/Clang vector extensions (16 fp32 lanes: one AVX-512
// register, split by the compiler elsewhere), no torch headers, so it builds in about a second.
// Columns go in blocks of kBlock vectors so that each Horner step has kBlock independent FMAs (one
// vector's Horner chain alone is latency-bound). Tensors are fp32 or bf16 (all of x, out, grad and
// grad_x the same), computed in fp32; bf16 results round to nearest even exactly as torch's casts.
// Coefficient k of column j is at coef[k * coef_ld + j * coef_cs]: (coef_ld, coef_cs) = (1, 0) when
// shared by all columns, (F, 1) when per column.
#include <cstdint>
#include <cstring>

#include <omp.h>

namespace {

constexpr int kLanes = 16;
constexpr int kBlock = 4;      // vectors per column block
constexpr int kMaxCoefs = 32;  // p + q + 2 coefficient sums at most; MAX_COEFFICIENTS in rational_cpu.py
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vh __attribute__((vector_size(kLanes * 2)));

struct bf16 {
  uint16_t bits;
};

inline vf splat(float v) { return vf{} + v; }

// n <= kLanes values, zeros in the other lanes; n is a compile-time kLanes on the hot path.
inline vf load(const float* src, int n) {
  vf v{};
  std::memcpy(&v, src, n * sizeof(float));
  return v;
}

inline vf load(const bf16* src, int n) {
  vh h{};
  std::memcpy(&h, src, n * sizeof(uint16_t));
  vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline void store(float* dst, vf v, int n) { std::memcpy(dst, &v, n * sizeof(float)); }

inline void store(bf16* dst, vf v, int n) {
  vu bits;
  std::memcpy(&bits, &v, sizeof v);
  vu rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;  // round to nearest even
  rounded = (v != v) ? vu{} + 0x7FC0u : rounded;             // NaN stays NaN
  vh h = __builtin_convertvector(rounded, vh);
  std::memcpy(dst, &h, n * sizeof(uint16_t));
}

inline vf clamp_unit(vf u) { return u < -1.0f ? splat(-1.0f) : (u > 1.0f ? splat(1.0f) : u); }
inline vf positive_part(vf v) { return v > 0.0f ? v : vf{}; }

// The arguments both kernels share.
template <typename T>
struct Gate {
  const T* x;
  int64_t x_ld, rows, cols;
  const float *shift, *inv_scale_in, *scale_out, *numerator, *denominator;
  int p, q;
  int64_t coef_ld, coef_cs;
  bool positive_support;  // zero where x <= 0: output, and the gradient everything else gets
};

// One block's coefficients: broadcast once when shared, loaded per block when per column.
template <int NV>
struct Coefs {
  vf a[kMaxCoefs][NV], c[kMaxCoefs][NV];

  template <typename T>
  explicit Coefs(const Gate<T>& g) {
    if (g.coef_cs != 0) return;
    for (int k = 0; k <= g.p; ++k)
      for (int v = 0; v < NV; ++v) a[k][v] = splat(g.numerator[k * g.coef_ld]);
    for (int k = 0; k < g.q; ++k)
      for (int v = 0; v < NV; ++v) c[k][v] = splat(g.denominator[k * g.coef_ld]);
  }

  template <typename T>
  void load_columns(const Gate<T>& g, int64_t col, int n) {
    if (g.coef_cs == 0) return;
    for (int v = 0; v < NV; ++v) {
      for (int k = 0; k <= g.p; ++k) a[k][v] = load(g.numerator + k * g.coef_ld + col + v * kLanes, n);
      for (int k = 0; k < g.q; ++k) c[k][v] = load(g.denominator + k * g.coef_ld + col + v * kLanes, n);
    }
  }
};

// Which rows and columns thread t of nt walks: rows when there are enough, else column blocks (the
// TopK path calls with a single row of N * k selected values).
struct Range {
  int64_t row0, row1, col0, col1;
};

inline Range thread_range(int t, int nt, int64_t rows, int64_t cols) {
  if (rows >= nt) return {rows * t / nt, rows * (t + 1) / nt, 0, cols};
  constexpr int64_t width = kBlock * kLanes;
  int64_t blocks = (cols + width - 1) / width;
  int64_t c0 = blocks * t / nt * width, c1 = blocks * (t + 1) / nt * width;
  return {0, rows, c0 < cols ? c0 : cols, c1 < cols ? c1 : cols};
}

// Calls body.template run<NV>(row, col, n) over the range: full blocks of kBlock vectors, then single
// vectors, the last one partial (n < kLanes lanes); body.end_row() after each row.
template <typename Body>
void walk(const Range& r, Body& body) {
  constexpr int64_t width = kBlock * kLanes;
  for (int64_t row = r.row0; row < r.row1; ++row) {
    int64_t col = r.col0;
    for (; col + width <= r.col1; col += width) body.template run<kBlock>(row, col, kLanes);
    for (; col < r.col1; col += kLanes)
      body.template run<1>(row, col, r.col1 - col < kLanes ? int(r.col1 - col) : kLanes);
    body.end_row();
  }
}

template <typename T>
struct Forward {
  const Gate<T>& g;
  T* out;
  int64_t out_ld;
  const float* slope_pos;
  Coefs<kBlock> wide;
  Coefs<1> narrow;

  template <int NV>
  Coefs<NV>& coefs() {
    if constexpr (NV == kBlock) return wide;
    else return narrow;
  }

  // out = scale_out * (R(clamp(u)) + max(u - 1, 0) * slope_pos),  u = (x - shift) * inv_scale_in.
  template <int NV>
  void run(int64_t row, int64_t col, int n) {
    Coefs<NV>& k = coefs<NV>();
    k.load_columns(g, col, n);
    vf xs[NV], u[NV], tc[NV], value[NV], big_b[NV], y[NV];
    for (int v = 0; v < NV; ++v) {
      int64_t j = col + v * kLanes;
      xs[v] = load(g.x + row * g.x_ld + j, n);
      u[v] = (xs[v] - load(g.shift + j, n)) * load(g.inv_scale_in + j, n);
      tc[v] = clamp_unit(u[v]);
      y[v] = tc[v] < 0.0f ? -tc[v] : tc[v];
      value[v] = k.a[g.p][v] * tc[v] + k.a[g.p - 1][v];
    }
    for (int i = g.p - 2; i >= 0; --i)
      for (int v = 0; v < NV; ++v) value[v] = value[v] * tc[v] + k.a[i][v];
    if (g.q > 0) {
      for (int v = 0; v < NV; ++v) big_b[v] = k.c[g.q - 1][v];
      for (int i = g.q - 2; i >= 0; --i)
        for (int v = 0; v < NV; ++v) big_b[v] = big_b[v] * y[v] + k.c[i][v];
      for (int v = 0; v < NV; ++v) value[v] = value[v] / (1.0f + big_b[v] * y[v]);
    }
    for (int v = 0; v < NV; ++v) {
      int64_t j = col + v * kLanes;
      vf slope = g.coef_cs == 0 ? splat(slope_pos[0]) : load(slope_pos + j, n);
      vf r = value[v] + positive_part(u[v] - tc[v]) * slope;
      vf result = load(g.scale_out + j, n) * r;
      if (g.positive_support) result = xs[v] > 0.0f ? result : vf{};
      store(out + row * out_ld + j, result, n);
    }
  }

  void end_row() {}
};

template <typename T>
struct Backward {
  const Gate<T>& g;
  const T* grad;
  int64_t grad_ld;
  T* grad_x;
  int64_t grad_x_ld;
  bool per_column_sums;
  float* my_cols;  // this thread's [n_col_sums, cols] slice
  Coefs<kBlock> wide;
  Coefs<1> narrow;
  vf row_total[kMaxCoefs] = {};  // shared coefficient sums: this row's, per lane
  double total[kMaxCoefs] = {};  // and all rows'

  template <int NV>
  Coefs<NV>& coefs() {
    if constexpr (NV == kBlock) return wide;
    else return narrow;
  }

  void add_to_column(int sum, int64_t j, vf v, int n) {
    float* dst = my_cols + sum * g.cols + j;
    store(dst, load(dst, n) + v, n);
  }

  template <int NV>
  void run(int64_t row, int64_t col, int n) {
    Coefs<NV>& k = coefs<NV>();
    k.load_columns(g, col, n);
    const int p = g.p, q = g.q;
    vf gr[NV], u[NV], tc[NV], y[NV], sgn[NV], big_p[NV], d_p[NV], w[NV], value[NV], slope[NV], w_q[NV];
    for (int v = 0; v < NV; ++v) {
      int64_t j = col + v * kLanes;
      vf xs = load(g.x + row * g.x_ld + j, n);
      gr[v] = load(grad + row * grad_ld + j, n);
      if (g.positive_support) gr[v] = xs > 0.0f ? gr[v] : vf{};
      u[v] = (xs - load(g.shift + j, n)) * load(g.inv_scale_in + j, n);
      tc[v] = clamp_unit(u[v]);
      y[v] = tc[v] < 0.0f ? -tc[v] : tc[v];
      sgn[v] = tc[v] > 0.0f ? splat(1.0f) : (tc[v] < 0.0f ? splat(-1.0f) : vf{});
      big_p[v] = k.a[p][v] * tc[v] + k.a[p - 1][v];
      d_p[v] = k.a[p][v];
      w[v] = gr[v] * load(g.scale_out + j, n);
    }
    for (int i = p - 2; i >= 0; --i)
      for (int v = 0; v < NV; ++v) {
        d_p[v] = d_p[v] * tc[v] + big_p[v];
        big_p[v] = big_p[v] * tc[v] + k.a[i][v];
      }
    if (q > 0) {
      // B(y) = sum c_j y^j (Q = 1 + B) and dB/dy, by Horner.
      vf big_b[NV], d_b[NV];
      for (int v = 0; v < NV; ++v) big_b[v] = d_b[v] = k.c[q - 1][v];
      for (int i = q - 2; i >= 0; --i)
        for (int v = 0; v < NV; ++v) {
          big_b[v] = big_b[v] * y[v] + k.c[i][v];
          d_b[v] = d_b[v] * y[v] + big_b[v];
        }
      for (int v = 0; v < NV; ++v) {
        vf inv_q = 1.0f / (1.0f + big_b[v] * y[v]);
        value[v] = big_p[v] * inv_q;
        slope[v] = (d_p[v] - value[v] * d_b[v] * sgn[v]) * inv_q;  // R' = (P' - R Q') / Q: never forms Q^2
        w_q[v] = w[v] * inv_q;
      }
    } else {
      for (int v = 0; v < NV; ++v) value[v] = big_p[v], slope[v] = d_p[v], w_q[v] = w[v];
    }
    for (int v = 0; v < NV; ++v) {
      int64_t j = col + v * kLanes;
      vf d = u[v] - tc[v];
      slope[v] = u[v] >= -1.0f ? slope[v] : vf{};  // the lower tail is flat
      vf gx = w[v] * slope[v] * load(g.inv_scale_in + j, n);
      store(grad_x + row * grad_x_ld + j, gx, n);
      add_to_column(0, j, gx, n);
      add_to_column(1, j, gx * u[v], n);
      add_to_column(2, j, gr[v] * (value[v] + slope[v] * d), n);
    }

    // Coefficient sums: dR/da_i = tc^i / Q, dR/dc_j = -R y^j / Q, with tc^i = sgn y^i for odd i;
    // the last one feeds the upper tail's dependence on the coefficients.
    vf term[NV], w_q_sgn[NV], w_qr[NV], power[NV];
    add_coef_sum<NV>(0, w_q, col, n);
    for (int v = 0; v < NV; ++v) term[v] = w_q[v] * tc[v];
    add_coef_sum<NV>(1, term, col, n);
    for (int v = 0; v < NV; ++v) term[v] = w[v] * positive_part(u[v] - tc[v]);
    add_coef_sum<NV>(p + q + 1, term, col, n);
    for (int v = 0; v < NV; ++v) {
      w_q_sgn[v] = w_q[v] * sgn[v];
      w_qr[v] = -w_q[v] * value[v];
      power[v] = y[v];
    }
    for (int i = 1, top = p > q ? p : q; i <= top; ++i) {
      if (i > 1) {
        for (int v = 0; v < NV; ++v) power[v] = power[v] * y[v];
        if (i <= p) {
          for (int v = 0; v < NV; ++v) term[v] = (i % 2 ? w_q_sgn[v] : w_q[v]) * power[v];
          add_coef_sum<NV>(i, term, col, n);
        }
      }
      if (i <= q) {
        for (int v = 0; v < NV; ++v) term[v] = w_qr[v] * power[v];
        add_coef_sum<NV>(p + i, term, col, n);
      }
    }
  }

  // Shared sums go through one vector per coefficient per row, then into a double per coefficient:
  // one load and store per coefficient per block, and no fp32 sum runs over more than a row.
  template <int NV>
  void add_coef_sum(int k, const vf (&term)[NV], int64_t col, int n) {
    if (per_column_sums) {
      for (int v = 0; v < NV; ++v) add_to_column(3 + k, col + v * kLanes, term[v], n);
      return;
    }
    vf s = term[0];
    for (int v = 1; v < NV; ++v) s += term[v];
    row_total[k] += s;
  }

  void end_row() {
    if (per_column_sums) return;
    for (int k = 0; k < g.p + g.q + 2; ++k) {
      for (int lane = 0; lane < kLanes; ++lane) total[k] += row_total[k][lane];
      row_total[k] = vf{};
    }
  }
};

template <typename T>
void forward(const Gate<T>& g, T* out, int64_t out_ld, const float* slope_pos, int n_threads) {
#pragma omp parallel num_threads(n_threads)
  {
    Forward<T> body{g, out, out_ld, slope_pos, Coefs<kBlock>(g), Coefs<1>(g)};
    walk(thread_range(omp_get_thread_num(), omp_get_num_threads(), g.rows, g.cols), body);
  }
}

template <typename T>
void backward(const Gate<T>& g, const T* grad, int64_t grad_ld, T* grad_x, int64_t grad_x_ld, bool per_column_sums,
              float* col_sums, float* coef_sums, int n_threads) {
  const int n_coef = g.p + g.q + 2;
  const int n_col_sums = per_column_sums ? 3 + n_coef : 3;
#pragma omp parallel num_threads(n_threads)
  {
    const int t = omp_get_thread_num();
    float* my_cols = col_sums + int64_t(t) * n_col_sums * g.cols;
    std::memset(my_cols, 0, sizeof(float) * n_col_sums * g.cols);
    Backward<T> body{g, grad, grad_ld, grad_x, grad_x_ld, per_column_sums, my_cols, Coefs<kBlock>(g), Coefs<1>(g)};
    walk(thread_range(t, omp_get_num_threads(), g.rows, g.cols), body);
    if (!per_column_sums)
      for (int k = 0; k < n_coef; ++k) coef_sums[t * n_coef + k] = float(body.total[k]);
  }
}

}  // namespace

extern "C" {

inline bool supported_degree(int p, int q) { return p >= 1 && q >= 0 && p + q + 2 <= kMaxCoefs; }

// dtype: 0 = fp32, 1 = bf16, for x and out alike; positive_support 0 or 1 (see Gate). Returns 0, or 1
// for an unsupported degree.
int rsae_rational_forward(const void* x, int dtype, int64_t x_ld, void* out, int64_t out_ld, int64_t rows,
                           int64_t cols, const float* shift, const float* inv_scale_in, const float* scale_out,
                           const float* numerator, const float* denominator, int p, int q, int64_t coef_ld,
                           int64_t coef_cs, int positive_support, const float* slope_pos, int n_threads) {
  if (!supported_degree(p, q)) return 1;
  if (dtype == 0) {
    Gate<float> g{static_cast<const float*>(x), x_ld, rows, cols, shift, inv_scale_in, scale_out,
                  numerator, denominator, p, q, coef_ld, coef_cs, positive_support != 0};
    forward(g, static_cast<float*>(out), out_ld, slope_pos, n_threads);
  } else {
    Gate<bf16> g{static_cast<const bf16*>(x), x_ld, rows, cols, shift, inv_scale_in, scale_out,
                 numerator, denominator, p, q, coef_ld, coef_cs, positive_support != 0};
    forward(g, static_cast<bf16*>(out), out_ld, slope_pos, n_threads);
  }
  return 0;
}

// grad_x, and the sums the parameter gradients need (see rational_backward in rsae/rational.py).
// col_sums: [n_threads, n_col_sums, cols] fp32, n_col_sums = 3 (+ p + q + 2 if per_column_sums),
// rows: sum grad_x, sum grad_x * u, sum grad * r, then [sums_a (p+1), sums_c (q), tail_pos].
// coef_sums: [n_threads, p + q + 2] fp32, the same coefficient sums over every element when
// per_column_sums is 0. dtype as in the forward, for grad, x and grad_x alike. Returns as the forward.
int rsae_rational_backward(const void* grad, int dtype, int64_t grad_ld, const void* x, int64_t x_ld, void* grad_x,
                            int64_t grad_x_ld, int64_t rows, int64_t cols, const float* shift,
                            const float* inv_scale_in, const float* scale_out, const float* numerator,
                            const float* denominator, int p, int q, int64_t coef_ld, int64_t coef_cs,
                            int positive_support, int per_column_sums, float* col_sums, float* coef_sums,
                            int n_threads) {
  if (!supported_degree(p, q)) return 1;
  if (dtype == 0) {
    Gate<float> g{static_cast<const float*>(x), x_ld, rows, cols, shift, inv_scale_in, scale_out,
                  numerator, denominator, p, q, coef_ld, coef_cs, positive_support != 0};
    backward(g, static_cast<const float*>(grad), grad_ld, static_cast<float*>(grad_x), grad_x_ld,
             per_column_sums != 0, col_sums, coef_sums, n_threads);
  } else {
    Gate<bf16> g{static_cast<const bf16*>(x), x_ld, rows, cols, shift, inv_scale_in, scale_out,
                 numerator, denominator, p, q, coef_ld, coef_cs, positive_support != 0};
    backward(g, static_cast<const bf16*>(grad), grad_ld, static_cast<bf16*>(grad_x), grad_x_ld,
             per_column_sums != 0, col_sums, coef_sums, n_threads);
  }
  return 0;
}

}  // extern "C"
