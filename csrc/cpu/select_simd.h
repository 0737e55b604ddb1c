// SIMD key, counting and write sweeps (ordered compaction) for every float dtype, chosen at
// run time. float32, bfloat16 and float16 share one template per SIMD level (v's bits in
// 32-bit lanes; see "value lanes" below); float64 has its own kernels (64-bit lanes).
//
// Built with per-function target attributes (never -march=native), so one binary runs on
// any x86-64 and uses AVX-512 or AVX2 only where the CPU has it. Every vector is compacted
// on the vector path; in a vector holding a boundary-key tie only the tie lanes are
// classified one by one (tie_keep_bits: the scalar Classifier's ordinal rule, lane order).
// Results are bit-identical to the scalar pass by construction (same classification, same
// order).
//
// Zen 4 note: vpcompressps with a *memory* destination is microcoded and slow there, so we
// compress into a register and store the whole vector (or a masked store near the end of
// the chunk's output slice, which must never be overrun: the next slice belongs to another
// thread).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "select_core.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DGP_X86 1
#else
#define DGP_X86 0
#endif

namespace dgp {

// Software prefetch distance of the streaming sweeps, in 64-byte lines ahead (0 = off).
// One line of g (and of e) is consumed per 16 float32 entries, so one prefetch per stream
// per iteration keeps the distance constant. Tuned with _C.set_prefetch (bench/README.md).
inline std::atomic<int>& prefetch_lines() {
  static std::atomic<int> lines{0};
  return lines;
}

enum class Simd : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline Simd detect_simd() {
#if DGP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("f16c"))
    return Simd::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") &&
      __builtin_cpu_supports("f16c"))
    return Simd::kAvx2;
#endif
  return Simd::kScalar;
}

// Kept bits of the lanes of one vector that equal a boundary key (`tie_hi`: lanes == khi,
// `tie_lo`: lanes == klo), in lane order, advancing the tie ordinals exactly as the scalar
// Classifier does entry by entry (a lane equal to khi never advances o_lo). Only tie lanes
// are visited, so a vector holding a tie stays on the vector path.
template <typename K>
inline uint32_t tie_keep_bits(const Classifier<K>& cls, uint32_t tie_hi, uint32_t tie_lo,
                              int64_t& o_hi, int64_t& o_lo) {
  uint32_t kept = 0;
  for (uint32_t m = tie_hi; m; m &= m - 1) {
    const int64_t o = o_hi++;
    const bool k = cls.same ? (o >= cls.s_hi && o < cls.t_lo) : (o >= cls.s_hi);
    kept |= static_cast<uint32_t>(k) << __builtin_ctz(m);
  }
  for (uint32_t m = tie_lo & ~tie_hi; m; m &= m - 1)
    kept |= static_cast<uint32_t>(o_lo++ < cls.t_lo) << __builtin_ctz(m);
  return kept;
}

#if DGP_X86
// 8 lanes of 32 bits, all ones where bit j of `bits` is set.
__attribute__((target("avx2"))) inline __m256i lanes_of_bits8(int bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), sel), sel);
}

// 4 lanes of 64 bits, all ones where bit j of `bits` is set.
__attribute__((target("avx2"))) inline __m256i lanes_of_bits4(int bits) {
  const __m256i sel = _mm256_setr_epi64x(1, 2, 4, 8);
  return _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(bits), sel), sel);
}

// ------------------------------------------------------------------ value lanes
// float32 and the 16-bit formats share every 32-bit-lane kernel below: v's raw bits sit in
// 32-bit lanes (16 per AVX-512 step, 8 per AVX2 step), so the compares and compresses are
// the same for all three; a 16-bit format is widened on load and narrowed back to 16 bits
// before each store. With error feedback, a 16-bit v = g + e is computed as c10 and torch
// do: both widened to float, one float add, rounded once to the 16-bit format (bfloat16:
// round to nearest even on the bit pattern, which is c10's round_to_nearest_even for every
// non-NaN float; float16: vcvtps2ph with round-to-nearest-even, the IEEE conversion c10
// implements). A NaN sum rounds to a NaN in both formats, so the key test catches it.
template <typename T>
struct Is16 : std::integral_constant<bool, std::is_same_v<T, c10::BFloat16> ||
                                               std::is_same_v<T, c10::Half>> {};

// The value types whose entries take one 32-bit lane each.
template <typename T>
inline constexpr bool kLanes32 = std::is_same_v<T, float> || Is16<T>::value;

// The key of a 32-bit lane: v's bits without the sign bit (float32 or a 16-bit format).
template <typename T>
inline constexpr int kKeyMask32 = sizeof(T) == 4 ? 0x7fffffff : 0x7fff;

#define DGP_AVX512 "avx512f,avx512vl,avx512dq,avx512bw,popcnt,f16c"
#define DGP_AVX2 "avx2,popcnt,f16c"

// Software prefetch in the in-place float32 sweeps with AVX-512 (prefetch_lines() ahead;
// the 16-bit kernels never prefetch). Prefetching is a template parameter so that the
// default loop carries no run-time check: the check and its offset register had cost the
// float32 write pass 3% (one more register spilled to a vector register per iteration).
template <typename T>
inline constexpr bool kPrefetchable = std::is_same_v<T, float>;
template <typename T>
inline bool prefetch_on() {
  return kPrefetchable<T> && prefetch_lines().load(std::memory_order_relaxed) > 0;
}
template <bool EF, typename T>
inline void prefetch_ahead(const T* g, const T* e, int64_t i, int64_t pf) {
  _mm_prefetch(reinterpret_cast<const char*>(g + i + pf), _MM_HINT_T0);
  if constexpr (EF) _mm_prefetch(reinterpret_cast<const char*>(e + i + pf), _MM_HINT_T0);
}

// 16 raw 16-bit entries of v (widened to 32-bit lanes) at i.
template <typename T, bool EF>
__attribute__((target(DGP_AVX512))) inline __m512i load16_avx512(const T* g, const T* e,
                                                                 int64_t i) {
  const __m512i gr = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i)));
  if constexpr (!EF) {
    return gr;
  } else {
    const __m512i er =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(e + i)));
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m512 s = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(gr, 16)),
                                     _mm512_castsi512_ps(_mm512_slli_epi32(er, 16)));
      const __m512i u = _mm512_castps_si512(s);
      const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                             _mm512_set1_epi32(1)),
                                            _mm512_set1_epi32(0x7fff));
      return _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    } else {
      const __m512 s = _mm512_add_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(gr)),
                                     _mm512_cvtph_ps(_mm512_cvtepi32_epi16(er)));
      return _mm512_cvtepu16_epi32(_mm512_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

// v = g (+ e with EF) at i in 16 lanes of 32 bits.
template <typename T, bool EF = true>
__attribute__((target(DGP_AVX512))) inline __m512i v_lanes(const T* g, const T* e, int64_t i) {
  if constexpr (std::is_same_v<T, float> && EF) {
    return _mm512_castps_si512(_mm512_add_ps(_mm512_loadu_ps(g + i), _mm512_loadu_ps(e + i)));
  } else if constexpr (std::is_same_v<T, float>) {
    return _mm512_castps_si512(_mm512_loadu_ps(g + i));
  } else {
    return load16_avx512<T, EF>(g, e, i);
  }
}
// 16 stored entries of a 32- or 16-bit type (values or keys) to and from 32-bit lanes.
template <typename T>
__attribute__((target(DGP_AVX512))) inline __m512i load_lanes(const T* p) {
  if constexpr (sizeof(T) == 4)
    return _mm512_loadu_si512(p);
  else
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <typename T>
__attribute__((target(DGP_AVX512))) inline void store_lanes(T* p, __m512i x) {
  if constexpr (sizeof(T) == 4)
    _mm512_storeu_si512(p, x);
  else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(x));
}
template <typename T>
__attribute__((target(DGP_AVX512))) inline void store_lanes_masked(T* p, __mmask16 m, __m512i x) {
  if constexpr (sizeof(T) == 4)
    _mm512_mask_storeu_epi32(p, m, x);
  else
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(x));
}
template <typename T>
inline T from_bits(uint32_t b) {
  T v;
  if constexpr (sizeof(T) == 4) {
    std::memcpy(&v, &b, 4);
  } else {
    const uint16_t h = static_cast<uint16_t>(b);
    std::memcpy(&v, &h, 2);
  }
  return v;
}

// 256 permutations that move the set lanes of an 8-bit mask to the front (AVX2 has no
// compress instruction).
struct Avx2Lut {
  alignas(32) int32_t perm[256][8];
  Avx2Lut() {
    for (int m = 0; m < 256; ++m) {
      int j = 0;
      for (int b = 0; b < 8; ++b)
        if (m & (1 << b)) perm[m][j++] = b;
      for (; j < 8; ++j) perm[m][j] = 0;
    }
  }
};
inline const Avx2Lut& avx2_lut() {
  static const Avx2Lut lut;
  return lut;
}

