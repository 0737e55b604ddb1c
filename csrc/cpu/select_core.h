// Exact DGP band selection on the CPU: the torch-free core behind csrc/cpu/select.cpp.
//
// Semantics (docs/semantics.md): rank entries by |v| descending, ties by ascending
// flat index; keep ranks [k_top, k_top + k_keep). |v| is ordered by the integer key
// bits(v) & ~sign, so the two boundary entries are found by radix selection on keys only:
//
//   analysis  : per-chunk radix histograms of the key, level by level (16 + 15 bits for
//               float32), each level restricted to the boundary bucket of the level above,
//               until the exact keys Khi (rank k_top) and Klo (rank k_top + k_keep - 1) are
//               known. Per-chunk counts of keys > K and == K come out of the same histograms.
//   ties      : entries whose key equals a boundary key are kept by their ordinal among the
//               equal keys in index order (the tie rule), so no index is ever compared:
//               at Khi the first s_hi tied entries are in the dropped top, at Klo only the
//               first t_lo tied entries are kept. Per-chunk ordinals come from prefix sums.
//   write     : one ordered pass per chunk writes indices/values at a precomputed offset
//               (no atomics), and, with error feedback, residual = v with kept entries 0.
//
// The analysis never writes user memory, so a NaN (found in the first level) aborts before
// anything is modified. Small layers use a radix descent on a key copy (analyze_direct).
// Chunks are static slices [c*n/C, (c+1)*n/C) so every pass sees the same partition.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace dgp {

template <typename T>
struct KeyTraits;
template <>
struct KeyTraits<float> {
  static constexpr int kMant = 23;  // mantissa bits: one key step is 2^-kMant relative
  using K = uint32_t;
  static constexpr int kBits = 31;
  static constexpr K kMask = 0x7fffffffu;
  static constexpr K kInf = 0x7f800000u;
};
template <>
struct KeyTraits<double> {
  static constexpr int kMant = 52;  // mantissa bits: one key step is 2^-kMant relative
  using K = uint64_t;
  static constexpr int kBits = 63;
  static constexpr K kMask = 0x7fffffffffffffffull;
  static constexpr K kInf = 0x7ff0000000000000ull;
};
template <>
struct KeyTraits<c10::Half> {
  static constexpr int kMant = 10;  // mantissa bits: one key step is 2^-kMant relative
  using K = uint16_t;
  static constexpr int kBits = 15;
  static constexpr K kMask = 0x7fff;
  static constexpr K kInf = 0x7c00;
};
template <>
struct KeyTraits<c10::BFloat16> {
  static constexpr int kMant = 7;  // mantissa bits: one key step is 2^-kMant relative
  using K = uint16_t;
  static constexpr int kBits = 15;
  static constexpr K kMask = 0x7fff;
  static constexpr K kInf = 0x7f80;
};

template <typename T>
inline typename KeyTraits<T>::K key_of(T v) {
  typename KeyTraits<T>::K k;
  std::memcpy(&k, &v, sizeof(k));
  return static_cast<typename KeyTraits<T>::K>(k & KeyTraits<T>::kMask);
}

// v = g (+ e), computed in T exactly as torch computes g + e (c10::Half / BFloat16 add in
// float and round once).
template <typename T, bool EF>
inline T load_v(const T* g, const T* e, int64_t i) {
  if constexpr (EF) {
    return static_cast<T>(g[i] + e[i]);
  } else {
    return g[i];
  }
}

struct Counts {
  int64_t n = 0, k_top = 0, k_keep = 0;
};

// The counts of docs/semantics.md, in double; must match dgp_kernels/ops/checks.py:band_counts.
inline Counts band_counts(int64_t n, double top, double keep) {
  Counts c;
  c.n = n;
  int64_t kt = static_cast<int64_t>(std::floor(top * static_cast<double>(n) + 1e-6));
  c.k_top = std::min(std::max<int64_t>(kt, 0), n);
  int64_t kk = static_cast<int64_t>(std::floor(keep * static_cast<double>(n) + 1e-6));
  c.k_keep = std::max<int64_t>(0, std::min(kk, n - c.k_top));
  return c;
}

// Everything the write pass needs, per layer.
template <typename K>
struct Plan {
  Counts cnt;
  int nchunks = 1;
  K khi = 0, klo = 0;
  int64_t s_hi = 0;  // tied entries at khi with ordinal < s_hi are in the dropped top
  int64_t t_lo = 0;  // tied entries at klo with ordinal >= t_lo are below the band
  std::vector<int64_t> out_off;  // per chunk: first output slot (size nchunks + 1)
  std::vector<int64_t> ord_hi;   // per chunk: ordinal of its first khi tie
  std::vector<int64_t> ord_lo;   // per chunk: ordinal of its first klo tie
  bool has_nan = false;
};

inline int64_t chunk_begin(int64_t n, int c, int C) {
  return static_cast<int64_t>((static_cast<__int128>(n) * c) / C);
}

// Radix digit widths, most significant first; they sum to the key width. Small layers use
// narrow digits (their histograms must stay cheap relative to n); large layers 16 bits,
// whose histogram (256 KiB of uint32) fits L2 and leaves tiny boundary buckets.
inline int digit_schedule(int key_bits, int64_t n, int* digits) {
  int nd = 0;
  if (key_bits == 15) {
    if (n <= (int64_t(1) << 16)) {
      digits[nd++] = 8;
      digits[nd++] = 7;
    } else {
      digits[nd++] = 15;
    }
  } else if (key_bits == 31) {
    if (n <= (int64_t(1) << 18)) {
      digits[nd++] = 11;
      digits[nd++] = 10;
      digits[nd++] = 10;
    } else {
      digits[nd++] = 16;
      digits[nd++] = 15;
    }
  } else {  // 63
    if (n <= (int64_t(1) << 18)) {
      for (int i = 0; i < 3; ++i) digits[nd++] = 11;
      for (int i = 0; i < 3; ++i) digits[nd++] = 10;
    } else {
      for (int i = 0; i < 3; ++i) digits[nd++] = 16;
      digits[nd++] = 15;
    }
  }
  return nd;
}