// 8 raw 16-bit entries of v (in 32-bit lanes) at i; AVX2 + F16C.
template <typename T, bool EF>
__attribute__((target(DGP_AVX2))) inline __m256i load16_avx2(const T* g, const T* e, int64_t i) {
  const __m256i gr = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + i)));
  if constexpr (!EF) {
    return gr;
  } else {
    const __m128i e16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(e + i));
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m256i er = _mm256_cvtepu16_epi32(e16);
      const __m256 s = _mm256_add_ps(_mm256_castsi256_ps(_mm256_slli_epi32(gr, 16)),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(er, 16)));
      const __m256i u = _mm256_castps_si256(s);
      const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                             _mm256_set1_epi32(1)),
                                            _mm256_set1_epi32(0x7fff));
      return _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    } else {
      const __m256 s =
          _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + i))),
                        _mm256_cvtph_ps(e16));
      return _mm256_cvtepu16_epi32(_mm256_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

// 8 32-bit lanes holding 16-bit values -> 8 packed uint16 (values < 2^16: no saturation).
__attribute__((target("avx2"))) inline __m128i narrow16_avx2(__m256i x) {
  return _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}

// The AVX2 forms of the lane helpers above (8 lanes).
template <typename T, bool EF = true>
__attribute__((target(DGP_AVX2))) inline __m256i v_lanes_avx2(const T* g, const T* e, int64_t i) {
  if constexpr (std::is_same_v<T, float> && EF) {
    return _mm256_castps_si256(_mm256_add_ps(_mm256_loadu_ps(g + i), _mm256_loadu_ps(e + i)));
  } else if constexpr (std::is_same_v<T, float>) {
    return _mm256_castps_si256(_mm256_loadu_ps(g + i));
  } else {
    return load16_avx2<T, EF>(g, e, i);
  }
}
template <typename T>
__attribute__((target("avx2"))) inline __m256i load_lanes_avx2(const T* p) {
  if constexpr (sizeof(T) == 4)
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  else
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <typename T>
__attribute__((target("avx2"))) inline void store_lanes_avx2(T* p, __m256i x) {
  if constexpr (sizeof(T) == 4)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
  else
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow16_avx2(x));
}
// Keys are < 2^31, so AVX2's signed 32-bit compares order them; a bound above every key
// (the all-ones "no bound") is clamped to 0x7fffffff, which keeps each compare's outcome.
inline int clamp_key31(uint32_t b) { return static_cast<int>(b > 0x7fffffffu ? 0x7fffffffu : b); }

// The largest (Max) or the smallest of 8 unsigned 32-bit lanes.
template <bool Max>
__attribute__((target("avx2"))) inline uint32_t reduce_avx2(__m256i x) {
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), x);
  return Max ? *std::max_element(lanes, lanes + 8) : *std::min_element(lanes, lanes + 8);
}

// ------------------------------------------------------------------ in-place path, 32-bit lanes
// The counting sweep of the sampled path (count_chunk_scalar's vector form; see
// analyze_sampled) and the write pass (write_scalar's), for float32 and the 16-bit formats.

// Counting sweep, 16 entries per step: five unsigned compares and two register compresses;
// candidates are stored as whole vectors into buffers that have kSimdSlack slots of slack.
static_assert(kSimdSlack >= 16, "a whole-vector candidate store must fit in the slack");

// The end of every counting sweep: its totals into `out`, then the scalar sweep for the
// entries past the last whole vector (none after an overflow: the caller falls back).
template <typename T, bool EF>
inline void finish_count(const T* g, const T* e, int64_t i, int64_t hi,
                         const Bracket<typename KeyTraits<T>::K>& br, typename KeyTraits<T>::K* ch,
                         int64_t cap_h, typename KeyTraits<T>::K* cl, int64_t cap_l,
                         ChunkCount<typename KeyTraits<T>::K>& out, typename KeyTraits<T>::K kmax,
                         int64_t above, int64_t mid, int64_t nh, int64_t nl) {
  out.kmax = kmax;
  out.above = above;
  out.mid = mid;
  out.nh = nh;
  out.nl = nl;
  if (!out.overflow) count_chunk_scalar<T, EF>(g, e, i, hi, br, ch, cap_h, cl, cap_l, out);
}

template <typename T, bool EF, bool PF>
__attribute__((target(DGP_AVX512))) void count_avx512(
    const T* g, const T* e, int64_t lo, int64_t hi, const Bracket<typename KeyTraits<T>::K>& br,
    typename KeyTraits<T>::K* ch, int64_t cap_h, typename KeyTraits<T>::K* cl, int64_t cap_l,
    ChunkCount<typename KeyTraits<T>::K>& out) {
  using K = typename KeyTraits<T>::K;
  const __m512i kmask = _mm512_set1_epi32(kKeyMask32<T>);
  const __m512i a_hi = _mm512_set1_epi32(static_cast<int>(br.a_hi));
  const __m512i b_hi = _mm512_set1_epi32(static_cast<int>(br.b_hi));
  const __m512i a_lo = _mm512_set1_epi32(static_cast<int>(br.a_lo));
  const __m512i b_lo = _mm512_set1_epi32(static_cast<int>(br.b_lo));
  __m512i kmax = _mm512_setzero_si512();
  // float32 counts the above / mid classes per lane, summed after the loop (a lane counts
  // at most (hi - lo) / 16 < 2^27 entries): two popcounts fewer per vector, and fewer
  // scalars live in the loop (the compiler had spilled some to vector registers). The
  // 16-bit kernels keep scalar popcounts: their loop is shorter on loads and the two
  // vector adds made it 9% slower without error feedback (ResNet-18 gradients, 1 thread).
  const __m512i one = _mm512_set1_epi32(1);
  __m512i v_above = _mm512_setzero_si512(), v_mid = _mm512_setzero_si512();
  int64_t above = 0, mid = 0, nh = 0, nl = 0;
  const int64_t pf = PF ? int64_t(16) * prefetch_lines().load(std::memory_order_relaxed) : 0;
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) {
    if constexpr (PF) prefetch_ahead<EF>(g, e, i, pf);
    const __m512i k = _mm512_and_si512(v_lanes<T, EF>(g, e, i), kmask);
    kmax = _mm512_max_epu32(kmax, k);
    const __mmask16 m_above = _mm512_cmpgt_epu32_mask(k, a_hi);
    const __mmask16 m_geh = _mm512_cmpge_epu32_mask(k, b_hi);
    const __mmask16 m_h = m_geh & static_cast<__mmask16>(~m_above);
    const __mmask16 m_mid = _mm512_cmpgt_epu32_mask(k, a_lo) & static_cast<__mmask16>(~m_geh);
    const __mmask16 m_l = _mm512_cmpge_epu32_mask(k, b_lo) & _mm512_cmple_epu32_mask(k, a_lo);
    if constexpr (std::is_same_v<T, float>) {
      v_above = _mm512_mask_add_epi32(v_above, m_above, v_above, one);
      v_mid = _mm512_mask_add_epi32(v_mid, m_mid, v_mid, one);
    } else {
      above += __builtin_popcount(m_above);
      mid += __builtin_popcount(m_mid);
    }
    // Branch-free appends: a vector holds a candidate of either boundary about 40% of the
    // time at the defaults, so a branch on it was mispredicted often (ResNet-18 gradients,
    // float32, 1 thread: the whole call 16.5 -> 11.2 ms). The compressed vector is always
    // stored (into the slot's slack when nothing is selected: nh <= cap_h before every
    // store and kSimdSlack >= 16) and the count advances by its popcount.
    store_lanes<K>(ch + nh, _mm512_maskz_compress_epi32(m_h, k));
    nh += __builtin_popcount(m_h);
    store_lanes<K>(cl + nl, _mm512_maskz_compress_epi32(m_l, k));
    nl += __builtin_popcount(m_l);
    if (nh > cap_h || nl > cap_l) { out.overflow = true; break; }
  }
  finish_count<T, EF>(g, e, i, hi, br, ch, cap_h, cl, cap_l, out,
                      static_cast<K>(_mm512_reduce_max_epu32(kmax)),
                      above + _mm512_reduce_add_epi32(v_above), mid + _mm512_reduce_add_epi32(v_mid),
                      nh, nl);
}

// Write pass, 16 entries per step: kept lanes compressed in registers to (index, value) and
// stored whole, or masked near the end of the chunk's output slice.
template <typename T, bool EF, bool PF>
__attribute__((target(DGP_AVX512))) void write_avx512(
    const T* g, T* e, int64_t lo, int64_t hi, const Classifier<typename KeyTraits<T>::K>& cls,
    int64_t& o_hi, int64_t& o_lo, int64_t& pos, int64_t out_end, int64_t* idx, T* val) {
  const __m512i kmask = _mm512_set1_epi32(kKeyMask32<T>);
  const __m512i vkhi = _mm512_set1_epi32(static_cast<int>(cls.khi));
  const __m512i vklo = _mm512_set1_epi32(static_cast<int>(cls.klo));
  const __m512i iota0 = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i iota1 = _mm512_set_epi64(15, 14, 13, 12, 11, 10, 9, 8);
  const int64_t pf = PF ? int64_t(16) * prefetch_lines().load(std::memory_order_relaxed) : 0;
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) {
    if constexpr (PF) prefetch_ahead<EF>(g, e, i, pf);
    const __m512i v = v_lanes<T, EF>(g, e, i);
    const __m512i k = _mm512_and_si512(v, kmask);
    const __mmask16 tie_hi = _mm512_cmpeq_epu32_mask(k, vkhi), tie_lo = _mm512_cmpeq_epu32_mask(k, vklo);
    __mmask16 in = _mm512_cmpgt_epu32_mask(k, vklo) & _mm512_cmplt_epu32_mask(k, vkhi);
    if (tie_hi | tie_lo) in |= static_cast<__mmask16>(tie_keep_bits(cls, tie_hi, tie_lo, o_hi, o_lo));
    if constexpr (EF) store_lanes<T>(e + i, _mm512_maskz_mov_epi32(static_cast<__mmask16>(~in), v));
    // float32 skips a vector with no kept entry; the 16-bit kernels are branch-free there
    // (an empty vector's stores are overwritten by the next kept entries). Measured on the
    // ResNet-18 gradients, 1 thread: float32 branch-free is 4-12% faster at keep 0.2 but
    // 7-15% slower at keep 0.01, where most vectors keep nothing.
    if (!std::is_same_v<T, float> || in) {
      const int cnt = __builtin_popcount(in);
      const int c0 = __builtin_popcount(in & 0xff);
      const __m512i cv = _mm512_maskz_compress_epi32(in, v);
      const __m512i base = _mm512_set1_epi64(i);
      const __m512i i0 = _mm512_maskz_compress_epi64(static_cast<__mmask8>(in & 0xff),
                                                     _mm512_add_epi64(base, iota0));
      const __m512i i1 = _mm512_maskz_compress_epi64(static_cast<__mmask8>(in >> 8),
                                                     _mm512_add_epi64(base, iota1));
      if (pos + 16 <= out_end) {
        store_lanes<T>(val + pos, cv);
        _mm512_storeu_si512(idx + pos, i0);
        _mm512_storeu_si512(idx + pos + c0, i1);
      } else {
        store_lanes_masked<T>(val + pos, static_cast<__mmask16>((1u << cnt) - 1), cv);
        _mm512_mask_storeu_epi64(idx + pos, static_cast<__mmask8>((1u << c0) - 1), i0);
        _mm512_mask_storeu_epi64(idx + pos + c0, static_cast<__mmask8>((1u << (cnt - c0)) - 1), i1);
      }
      pos += cnt;
    }
  }
  write_scalar<T, EF, Sink::kSparse>(g, e, nullptr, i, hi, cls, o_hi, o_lo, pos, out_end, idx,
                                     val);
}

// Appends the lanes of `k` selected by `mask` (may be empty) to `dst[n..]` through the
// permutation table: a whole 8-key store, into the slack when it passes n + popcount.
template <typename K>
__attribute__((target("avx2,popcnt"))) inline void append_avx2(const Avx2Lut& lut, __m256i k,
                                                               int mask, K* dst, int64_t& n) {
  const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.perm[mask]));
  store_lanes_avx2<K>(dst + n, _mm256_permutevar8x32_epi32(k, perm));
  n += __builtin_popcount(mask);
}

// Counting sweep for AVX2-only CPUs, 8 entries per step (same classification as
// count_avx512 and count_chunk_scalar), with signed compares against clamped bounds
// (clamp_key31); candidates compacted with the permutation table.
template <typename T, bool EF>
__attribute__((target(DGP_AVX2))) void count_avx2(
    const T* g, const T* e, int64_t lo, int64_t hi, const Bracket<typename KeyTraits<T>::K>& br,
    typename KeyTraits<T>::K* ch, int64_t cap_h, typename KeyTraits<T>::K* cl, int64_t cap_l,
    ChunkCount<typename KeyTraits<T>::K>& out) {
  using K = typename KeyTraits<T>::K;
  const Avx2Lut& lut = avx2_lut();
  const __m256i kmask = _mm256_set1_epi32(kKeyMask32<T>);
  const __m256i a_hi = _mm256_set1_epi32(clamp_key31(br.a_hi));
  const __m256i b_hi = _mm256_set1_epi32(clamp_key31(br.b_hi));
  const __m256i a_lo = _mm256_set1_epi32(clamp_key31(br.a_lo));
  const __m256i b_lo = _mm256_set1_epi32(clamp_key31(br.b_lo));
  const __m256i ones = _mm256_set1_epi32(-1);
  __m256i kmax = _mm256_setzero_si256();
  int64_t above = 0, mid = 0, nh = 0, nl = 0;
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m256i k = _mm256_and_si256(v_lanes_avx2<T, EF>(g, e, i), kmask);
    kmax = _mm256_max_epi32(kmax, k);
    const __m256i gt_ahi = _mm256_cmpgt_epi32(k, a_hi);
    const __m256i ge_bhi = _mm256_xor_si256(_mm256_cmpgt_epi32(b_hi, k), ones);
    const __m256i gt_alo = _mm256_cmpgt_epi32(k, a_lo);
    const __m256i ge_blo = _mm256_xor_si256(_mm256_cmpgt_epi32(b_lo, k), ones);
    const int m_above = _mm256_movemask_ps(_mm256_castsi256_ps(gt_ahi));
    const int m_h = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(gt_ahi, ge_bhi)));
    const int m_mid = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(ge_bhi, gt_alo)));
    const int m_l = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(gt_alo, ge_blo)));
    above += __builtin_popcount(m_above);
    mid += __builtin_popcount(m_mid);
    // branch-free, as in the AVX-512 sweep (an empty mask's store lands in the slack)
    append_avx2<K>(lut, k, m_h, ch, nh);
    append_avx2<K>(lut, k, m_l, cl, nl);
    if (nh > cap_h || nl > cap_l) { out.overflow = true; break; }
  }
  finish_count<T, EF>(g, e, i, hi, br, ch, cap_h, cl, cap_l, out,
                      static_cast<K>(reduce_avx2<true>(kmax)), above, mid, nh, nl);
}

// Write pass for AVX2-only CPUs, 8 entries per step.
template <typename T, bool EF>
__attribute__((target(DGP_AVX2))) void write_avx2(
    const T* g, T* e, int64_t lo, int64_t hi, const Classifier<typename KeyTraits<T>::K>& cls,
    int64_t& o_hi, int64_t& o_lo, int64_t& pos, int64_t out_end, int64_t* idx, T* val) {
  const Avx2Lut& lut = avx2_lut();
  const __m256i kmask = _mm256_set1_epi32(kKeyMask32<T>);
  const __m256i vkhi = _mm256_set1_epi32(static_cast<int>(cls.khi));
  const __m256i vklo = _mm256_set1_epi32(static_cast<int>(cls.klo));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m256i v = v_lanes_avx2<T, EF>(g, e, i);
    const __m256i k = _mm256_and_si256(v, kmask);
    const int tie_hi = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, vkhi)));
    const int tie_lo = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, vklo)));
    __m256i inv = _mm256_and_si256(_mm256_cmpgt_epi32(k, vklo), _mm256_cmpgt_epi32(vkhi, k));
    int in = _mm256_movemask_ps(_mm256_castsi256_ps(inv));
    if (tie_hi | tie_lo) {
      in |= static_cast<int>(tie_keep_bits(cls, tie_hi, tie_lo, o_hi, o_lo));
      inv = lanes_of_bits8(in);
    }
    if constexpr (EF) store_lanes_avx2<T>(e + i, _mm256_andnot_si256(inv, v));
    // Branch-free on `in` (an 8-entry vector holds no kept entry ~17% of the time at the
    // defaults, too often for the predictor): an empty vector stores lanes that the next
    // kept entries overwrite (pos does not move), inside the slice (pos + 8 <= out_end).
    const int cnt = __builtin_popcount(in);
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.perm[in]));
    const __m256i cv = _mm256_permutevar8x32_epi32(v, perm);
    const __m256i off = _mm256_permutevar8x32_epi32(iota, perm);
    const __m256i base = _mm256_set1_epi64x(i);
    const __m256i i0 = _mm256_add_epi64(base, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(off)));
    const __m256i i1 = _mm256_add_epi64(base, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(off, 1)));
    if (pos + 8 <= out_end) {
      store_lanes_avx2<T>(val + pos, cv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + pos), i0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + pos + 4), i1);
    } else if (cnt) {
      alignas(32) uint32_t tv[8];
      alignas(32) int64_t ti[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tv), cv);
      _mm256_store_si256(reinterpret_cast<__m256i*>(ti), i0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(ti + 4), i1);
      for (int j = 0; j < cnt; ++j) {
        val[pos + j] = from_bits<T>(tv[j]);
        idx[pos + j] = ti[j];
      }
    }
    pos += cnt;
  }
  write_scalar<T, EF, Sink::kSparse>(g, e, nullptr, i, hi, cls, o_hi, o_lo, pos, out_end, idx,
                                     val);
}

// ------------------------------------------------------------------ float64
// 8 entries per AVX-512 step, 4 per AVX2 step; 63-bit keys. AVX2 compares are signed
// 64-bit: keys are < 2^63, and the "no bound" value (all ones) is clamped to 2^63 - 1,
// above every key, which keeps each compare's outcome.
template <bool EF>
__attribute__((target(DGP_AVX512))) void count_f64_avx512(
    const double* g, const double* e, int64_t lo, int64_t hi, const Bracket<uint64_t>& br,
    uint64_t* ch, int64_t cap_h, uint64_t* cl, int64_t cap_l, ChunkCount<uint64_t>& out) {
  const __m512i kmask = _mm512_set1_epi64(0x7fffffffffffffffll);
  const __m512i a_hi = _mm512_set1_epi64(static_cast<int64_t>(br.a_hi));
  const __m512i b_hi = _mm512_set1_epi64(static_cast<int64_t>(br.b_hi));
  const __m512i a_lo = _mm512_set1_epi64(static_cast<int64_t>(br.a_lo));
  const __m512i b_lo = _mm512_set1_epi64(static_cast<int64_t>(br.b_lo));
  __m512i kmax = _mm512_setzero_si512();
  int64_t above = 0, mid = 0, nh = 0, nl = 0;
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    __m512d v = _mm512_loadu_pd(g + i);
    if constexpr (EF) v = _mm512_add_pd(v, _mm512_loadu_pd(e + i));
    const __m512i k = _mm512_and_si512(_mm512_castpd_si512(v), kmask);
    kmax = _mm512_max_epu64(kmax, k);
    const __mmask8 m_above = _mm512_cmpgt_epu64_mask(k, a_hi);
    const __mmask8 m_geh = _mm512_cmpge_epu64_mask(k, b_hi);
    const __mmask8 m_h = m_geh & static_cast<__mmask8>(~m_above);
    const __mmask8 m_mid = _mm512_cmpgt_epu64_mask(k, a_lo) & static_cast<__mmask8>(~m_geh);
    const __mmask8 m_l = _mm512_cmpge_epu64_mask(k, b_lo) & _mm512_cmple_epu64_mask(k, a_lo);
    above += __builtin_popcount(m_above);
    mid += __builtin_popcount(m_mid);
    _mm512_storeu_si512(ch + nh, _mm512_maskz_compress_epi64(m_h, k));
    nh += __builtin_popcount(m_h);
    _mm512_storeu_si512(cl + nl, _mm512_maskz_compress_epi64(m_l, k));
    nl += __builtin_popcount(m_l);
    if (nh > cap_h || nl > cap_l) { out.overflow = true; break; }
  }
  finish_count<double, EF>(g, e, i, hi, br, ch, cap_h, cl, cap_l, out,
                           _mm512_reduce_max_epu64(kmax), above, mid, nh, nl);
}