// Given the exact boundary keys and, per chunk, the counts of keys > K and == K at both
// boundaries, computes the tie windows, each chunk's first output slot and tie ordinals.
template <typename K>
void finalize_plan(Plan<K>& p, int C, const std::vector<int64_t>& gt_hi,
                   const std::vector<int64_t>& gt_lo, const std::vector<int64_t>& eq_hi,
                   const std::vector<int64_t>& eq_lo) {
  int64_t G_hi = 0, G_lo = 0;
  for (int c = 0; c < C; ++c) {
    G_hi += gt_hi[c];
    G_lo += gt_lo[c];
  }
  p.s_hi = p.cnt.k_top - G_hi;
  p.t_lo = p.cnt.k_top + p.cnt.k_keep - G_lo;
  p.nchunks = C;
  p.out_off.assign(C + 1, 0);
  p.ord_hi.assign(C, 0);
  p.ord_lo.assign(C, 0);
  int64_t oh = 0, ol = 0, out = 0;
  auto overlap = [](int64_t a0, int64_t a1, int64_t b0, int64_t b1) {
    return std::max<int64_t>(0, std::min(a1, b1) - std::max(a0, b0));
  };
  const int64_t kInfRank = INT64_MAX / 4;
  for (int c = 0; c < C; ++c) {
    p.ord_hi[c] = oh;
    p.ord_lo[c] = ol;
    p.out_off[c] = out;
    int64_t kept;
    if (p.khi == p.klo) {
      kept = overlap(oh, oh + eq_hi[c], p.s_hi, p.t_lo);
    } else {
      const int64_t strict = gt_lo[c] - gt_hi[c] - eq_hi[c];
      kept = strict + overlap(oh, oh + eq_hi[c], p.s_hi, kInfRank) +
             overlap(ol, ol + eq_lo[c], 0, p.t_lo);
    }
    out += kept;
    oh += eq_hi[c];
    ol += eq_lo[c];
  }
  p.out_off[C] = out;
}

// Finds, in the combined histogram h[0..nb), the bucket holding rank r (ranks count from the
// largest bucket down). Returns the bucket and sets *above to the count in higher buckets.
inline int64_t find_rank_bucket(const uint64_t* h, int64_t nb, int64_t r, int64_t* above) {
  int64_t cum = 0;
  for (int64_t b = nb - 1; b >= 0; --b) {
    if (cum + static_cast<int64_t>(h[b]) > r) {
      *above = cum;
      return b;
    }
    cum += static_cast<int64_t>(h[b]);
  }
  *above = cum;
  return -1;  // unreachable when r < total
}

// Histogram analysis with C chunks. `run` executes f(c) for c in [0, C) (in parallel when
// the caller wants; each chunk touches only its own histogram slice).
template <typename T, bool EF, typename Runner>
void analyze_radix(const T* g, const T* e, Plan<typename KeyTraits<T>::K>& p, int C,
                   Runner&& run) {
  using K = typename KeyTraits<T>::K;
  const int64_t n = p.cnt.n;
  int digits[8];
  const int nd = digit_schedule(KeyTraits<T>::kBits, n, digits);

  std::vector<int64_t> gt_hi(C, 0), gt_lo(C, 0), eq_hi(C, 0), eq_lo(C, 0);
  std::vector<uint8_t> nan_flag(C, 0);
  int64_t r_hi = p.cnt.k_top;                        // rank still to find within prefix
  int64_t r_lo = p.cnt.k_top + p.cnt.k_keep - 1;
  K pre_hi = 0, pre_lo = 0;                          // key prefixes found so far
  int consumed = 0;

  for (int lvl = 0; lvl < nd; ++lvl) {
    const int b = digits[lvl];
    const int64_t nb = int64_t(1) << b;
    const int shift = KeyTraits<T>::kBits - consumed - b;
    const K dmask = static_cast<K>(nb - 1);
    const bool same = (pre_hi == pre_lo);
    const int nh = same ? 1 : 2;
    std::vector<uint32_t> hist(static_cast<size_t>(C) * nh * nb, 0);

    if (lvl == 0) {
      run([&](int c) {
        uint32_t* h = hist.data() + static_cast<size_t>(c) * nb;
        const int64_t lo = chunk_begin(n, c, C), hi = chunk_begin(n, c + 1, C);
        K kmax = 0;
        for (int64_t i = lo; i < hi; ++i) {
          K k = key_of(load_v<T, EF>(g, e, i));
          kmax = std::max(kmax, k);
          h[(k >> shift) & dmask]++;
        }
        nan_flag[c] = kmax > KeyTraits<T>::kInf;
      });
      for (int c = 0; c < C; ++c) {
        if (nan_flag[c]) {
          p.has_nan = true;
          return;
        }
      }
    } else {
      const int pshift = KeyTraits<T>::kBits - consumed;
      run([&](int c) {
        uint32_t* h_hi = hist.data() + static_cast<size_t>(c) * nh * nb;
        uint32_t* h_lo = h_hi + (same ? 0 : nb);
        const int64_t lo = chunk_begin(n, c, C), hi = chunk_begin(n, c + 1, C);
        for (int64_t i = lo; i < hi; ++i) {
          K k = key_of(load_v<T, EF>(g, e, i));
          K pk = static_cast<K>(k >> pshift);
          if (pk == pre_hi) h_hi[(k >> shift) & dmask]++;
          else if (pk == pre_lo) h_lo[(k >> shift) & dmask]++;
        }
      });
    }

    // Combine chunks and locate both boundary buckets at this level.
    std::vector<uint64_t> tot(static_cast<size_t>(nh) * nb, 0);
    for (int c = 0; c < C; ++c) {
      const uint32_t* h = hist.data() + static_cast<size_t>(c) * nh * nb;
      for (int64_t j = 0; j < nh * nb; ++j) tot[j] += h[j];
    }
    int64_t above_hi = 0, above_lo = 0;
    const int64_t b_hi = find_rank_bucket(tot.data(), nb, r_hi, &above_hi);
    const uint64_t* tot_lo = tot.data() + (same ? 0 : nb);
    // When the prefixes are equal both ranks are relative to the same bucket.
    const int64_t b_lo = find_rank_bucket(tot_lo, nb, r_lo, &above_lo);
    for (int c = 0; c < C; ++c) {
      const uint32_t* h_hi = hist.data() + static_cast<size_t>(c) * nh * nb;
      const uint32_t* h_lo = h_hi + (same ? 0 : nb);
      int64_t a = 0;
      for (int64_t j = b_hi + 1; j < nb; ++j) a += h_hi[j];
      gt_hi[c] += a;
      a = 0;
      for (int64_t j = b_lo + 1; j < nb; ++j) a += h_lo[j];
      gt_lo[c] += a;
      if (lvl == nd - 1) {
        eq_hi[c] = h_hi[b_hi];
        eq_lo[c] = h_lo[b_lo];
      }
    }
    r_hi -= above_hi;
    r_lo -= above_lo;
    pre_hi = static_cast<K>((pre_hi << b) | static_cast<K>(b_hi));
    pre_lo = static_cast<K>((pre_lo << b) | static_cast<K>(b_lo));
    consumed += b;
  }

  p.khi = pre_hi;
  p.klo = pre_lo;
  finalize_plan(p, C, gt_hi, gt_lo, eq_hi, eq_lo);
}

// ------------------------------------------------------------------ sampled brackets
// For large layers: a stratified sample of the keys brackets both boundary ranks, then ONE
// counting sweep counts, per chunk, the entries above and between the brackets and copies
// the keys inside the brackets (~3% of n at the defaults) into per-chunk candidate buffers;
// the exact boundary keys are selected among the candidates. With the write pass that is
// two sweeps over the data instead of the radix path's three. If a bracket misses its rank
// (an unrepresentative sample, or heavy ties such as many exact zeros) or a candidate buffer
// fills up, the caller falls back to the radix path: exact either way, only slower.

// Inclusive key ranges [b_hi, a_hi] (around rank k_top) and [b_lo, a_lo] (around rank
// k_top + k_keep - 1), with b_hi > a_lo. When the two would overlap they are merged into
// [b_hi, a_hi] and the low range is made empty (b_lo = a_lo + 1, no key strictly between).
template <typename K>
struct Bracket {
  K a_hi, b_hi, a_lo, b_lo;
};

// One chunk's counting result. Candidate buffers are caller-owned with 16 slots of slack
// past their capacity so SIMD kernels may store whole vectors.
template <typename K>
struct ChunkCount {
  int64_t above = 0;  // keys > a_hi
  int64_t mid = 0;    // a_lo < key < b_hi
  int64_t nh = 0, nl = 0;  // candidates written
  K kmax = 0;
  bool overflow = false;
};

constexpr int kSimdSlack = 16;

template <typename T, bool EF>
void count_chunk_scalar(const T* g, const T* e, int64_t lo, int64_t hi,
                        const Bracket<typename KeyTraits<T>::K>& br,
                        typename KeyTraits<T>::K* ch, int64_t cap_h,
                        typename KeyTraits<T>::K* cl, int64_t cap_l,
                        ChunkCount<typename KeyTraits<T>::K>& out) {
  using K = typename KeyTraits<T>::K;
  K kmax = out.kmax;
  int64_t above = out.above, mid = out.mid, nh = out.nh, nl = out.nl;
  for (int64_t i = lo; i < hi; ++i) {
    const K k = key_of(load_v<T, EF>(g, e, i));
    kmax = std::max(kmax, k);
    // The classes of the chain "above a_hi / else at least b_hi / else above a_lo / else at
    // least b_lo", without branches (a chain of data-dependent branches was mispredicted
    // about one entry in four): each candidate is stored unconditionally into the slot
    // (nh <= cap_h before the store; the slot has kSimdSlack spare entries) and counted
    // when it is one.
    const bool c_above = k > br.a_hi;
    const bool c_h = !c_above & (k >= br.b_hi);
    const bool c_mid = !c_above & !c_h & (k > br.a_lo);
    const bool c_l = !c_above & !c_h & !c_mid & (k >= br.b_lo);
    above += c_above;
    mid += c_mid;
    ch[nh] = k;
    nh += c_h;
    cl[nl] = k;
    nl += c_l;
    if (nh > cap_h || nl > cap_l) { out.overflow = true; break; }
  }
  out.kmax = kmax;
  out.above = above;
  out.mid = mid;
  out.nh = nh;
  out.nl = nl;
}

// Keys at descending ranks `ranks[0..R)` (strictly increasing, each < cnt) among
// data[0..cnt); writes them to out[0..R) and changes nothing but `data`'s order.
// Radix descent: one min/max pass, one 2^11-bucket histogram of (k - lo) >> s, and for each
// bucket that holds a requested rank, its members are gathered and the same is done on them
// (each level narrows the key range 2^11-fold, so two levels almost always leave a handful;
// those are sorted). Branch-free histograms, an L1-resident table and one call for all ranks
// replace nth_element, whose mispredicted compares dominated small sampled layers.
template <typename K>
void select_desc_ranks(K* data, int64_t cnt, const int64_t* ranks, int R, K* out) {
  if (cnt <= 48) {
    std::sort(data, data + cnt, std::greater<K>());
    for (int i = 0; i < R; ++i) out[i] = data[ranks[i]];
    return;
  }
  K lo = data[0], hi = data[0];
  for (int64_t j = 1; j < cnt; ++j) {
    lo = std::min(lo, data[j]);
    hi = std::max(hi, data[j]);
  }
  if (lo == hi) {
    for (int i = 0; i < R; ++i) out[i] = lo;
    return;
  }
  constexpr int kBits = 11;
  const uint64_t range = static_cast<uint64_t>(hi - lo);
  const int bits = 64 - __builtin_clzll(range);
  const int s = bits > kBits ? bits - kBits : 0;
  const int64_t nb = static_cast<int64_t>(range >> s) + 1;
  // Four interleaved tables for large inputs: candidates crowd into few buckets, and
  // back-to-back increments of one counter serialise on store-to-load forwarding.
  uint32_t h[4][int64_t(1) << kBits];
  const int tables = cnt >= 16 * nb ? 4 : 1;
  for (int t = 0; t < tables; ++t) std::memset(h[t], 0, sizeof(uint32_t) * static_cast<size_t>(nb));
  int64_t j0 = 0;
  if (tables == 4) {
    for (; j0 + 4 <= cnt; j0 += 4) {
      h[0][static_cast<uint64_t>(data[j0] - lo) >> s]++;
      h[1][static_cast<uint64_t>(data[j0 + 1] - lo) >> s]++;
      h[2][static_cast<uint64_t>(data[j0 + 2] - lo) >> s]++;
      h[3][static_cast<uint64_t>(data[j0 + 3] - lo) >> s]++;
    }
    for (int64_t b = 0; b < nb; ++b) h[0][b] += h[1][b] + h[2][b] + h[3][b];
  }
  for (int64_t j = j0; j < cnt; ++j) h[0][static_cast<uint64_t>(data[j] - lo) >> s]++;
  int i = 0;
  int64_t cum = 0;  // entries in buckets above b
  for (int64_t b = nb - 1; b >= 0 && i < R; --b) {
    const int64_t c = h[0][b];
    const int first = i;
    while (i < R && ranks[i] < cum + c) ++i;
    if (i > first) {
      // Branch-free gather (a bucket can hold a large share: a branch would mispredict);
      // one slot of slack for the unconditional store.
      std::unique_ptr<K[]> buf(new K[static_cast<size_t>(c) + 1]);
      int64_t w = 0;
      for (int64_t j = 0; j < cnt; ++j) {
        buf[w] = data[j];
        w += static_cast<int64_t>(static_cast<uint64_t>(data[j] - lo) >> s) == b;
      }
      int64_t sub[8];
      for (int t = first; t < i; ++t) sub[t - first] = ranks[t] - cum;
      select_desc_ranks(buf.get(), c, sub, i - first, out + first);
    }
    cum += c;
  }
}