template <bool EF>
__attribute__((target(DGP_AVX512))) void write_f64_avx512(
    const double* g, double* e, int64_t lo, int64_t hi, const Classifier<uint64_t>& cls,
    int64_t& o_hi, int64_t& o_lo, int64_t& pos, int64_t out_end, int64_t* idx, double* val) {
  const __m512i kmask = _mm512_set1_epi64(0x7fffffffffffffffll);
  const __m512i vkhi = _mm512_set1_epi64(static_cast<int64_t>(cls.khi));
  const __m512i vklo = _mm512_set1_epi64(static_cast<int64_t>(cls.klo));
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    __m512d v = _mm512_loadu_pd(g + i);
    if constexpr (EF) v = _mm512_add_pd(v, _mm512_loadu_pd(e + i));
    const __m512i k = _mm512_and_si512(_mm512_castpd_si512(v), kmask);
    const __mmask8 tie_hi = _mm512_cmpeq_epu64_mask(k, vkhi), tie_lo = _mm512_cmpeq_epu64_mask(k, vklo);
    __mmask8 in = _mm512_cmpgt_epu64_mask(k, vklo) & _mm512_cmplt_epu64_mask(k, vkhi);
    if (tie_hi | tie_lo) in |= static_cast<__mmask8>(tie_keep_bits(cls, tie_hi, tie_lo, o_hi, o_lo));
    if constexpr (EF) _mm512_storeu_pd(e + i, _mm512_maskz_mov_pd(static_cast<__mmask8>(~in), v));
    const int cnt = __builtin_popcount(in);
    const __m512d cv = _mm512_maskz_compress_pd(in, v);
    const __m512i ci = _mm512_maskz_compress_epi64(in, _mm512_add_epi64(_mm512_set1_epi64(i), iota));
    if (pos + 8 <= out_end) {
      _mm512_storeu_pd(val + pos, cv);
      _mm512_storeu_si512(idx + pos, ci);
    } else if (cnt) {
      const __mmask8 m = static_cast<__mmask8>((1u << cnt) - 1);
      _mm512_mask_storeu_pd(val + pos, m, cv);
      _mm512_mask_storeu_epi64(idx + pos, m, ci);
    }
    pos += cnt;
  }
  write_scalar<double, EF, Sink::kSparse>(g, e, nullptr, i, hi, cls, o_hi, o_lo, pos, out_end,
                                          idx, val);
}

// Permutations that move the set lanes of a 4-bit mask of 64-bit lanes to the front, as
// pairs of 32-bit lane indices (for vpermd).
struct Avx2Lut4 {
  alignas(32) int32_t perm[16][8];
  Avx2Lut4() {
    for (int m = 0; m < 16; ++m) {
      int j = 0;
      for (int b = 0; b < 4; ++b)
        if (m & (1 << b)) {
          perm[m][2 * j] = 2 * b;
          perm[m][2 * j + 1] = 2 * b + 1;
          ++j;
        }
      for (; j < 4; ++j) perm[m][2 * j] = perm[m][2 * j + 1] = 0;
    }
  }
};
inline const Avx2Lut4& avx2_lut4() {
  static const Avx2Lut4 lut;
  return lut;
}

template <bool EF>
__attribute__((target("avx2,popcnt"))) void count_f64_avx2(
    const double* g, const double* e, int64_t lo, int64_t hi, const Bracket<uint64_t>& br,
    uint64_t* ch, int64_t cap_h, uint64_t* cl, int64_t cap_l, ChunkCount<uint64_t>& out) {
  const Avx2Lut4& lut = avx2_lut4();
  auto clamp = [](uint64_t b) {
    return static_cast<int64_t>(b > 0x7fffffffffffffffull ? 0x7fffffffffffffffull : b);
  };
  const __m256i kmask = _mm256_set1_epi64x(0x7fffffffffffffffll);
  const __m256i a_hi = _mm256_set1_epi64x(clamp(br.a_hi)), b_hi = _mm256_set1_epi64x(clamp(br.b_hi));
  const __m256i a_lo = _mm256_set1_epi64x(clamp(br.a_lo)), b_lo = _mm256_set1_epi64x(clamp(br.b_lo));
  const __m256i ones = _mm256_set1_epi64x(-1);
  uint64_t kmx = 0;
  int64_t above = 0, mid = 0, nh = 0, nl = 0;
  int64_t i = lo;
  for (; i + 4 <= hi; i += 4) {
    __m256d v = _mm256_loadu_pd(g + i);
    if constexpr (EF) v = _mm256_add_pd(v, _mm256_loadu_pd(e + i));
    const __m256i k = _mm256_and_si256(_mm256_castpd_si256(v), kmask);
    const __m256i gt_ahi = _mm256_cmpgt_epi64(k, a_hi);
    const __m256i ge_bhi = _mm256_xor_si256(_mm256_cmpgt_epi64(b_hi, k), ones);
    const __m256i gt_alo = _mm256_cmpgt_epi64(k, a_lo);
    const __m256i ge_blo = _mm256_xor_si256(_mm256_cmpgt_epi64(b_lo, k), ones);
    // NaN keys exceed the infinity key: one compare keeps the running maximum's job.
    const __m256i nan = _mm256_cmpgt_epi64(k, _mm256_set1_epi64x(0x7ff0000000000000ll));
    if (_mm256_movemask_pd(_mm256_castsi256_pd(nan))) kmx = 0xffffffffffffffffull >> 1;
    const int m_above = _mm256_movemask_pd(_mm256_castsi256_pd(gt_ahi));
    const int m_h = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_andnot_si256(gt_ahi, ge_bhi)));
    const int m_mid = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_andnot_si256(ge_bhi, gt_alo)));
    const int m_l = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_andnot_si256(gt_alo, ge_blo)));
    above += __builtin_popcount(m_above);
    mid += __builtin_popcount(m_mid);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ch + nh),
                        _mm256_permutevar8x32_epi32(k, _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.perm[m_h]))));
    nh += __builtin_popcount(m_h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cl + nl),
                        _mm256_permutevar8x32_epi32(k, _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.perm[m_l]))));
    nl += __builtin_popcount(m_l);
    if (nh > cap_h || nl > cap_l) { out.overflow = true; break; }
  }
  finish_count<double, EF>(g, e, i, hi, br, ch, cap_h, cl, cap_l, out, kmx, above, mid, nh, nl);
}

template <bool EF>
__attribute__((target("avx2,popcnt"))) void write_f64_avx2(
    const double* g, double* e, int64_t lo, int64_t hi, const Classifier<uint64_t>& cls,
    int64_t& o_hi, int64_t& o_lo, int64_t& pos, int64_t out_end, int64_t* idx, double* val) {
  const Avx2Lut4& lut = avx2_lut4();
  const __m256i kmask = _mm256_set1_epi64x(0x7fffffffffffffffll);
  const __m256i vkhi = _mm256_set1_epi64x(static_cast<int64_t>(cls.khi));
  const __m256i vklo = _mm256_set1_epi64x(static_cast<int64_t>(cls.klo));
  const __m256i iota = _mm256_setr_epi64x(0, 1, 2, 3);
  int64_t i = lo;
  for (; i + 4 <= hi; i += 4) {
    __m256d v = _mm256_loadu_pd(g + i);
    if constexpr (EF) v = _mm256_add_pd(v, _mm256_loadu_pd(e + i));
    const __m256i k = _mm256_and_si256(_mm256_castpd_si256(v), kmask);
    const int tie_hi = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(k, vkhi)));
    const int tie_lo = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(k, vklo)));
    __m256i inv = _mm256_and_si256(_mm256_cmpgt_epi64(k, vklo), _mm256_cmpgt_epi64(vkhi, k));
    int in = _mm256_movemask_pd(_mm256_castsi256_pd(inv));
    if (tie_hi | tie_lo) {
      in |= static_cast<int>(tie_keep_bits(cls, tie_hi, tie_lo, o_hi, o_lo));
      inv = lanes_of_bits4(in);
    }
    if constexpr (EF) _mm256_storeu_pd(e + i, _mm256_andnot_pd(_mm256_castsi256_pd(inv), v));
    const int cnt = __builtin_popcount(in);
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.perm[in]));
    const __m256i cv = _mm256_permutevar8x32_epi32(_mm256_castpd_si256(v), perm);
    const __m256i ci = _mm256_permutevar8x32_epi32(_mm256_add_epi64(_mm256_set1_epi64x(i), iota), perm);
    if (pos + 4 <= out_end) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(val + pos), cv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + pos), ci);
    } else if (cnt) {
      alignas(32) int64_t tv[4], ti[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tv), cv);
      _mm256_store_si256(reinterpret_cast<__m256i*>(ti), ci);
      for (int j = 0; j < cnt; ++j) {
        std::memcpy(val + pos + j, tv + j, sizeof(double));
        idx[pos + j] = ti[j];
      }
    }
    pos += cnt;
  }
  write_scalar<double, EF, Sink::kSparse>(g, e, nullptr, i, hi, cls, o_hi, o_lo, pos, out_end,
                                          idx, val);
}

// ------------------------------------------------------------------ key sweeps
// Keys of v = g (+ e) for the direct path of small layers, with their min and max (the NaN
// check). Vector kernels where the scalar loop is slow: every dtype on AVX-512, the 16-bit
// formats on AVX2 (their scalar conversions cost ~5 ns an entry with error feedback).

// The scalar end of the key sweeps (the entries past the last whole vector) and their
// results, the running minimum and maximum `mn`, `mx` included.
template <typename T, bool EF>
inline void finish_keys(const T* g, const T* e, int64_t i, int64_t n,
                        typename KeyTraits<T>::K* keys, typename KeyTraits<T>::K mn,
                        typename KeyTraits<T>::K mx, typename KeyTraits<T>::K& kmin,
                        typename KeyTraits<T>::K& kmax) {
  for (; i < n; ++i) {
    const typename KeyTraits<T>::K k = key_of(load_v<T, EF>(g, e, i));
    mn = std::min(mn, k);
    mx = std::max(mx, k);
    keys[i] = k;
  }
  kmin = mn;
  kmax = mx;
}