// Layers up to this size are analysed on one thread from a copy of their keys, in three
// sweeps of the copy: keys with their min/max (NaN check included), one histogram of the
// key range (about n/4 buckets), one branch-free gather of the two boundary buckets; then
// the exact keys and the counts above them come from the gathered few percent of n
// (select_desc_ranks). Below ~2^15 entries that beats histograms over the whole key width
// (their clearing and scanning cost more than n) and the sampled path (its sample is a
// large share of n).
constexpr int64_t kDirectMax = int64_t(1) << 15;

// Key range [lo, hi] mapped to at most 2^bits buckets: bucket(k) = (k - lo) >> shift.
template <typename K>
struct KeyBuckets {
  K lo;
  int shift;
  int64_t nb;
  KeyBuckets(K lo_, K hi_, int bits) : lo(lo_) {
    const uint64_t range = static_cast<uint64_t>(hi_ - lo_);
    const int w = range ? 64 - __builtin_clzll(range) : 0;
    shift = w > bits ? w - bits : 0;
    nb = static_cast<int64_t>(range >> shift) + 1;
  }
  inline uint32_t operator()(K k) const {
    return static_cast<uint32_t>(static_cast<uint64_t>(k - lo) >> shift);
  }
};

// `keys_fn(keys, kmin, kmax)` writes the n keys and their min/max with a vector kernel and
// returns true, or returns false (no kernel for this dtype and CPU: the scalar loop runs).
template <typename T, bool EF, typename KeysFn>
void analyze_direct(const T* g, const T* e, Plan<typename KeyTraits<T>::K>& p, KeysFn&& keys_fn) {
  using K = typename KeyTraits<T>::K;
  const int64_t n = p.cnt.n;
  // Key copy, then candidates of the (at most two) boundary buckets behind it.
  static thread_local std::vector<K> buf_tl;
  buf_tl.resize(static_cast<size_t>(2 * n + 2));
  K* keys = buf_tl.data();
  K kmax = 0, kmin = std::numeric_limits<K>::max();
  if (!keys_fn(keys, kmin, kmax)) {
    for (int64_t i = 0; i < n; ++i) {
      const K k = key_of(load_v<T, EF>(g, e, i));
      kmax = std::max(kmax, k);
      kmin = std::min(kmin, k);
      keys[i] = k;
    }
  }
  if (kmax > KeyTraits<T>::kInf) {
    p.has_nan = true;
    return;
  }
  const int64_t r_hi = p.cnt.k_top, r_lo = p.cnt.k_top + p.cnt.k_keep - 1;
  // One histogram of the key range with about n/4 buckets (at most 2^11, an L1-resident
  // table; at least 2^6): the boundary buckets then hold a few percent of n on smooth data.
  const int bits = std::max(6, std::min(11, 63 - __builtin_clzll(static_cast<uint64_t>(n) | 1) - 2));
  const KeyBuckets<K> bk(kmin, kmax, bits);
  uint32_t h[4][int64_t(1) << 11];
  const bool four = n >= 16 * bk.nb;  // interleaved tables: repeated buckets serialise
  std::memset(h[0], 0, sizeof(uint32_t) * static_cast<size_t>(bk.nb));
  int64_t i0 = 0;
  if (four) {
    for (int t = 1; t < 4; ++t) std::memset(h[t], 0, sizeof(uint32_t) * static_cast<size_t>(bk.nb));
    for (; i0 + 4 <= n; i0 += 4) {
      h[0][bk(keys[i0])]++;
      h[1][bk(keys[i0 + 1])]++;
      h[2][bk(keys[i0 + 2])]++;
      h[3][bk(keys[i0 + 3])]++;
    }
    for (int64_t b = 0; b < bk.nb; ++b) h[0][b] += h[1][b] + h[2][b] + h[3][b];
  }
  for (int64_t i = i0; i < n; ++i) h[0][bk(keys[i])]++;
  // Boundary buckets and the counts above them.
  int64_t b_hi = -1, b_lo = -1, above_hi = 0, above_lo = 0, cum = 0;
  for (int64_t b = bk.nb - 1; b >= 0 && b_lo < 0; --b) {
    const int64_t c = h[0][b];
    if (b_hi < 0 && cum + c > r_hi) {
      b_hi = b;
      above_hi = cum;
    }
    if (cum + c > r_lo) {
      b_lo = b;
      above_lo = cum;
    }
    cum += c;
  }
  // One branch-free gather of both buckets' keys (each append lands in its slot's next
  // entry, which only a member claims).
  K* ch = keys + n;
  const int64_t nh_cap = h[0][b_hi];
  K* cl = ch + nh_cap + 1;
  int64_t nh = 0, nl = 0;
  const uint32_t ubh = static_cast<uint32_t>(b_hi), ubl = static_cast<uint32_t>(b_lo);
  if (b_hi == b_lo) {
    for (int64_t i = 0; i < n; ++i) {
      ch[nh] = keys[i];
      nh += bk(keys[i]) == ubh;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t b = bk(keys[i]);
      ch[nh] = keys[i];
      nh += b == ubh;
      cl[nl] = keys[i];
      nl += b == ubl;
    }
  }
  // Exact keys inside the gathered buckets, and the counts of larger keys.
  auto count_gt = [](const K* a, int64_t m, K key) {
    int64_t c = 0;
    for (int64_t j = 0; j < m; ++j) c += a[j] > key;
    return c;
  };
  int64_t gt_hi, gt_lo;
  if (b_hi == b_lo) {
    const int64_t rr[2] = {r_hi - above_hi, r_lo - above_hi};
    K kk[2];
    if (rr[0] == rr[1]) {
      select_desc_ranks(ch, nh, rr, 1, kk);
      kk[1] = kk[0];
    } else {
      select_desc_ranks(ch, nh, rr, 2, kk);
    }
    p.khi = kk[0];
    p.klo = kk[1];
    gt_hi = above_hi + count_gt(ch, nh, p.khi);
    gt_lo = above_hi + count_gt(ch, nh, p.klo);
  } else {
    const int64_t rh = r_hi - above_hi, rl = r_lo - above_lo;
    select_desc_ranks(ch, nh, &rh, 1, &p.khi);
    select_desc_ranks(cl, nl, &rl, 1, &p.klo);
    gt_hi = above_hi + count_gt(ch, nh, p.khi);
    gt_lo = above_lo + count_gt(cl, nl, p.klo);
  }
  p.s_hi = p.cnt.k_top - gt_hi;
  p.t_lo = p.cnt.k_top + p.cnt.k_keep - gt_lo;
  p.nchunks = 1;
  p.out_off = {0, p.cnt.k_keep};
  p.ord_hi = {0};
  p.ord_lo = {0};
}

// Sample positions: one per stratum of n/m entries, at a hashed offset inside it.
inline int64_t sample_pos(int64_t j, int64_t stride) {
  uint64_t h = static_cast<uint64_t>(j) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 32;
  return j * stride + static_cast<int64_t>(h % static_cast<uint64_t>(stride));
}

template <typename T, bool EF, typename Runner, typename CountFn>
bool analyze_bracketed(Plan<typename KeyTraits<T>::K>& p, int C,
                       const Bracket<typename KeyTraits<T>::K>& br, bool merged, double cap_fh,
                       double cap_fl, Runner&& run, CountFn&& count,
                       std::vector<ChunkCount<typename KeyTraits<T>::K>>* miss_cc = nullptr);

// Layers this large try the sampled path first.
constexpr int64_t kSampleMin = int64_t(1) << 15;

// `count(lo, hi, br, ch, cap_h, cl, cap_l, out)` counts entries [lo, hi) (SIMD where
// available).
// Returns false when the caller must fall back to the radix path.
template <typename T, bool EF, typename Runner, typename CountFn>
bool analyze_sampled(const T* g, const T* e, Plan<typename KeyTraits<T>::K>& p, int C,
                     Runner&& run, CountFn&& count) {
  using K = typename KeyTraits<T>::K;
  const int64_t n = p.cnt.n;
  // ~1/128 of the layer, within [2048, 16384]: random loads are the sample's cost.
  const int64_t m = std::min<int64_t>(16384, std::max<int64_t>(2048, n / 128));
  // Runs of kRun consecutive entries (one cache line of float32) at hashed offsets in
  // m / kRun strata: random single-entry loads cost a DRAM miss each (ResNet-18 profile:
  // ~10% of the time), runs amortise it 8x. Spatial correlation inside a run only widens
  // the sampling error, which the bracket margin and the exact fallback absorb.
  constexpr int64_t kRun = 8;
  const int64_t strata = m / kRun;
  const int64_t stride = n / strata;
  std::unique_ptr<K[]> smp(new K[static_cast<size_t>(m)]);
  // Each run is a DRAM miss per stream: prefetch kAhead runs ahead so misses overlap.
  constexpr int64_t kAhead = 8;
  auto run_at = [&](int64_t j) { return std::min(sample_pos(j, stride), n - kRun); };
  for (int64_t j = 0; j < strata; ++j) {
    if (j + kAhead < strata) {
      const int64_t a = run_at(j + kAhead);
      __builtin_prefetch(g + a);
      if constexpr (EF) __builtin_prefetch(e + a);
    }
    const int64_t at = run_at(j);
    for (int64_t t = 0; t < kRun; ++t) smp[j * kRun + t] = key_of(load_v<T, EF>(g, e, at + t));
  }

  // Bracket each boundary rank by +-z standard deviations of the sampled quantile
  // (z = 4: a miss costs a fallback, so be generous; 2.9% of n are candidates at the
  // defaults with m = 32768).
  const int64_t r_hi = p.cnt.k_top, r_lo = p.cnt.k_top + p.cnt.k_keep - 1;
  auto margin = [&](int64_t r) {
    const double q = static_cast<double>(r) / static_cast<double>(n);
    return static_cast<int64_t>(4.0 * std::sqrt(static_cast<double>(m) * q * (1.0 - q))) + 4;
  };
  const double scale = static_cast<double>(m) / static_cast<double>(n);
  const int64_t ph = static_cast<int64_t>(static_cast<double>(r_hi) * scale);
  const int64_t pl = static_cast<int64_t>(static_cast<double>(r_lo) * scale);
  const int64_t dh = margin(r_hi), dl = margin(r_lo);
  // The four sample quantiles, all in one radix descent (positions sorted and deduplicated).
  const int64_t want[4] = {ph - dh, ph + dh, pl - dl, pl + dl};
  int64_t pos[4];
  int np = 0;
  for (int64_t w : want)
    if (w >= 0 && w < m) pos[np++] = w;
  std::sort(pos, pos + np);
  np = static_cast<int>(std::unique(pos, pos + np) - pos);
  K qk[4];
  select_desc_ranks(smp.get(), m, pos, np, qk);
  auto at_rank = [&](int64_t w) { return qk[std::lower_bound(pos, pos + np, w) - pos]; };
  Bracket<K> br;
  br.a_hi = (ph - dh < 0) ? std::numeric_limits<K>::max() : at_rank(ph - dh);
  br.b_hi = (ph + dh >= m) ? K(0) : at_rank(ph + dh);
  br.a_lo = (pl - dl < 0) ? std::numeric_limits<K>::max() : at_rank(pl - dl);
  br.b_lo = (pl + dl >= m) ? K(0) : at_rank(pl + dl);
  const bool merged = br.a_lo >= br.b_hi;
  if (merged) {
    br.b_hi = br.b_lo;
    br.a_lo = br.b_hi == 0 ? K(0) : static_cast<K>(br.b_hi - 1);
    br.b_lo = static_cast<K>(br.a_lo + 1);
  }
  const double frac_h = merged ? static_cast<double>(pl + dl - ph + dh) / m
                               : static_cast<double>(2 * dh) / m;
  const double frac_l = merged ? 0.0 : static_cast<double>(2 * dl) / m;
  // 3x the expected candidate count: an overflow only means a fallback.
  return analyze_bracketed<T, EF>(p, C, br, merged, 3.0 * frac_h, 3.0 * frac_l, run, count);
}