template <typename T, bool EF>
__attribute__((target(DGP_AVX512))) void keys_avx512(const T* g, const T* e, int64_t n,
                                                     typename KeyTraits<T>::K* keys,
                                                     typename KeyTraits<T>::K& kmin,
                                                     typename KeyTraits<T>::K& kmax) {
  using K = typename KeyTraits<T>::K;
  int64_t i = 0;
  K mn = kmin, mx = kmax;
  if constexpr (std::is_same_v<T, double>) {
    const __m512i kmask = _mm512_set1_epi64(0x7fffffffffffffffll);
    __m512i vmn = _mm512_set1_epi64(-1), vmx = _mm512_setzero_si512();
    for (; i + 8 <= n; i += 8) {
      __m512d v = _mm512_loadu_pd(g + i);
      if constexpr (EF) v = _mm512_add_pd(v, _mm512_loadu_pd(e + i));
      const __m512i k = _mm512_and_si512(_mm512_castpd_si512(v), kmask);
      vmn = _mm512_min_epu64(vmn, k);
      vmx = _mm512_max_epu64(vmx, k);
      _mm512_storeu_si512(keys + i, k);
    }
    mn = std::min<K>(mn, _mm512_reduce_min_epu64(vmn));
    mx = std::max<K>(mx, _mm512_reduce_max_epu64(vmx));
  } else {
    __m512i vmn = _mm512_set1_epi32(-1), vmx = _mm512_setzero_si512();
    for (; i + 16 <= n; i += 16) {
      const __m512i k = _mm512_and_si512(v_lanes<T, EF>(g, e, i), _mm512_set1_epi32(kKeyMask32<T>));
      store_lanes<K>(keys + i, k);
      vmn = _mm512_min_epu32(vmn, k);
      vmx = _mm512_max_epu32(vmx, k);
    }
    mn = std::min<K>(mn, static_cast<K>(_mm512_reduce_min_epu32(vmn)));
    mx = std::max<K>(mx, static_cast<K>(_mm512_reduce_max_epu32(vmx)));
  }
  finish_keys<T, EF>(g, e, i, n, keys, mn, mx, kmin, kmax);
}

// The 16-bit formats only (see above).
template <typename T, bool EF>
__attribute__((target(DGP_AVX2))) void keys_h16_avx2(const T* g, const T* e, int64_t n,
                                                     uint16_t* keys, uint16_t& kmin,
                                                     uint16_t& kmax) {
  int64_t i = 0;
  __m256i vmn = _mm256_set1_epi32(0xffff), vmx = _mm256_setzero_si256();
  for (; i + 8 <= n; i += 8) {
    const __m256i k = _mm256_and_si256(v_lanes_avx2<T, EF>(g, e, i), _mm256_set1_epi32(0x7fff));
    vmn = _mm256_min_epi32(vmn, k);
    vmx = _mm256_max_epi32(vmx, k);
    store_lanes_avx2<uint16_t>(keys + i, k);
  }
  finish_keys<T, EF>(g, e, i, n, keys, std::min<uint16_t>(kmin, reduce_avx2<false>(vmn)),
                     std::max<uint16_t>(kmax, reduce_avx2<true>(vmx)), kmin, kmax);
}

template <typename T, bool EF>
inline bool keys_simd(Simd s, const T* g, const T* e, int64_t n, typename KeyTraits<T>::K* keys,
                      typename KeyTraits<T>::K& kmin, typename KeyTraits<T>::K& kmax) {
  if (s == Simd::kAvx512) {
    keys_avx512<T, EF>(g, e, n, keys, kmin, kmax);
    return true;
  }
  if constexpr (Is16<T>::value) {
    if (s == Simd::kAvx2) {
      keys_h16_avx2<T, EF>(g, e, n, keys, kmin, kmax);
      return true;
    }
  }
  return false;
}

// Run-time dispatch of the counting and write sweeps by dtype and SIMD level. Each returns
// false when it has no vector kernel for (T, level); the caller then runs the scalar pass.
template <typename T, bool EF>
inline bool count_simd(Simd s, const T* g, const T* e, int64_t lo, int64_t hi,
                       const Bracket<typename KeyTraits<T>::K>& br, typename KeyTraits<T>::K* ch,
                       int64_t cap_h, typename KeyTraits<T>::K* cl, int64_t cap_l,
                       ChunkCount<typename KeyTraits<T>::K>& out) {
  if constexpr (kLanes32<T>) {
    if (s == Simd::kAvx512) {
      if (prefetch_on<T>())
        count_avx512<T, EF, kPrefetchable<T>>(g, e, lo, hi, br, ch, cap_h, cl, cap_l, out);
      else
        count_avx512<T, EF, false>(g, e, lo, hi, br, ch, cap_h, cl, cap_l, out);
      return true;
    }
    if (s == Simd::kAvx2) {
      count_avx2<T, EF>(g, e, lo, hi, br, ch, cap_h, cl, cap_l, out);
      return true;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (s == Simd::kAvx512) {
      count_f64_avx512<EF>(g, e, lo, hi, br, ch, cap_h, cl, cap_l, out);
      return true;
    }
    if (s == Simd::kAvx2) {
      count_f64_avx2<EF>(g, e, lo, hi, br, ch, cap_h, cl, cap_l, out);
      return true;
    }
  }
  return false;
}

template <typename T, bool EF>
inline bool write_simd(Simd s, const T* g, T* e, int64_t lo, int64_t hi,
                       const Classifier<typename KeyTraits<T>::K>& cls, int64_t& o_hi,
                       int64_t& o_lo, int64_t& pos, int64_t out_end, int64_t* idx, T* val) {
  if constexpr (kLanes32<T>) {
    if (s == Simd::kAvx512) {
      if (prefetch_on<T>())
        write_avx512<T, EF, kPrefetchable<T>>(g, e, lo, hi, cls, o_hi, o_lo, pos, out_end, idx, val);
      else
        write_avx512<T, EF, false>(g, e, lo, hi, cls, o_hi, o_lo, pos, out_end, idx, val);
      return true;
    }
    if (s == Simd::kAvx2) {
      write_avx2<T, EF>(g, e, lo, hi, cls, o_hi, o_lo, pos, out_end, idx, val);
      return true;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (s == Simd::kAvx512) {
      write_f64_avx512<EF>(g, e, lo, hi, cls, o_hi, o_lo, pos, out_end, idx, val);
      return true;
    }
    if (s == Simd::kAvx2) {
      write_f64_avx2<EF>(g, e, lo, hi, cls, o_hi, o_lo, pos, out_end, idx, val);
      return true;
    }
  }
  return false;
}

// ------------------------------------------------------------------ one-sweep hinted path
// The sweep (sweep_chunk_scalar's vector form) and the fix-up (fixup_chunk_scalar's) for
// float32 and the 16-bit formats, 16 entries per step with v's raw bits in 32-bit lanes
// (16-bit formats widened and rounded as load16_avx512 does, stored narrowed).

// The end of every one-sweep vector kernel: its lane totals into `out` and `t`, then the
// scalar sweep for the entries past the last whole vector.
template <typename T>
inline void finish_sweep(const T* g, const T* e, T* eo, int64_t base, int64_t i, int64_t hi,
                         const SweepBounds<typename KeyTraits<T>::K>& sb, InRange<T>& t,
                         SweepCount<typename KeyTraits<T>::K>& out, int64_t above,
                         typename KeyTraits<T>::K kmax, int64_t nt, int64_t nw) {
  out.above += above;
  out.kmax = std::max(out.kmax, kmax);
  t.n = nt;
  t.nw = nw;
  if (!out.overflow) sweep_chunk_scalar<T>(g, e, eo, base, i, hi, sb, t, out);
}

// Per 16 entries: the eo store (v, or 0 on tentatively kept lanes), the in-range append
// (value and chunk offset) and the window-key append, compressed in registers and stored
// whole; the above count stays in vector lanes. (Measured on the ResNet-18 list, float32,
// 1 thread: non-temporal eo stores, also with the in-range appends staged in L1 and
// streamed out a line at a time, software prefetch, and 256-bit or table-driven compresses
// were all slower or no faster.)
template <typename T>
__attribute__((target(DGP_AVX512))) inline void sweep_avx512(
    const T* g, const T* e, T* eo, int64_t base, int64_t hi,
    const SweepBounds<typename KeyTraits<T>::K>& sb, InRange<T>& t,
    SweepCount<typename KeyTraits<T>::K>& out) {
  using K = typename KeyTraits<T>::K;
  int64_t i = base;
  const __m512i kmask = _mm512_set1_epi32(sizeof(T) == 4 ? 0x7fffffff : 0x7fff);
  const __m512i a_hi = _mm512_set1_epi32(static_cast<int>(sb.br.a_hi));
  const __m512i in_lo = _mm512_set1_epi32(static_cast<int>(sb.br.b_lo));
  const __m512i b_hi = _mm512_set1_epi32(static_cast<int>(sb.br.b_hi));
  const __m512i a_lo = _mm512_set1_epi32(static_cast<int>(sb.br.a_lo));
  const bool t_any = static_cast<int64_t>(sb.p_hi) > static_cast<int64_t>(sb.p_lo) + 1;
  const __m512i t_lo = _mm512_set1_epi32(t_any ? static_cast<int>(sb.p_lo + 1) : 0);
  const __m512i t_w = _mm512_set1_epi32(t_any ? static_cast<int>(sb.p_hi - sb.p_lo - 1) : 0);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i kmax = _mm512_setzero_si512();
  __m512i v_above = _mm512_setzero_si512();
  __m512i off = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(i - base)));
  const __m512i sixteen = _mm512_set1_epi32(16);
  int64_t nt = t.n, nw = t.nw;
  int32_t* tidx = t.idx;
  T* tval = t.val;
  K* w = t.w;
  const int64_t cap_t = t.cap;
  for (; i + 16 <= hi; i += 16) {
    const __m512i v = v_lanes<T>(g, e, i);
    const __m512i k = _mm512_and_si512(v, kmask);
    kmax = _mm512_max_epu32(kmax, k);
    const __mmask16 m_above = _mm512_cmpgt_epu32_mask(k, a_hi);
    const __mmask16 m_in = _mm512_mask_cmpge_epu32_mask(static_cast<__mmask16>(~m_above), k, in_lo);
    // p_lo < k < p_hi as one unsigned range test: k - (p_lo + 1) < p_hi - p_lo - 1.
    const __mmask16 m_t = _mm512_mask_cmplt_epu32_mask(m_in, _mm512_sub_epi32(k, t_lo), t_w);
    store_lanes<T>(eo + i, _mm512_maskz_mov_epi32(static_cast<__mmask16>(~m_t), v));
    v_above = _mm512_mask_add_epi32(v_above, m_above, v_above, one);
    store_lanes<T>(tval + nt, _mm512_maskz_compress_epi32(m_in, v));
    _mm512_storeu_si512(tidx + nt, _mm512_maskz_compress_epi32(m_in, off));
    nt += __builtin_popcount(m_in);
    const __mmask16 m_h = _mm512_mask_cmpge_epu32_mask(m_in, k, b_hi);
    const __mmask16 m_l = _mm512_mask_cmple_epu32_mask(m_in, k, a_lo);
    const __mmask16 m_w = m_h | m_l;
    store_lanes<K>(w + nw, _mm512_maskz_compress_epi32(m_w, k));
    nw += __builtin_popcount(m_w);
    off = _mm512_add_epi32(off, sixteen);
    if (nt > cap_t) { out.overflow = true; break; }
  }
  finish_sweep<T>(g, e, eo, base, i, hi, sb, t, out, _mm512_reduce_add_epi32(v_above),
                  static_cast<K>(_mm512_reduce_max_epu32(kmax)), nt, nw);
}