// Both boundary ranks from given brackets: ONE counting sweep counts, per chunk, the entries
// above and between the brackets and copies the keys inside them into per-chunk candidate
// buffers (`cap_h` / `cap_l`: their capacity as a fraction of the chunk); the exact keys are
// selected among the candidates. `merged`: one bracket [b_lo, a_hi] holds both ranks (the
// low range is empty). Returns false, having written nothing but `p.has_nan`, when a rank is
// outside its bracket or a buffer overflows: the caller then takes another path.
template <typename T, bool EF, typename Runner, typename CountFn>
bool analyze_bracketed(Plan<typename KeyTraits<T>::K>& p, int C,
                       const Bracket<typename KeyTraits<T>::K>& br, bool merged, double cap_fh,
                       double cap_fl, Runner&& run, CountFn&& count,
                       std::vector<ChunkCount<typename KeyTraits<T>::K>>* miss_cc) {
  using K = typename KeyTraits<T>::K;
  const int64_t n = p.cnt.n;
  const int64_t r_hi = p.cnt.k_top, r_lo = p.cnt.k_top + p.cnt.k_keep - 1;
  std::vector<ChunkCount<K>> cc(C);
  std::vector<int64_t> cap_h(C), cap_l(C), base_h(C + 1, 0), base_l(C + 1, 0);
  for (int c = 0; c < C; ++c) {
    const int64_t len = chunk_begin(n, c + 1, C) - chunk_begin(n, c, C);
    cap_h[c] = std::min<int64_t>(len, static_cast<int64_t>(cap_fh * len) + 256);
    cap_l[c] = merged ? 0 : std::min<int64_t>(len, static_cast<int64_t>(cap_fl * len) + 256);
    base_h[c + 1] = base_h[c] + cap_h[c] + kSimdSlack;
    base_l[c + 1] = base_l[c] + cap_l[c] + kSimdSlack;
  }
  // Uninitialised: only the counted prefix of each chunk's slice is ever read.
  std::unique_ptr<K[]> cand_h(new K[static_cast<size_t>(base_h[C])]);
  std::unique_ptr<K[]> cand_l(new K[static_cast<size_t>(base_l[C])]);
  run([&](int c) {
    count(c, chunk_begin(n, c, C), chunk_begin(n, c + 1, C), br, cand_h.get() + base_h[c],
          cap_h[c], cand_l.get() + base_l[c], cap_l[c], cc[c]);
  });
  int64_t above = 0, nh = 0, mid = 0, nl = 0;
  for (int c = 0; c < C; ++c) {
    if (cc[c].kmax > KeyTraits<T>::kInf && !cc[c].overflow) {
      p.has_nan = true;
      return true;
    }
    if (cc[c].overflow) return false;
    above += cc[c].above;
    nh += cc[c].nh;
    mid += cc[c].mid;
    nl += cc[c].nl;
  }
  // Both ranks must fall inside their brackets (on a miss, `miss_cc` receives the chunk
  // counts: the one-sweep path may still find both ranks among its in-range entries).
  const int64_t before_lo = merged ? above : above + nh + mid;
  const int64_t n_lo = merged ? nh : nl;
  if (!(above <= r_hi && r_hi < above + nh) || !(before_lo <= r_lo && r_lo < before_lo + n_lo)) {
    if (miss_cc != nullptr) *miss_cc = std::move(cc);
    return false;
  }

  // Exact keys: a radix descent over the gathered candidates (order inside chunks is irrelevant
  // to the per-chunk counts taken afterwards).
  auto gather = [&](const K* src, const std::vector<int64_t>& base, bool hi_side) {
    std::vector<K> all;
    all.reserve(static_cast<size_t>(hi_side ? nh : nl));
    for (int c = 0; c < C; ++c) {
      const int64_t cnt = hi_side ? cc[c].nh : cc[c].nl;
      all.insert(all.end(), src + base[c], src + base[c] + cnt);
    }
    return all;
  };
  std::vector<K> all_h = gather(cand_h.get(), base_h, true);
  const int64_t rh = r_hi - above;
  if (merged) {
    // Both ranks inside one candidate set: one descent finds both (rh <= r_lo - above).
    const int64_t rr[2] = {rh, r_lo - above};
    K kk[2];
    if (rr[0] == rr[1]) {
      select_desc_ranks(all_h.data(), nh, rr, 1, kk);
      kk[1] = kk[0];
    } else {
      select_desc_ranks(all_h.data(), nh, rr, 2, kk);
    }
    p.khi = kk[0];
    p.klo = kk[1];
  } else {
    select_desc_ranks(all_h.data(), nh, &rh, 1, &p.khi);
    std::vector<K> all_l = gather(cand_l.get(), base_l, false);
    const int64_t rl = r_lo - before_lo;
    select_desc_ranks(all_l.data(), nl, &rl, 1, &p.klo);
  }

  std::vector<int64_t> gt_hi(C), gt_lo(C), eq_hi(C), eq_lo(C);
  for (int c = 0; c < C; ++c) {
    const K* h = cand_h.get() + base_h[c];
    const K* l = cand_l.get() + base_l[c];
    int64_t g_h = 0, e_h = 0, g_l = 0, e_l = 0;
    for (int64_t j = 0; j < cc[c].nh; ++j) {
      g_h += h[j] > p.khi;
      e_h += h[j] == p.khi;
      g_l += h[j] > p.klo;
      e_l += h[j] == p.klo;
    }
    gt_hi[c] = cc[c].above + g_h;
    eq_hi[c] = e_h;
    if (merged) {
      gt_lo[c] = cc[c].above + g_l;
      eq_lo[c] = e_l;
    } else {
      g_l = e_l = 0;
      for (int64_t j = 0; j < cc[c].nl; ++j) {
        g_l += l[j] > p.klo;
        e_l += l[j] == p.klo;
      }
      gt_lo[c] = cc[c].above + cc[c].nh + cc[c].mid + g_l;
      eq_lo[c] = e_l;
    }
  }
  finalize_plan(p, C, gt_hi, gt_lo, eq_hi, eq_lo);
  return true;
}

// ------------------------------------------------------------------ band hints
// Steady state: with error feedback the same layer is selected every step and its two
// boundary keys move little. A hint row per layer holds last step's exact keys and a margin
// around each; when both ranks still fall inside [key - margin, key + margin], the bracketed
// count sweep (analyze_bracketed) finds the exact keys without sampling or histograms. When a
// rank falls outside (or a candidate buffer overflows) the caller takes the unhinted path, so
// the result never depends on the hint: only the time does.
//
// Row layout (int64, kHintCols): {key bits of the dtype that wrote it (0: empty), khi, klo,
// margin_hi, margin_lo, move_hi, move_lo}: last step's exact keys, the half-widths of the
// brackets, and the keys' last signed moves. The brackets are centred on key + move (the
// top boundary of a layer with error feedback drifts one way, as the dropped top entries
// accumulate in the residual). Keys, margins and moves are in key units (one unit = one ulp
// of |v|, about 2^-kMant relative). Rows may hold anything: every field is clamped to the
// key range, a row written for another dtype counts as empty.
constexpr int kHintCols = 7;

template <typename T>
bool hint_bracket(const int64_t* row, Bracket<typename KeyTraits<T>::K>& br, bool& merged,
                  typename KeyTraits<T>::K* centre_hi = nullptr,
                  typename KeyTraits<T>::K* centre_lo = nullptr, int scale8 = 8) {
  using K = typename KeyTraits<T>::K;
  if (row[0] != KeyTraits<T>::kBits) return false;
  const int64_t kmax = static_cast<int64_t>(KeyTraits<T>::kMask);
  auto clamp = [&](int64_t v, int64_t lo) { return std::min(std::max(v, lo), kmax); };
  // Centre = key + move, in [0, kmax] (all terms within [-kmax, kmax]: no overflow).
  const int64_t chi = clamp(clamp(row[1], 0) + clamp(row[5], -kmax), 0);
  const int64_t clo = clamp(clamp(row[2], 0) + clamp(row[6], -kmax), 0);
  // `scale8`: margins times scale8 / 8 (the one-sweep path, where a wide bracket is cheap).
  auto scaled = [&](int64_t m) {
    const __int128 x = static_cast<__int128>(clamp(m, 0)) * scale8 / 8;
    return static_cast<int64_t>(std::min<__int128>(x, kmax));
  };
  const int64_t mh = scaled(row[3]), ml = scaled(row[4]);
  if (centre_hi != nullptr) *centre_hi = static_cast<K>(chi);
  if (centre_lo != nullptr) *centre_lo = static_cast<K>(clo);
  const uint64_t a_hi = static_cast<uint64_t>(std::min(chi + mh, kmax));
  const uint64_t b_hi = static_cast<uint64_t>(std::max<int64_t>(chi - mh, 0));
  const uint64_t a_lo = static_cast<uint64_t>(std::min(clo + ml, kmax));
  const uint64_t b_lo = static_cast<uint64_t>(std::max<int64_t>(clo - ml, 0));
  // The count sweep needs a_hi >= b_hi > a_lo >= b_lo; otherwise one merged range
  // [min(b_lo, b_hi), max(a_hi, a_lo)] holds both ranks (as on the sampled path).
  merged = a_lo >= b_hi;
  if (merged) {
    const uint64_t lo = std::min(b_lo, b_hi), hi = std::max(a_hi, a_lo);
    br.a_hi = static_cast<K>(hi);
    br.b_hi = static_cast<K>(lo);
    br.a_lo = lo == 0 ? K(0) : static_cast<K>(lo - 1);
    br.b_lo = static_cast<K>(br.a_lo + 1);
  } else {
    br.a_hi = static_cast<K>(a_hi);
    br.b_hi = static_cast<K>(b_hi);
    br.a_lo = static_cast<K>(a_lo);
    br.b_lo = static_cast<K>(b_lo);
  }
  return true;
}

// After a layer's exact keys are known: next step's move is this step's; its margin is twice
// this step's prediction error (|move - predicted move|) plus a floor of 2^-(kMant-9) relative
// (0.2%; one key unit for bfloat16), and decays by at most a quarter per step, so one calm
// step after a jumpy one does not shrink the bracket into a miss. (Real ResNet-18 gradients
// drifting as AR(1), correlation 0.9: without the move the top bracket missed on most
// large layers, its key rising by about 1.3 margins a step.)
template <typename T>
void hint_update(int64_t* row, typename KeyTraits<T>::K khi, typename KeyTraits<T>::K klo) {
  const int64_t kmax = static_cast<int64_t>(KeyTraits<T>::kMask);
  const int64_t floor = int64_t(1) << std::max(0, KeyTraits<T>::kMant - 9);
  const int64_t hi = static_cast<int64_t>(khi), lo = static_cast<int64_t>(klo);
  int64_t mh = floor, ml = floor, vh = 0, vl = 0;
  if (row[0] == KeyTraits<T>::kBits) {
    auto clamp = [&](int64_t v, int64_t lo_) { return std::min(std::max(v, lo_), kmax); };
    vh = hi - clamp(row[1], 0);  // within [-kmax, kmax]
    vl = lo - clamp(row[2], 0);
    // Prediction errors, each within [0, 2 kmax]: no overflow in int64 for 63-bit keys
    // only because 2 * kmax < 2^64; computed in uint64.
    auto err = [&](int64_t v, int64_t pred) {
      const int64_t p = clamp(pred, -kmax);
      return v > p ? static_cast<uint64_t>(v) - static_cast<uint64_t>(p)
                   : static_cast<uint64_t>(p) - static_cast<uint64_t>(v);
    };
    auto margin = [&](uint64_t e, int64_t old) {
      const uint64_t m = std::min<uint64_t>(2 * std::min<uint64_t>(e, kmax) + floor, kmax);
      return static_cast<int64_t>(std::max<uint64_t>(m, clamp(old, 0) / 4 * 3));
    };
    mh = margin(err(vh, row[5]), row[3]);
    ml = margin(err(vl, row[6]), row[4]);
  }
  row[0] = KeyTraits<T>::kBits;
  row[1] = hi;
  row[2] = lo;
  row[3] = mh;
  row[4] = ml;
  row[5] = vh;
  row[6] = vl;
}

// What the write pass produces.
enum class Sink { kSparse, kDense, kInplace };

// Decides one entry: kept or not, advancing the tie ordinals. Shared by the scalar pass and
// the SIMD passes' tie fallback.
template <typename K>
struct Classifier {
  K khi, klo;
  int64_t s_hi, t_lo;
  bool same;
  inline bool operator()(K k, int64_t& o_hi, int64_t& o_lo) const {
    if (k > klo && k < khi) return true;
    if (k == khi) {
      const int64_t o = o_hi++;
      return same ? (o >= s_hi && o < t_lo) : (o >= s_hi);
    }
    if (k == klo) return o_lo++ < t_lo;
    return false;
  }
};