// The fix-up over 16 in-range entries at a time: kept lanes compressed to (index, value)
// and stored whole or masked near the slice end; tie lanes through tie_keep_bits; lanes
// whose tentative eo was wrong rewritten one by one.
template <typename T>
__attribute__((target(DGP_AVX512))) inline void fixup_avx512(
    const InRange<T>& t, int64_t base, const SweepBounds<typename KeyTraits<T>::K>& sb,
    const Classifier<typename KeyTraits<T>::K>& cls, int64_t& o_hi, int64_t& o_lo,
    int64_t& pos, int64_t out_end, int64_t* idx, T* val, T* eo) {
  const __m512i kmask = _mm512_set1_epi32(sizeof(T) == 4 ? 0x7fffffff : 0x7fff);
  const __m512i vkhi = _mm512_set1_epi32(static_cast<int>(cls.khi));
  const __m512i vklo = _mm512_set1_epi32(static_cast<int>(cls.klo));
  const __m512i p_hi = _mm512_set1_epi32(static_cast<int>(sb.p_hi));
  const __m512i p_lo = _mm512_set1_epi32(static_cast<int>(sb.p_lo));
  const __m512i vbase = _mm512_set1_epi64(base);
  int64_t j = 0;
  for (; j + 16 <= t.n; j += 16) {
    const __m512i v = load_lanes<T>(t.val + j);
    const __m512i off = _mm512_loadu_si512(t.idx + j);
    const __m512i k = _mm512_and_si512(v, kmask);
    const __mmask16 tie_hi = _mm512_cmpeq_epu32_mask(k, vkhi);
    const __mmask16 tie_lo = _mm512_cmpeq_epu32_mask(k, vklo);
    __mmask16 in = _mm512_mask_cmplt_epu32_mask(_mm512_cmpgt_epu32_mask(k, vklo), k, vkhi);
    if (tie_hi | tie_lo)
      in |= static_cast<__mmask16>(tie_keep_bits(cls, tie_hi, tie_lo, o_hi, o_lo));
    const __mmask16 tent = _mm512_mask_cmplt_epu32_mask(_mm512_cmpgt_epu32_mask(k, p_lo), k, p_hi);
    if (__builtin_expect(static_cast<__mmask16>(in ^ tent) != 0, 0)) {
      alignas(64) int32_t o[16];
      alignas(64) uint32_t x[16];
      _mm512_store_si512(o, off);
      _mm512_store_si512(x, v);
      for (uint32_t m = static_cast<__mmask16>(in ^ tent); m; m &= m - 1) {
        const int l = __builtin_ctz(m);
        eo[base + o[l]] = (in >> l) & 1 ? T(0) : from_bits<T>(x[l]);
      }
    }
    const int cnt = __builtin_popcount(in);
    const __m512i cv = _mm512_maskz_compress_epi32(in, v);
    const __m512i co = _mm512_maskz_compress_epi32(in, off);
    const __m512i i0 = _mm512_add_epi64(vbase, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(co)));
    const __m512i i1 =
        _mm512_add_epi64(vbase, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(co, 1)));
    if (pos + 16 <= out_end) {
      store_lanes<T>(val + pos, cv);
      _mm512_storeu_si512(idx + pos, i0);
      _mm512_storeu_si512(idx + pos + 8, i1);
    } else {
      const int c1 = cnt > 8 ? cnt - 8 : 0;
      store_lanes_masked<T>(val + pos, static_cast<__mmask16>((1u << cnt) - 1), cv);
      _mm512_mask_storeu_epi64(idx + pos, static_cast<__mmask8>((1u << std::min(cnt, 8)) - 1), i0);
      _mm512_mask_storeu_epi64(idx + pos + 8, static_cast<__mmask8>((1u << c1) - 1), i1);
    }
    pos += cnt;
  }
  fixup_chunk_scalar<T>(t, j, base, sb, cls, o_hi, o_lo, pos, out_end, idx, val, eo);
}

// Chunk offsets from, from + 1, ..., from + 7 (the 8-entry one-sweep kernels).
__attribute__((target("avx2"))) inline __m256i offsets8(int64_t from) {
  return _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                          _mm256_set1_epi32(static_cast<int>(from)));
}

// The same two passes for float64 with AVX-512, 8 entries per step (64-bit keys; chunk
// offsets in a 256-bit register).
__attribute__((target(DGP_AVX512))) inline void sweep_f64_avx512(
    const double* g, const double* e, double* eo, int64_t base, int64_t hi,
    const SweepBounds<uint64_t>& sb, InRange<double>& t, SweepCount<uint64_t>& out) {
  int64_t i = base;
  const __m512i kmask = _mm512_set1_epi64(0x7fffffffffffffffll);
  const __m512i a_hi = _mm512_set1_epi64(static_cast<int64_t>(sb.br.a_hi));
  const __m512i in_lo = _mm512_set1_epi64(static_cast<int64_t>(sb.br.b_lo));
  const __m512i b_hi = _mm512_set1_epi64(static_cast<int64_t>(sb.br.b_hi));
  const __m512i a_lo = _mm512_set1_epi64(static_cast<int64_t>(sb.br.a_lo));
  const bool t_any = sb.p_hi > sb.p_lo && sb.p_hi - sb.p_lo > 1;
  const __m512i t_lo = _mm512_set1_epi64(t_any ? static_cast<int64_t>(sb.p_lo + 1) : 0);
  const __m512i t_w = _mm512_set1_epi64(t_any ? static_cast<int64_t>(sb.p_hi - sb.p_lo - 1) : 0);
  const __m512i one = _mm512_set1_epi64(1);
  __m512i kmax = _mm512_setzero_si512();
  __m512i v_above = _mm512_setzero_si512();
  __m256i off = offsets8(i - base);
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t nt = t.n, nw = t.nw;
  const int64_t cap_t = t.cap;
  for (; i + 8 <= hi; i += 8) {
    const __m512i v = _mm512_castpd_si512(_mm512_add_pd(_mm512_loadu_pd(g + i), _mm512_loadu_pd(e + i)));
    const __m512i k = _mm512_and_si512(v, kmask);
    kmax = _mm512_max_epu64(kmax, k);
    const __mmask8 m_above = _mm512_cmpgt_epu64_mask(k, a_hi);
    const __mmask8 m_in = _mm512_mask_cmpge_epu64_mask(static_cast<__mmask8>(~m_above), k, in_lo);
    const __mmask8 m_t = _mm512_mask_cmplt_epu64_mask(m_in, _mm512_sub_epi64(k, t_lo), t_w);
    _mm512_storeu_si512(eo + i, _mm512_maskz_mov_epi64(static_cast<__mmask8>(~m_t), v));
    v_above = _mm512_mask_add_epi64(v_above, m_above, v_above, one);
    _mm512_storeu_si512(t.val + nt, _mm512_maskz_compress_epi64(m_in, v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.idx + nt), _mm256_maskz_compress_epi32(m_in, off));
    nt += __builtin_popcount(m_in);
    const __mmask8 m_h = _mm512_mask_cmpge_epu64_mask(m_in, k, b_hi);
    const __mmask8 m_l = _mm512_mask_cmple_epu64_mask(m_in, k, a_lo);
    const __mmask8 m_w = m_h | m_l;
    _mm512_storeu_si512(t.w + nw, _mm512_maskz_compress_epi64(m_w, k));
    nw += __builtin_popcount(m_w);
    off = _mm256_add_epi32(off, eight);
    if (nt > cap_t) { out.overflow = true; break; }
  }
  finish_sweep<double>(g, e, eo, base, i, hi, sb, t, out, _mm512_reduce_add_epi64(v_above),
                       static_cast<uint64_t>(_mm512_reduce_max_epu64(kmax)), nt, nw);
}