// Scalar write pass over [lo, hi) of one chunk.
template <typename T, bool EF, Sink S>
void write_scalar(const T* g, T* e, T* dense, int64_t lo, int64_t hi,
                  const Classifier<typename KeyTraits<T>::K>& cls, int64_t& o_hi,
                  int64_t& o_lo, int64_t& pos_io, int64_t out_end, int64_t* idx, T* val) {
  // Entries that are not a boundary key are classified without branches (the classifier's
  // chain was mispredicted on about one entry in five), and the sparse append is
  // branch-free too: every entry is written at the next slot, which only a kept one claims
  // (`out_end`: the slice's end; the slot past it, another thread's, is never written).
  int64_t pos = pos_io;
  for (int64_t i = lo; i < hi; ++i) {
    const T v = load_v<T, EF>(g, e, i);
    const auto k = key_of(v);
    bool kept;
    if (__builtin_expect((k == cls.khi) | (k == cls.klo), 0)) {
      kept = cls(k, o_hi, o_lo);
    } else {
      kept = (k > cls.klo) & (k < cls.khi);
    }
    if constexpr (S == Sink::kSparse) {
      if (pos < out_end) {
        idx[pos] = i;
        val[pos] = v;
      }
      pos += kept;
      if constexpr (EF) e[i] = kept ? T(0) : v;
    } else if constexpr (S == Sink::kDense) {
      dense[i] = kept ? v : T(0);
    } else {  // in place on g (const_cast by the caller's contract)
      if (!kept) const_cast<T*>(g)[i] = T(0);
    }
  }
  pos_io = pos;
}

// ------------------------------------------------------------------ one-sweep hinted path
// Out-of-place error feedback (select_ef_multi_into): the new residual goes to a second
// buffer `eo`, so the old residual `e` stays intact whatever happens and the step may write
// while it counts. With hinted brackets (two separate ones: a merged bracket's window would
// hold the whole band), ONE sweep over g and e
//   - counts the keys above a_hi (the dropped top);
//   - appends every in-range entry (chunk offset and value, in index order) to a per-chunk
//     in-range buffer (~k_keep plus the windows; cache-resident for one layer);
//   - writes eo with a *tentative* decision: 0 where the key is strictly between the
//     predicted keys (the bracket centres p_lo < k < p_hi), else v;
//   - appends the keys of the hi window [b_hi, a_hi] and the lo window [b_lo, a_lo] to one
//     more per-chunk buffer (split by value afterwards: the windows do not overlap).
// The exact keys then come from the window keys (or, when a boundary moved past its window
// but stayed in range, from all in-range keys), and a fix-up pass over the in-range buffer
// only applies the tie rule, writes indices/values at their planned slots and rewrites eo
// where the tentative decision was wrong (entries between a predicted and the true key:
// few, however wide the brackets). A NaN, a rank outside [b_lo, a_hi] or a full buffer
// leaves eo half-written and the caller redoes the layer from e, which is never written.

// Sweep bounds: the bracket plus the predicted keys (tentative keep: p_lo < k < p_hi).
template <typename K>
struct SweepBounds {
  Bracket<K> br;
  K p_hi, p_lo;
};

// One chunk's in-range buffer: entries with key in [b_lo, a_hi], in index order. `idx` holds
// offsets from the chunk start (chunks are < 2^31 entries); both arrays have kSimdSlack
// slots past `cap` so SIMD sweeps may store whole vectors.
template <typename T>
struct InRange {
  int32_t* idx = nullptr;
  T* val = nullptr;
  int64_t cap = 0;
  int64_t n = 0;
  // Keys of the in-range entries in the hi window [b_hi, a_hi] or the lo window
  // [b_lo, a_lo], in index order, appended by the same sweep (the slots of `idx`).
  typename KeyTraits<T>::K* w = nullptr;
  int64_t nw = 0;
};

template <typename K>
struct SweepCount {
  int64_t above = 0;  // keys > a_hi
  K kmax = 0;
  bool overflow = false;
};

template <typename K>
inline bool tentative_keep(K k, const SweepBounds<K>& sb) {
  return (k > sb.p_lo) & (k < sb.p_hi);
}

// Scalar sweep of entries [from, hi) of the chunk that starts at `base` (the SIMD sweeps
// finish their tail here). Accumulates into `out` and `t`.
template <typename T>
void sweep_chunk_scalar(const T* g, const T* e, T* eo, int64_t base, int64_t from, int64_t hi,
                        const SweepBounds<typename KeyTraits<T>::K>& sb, InRange<T>& t,
                        SweepCount<typename KeyTraits<T>::K>& out) {
  using K = typename KeyTraits<T>::K;
  const Bracket<K>& br = sb.br;
  K kmax = out.kmax;
  int64_t above = out.above, nt = t.n, nw = t.nw;
  for (int64_t i = from; i < hi; ++i) {
    const T v = load_v<T, true>(g, e, i);
    const K k = key_of(v);
    kmax = std::max(kmax, k);
    const bool c_above = k > br.a_hi;
    const bool c_in = !c_above & (k >= br.b_lo);
    above += c_above;
    eo[i] = (c_in & tentative_keep(k, sb)) ? T(0) : v;
    t.idx[nt] = static_cast<int32_t>(i - base);  // branch-free appends
    t.val[nt] = v;
    t.w[nw] = k;
    nt += c_in;
    nw += c_in & ((k >= br.b_hi) | (k <= br.a_lo));
    if (nt > t.cap) { out.overflow = true; break; }
  }
  out.kmax = kmax;
  out.above = above;
  t.n = nt;
  t.nw = nw;
}

// Fix-up of one chunk after the exact keys are known: the in-range entries [from, t.n) in
// index order through the classifier (tie ordinals advance as in the write pass), kept ones
// appended at `pos`, and eo rewritten where the sweep's tentative decision was wrong.
template <typename T>
void fixup_chunk_scalar(const InRange<T>& t, int64_t from, int64_t base,
                        const SweepBounds<typename KeyTraits<T>::K>& sb,
                        const Classifier<typename KeyTraits<T>::K>& cls, int64_t& o_hi,
                        int64_t& o_lo, int64_t& pos_io, int64_t out_end, int64_t* idx, T* val,
                        T* eo) {
  int64_t pos = pos_io;
  for (int64_t j = from; j < t.n; ++j) {
    const T v = t.val[j];
    const auto k = key_of(v);
    const int64_t i = base + t.idx[j];
    bool kept;
    if (__builtin_expect((k == cls.khi) | (k == cls.klo), 0)) {
      kept = cls(k, o_hi, o_lo);
    } else {
      kept = (k > cls.klo) & (k < cls.khi);
    }
    if (pos < out_end) {
      idx[pos] = i;
      val[pos] = v;
    }
    pos += kept;
    if (__builtin_expect(kept != tentative_keep(k, sb), 0)) eo[i] = kept ? T(0) : v;
  }
  pos_io = pos;
}

}  // namespace dgp