__attribute__((target(DGP_AVX512))) inline void fixup_f64_avx512(
    const InRange<double>& t, int64_t base, const SweepBounds<uint64_t>& sb,
    const Classifier<uint64_t>& cls, int64_t& o_hi, int64_t& o_lo, int64_t& pos,
    int64_t out_end, int64_t* idx, double* val, double* eo) {
  const __m512i kmask = _mm512_set1_epi64(0x7fffffffffffffffll);
  const __m512i vkhi = _mm512_set1_epi64(static_cast<int64_t>(cls.khi));
  const __m512i vklo = _mm512_set1_epi64(static_cast<int64_t>(cls.klo));
  const __m512i p_hi = _mm512_set1_epi64(static_cast<int64_t>(sb.p_hi));
  const __m512i p_lo = _mm512_set1_epi64(static_cast<int64_t>(sb.p_lo));
  const __m512i vbase = _mm512_set1_epi64(base);
  int64_t j = 0;
  for (; j + 8 <= t.n; j += 8) {
    const __m512i v = _mm512_loadu_si512(t.val + j);
    const __m256i off = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.idx + j));
    const __m512i k = _mm512_and_si512(v, kmask);
    const __mmask8 tie_hi = _mm512_cmpeq_epu64_mask(k, vkhi);
    const __mmask8 tie_lo = _mm512_cmpeq_epu64_mask(k, vklo);
    __mmask8 in = _mm512_mask_cmplt_epu64_mask(_mm512_cmpgt_epu64_mask(k, vklo), k, vkhi);
    if (tie_hi | tie_lo) in |= static_cast<__mmask8>(tie_keep_bits(cls, tie_hi, tie_lo, o_hi, o_lo));
    const __mmask8 tent = _mm512_mask_cmplt_epu64_mask(_mm512_cmpgt_epu64_mask(k, p_lo), k, p_hi);
    if (__builtin_expect(static_cast<__mmask8>(in ^ tent) != 0, 0)) {
      alignas(32) int32_t o[8];
      alignas(64) double x[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(o), off);
      _mm512_store_si512(x, v);
      for (uint32_t m = static_cast<__mmask8>(in ^ tent); m; m &= m - 1) {
        const int l = __builtin_ctz(m);
        eo[base + o[l]] = (in >> l) & 1 ? 0.0 : x[l];
      }
    }
    const int cnt = __builtin_popcount(in);
    const __m512i cv = _mm512_maskz_compress_epi64(in, v);
    const __m512i ci = _mm512_add_epi64(vbase, _mm512_cvtepi32_epi64(_mm256_maskz_compress_epi32(in, off)));
    if (pos + 8 <= out_end) {
      _mm512_storeu_si512(val + pos, cv);
      _mm512_storeu_si512(idx + pos, ci);
    } else {
      const __mmask8 m = static_cast<__mmask8>((1u << cnt) - 1);
      _mm512_mask_storeu_epi64(val + pos, m, cv);
      _mm512_mask_storeu_epi64(idx + pos, m, ci);
    }
    pos += cnt;
  }
  fixup_chunk_scalar<double>(t, j, base, sb, cls, o_hi, o_lo, pos, out_end, idx, val, eo);
}

// The same two passes with AVX2, 8 entries per step (float32, and the 16-bit formats
// widened as load16_avx2 does): compaction through the permutation table (avx2_lut)
// instead of vpcompress; keys < 2^31, so signed compares against bounds clamped to
// 0x7fffffff order them as the unsigned ones do (a clamped bound differs only for the
// all-ones NaN key, and any NaN fails the layer anyway).
template <typename T>
__attribute__((target("avx2,popcnt,f16c"))) inline void sweep_avx2(
    const T* g, const T* e, T* eo, int64_t base, int64_t hi,
    const SweepBounds<typename KeyTraits<T>::K>& sb, InRange<T>& t,
    SweepCount<typename KeyTraits<T>::K>& out) {
  using K = typename KeyTraits<T>::K;
  const Avx2Lut& lut = avx2_lut();
  int64_t i = base;
  const __m256i kmask = _mm256_set1_epi32(sizeof(T) == 4 ? 0x7fffffff : 0x7fff);
  const __m256i ones = _mm256_set1_epi32(-1);
  const __m256i a_hi = _mm256_set1_epi32(clamp_key31(sb.br.a_hi));
  const __m256i in_lo = _mm256_set1_epi32(clamp_key31(sb.br.b_lo));
  const __m256i b_hi = _mm256_set1_epi32(clamp_key31(sb.br.b_hi));
  const __m256i a_lo = _mm256_set1_epi32(clamp_key31(sb.br.a_lo));
  const __m256i p_hi = _mm256_set1_epi32(clamp_key31(sb.p_hi));
  const __m256i p_lo = _mm256_set1_epi32(clamp_key31(sb.p_lo));
  __m256i kmax = _mm256_setzero_si256();
  __m256i v_above = _mm256_setzero_si256();
  __m256i off = offsets8(i - base);
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t nt = t.n, nw = t.nw;
  const int64_t cap_t = t.cap;
  for (; i + 8 <= hi; i += 8) {
    const __m256i v = v_lanes_avx2<T>(g, e, i);
    const __m256i k = _mm256_and_si256(v, kmask);
    kmax = _mm256_max_epi32(kmax, k);
    const __m256i gt_ahi = _mm256_cmpgt_epi32(k, a_hi);
    const __m256i in_v = _mm256_andnot_si256(gt_ahi, _mm256_xor_si256(_mm256_cmpgt_epi32(in_lo, k), ones));
    const __m256i tent = _mm256_and_si256(
        in_v, _mm256_and_si256(_mm256_cmpgt_epi32(k, p_lo), _mm256_cmpgt_epi32(p_hi, k)));
    store_lanes_avx2<T>(eo + i, _mm256_andnot_si256(tent, v));
    v_above = _mm256_sub_epi32(v_above, gt_ahi);
    const int m_in = _mm256_movemask_ps(_mm256_castsi256_ps(in_v));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.perm[m_in]));
    store_lanes_avx2<T>(t.val + nt, _mm256_permutevar8x32_epi32(v, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.idx + nt), _mm256_permutevar8x32_epi32(off, perm));
    nt += __builtin_popcount(m_in);
    const __m256i h_v = _mm256_andnot_si256(_mm256_cmpgt_epi32(b_hi, k), in_v);
    const __m256i l_v = _mm256_andnot_si256(_mm256_cmpgt_epi32(k, a_lo), in_v);
    const int m_w = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(h_v, l_v)));
    const __m256i perm_w = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.perm[m_w]));
    store_lanes_avx2<K>(t.w + nw, _mm256_permutevar8x32_epi32(k, perm_w));
    nw += __builtin_popcount(m_w);
    off = _mm256_add_epi32(off, eight);
    if (nt > cap_t) { out.overflow = true; break; }
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v_above);
  int64_t above = 0;
  for (uint32_t x : lanes) above += x;
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), kmax);
  uint32_t kmx = 0;
  for (uint32_t x : lanes) kmx = x > kmx ? x : kmx;
  finish_sweep<T>(g, e, eo, base, i, hi, sb, t, out, above, static_cast<K>(kmx), nt, nw);
}

template <typename T>
__attribute__((target("avx2,popcnt,f16c"))) inline void fixup_avx2(
    const InRange<T>& t, int64_t base, const SweepBounds<typename KeyTraits<T>::K>& sb,
    const Classifier<typename KeyTraits<T>::K>& cls, int64_t& o_hi, int64_t& o_lo,
    int64_t& pos, int64_t out_end, int64_t* idx, T* val, T* eo) {
  const Avx2Lut& lut = avx2_lut();
  const __m256i kmask = _mm256_set1_epi32(sizeof(T) == 4 ? 0x7fffffff : 0x7fff);
  const __m256i vkhi = _mm256_set1_epi32(clamp_key31(cls.khi));
  const __m256i vklo = _mm256_set1_epi32(clamp_key31(cls.klo));
  const __m256i p_hi = _mm256_set1_epi32(clamp_key31(sb.p_hi));
  const __m256i p_lo = _mm256_set1_epi32(clamp_key31(sb.p_lo));
  const __m256i vbase = _mm256_set1_epi64x(base);
  int64_t j = 0;
  for (; j + 8 <= t.n; j += 8) {
    const __m256i v = load_lanes_avx2<T>(t.val + j);
    const __m256i off = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.idx + j));
    const __m256i k = _mm256_and_si256(v, kmask);
    const int tie_hi = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, vkhi)));
    const int tie_lo = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, vklo)));
    int in = _mm256_movemask_ps(_mm256_castsi256_ps(
        _mm256_and_si256(_mm256_cmpgt_epi32(k, vklo), _mm256_cmpgt_epi32(vkhi, k))));
    if (tie_hi | tie_lo) in |= static_cast<int>(tie_keep_bits(cls, tie_hi, tie_lo, o_hi, o_lo));
    const int tent = _mm256_movemask_ps(_mm256_castsi256_ps(
        _mm256_and_si256(_mm256_cmpgt_epi32(k, p_lo), _mm256_cmpgt_epi32(p_hi, k))));
    alignas(32) int32_t o[8];
    alignas(32) uint32_t x[8];
    if (__builtin_expect((in ^ tent) != 0, 0)) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(o), off);
      _mm256_store_si256(reinterpret_cast<__m256i*>(x), v);
      for (uint32_t m = static_cast<uint32_t>(in ^ tent); m; m &= m - 1) {
        const int l = __builtin_ctz(m);
        eo[base + o[l]] = (in >> l) & 1 ? T(0) : from_bits<T>(x[l]);
      }
    }
    const int cnt = __builtin_popcount(in);
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.perm[in]));
    const __m256i cv = _mm256_permutevar8x32_epi32(v, perm);
    const __m256i co = _mm256_permutevar8x32_epi32(off, perm);
    const __m256i i0 = _mm256_add_epi64(vbase, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(co)));
    const __m256i i1 = _mm256_add_epi64(vbase, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(co, 1)));
    if (pos + 8 <= out_end) {
      store_lanes_avx2<T>(val + pos, cv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + pos), i0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + pos + 4), i1);
    } else {
      alignas(32) int64_t xi[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(x), cv);
      _mm256_store_si256(reinterpret_cast<__m256i*>(xi), i0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(xi + 4), i1);
      for (int l = 0; l < cnt && pos + l < out_end; ++l) {
        val[pos + l] = from_bits<T>(x[l]);
        idx[pos + l] = xi[l];
      }
    }
    pos += cnt;
  }
  fixup_chunk_scalar<T>(t, j, base, sb, cls, o_hi, o_lo, pos, out_end, idx, val, eo);
}

// float64 with AVX2, 4 entries per step: 64-bit keys (< 2^63, signed compares against
// clamped bounds as above), chunk offsets carried in 64-bit lanes so one permutation
// (avx2_lut4) compacts values, keys and offsets alike.
inline int64_t clamp_key63(uint64_t b) {
  return static_cast<int64_t>(b > 0x7fffffffffffffffull ? 0x7fffffffffffffffull : b);
}
// The low 32 bits of each 64-bit lane, packed into 128 bits.
__attribute__((target("avx2"))) inline __m128i narrow64_avx2(__m256i x) {
  return _mm256_castsi256_si128(
      _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
}

__attribute__((target("avx2,popcnt"))) inline void sweep_f64_avx2(
    const double* g, const double* e, double* eo, int64_t base, int64_t hi,
    const SweepBounds<uint64_t>& sb, InRange<double>& t, SweepCount<uint64_t>& out) {
  const Avx2Lut4& lut = avx2_lut4();
  int64_t i = base;
  const __m256i kmask = _mm256_set1_epi64x(0x7fffffffffffffffll);
  const __m256i ones = _mm256_set1_epi64x(-1);
  const __m256i a_hi = _mm256_set1_epi64x(clamp_key63(sb.br.a_hi));
  const __m256i in_lo = _mm256_set1_epi64x(clamp_key63(sb.br.b_lo));
  const __m256i b_hi = _mm256_set1_epi64x(clamp_key63(sb.br.b_hi));
  const __m256i a_lo = _mm256_set1_epi64x(clamp_key63(sb.br.a_lo));
  const __m256i p_hi = _mm256_set1_epi64x(clamp_key63(sb.p_hi));
  const __m256i p_lo = _mm256_set1_epi64x(clamp_key63(sb.p_lo));
  __m256i kmax = _mm256_setzero_si256();
  __m256i v_above = _mm256_setzero_si256();
  __m256i off = _mm256_add_epi64(_mm256_setr_epi64x(0, 1, 2, 3), _mm256_set1_epi64x(i - base));
  const __m256i four = _mm256_set1_epi64x(4);
  int64_t nt = t.n, nw = t.nw;
  const int64_t cap_t = t.cap;
  for (; i + 4 <= hi; i += 4) {
    const __m256i v = _mm256_castpd_si256(_mm256_add_pd(_mm256_loadu_pd(g + i), _mm256_loadu_pd(e + i)));
    const __m256i k = _mm256_and_si256(v, kmask);
    kmax = _mm256_blendv_epi8(kmax, k, _mm256_cmpgt_epi64(k, kmax));
    const __m256i gt_ahi = _mm256_cmpgt_epi64(k, a_hi);
    const __m256i in_v = _mm256_andnot_si256(gt_ahi, _mm256_xor_si256(_mm256_cmpgt_epi64(in_lo, k), ones));
    const __m256i tent = _mm256_and_si256(
        in_v, _mm256_and_si256(_mm256_cmpgt_epi64(k, p_lo), _mm256_cmpgt_epi64(p_hi, k)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(eo + i), _mm256_andnot_si256(tent, v));
    v_above = _mm256_sub_epi64(v_above, gt_ahi);
    const int m_in = _mm256_movemask_pd(_mm256_castsi256_pd(in_v));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.perm[m_in]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.val + nt), _mm256_permutevar8x32_epi32(v, perm));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(t.idx + nt),
                     narrow64_avx2(_mm256_permutevar8x32_epi32(off, perm)));
    nt += __builtin_popcount(m_in);
    const __m256i h_v = _mm256_andnot_si256(_mm256_cmpgt_epi64(b_hi, k), in_v);
    const __m256i l_v = _mm256_andnot_si256(_mm256_cmpgt_epi64(k, a_lo), in_v);
    const int m_w = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_or_si256(h_v, l_v)));
    const __m256i perm_w = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.perm[m_w]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.w + nw), _mm256_permutevar8x32_epi32(k, perm_w));
    nw += __builtin_popcount(m_w);
    off = _mm256_add_epi64(off, four);
    if (nt > cap_t) { out.overflow = true; break; }
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v_above);
  const int64_t above = static_cast<int64_t>(lanes[0] + lanes[1] + lanes[2] + lanes[3]);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), kmax);
  const uint64_t kmx = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
  finish_sweep<double>(g, e, eo, base, i, hi, sb, t, out, above, kmx, nt, nw);
}

__attribute__((target("avx2,popcnt"))) inline void fixup_f64_avx2(
    const InRange<double>& t, int64_t base, const SweepBounds<uint64_t>& sb,
    const Classifier<uint64_t>& cls, int64_t& o_hi, int64_t& o_lo, int64_t& pos,
    int64_t out_end, int64_t* idx, double* val, double* eo) {
  const Avx2Lut4& lut = avx2_lut4();
  const __m256i kmask = _mm256_set1_epi64x(0x7fffffffffffffffll);
  const __m256i vkhi = _mm256_set1_epi64x(clamp_key63(cls.khi));
  const __m256i vklo = _mm256_set1_epi64x(clamp_key63(cls.klo));
  const __m256i p_hi = _mm256_set1_epi64x(clamp_key63(sb.p_hi));
  const __m256i p_lo = _mm256_set1_epi64x(clamp_key63(sb.p_lo));
  const __m256i vbase = _mm256_set1_epi64x(base);
  int64_t j = 0;
  for (; j + 4 <= t.n; j += 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.val + j));
    const __m256i off = _mm256_cvtepi32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.idx + j)));
    const __m256i k = _mm256_and_si256(v, kmask);
    const int tie_hi = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(k, vkhi)));
    const int tie_lo = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(k, vklo)));
    int in = _mm256_movemask_pd(_mm256_castsi256_pd(
        _mm256_and_si256(_mm256_cmpgt_epi64(k, vklo), _mm256_cmpgt_epi64(vkhi, k))));
    if (tie_hi | tie_lo) in |= static_cast<int>(tie_keep_bits(cls, tie_hi, tie_lo, o_hi, o_lo));
    const int tent = _mm256_movemask_pd(_mm256_castsi256_pd(
        _mm256_and_si256(_mm256_cmpgt_epi64(k, p_lo), _mm256_cmpgt_epi64(p_hi, k))));
    if (__builtin_expect((in ^ tent) != 0, 0)) {
      for (uint32_t m = static_cast<uint32_t>(in ^ tent); m; m &= m - 1) {
        const int l = __builtin_ctz(m);
        eo[base + t.idx[j + l]] = (in >> l) & 1 ? 0.0 : t.val[j + l];
      }
    }
    const int cnt = __builtin_popcount(in);
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.perm[in]));
    const __m256i cv = _mm256_permutevar8x32_epi32(v, perm);
    const __m256i ci = _mm256_add_epi64(vbase, _mm256_permutevar8x32_epi32(off, perm));
    if (pos + 4 <= out_end) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(val + pos), cv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + pos), ci);
    } else {
      alignas(32) double xv[4];
      alignas(32) int64_t xi[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(xv), cv);
      _mm256_store_si256(reinterpret_cast<__m256i*>(xi), ci);
      for (int l = 0; l < cnt && pos + l < out_end; ++l) {
        val[pos + l] = xv[l];
        idx[pos + l] = xi[l];
      }
    }
    pos += cnt;
  }
  fixup_chunk_scalar<double>(t, j, base, sb, cls, o_hi, o_lo, pos, out_end, idx, val, eo);
}

// The one-sweep hinted path's kernels by dtype and SIMD level (false: no vector kernel;
// the caller runs the scalar pass).
// Whether the one-sweep path has vector kernels for (T, level): every float dtype with
// AVX-512 or AVX2. On scalar CPUs select_ef_multi_into copies e and runs the in-place path
// (the scalar sweep measured 4-11x slower than the in-place SIMD passes: 1M entries, fp64
// 6.0 vs 1.6 ms).
template <typename T>
inline constexpr bool kOneSweepType = std::is_same_v<T, float> || Is16<T>::value;
template <typename T>
inline bool one_sweep_vectorized(Simd s) {
  return (kOneSweepType<T> || std::is_same_v<T, double>) &&
         (s == Simd::kAvx512 || s == Simd::kAvx2);
}

template <typename T>
inline bool sweep_simd(Simd s, const T* g, const T* e, T* eo, int64_t base, int64_t hi,
                       const SweepBounds<typename KeyTraits<T>::K>& sb, InRange<T>& t,
                       SweepCount<typename KeyTraits<T>::K>& out) {
  if constexpr (kOneSweepType<T>) {
    if (s == Simd::kAvx512) {
      sweep_avx512<T>(g, e, eo, base, hi, sb, t, out);
      return true;
    }
    if (s == Simd::kAvx2) {
      sweep_avx2<T>(g, e, eo, base, hi, sb, t, out);
      return true;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (s == Simd::kAvx512) {
      sweep_f64_avx512(g, e, eo, base, hi, sb, t, out);
      return true;
    }
    if (s == Simd::kAvx2) {
      sweep_f64_avx2(g, e, eo, base, hi, sb, t, out);
      return true;
    }
  }
  return false;
}

template <typename T>
inline bool fixup_simd(Simd s, const InRange<T>& t, int64_t base,
                       const SweepBounds<typename KeyTraits<T>::K>& sb,
                       const Classifier<typename KeyTraits<T>::K>& cls, int64_t& o_hi,
                       int64_t& o_lo, int64_t& pos, int64_t out_end, int64_t* idx, T* val, T* eo) {
  if constexpr (kOneSweepType<T>) {
    if (s == Simd::kAvx512) {
      fixup_avx512<T>(t, base, sb, cls, o_hi, o_lo, pos, out_end, idx, val, eo);
      return true;
    }
    if (s == Simd::kAvx2) {
      fixup_avx2<T>(t, base, sb, cls, o_hi, o_lo, pos, out_end, idx, val, eo);
      return true;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (s == Simd::kAvx512) {
      fixup_f64_avx512(t, base, sb, cls, o_hi, o_lo, pos, out_end, idx, val, eo);
      return true;
    }
    if (s == Simd::kAvx2) {
      fixup_f64_avx2(t, base, sb, cls, o_hi, o_lo, pos, out_end, idx, val, eo);
      return true;
    }
  }
  return false;
}

#endif  // DGP_X86

}  // namespace dgp
