// CPU kernels of the dgp:: band-selection ops (schemas: dgp_kernels/ops/select.py).
//
// This file only implements: argument checks (TORCH_CHECK_VALUE/TYPE, so Python sees
// ValueError/TypeError with the same wording as the wrappers), the layer scheduler
// (a fork-join pool across small layers, and across chunks within large ones), the run-time SIMD
// choice, and thin ATen adapters around the torch-free core in select_core.h.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>


#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "select_core.h"
#include "select_simd.h"
#include "thread_pool.h"

namespace dgp {

// ------------------------------------------------------------------ SIMD level (run time)
static std::atomic<int> g_simd_level{-1};
static int simd_best() {
  static const int best = static_cast<int>(detect_simd());
  return best;
}
static Simd simd_current() {
  int s = g_simd_level.load(std::memory_order_relaxed);
  if (s < 0) {
    s = simd_best();
    g_simd_level.store(s, std::memory_order_relaxed);
  }
  return static_cast<Simd>(s);
}
static const char* simd_name(Simd s) {
  switch (s) {
    case Simd::kAvx512: return "avx512";
    case Simd::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// ------------------------------------------------------------------ scheduler
template <typename T>
struct LayerIO {
  const T* g = nullptr;
  T* e = nullptr;      // residual (error feedback) or nullptr
  T* dense = nullptr;  // dense output (Sink::kDense)
  int64_t n = 0;
  int64_t* idx = nullptr;  // sparse outputs: this layer's slice
  T* val = nullptr;
  T* eo = nullptr;  // new residual (select_ef_multi_into), or nullptr: in place on e
};

// Layers at least this large are split into chunks worked on by several threads; smaller
// ones are spread over threads whole, and only when the call's small layers hold at least
// this many entries in all: a fork-join costs ~5-30 us (more when another process holds a
// core), a 2^18-entry layer ~150 us of one thread's sweeps (ResNet-18: 8 of its 62
// tensors, 10.7M of 11.2M entries, are split).
constexpr int64_t kParMin = int64_t(1) << 18;
// Target entries per chunk of a split layer on the sampled path: several chunks per thread,
// handed out one at a time, so a thread that loses its core to another process delays the
// call by one chunk, not by half the layer.
constexpr int64_t kChunkTarget = int64_t(1) << 18;
// Chunk histograms are uint32: keep chunks below 2^31 entries.
constexpr int64_t kMaxChunk = int64_t(1) << 31;

template <typename T, bool EF>
void scan_nan(const T* g, const T* e, Plan<typename KeyTraits<T>::K>& p) {
  using K = typename KeyTraits<T>::K;
  K kmax = 0;
  for (int64_t i = 0; i < p.cnt.n; ++i) kmax = std::max(kmax, key_of(load_v<T, EF>(g, e, i)));
  p.has_nan = kmax > KeyTraits<T>::kInf;
  // Nothing is kept: a classifier with khi == klo == 0 and an empty ordinal window.
  p.khi = p.klo = 0;
  p.s_hi = p.t_lo = 0;
  p.nchunks = 1;
  p.out_off = {0, 0};
  p.ord_hi = {0};
  p.ord_lo = {0};
}

// The counting sweep of the sampled path for one layer: SIMD for float32 where available.
static std::atomic<bool> g_sample_enabled{true};

// How layers were analysed since the last reset: direct, radix, sampled, sampled->radix
// fallbacks, hinted brackets that held, hinted brackets that missed (the layer then took
// another path), and of those that held on the one-sweep path, the ones resolved from the
// in-range entries after a window miss. Exposed to Python (tests assert each path is really
// taken).
static std::atomic<int64_t> g_path_count[7];
static bool sample_enabled() { return g_sample_enabled.load(std::memory_order_relaxed); }

template <typename T, bool EF>
auto count_fn(const LayerIO<T>& io) {
  using K = typename KeyTraits<T>::K;
  return [&io](int, int64_t lo, int64_t hi, const Bracket<K>& br, K* ch, int64_t cap_h, K* cl,
               int64_t cap_l, ChunkCount<K>& out) {
#if DGP_X86
    if (count_simd<T, EF>(simd_current(), io.g, io.e, lo, hi, br, ch, cap_h, cl, cap_l, out))
      return;
#endif
    count_chunk_scalar<T, EF>(io.g, io.e, lo, hi, br, ch, cap_h, cl, cap_l, out);
  };
}

// Returns false when the chunk did not write exactly the entries its plan promised (an
// internal invariant; checked by the caller after the fork-join, since nothing may throw
// inside a pool task).
template <typename T, bool EF, Sink S>
bool write_chunk(const LayerIO<T>& io, const Plan<typename KeyTraits<T>::K>& p, int c) {
  const int C = p.nchunks;
  const int64_t lo = chunk_begin(io.n, c, C), hi = chunk_begin(io.n, c + 1, C);
  Classifier<typename KeyTraits<T>::K> cls{p.khi, p.klo, p.s_hi, p.t_lo, p.khi == p.klo};
  int64_t o_hi = p.ord_hi[c], o_lo = p.ord_lo[c], pos = p.out_off[c];
  const int64_t end = p.out_off[c + 1];
  bool done = false;
#if DGP_X86
  if constexpr (S == Sink::kSparse)
    done = write_simd<T, EF>(simd_current(), io.g, io.e, lo, hi, cls, o_hi, o_lo, pos, end,
                             io.idx, io.val);
#endif
  if (!done)
    write_scalar<T, EF, S>(io.g, io.e, io.dense, lo, hi, cls, o_hi, o_lo, pos, end, io.idx,
                           io.val);
  if constexpr (S == Sink::kSparse) return pos == end;
  return true;
}

// Runs the whole band selection for a list of layers. Every layer is analysed (and checked
// for NaN) before anything is written. Returns the index of the first layer holding a NaN
// (nothing written), or -1 on success.
//
// Threads (ThreadPool, never an OpenMP region): one fork-join analyses all small layers,
// each split layer's counting sweep is one fork-join, and one more writes every chunk of
// every layer. A call whose layers are all small runs on the calling thread only.
template <typename T, bool EF, Sink S>
int64_t run_layers(const std::vector<LayerIO<T>>& L, double top, double keep, int threads,
                   int64_t* hint = nullptr) {
  using K = typename KeyTraits<T>::K;
  const int64_t nl = static_cast<int64_t>(L.size());
  std::vector<Plan<K>> plans(nl);
  std::vector<int64_t> whole, split;
  std::vector<uint8_t> split_set(nl, 0);
  for (int64_t l = 0; l < nl; ++l) {
    plans[l].cnt = band_counts(L[l].n, top, keep);
    if (L[l].n == 0) continue;
    if (threads > 1 && L[l].n >= kParMin) {
      split.push_back(l);
      split_set[l] = 1;
    } else {
      whole.push_back(l);
    }
  }
  ThreadPool& pool = ThreadPool::get();
  auto radix_chunks = [&](int64_t n) {
    int64_t C = threads;
    while (n / C >= kMaxChunk) C *= 2;
    return static_cast<int>(C);
  };
  auto sampled_chunks = [&](int64_t n) {
    const int64_t C = std::max<int64_t>(threads, std::min<int64_t>(n / kChunkTarget, 64));
    return static_cast<int>(std::max<int64_t>(C, radix_chunks(n)));
  };
  auto seq = [](int C, auto&& f) {
    for (int c = 0; c < C; ++c) f(c);
  };
  auto par = [&](int C, auto&& f) { pool.run(C, threads, [&](int64_t c) { f(static_cast<int>(c)); }); };

  // Phase 1: analysis (reads only). `C` chunks (the write pass's partition of the layer),
  // worked on by the pool when `parallel`, else one after another on this thread.
  auto analyze = [&](int64_t l, int C, bool parallel) {
    Plan<K>& p = plans[l];
    const LayerIO<T>& io = L[l];
    if (p.cnt.k_keep == 0) {
      scan_nan<T, EF>(io.g, io.e, p);
      return;
    }
    if (C == 1 && p.cnt.n <= kDirectMax) {
      analyze_direct<T, EF>(io.g, io.e, p, [&](K* keys, K& kmin, K& kmax) {
#if DGP_X86
        return keys_simd<T, EF>(simd_current(), io.g, io.e, io.n, keys, kmin, kmax);
#else
        return false;
#endif
      });
      g_path_count[0]++;
      return;
    }
    if (hint != nullptr && p.cnt.n > kDirectMax) {
      Bracket<K> br;
      bool merged = false;
      if (hint_bracket<T>(hint + l * kHintCols, br, merged)) {
        // Candidate buffers of 1/4 of the chunk per bracket (only the used prefix is touched):
        // real ResNet-18 gradients at 1/8 overflowed on 3 of 4 misses; wider is no help.
        const bool ok =
            parallel ? analyze_bracketed<T, EF>(p, C, br, merged, 0.25, 0.25,
                                                [&](auto&& f) { par(C, f); }, count_fn<T, EF>(io))
                     : analyze_bracketed<T, EF>(p, C, br, merged, 0.25, 0.25,
                                                [&](auto&& f) { seq(C, f); }, count_fn<T, EF>(io));
        if (ok) {
          g_path_count[4]++;
          return;
        }
        g_path_count[5]++;
      }
    }
    if (p.cnt.n >= kSampleMin && sample_enabled()) {
      const bool ok =
          parallel ? analyze_sampled<T, EF>(io.g, io.e, p, C, [&](auto&& f) { par(C, f); },
                                            count_fn<T, EF>(io))
                   : analyze_sampled<T, EF>(io.g, io.e, p, C, [&](auto&& f) { seq(C, f); },
                                            count_fn<T, EF>(io));
      if (ok) {
        g_path_count[2]++;
        return;
      }
      g_path_count[3]++;
    } else {
      g_path_count[1]++;
    }
    const int Cr = split_set[l] ? radix_chunks(p.cnt.n) : 1;
    if (parallel) {
      analyze_radix<T, EF>(io.g, io.e, p, Cr, [&](auto&& f) { par(Cr, f); });
    } else {
      analyze_radix<T, EF>(io.g, io.e, p, Cr, [&](auto&& f) { seq(Cr, f); });
    }
  };
  // Which split layers are analysed by all threads together (a fork-join per layer, with
  // serial steps between: sampling, rank selection) and which whole by one thread, beside
  // other layers in one fork-join for all of them. Whole is cheaper when the layers can
  // keep every thread busy: a layer is split for analysis only when it holds more than
  // 1/(2*threads) of all entries (one big tensor: split; ResNet-18, largest layer 21% of
  // the list: every layer whole, largest first).
  std::vector<int64_t> par_an, seq_an;
  int64_t total = 0;
  for (int64_t l = 0; l < nl; ++l) total += L[l].n;
  for (int64_t l = 0; l < nl; ++l) {
    if (L[l].n == 0) continue;
    if (split_set[l] && L[l].n * 2 * threads > total) par_an.push_back(l);
    else seq_an.push_back(l);
  }
  const int64_t nw = static_cast<int64_t>(seq_an.size());
  int64_t whole_elems = 0;
  for (int64_t l : seq_an) whole_elems += L[l].n;
  const int whole_threads = (threads > 1 && nw > 1 && whole_elems >= kParMin) ? threads : 1;
  // Several threads: largest first, so the last tasks handed out are the shortest and the
  // threads finish together. One thread: list order, which the write pass reverses, so it
  // starts on the layers still in L3 (ResNet-18 with the largest-first order at 1 thread:
  // the counting sweep rose from 13% to 22% of the profile, the write fell from 23% to 17%).
  if (whole_threads > 1)
    std::stable_sort(seq_an.begin(), seq_an.end(),
                     [&](int64_t a, int64_t b) { return L[a].n > L[b].n; });
  auto chunks_of = [&](int64_t l) {
    if (!split_set[l]) return 1;
    return (plans[l].cnt.n >= kSampleMin && sample_enabled()) ? sampled_chunks(L[l].n)
                                                               : radix_chunks(L[l].n);
  };
  pool.run(nw, whole_threads, [&](int64_t j) { analyze(seq_an[j], chunks_of(seq_an[j]), false); });
  for (int64_t l : par_an) analyze(l, chunks_of(l), true);
  for (int64_t l = 0; l < nl; ++l)
    if (plans[l].has_nan) return l;
  if (hint != nullptr) {
    for (int64_t l = 0; l < nl; ++l) {
      int64_t* row = hint + l * kHintCols;
      if (plans[l].cnt.k_keep == 0) std::fill(row, row + kHintCols, int64_t(0));
      else hint_update<T>(row, plans[l].khi, plans[l].klo);
    }
  }

  // Phase 2: ordered compaction / writes, every chunk of every layer in one fork-join.
  // Reverse order: the layers analysed last are still in L3 (ResNet-18's last layers are
  // its largest), so their second read is cheaper. Output slots are precomputed, so the
  // order changes nothing in the results.
  std::vector<std::pair<int64_t, int>> tasks;
  for (auto it = split.rbegin(); it != split.rend(); ++it)
    for (int c = 0; c < plans[*it].nchunks; ++c) tasks.emplace_back(*it, c);
  for (int64_t j = static_cast<int64_t>(whole.size()) - 1; j >= 0; --j)
    tasks.emplace_back(whole[j], 0);
  std::atomic<bool> consistent{true};
  const int write_threads = split.empty() ? whole_threads : threads;
  pool.run(static_cast<int64_t>(tasks.size()), write_threads, [&](int64_t t) {
    const auto [l, c] = tasks[t];
    if (!write_chunk<T, EF, S>(L[l], plans[l], c)) consistent = false;
  });
  TORCH_INTERNAL_ASSERT(consistent.load(), "dgp: a compaction chunk wrote a different number "
                        "of entries than planned (please report this input)");
  return -1;
}

// ------------------------------------------------------------------ out-of-place residuals
// A growable per-thread scratch (never shrunk; only the used prefix is touched): the
// one-sweep path's in-range buffers (room for 4 + sizeof(T) bytes per entry of the largest
// hinted layer, of which about a quarter is written at the defaults) and window keys. Kept
// across calls so a training loop does not page-fault a fresh multi-MiB buffer every step,
// and reused layer after layer so it stays in cache between a layer's sweep and its fix-up.
struct Scratch {
  std::unique_ptr<char[]> p;
  size_t cap = 0;
  char* get(size_t bytes) {
    if (bytes > cap) {
      p.reset(new char[bytes]);
      cap = bytes;
    }
    return p.get();
  }
};
inline Scratch& thread_scratch(int which) {
  static thread_local Scratch s[2];  // in-range buffers, window keys
  return s[which];
}

// After the sweep, with both ranks inside the in-range entries but not both inside their
// windows (a boundary moved past its window into the mid range or the other window): the
// exact keys and per-chunk tie counts from all in-range keys.
template <typename T>
void in_range_plan(Plan<typename KeyTraits<T>::K>& p, int C, const std::vector<InRange<T>>& tr,
                   const std::vector<SweepCount<typename KeyTraits<T>::K>>& cc, int64_t above,
                   int64_t nin) {
  using K = typename KeyTraits<T>::K;
  const int64_t r_hi = p.cnt.k_top, r_lo = p.cnt.k_top + p.cnt.k_keep - 1;
  std::vector<K> keys;
  keys.reserve(static_cast<size_t>(nin));
  for (int c = 0; c < C; ++c)
    for (int64_t j = 0; j < tr[c].n; ++j) keys.push_back(key_of(tr[c].val[j]));
  const int64_t rr[2] = {r_hi - above, r_lo - above};
  K kk[2];
  select_desc_ranks(keys.data(), nin, rr, rr[0] == rr[1] ? 1 : 2, kk);
  if (rr[0] == rr[1]) kk[1] = kk[0];
  p.khi = kk[0];
  p.klo = kk[1];
  std::vector<int64_t> gt_hi(C), gt_lo(C), eq_hi(C), eq_lo(C);
  for (int c = 0; c < C; ++c) {
    int64_t g_h = 0, e_h = 0, g_l = 0, e_l = 0;
    for (int64_t j = 0; j < tr[c].n; ++j) {
      const K k = key_of(tr[c].val[j]);
      g_h += k > p.khi;
      e_h += k == p.khi;
      g_l += k > p.klo;
      e_l += k == p.klo;
    }
    gt_hi[c] = cc[c].above + g_h;
    eq_hi[c] = e_h;
    gt_lo[c] = cc[c].above + g_l;
    eq_lo[c] = e_l;
  }
  finalize_plan(p, C, gt_hi, gt_lo, eq_hi, eq_lo);
}

// One layer on the one-sweep path with C chunks (`run`: how chunk tasks execute). Returns
// 1 when done (outputs written), 3 when a fix-up chunk wrote a different number of
// entries than planned (an internal invariant: nothing may throw inside a pool task), 2 on
// a NaN, 0 when a rank lies outside [b_lo, a_hi] or a buffer filled (eo is then partly
// written; e, idx and val are not).
template <typename T, typename Runner>
int one_sweep_layer(const LayerIO<T>& io, Plan<typename KeyTraits<T>::K>& p, int C,
                    const SweepBounds<typename KeyTraits<T>::K>& sb, Scratch& sc, Scratch& sw,
                    Runner&& run) {
  using K = typename KeyTraits<T>::K;
  const int64_t n = io.n;
  // In-range capacity per chunk. A whole layer gets room for every entry (only the used
  // prefix is touched), so it never overflows: a wide bracket costs fix-up work, never a
  // second sweep. A split layer's chunks get their share of k_keep (1/4 more: chunks differ)
  // plus half the chunk.
  std::vector<int64_t> base_t(C + 1, 0);
  std::vector<InRange<T>> tr(C);
  for (int c = 0; c < C; ++c) {
    const int64_t len = chunk_begin(n, c + 1, C) - chunk_begin(n, c, C);
    const double share = 1.25 * static_cast<double>(p.cnt.k_keep) * len / n;
    tr[c].cap = C == 1 ? len : std::min<int64_t>(len, static_cast<int64_t>(share) + len / 2 + 256);
    base_t[c + 1] = base_t[c] + ((tr[c].cap + kSimdSlack + 15) / 16) * 16;
  }
  const size_t st = static_cast<size_t>(base_t[C]);
  char* mem = sc.get(st * (sizeof(int32_t) + sizeof(T)) + 2 * 64);
  auto align64 = [](void* q) {
    return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(q) + 63) & ~uintptr_t(63));
  };
  int32_t* tidx = reinterpret_cast<int32_t*>(align64(mem));
  T* tval = reinterpret_cast<T*>(align64(tidx + st));
  // Window keys: a second region, each chunk's in-range slots twice (the sweep appends both
  // windows' keys to the first half; the hi ones are then compacted there, the lo ones moved
  // to the second half).
  K* const wh0 = reinterpret_cast<K*>(align64(sw.get(2 * st * sizeof(K) + 64)));
  K* const wl0 = wh0 + st;
  for (int c = 0; c < C; ++c) {
    tr[c].idx = tidx + base_t[c];
    tr[c].val = tval + base_t[c];
    tr[c].w = wh0 + base_t[c];
  }
  std::vector<SweepCount<K>> cc(C);
  run([&](int c) {
    const int64_t lo = chunk_begin(n, c, C), hi = chunk_begin(n, c + 1, C);
#if DGP_X86
    if (sweep_simd<T>(simd_current(), io.g, io.e, io.eo, lo, hi, sb, tr[c], cc[c])) return;
#endif
    sweep_chunk_scalar<T>(io.g, io.e, io.eo, lo, lo, hi, sb, tr[c], cc[c]);
  });
  for (int c = 0; c < C; ++c)
    if (cc[c].overflow) return 0;  // (a NaN after the overflow is found by the other path)
  int64_t above = 0, nin = 0;
  for (int c = 0; c < C; ++c) {
    if (cc[c].kmax > KeyTraits<T>::kInf) {
      p.has_nan = true;
      return 2;
    }
    above += cc[c].above;
    nin += tr[c].n;
  }
  const int64_t r_hi = p.cnt.k_top, r_lo = p.cnt.k_top + p.cnt.k_keep - 1;
  if (!(above <= r_hi && r_lo < above + nin)) return 0;
  std::vector<int64_t> ch(C, 0), cl(C, 0);  // window counts per chunk
  int64_t nh = 0, nl = 0;
  for (int c = 0; c < C; ++c) {
    K* const h = wh0 + base_t[c];
    K* const l = wl0 + base_t[c];
    int64_t a = 0, b = 0;
    for (int64_t j = 0; j < tr[c].nw; ++j) {  // branch-free split (a <= j: in place)
      const K k = h[j];
      const bool is_hi = k >= sb.br.b_hi;
      h[a] = k;
      l[b] = k;
      a += is_hi;
      b += !is_hi;
    }
    nh += ch[c] = a;
    nl += cl[c] = b;
  }
  const bool windows = above <= r_hi && r_hi < above + nh && above + nin - nl <= r_lo;
  if (windows) {
    // The exact keys and per-chunk tie counts from the window keys, as analyze_bracketed.
    const std::vector<int64_t>& bh = base_t;
    const std::vector<int64_t>& bl = base_t;
    auto gather = [&](const K* src, const std::vector<int64_t>& b,
                      const std::vector<int64_t>& cnt, int64_t total) {
      std::vector<K> v;
      v.reserve(static_cast<size_t>(total));
      for (int c = 0; c < C; ++c) v.insert(v.end(), src + b[c], src + b[c] + cnt[c]);
      return v;
    };
    std::vector<K> all_h = gather(wh0, bh, ch, nh);
    const int64_t rh = r_hi - above;
    select_desc_ranks(all_h.data(), nh, &rh, 1, &p.khi);
    std::vector<K> all_l = gather(wl0, bl, cl, nl);
    const int64_t rl = r_lo - (above + nin - nl);
    select_desc_ranks(all_l.data(), nl, &rl, 1, &p.klo);
    std::vector<int64_t> gt_hi(C), gt_lo(C), eq_hi(C), eq_lo(C);
    for (int c = 0; c < C; ++c) {
      const K* h = wh0 + bh[c];
      const K* l = wl0 + bl[c];
      int64_t g_h = 0, e_h = 0, g_l = 0, e_l = 0;
      for (int64_t j = 0; j < ch[c]; ++j) {
        g_h += h[j] > p.khi;
        e_h += h[j] == p.khi;
      }
      for (int64_t j = 0; j < cl[c]; ++j) {
        g_l += l[j] > p.klo;
        e_l += l[j] == p.klo;
      }
      gt_hi[c] = cc[c].above + g_h;
      eq_hi[c] = e_h;
      gt_lo[c] = cc[c].above + tr[c].n - cl[c] + g_l;
      eq_lo[c] = e_l;
    }
    finalize_plan(p, C, gt_hi, gt_lo, eq_hi, eq_lo);
  } else {
    in_range_plan<T>(p, C, tr, cc, above, nin);
    g_path_count[6]++;
  }
  std::atomic<bool> consistent{true};
  const Classifier<K> cls{p.khi, p.klo, p.s_hi, p.t_lo, p.khi == p.klo};
  run([&](int c) {
    int64_t o_hi = p.ord_hi[c], o_lo = p.ord_lo[c], pos = p.out_off[c];
    const int64_t end = p.out_off[c + 1], base = chunk_begin(n, c, C);
    bool done = false;
#if DGP_X86
    done = fixup_simd<T>(simd_current(), tr[c], base, sb, cls, o_hi, o_lo, pos, end, io.idx,
                         io.val, io.eo);
#endif
    if (!done)
      fixup_chunk_scalar<T>(tr[c], 0, base, sb, cls, o_hi, o_lo, pos, end, io.idx, io.val,
                            io.eo);
    if (pos != end) consistent = false;
  });
  return consistent.load() ? 1 : 3;
}

// The one-sweep path doubles the hint's margins: there a wide bracket costs only fix-up work
// (a whole layer's buffers never overflow), a miss a second and third sweep. ResNet-18
// gradients drifting as AR(1) (0.9), 60 steps, 1 thread: 85 of 935 layer-steps missed with
// the hint's margins, 18 with 1.5x, 4 with 2x, 0 with 3x (minimum times equal within 1%:
// wider windows cost gather and selection work what they save in misses).
constexpr int kIntoMarginScale8 = 16;  // margins x 16/8

// select_ef_multi_into: error feedback with the new residual written to L[l].eo (e is read
// only). Layers whose hint row brackets both ranks take the one-sweep path (float32 with
// AVX-512: one_sweep_vectorized); every other
// layer (small ones, misses, no hint row) copies e into eo and takes run_layers's in-place
// path on eo. Returns the index of the first layer holding a NaN (eo unspecified, hint
// unchanged), or -1 on success (hint rows updated as run_layers does).
template <typename T>
int64_t run_layers_into(const std::vector<LayerIO<T>>& L, double top, double keep, int threads,
                        int64_t* hint) {
  using K = typename KeyTraits<T>::K;
  const int64_t nl = static_cast<int64_t>(L.size());
  std::vector<Plan<K>> plans(nl);
  std::vector<SweepBounds<K>> sbs(nl);
  std::vector<uint8_t> state(nl, 0);  // 0 other path, 1 done, 2 NaN, 3 inconsistent
  std::vector<int64_t> one, split;
  int64_t total = 0;
  for (int64_t l = 0; l < nl; ++l) total += L[l].n;
#if DGP_X86
  const bool vectorized = one_sweep_vectorized<T>(simd_current());
#else
  const bool vectorized = false;
#endif
  for (int64_t l = 0; l < nl; ++l) {
    plans[l].cnt = band_counts(L[l].n, top, keep);
    if (!vectorized || L[l].n <= kDirectMax || plans[l].cnt.k_keep == 0) continue;
    bool m = false;
    SweepBounds<K>& sb = sbs[l];
    if (!hint_bracket<T>(hint + l * kHintCols, sb.br, m, &sb.p_hi, &sb.p_lo, kIntoMarginScale8))
      continue;
    // Merged brackets (margins wider than the band's own key span, as while the residuals
    // build up in the first steps of error feedback) make the whole band one window: the
    // one sweep would append and select most of the layer. Such layers take the copy and
    // in-place path instead (ResNet-18 list, 1 thread: steps 3-8 of drifting gradients
    // 25-59 ms -> 15-22 ms; later steps unchanged).
    if (m) continue;
    // Split across threads only a layer too big to balance whole (as run_layers does).
    if (threads > 1 && L[l].n >= kParMin && L[l].n * 2 * threads > total) split.push_back(l);
    else one.push_back(l);
  }
  ThreadPool& pool = ThreadPool::get();
  int64_t one_elems = 0;
  for (int64_t l : one) one_elems += L[l].n;
  const int one_threads =
      (threads > 1 && one.size() > 1 && one_elems >= kParMin) ? threads : 1;
  if (one_threads > 1)
    std::stable_sort(one.begin(), one.end(),
                     [&](int64_t a, int64_t b) { return L[a].n > L[b].n; });
  pool.run(static_cast<int64_t>(one.size()), one_threads, [&](int64_t j) {
    const int64_t l = one[j];
    int C = 1;
    while (L[l].n / C >= kMaxChunk) C *= 2;
    state[l] = static_cast<uint8_t>(
        one_sweep_layer<T>(L[l], plans[l], C, sbs[l], thread_scratch(0), thread_scratch(1),
                           [&](auto&& f) {
                             for (int c = 0; c < C; ++c) f(c);
                           }));
  });
  for (int64_t l : split) {
    int64_t C = std::max<int64_t>(threads, std::min<int64_t>(L[l].n / kChunkTarget, 64));
    while (L[l].n / C >= kMaxChunk) C *= 2;
    const int Ci = static_cast<int>(C);
    state[l] = static_cast<uint8_t>(one_sweep_layer<T>(
        L[l], plans[l], Ci, sbs[l], thread_scratch(0), thread_scratch(1), [&](auto&& f) {
          pool.run(Ci, threads, [&](int64_t c) { f(static_cast<int>(c)); });
        }));
  }
  for (int64_t l = 0; l < nl; ++l)
    TORCH_INTERNAL_ASSERT(state[l] != 3, "dgp: a fix-up chunk wrote a different number of "
                          "entries than planned (please report this input)");
  for (int64_t l : one) g_path_count[state[l] == 0 ? 5 : 4]++;
  for (int64_t l : split) g_path_count[state[l] == 0 ? 5 : 4]++;

  // The rest: e copied into eo, then the in-place path on eo (empty hint rows: no second
  // try of a bracket that just missed).
  std::vector<int64_t> rest;
  int64_t first_nan = -1;
  for (int64_t l = 0; l < nl; ++l) {
    if (state[l] == 2 && first_nan < 0) first_nan = l;
    if (state[l] == 0 && L[l].n > 0) rest.push_back(l);
  }
  if (first_nan >= 0) {
    // Name the first NaN layer in list order, as the in-place path does.
    for (int64_t l : rest) {
      if (l > first_nan) break;
      Plan<K> q;
      q.cnt = plans[l].cnt;
      scan_nan<T, true>(L[l].g, L[l].e, q);
      if (q.has_nan) return l;
    }
    return first_nan;
  }
  std::vector<int64_t> rows(rest.size() * kHintCols, 0);
  if (!rest.empty()) {
    int64_t rest_elems = 0;
    for (int64_t l : rest) rest_elems += L[l].n;
    pool.run(static_cast<int64_t>(rest.size()),
             (threads > 1 && rest.size() > 1 && rest_elems >= kParMin) ? threads : 1,
             [&](int64_t j) {
               const LayerIO<T>& io = L[rest[j]];
               std::memcpy(io.eo, io.e, static_cast<size_t>(io.n) * sizeof(T));
             });
    std::vector<LayerIO<T>> R;
    R.reserve(rest.size());
    for (int64_t l : rest) {
      LayerIO<T> io = L[l];
      io.e = io.eo;
      io.eo = nullptr;
      R.push_back(io);
    }
    const int64_t bad = run_layers<T, true, Sink::kSparse>(R, top, keep, threads, rows.data());
    if (bad >= 0) return rest[bad];
  }
  for (int64_t l = 0; l < nl; ++l) {
    if (state[l] == 1) hint_update<T>(hint + l * kHintCols, plans[l].khi, plans[l].klo);
  }
  for (size_t j = 0; j < rest.size(); ++j) {
    int64_t* row = hint + rest[j] * kHintCols;
    const int64_t* got = rows.data() + j * kHintCols;
    if (got[0] == 0) std::fill(row, row + kHintCols, int64_t(0));
    else hint_update<T>(row, static_cast<K>(got[1]), static_cast<K>(got[2]));
  }
  for (int64_t l = 0; l < nl; ++l)
    if (L[l].n == 0) std::fill(hint + l * kHintCols, hint + (l + 1) * kHintCols, int64_t(0));
  return -1;
}

// ------------------------------------------------------------------ argument checks
// Shortest decimal that round-trips, so 1.0000001 is not printed as "1".
static std::string fmt(double x) {
  char buf[32];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  return buf;
}

static void check_fractions(double top, double keep) {
  TORCH_CHECK_VALUE(std::isfinite(top) && top >= 0.0 && top <= 1.0,
                    "top must be in [0, 1], got ", fmt(top));
  TORCH_CHECK_VALUE(std::isfinite(keep) && keep >= 0.0 && keep <= 1.0,
                    "keep must be in [0, 1], got ", fmt(keep));
  TORCH_CHECK_VALUE(top + keep <= 1.0 + 1e-9,
                    "top + keep must be <= 1 (they are fractions of the same tensor), got top=",
                    fmt(top), " + keep=", fmt(keep), " = ", fmt(top + keep));
}

static void check_grad(const at::Tensor& g, const std::string& name) {
  const auto st = g.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   name, " has dtype ", st,
                   "; DGP supports float32, float64, float16 and bfloat16");
  TORCH_CHECK_VALUE(g.device().is_cpu(), name, " must be a CPU tensor for this kernel, got ",
                    g.device());
}

static void check_residual(const at::Tensor& g, const at::Tensor& e, const std::string& name) {
  TORCH_CHECK_VALUE(e.sizes() == g.sizes() && e.scalar_type() == g.scalar_type() &&
                        e.device() == g.device(),
                    name, " must match its gradient in shape, dtype and device: gradient is ",
                    g.sizes(), " ", g.scalar_type(), " on ", g.device(), ", ", name, " is ",
                    e.sizes(), " ", e.scalar_type(), " on ", e.device());
}

static void check_list(at::TensorList gs, const char* name) {
  for (size_t i = 0; i < gs.size(); ++i) {
    check_grad(gs[i], std::string(name) + "[" + std::to_string(i) + "]");
    TORCH_CHECK_VALUE(gs[i].scalar_type() == gs[0].scalar_type() &&
                          gs[i].device() == gs[0].device(),
                      "all tensors of ", name,
                      " must share one dtype and device (values are returned in one flat "
                      "tensor): ", name, "[0] is ", gs[0].scalar_type(), " on ", gs[0].device(),
                      ", ", name, "[", i, "] is ", gs[i].scalar_type(), " on ", gs[i].device());
  }
}

static std::string nan_message(const std::string& g, bool ef, const std::string& e) {
  if (ef)
    return g + " + " + e +
           " contains NaN (a NaN gradient or residual, or inf - inf); DGP cannot rank NaN "
           "gradients";
  return g + " contains NaN; DGP cannot rank NaN gradients";
}

// ------------------------------------------------------------------ ATen adapters
template <typename T>
static LayerIO<T> io_of(const at::Tensor& gc) {
  LayerIO<T> io;
  io.g = gc.data_ptr<T>();
  io.n = gc.numel();
  return io;
}

std::tuple<at::Tensor, at::Tensor> select_cpu(const at::Tensor& g, double top, double keep) {
  check_fractions(top, keep);
  check_grad(g, "g");
  const at::Tensor gc = g.contiguous();
  const Counts c = band_counts(gc.numel(), top, keep);
  at::Tensor idx = at::empty({c.k_keep}, g.options().dtype(at::kLong));
  at::Tensor val = at::empty({c.k_keep}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dgp_select", [&] {
    std::vector<LayerIO<scalar_t>> L{io_of<scalar_t>(gc)};
    L[0].idx = idx.data_ptr<int64_t>();
    L[0].val = val.data_ptr<scalar_t>();
    const int64_t bad = run_layers<scalar_t, false, Sink::kSparse>(L, top, keep,
                                                                    at::get_num_threads());
    TORCH_CHECK_VALUE(bad < 0, nan_message("g", false, ""));
  });
  return {idx, val};
}

std::tuple<at::Tensor, at::Tensor> select_ef_cpu(const at::Tensor& g, const at::Tensor& residual,
                                                 double top, double keep) {
  check_fractions(top, keep);
  check_grad(g, "g");
  check_residual(g, residual, "residual");
  const at::Tensor gc = g.contiguous();
  // A non-contiguous residual is worked on in a contiguous copy, written back on success.
  at::Tensor ec = residual.is_contiguous() ? residual : residual.contiguous();
  const Counts c = band_counts(gc.numel(), top, keep);
  at::Tensor idx = at::empty({c.k_keep}, g.options().dtype(at::kLong));
  at::Tensor val = at::empty({c.k_keep}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dgp_select_ef", [&] {
    std::vector<LayerIO<scalar_t>> L{io_of<scalar_t>(gc)};
    L[0].e = ec.data_ptr<scalar_t>();
    L[0].idx = idx.data_ptr<int64_t>();
    L[0].val = val.data_ptr<scalar_t>();
    const int64_t bad = run_layers<scalar_t, true, Sink::kSparse>(L, top, keep,
                                                                   at::get_num_threads());
    TORCH_CHECK_VALUE(bad < 0, nan_message("g", true, "residual"));
  });
  if (!ec.is_same(residual)) residual.copy_(ec);
  return {idx, val};
}

at::Tensor prune_cpu(const at::Tensor& g, double top, double keep) {
  check_fractions(top, keep);
  check_grad(g, "g");
  const at::Tensor gc = g.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dgp_prune", [&] {
    std::vector<LayerIO<scalar_t>> L{io_of<scalar_t>(gc)};
    L[0].dense = out.data_ptr<scalar_t>();
    const int64_t bad = run_layers<scalar_t, false, Sink::kDense>(L, top, keep,
                                                                   at::get_num_threads());
    TORCH_CHECK_VALUE(bad < 0, nan_message("g", false, ""));
  });
  return out;
}

void prune_inplace_cpu(const at::Tensor& g, double top, double keep) {
  check_fractions(top, keep);
  check_grad(g, "g");
  at::Tensor gc = g.is_contiguous() ? g : g.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dgp_prune_", [&] {
    std::vector<LayerIO<scalar_t>> L{io_of<scalar_t>(gc)};
    const int64_t bad = run_layers<scalar_t, false, Sink::kInplace>(L, top, keep,
                                                                     at::get_num_threads());
    TORCH_CHECK_VALUE(bad < 0, nan_message("g", false, ""));
  });
  if (!gc.is_same(g)) g.copy_(gc);
}

// The outputs of a multi-tensor call: every layer's kept count laid out by offsets, and
// empty index and value tensors of the total length.
static std::tuple<at::Tensor, at::Tensor, at::Tensor> band_outputs(at::TensorList gs, double top,
                                                                   double keep) {
  const int64_t nl = static_cast<int64_t>(gs.size());
  at::Tensor offsets = at::empty({nl + 1}, at::TensorOptions().dtype(at::kLong));
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t l = 0; l < nl; ++l)
    off[l + 1] = off[l] + band_counts(gs[l].numel(), top, keep).k_keep;
  const auto vopts = nl ? gs[0].options() : at::TensorOptions().dtype(at::kFloat);
  return {at::empty({off[nl]}, vopts.dtype(at::kLong)), at::empty({off[nl]}, vopts), offsets};
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_impl(at::TensorList gs,
                                                                 const at::TensorList* res,
                                                                 double top, double keep,
                                                                 const at::Tensor* hint = nullptr) {
  check_fractions(top, keep);
  check_list(gs, "gs");
  const bool ef = res != nullptr;
  if (ef) {
    TORCH_CHECK_VALUE(res->size() == gs.size(), "residuals has ", res->size(),
                      " tensors but gs has ", gs.size(),
                      "; they must pair up one residual per gradient");
    for (size_t i = 0; i < gs.size(); ++i)
      check_residual(gs[i], (*res)[i], "residuals[" + std::to_string(i) + "]");
  }
  const int64_t nl = static_cast<int64_t>(gs.size());
  if (hint != nullptr) {
    TORCH_CHECK_TYPE(hint->scalar_type() == at::kLong, "hint must be an int64 tensor, got ",
                     hint->scalar_type());
    TORCH_CHECK_VALUE(hint->device().is_cpu() && hint->is_contiguous() && hint->dim() == 2 &&
                          hint->size(0) == nl && hint->size(1) == kHintCols,
                      "hint must be a contiguous CPU tensor of shape [", nl, ", ", kHintCols,
                      "] (one row per tensor of gs), got shape ", hint->sizes(), " on ",
                      hint->device(), hint->is_contiguous() ? "" : " (not contiguous)");
  }
  at::Tensor idx, val, offsets;
  std::tie(idx, val, offsets) = band_outputs(gs, top, keep);
  const int64_t* off = offsets.data_ptr<int64_t>();
  if (nl == 0) return {idx, val, offsets};

  std::vector<at::Tensor> gcs(nl), ecs(nl);
  for (int64_t l = 0; l < nl; ++l) {
    gcs[l] = gs[l].contiguous();
    if (ef) ecs[l] = (*res)[l].is_contiguous() ? (*res)[l] : (*res)[l].contiguous();
  }
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gs[0].scalar_type(), "dgp_multi", [&] {
    std::vector<LayerIO<scalar_t>> L(nl);
    int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* vp = val.data_ptr<scalar_t>();
    for (int64_t l = 0; l < nl; ++l) {
      L[l] = io_of<scalar_t>(gcs[l]);
      if (ef) L[l].e = ecs[l].data_ptr<scalar_t>();
      L[l].idx = ip + off[l];
      L[l].val = vp + off[l];
    }
    const int threads = at::get_num_threads();
    int64_t* hp = hint != nullptr ? hint->data_ptr<int64_t>() : nullptr;
    bad = ef ? run_layers<scalar_t, true, Sink::kSparse>(L, top, keep, threads, hp)
             : run_layers<scalar_t, false, Sink::kSparse>(L, top, keep, threads, hp);
  });
  if (bad >= 0) {
    const std::string i = std::to_string(bad);
    TORCH_CHECK_VALUE(false, nan_message("gs[" + i + "]", ef, "residuals[" + i + "]"));
  }
  if (ef)
    for (int64_t l = 0; l < nl; ++l)
      if (!ecs[l].is_same((*res)[l])) (*res)[l].copy_(ecs[l]);
  return {idx, val, offsets};
}

// Whether any residuals_out[i] shares memory with another tensor of the call.
static void check_into_disjoint(at::TensorList gs, at::TensorList res, at::TensorList outs) {
  struct Span {
    uintptr_t a, b;
    int kind;  // 0 gs, 1 residuals, 2 residuals_out
    size_t i;
  };
  std::vector<Span> v;
  auto add = [&](at::TensorList ts, int kind) {
    for (size_t i = 0; i < ts.size(); ++i) {
      if (ts[i].numel() == 0) continue;
      const uintptr_t a = reinterpret_cast<uintptr_t>(ts[i].data_ptr());
      // Extent: from the first element to one past the last one reachable (strides >= 0).
      int64_t last = 0;
      for (int64_t d = 0; d < ts[i].dim(); ++d) last += (ts[i].size(d) - 1) * ts[i].stride(d);
      v.push_back({a, a + static_cast<uintptr_t>((last + 1) * ts[i].element_size()), kind, i});
    }
  };
  add(gs, 0);
  add(res, 1);
  add(outs, 2);
  std::sort(v.begin(), v.end(), [](const Span& x, const Span& y) { return x.a < y.a; });
  static const char* names[] = {"gs", "residuals", "residuals_out"};
  // Sweep: the span reaching furthest so far against the next one.
  for (size_t j = 1, far = 0; j < v.size(); ++j) {
    if (v[j].a < v[far].b && (v[j].kind == 2 || v[far].kind == 2)) {
      const Span& x = v[j].kind == 2 ? v[j] : v[far];
      const Span& y = v[j].kind == 2 ? v[far] : v[j];
      TORCH_CHECK_VALUE(false, "residuals_out[", x.i, "] overlaps ", names[y.kind], "[", y.i,
                        "] in memory; residuals_out must be separate buffers (the new residuals "
                        "are written there while gs and residuals are read)");
    }
    if (v[j].b > v[far].b) far = j;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_ef_multi_into_cpu(
    at::TensorList gs, at::TensorList residuals, at::TensorList residuals_out,
    const at::Tensor& hint, double top, double keep) {
  check_fractions(top, keep);
  check_list(gs, "gs");
  TORCH_CHECK_VALUE(residuals.size() == gs.size(), "residuals has ", residuals.size(),
                    " tensors but gs has ", gs.size(),
                    "; they must pair up one residual per gradient");
  TORCH_CHECK_VALUE(residuals_out.size() == gs.size(), "residuals_out has ",
                    residuals_out.size(), " tensors but gs has ", gs.size(),
                    "; they must pair up one output residual per gradient");
  for (size_t i = 0; i < gs.size(); ++i) {
    check_residual(gs[i], residuals[i], "residuals[" + std::to_string(i) + "]");
    check_residual(gs[i], residuals_out[i], "residuals_out[" + std::to_string(i) + "]");
    TORCH_CHECK_VALUE(residuals_out[i].is_contiguous(), "residuals_out[", i,
                      "] must be contiguous (it is written in place), got strides ",
                      residuals_out[i].strides());
  }
  check_into_disjoint(gs, residuals, residuals_out);
  const int64_t nl = static_cast<int64_t>(gs.size());
  TORCH_CHECK_TYPE(hint.scalar_type() == at::kLong, "hint must be an int64 tensor, got ",
                   hint.scalar_type());
  TORCH_CHECK_VALUE(hint.device().is_cpu() && hint.is_contiguous() && hint.dim() == 2 &&
                        hint.size(0) == nl && hint.size(1) == kHintCols,
                    "hint must be a contiguous CPU tensor of shape [", nl, ", ", kHintCols,
                    "] (one row per tensor of gs), got shape ", hint.sizes(), " on ",
                    hint.device(), hint.is_contiguous() ? "" : " (not contiguous)");
  at::Tensor idx, val, offsets;
  std::tie(idx, val, offsets) = band_outputs(gs, top, keep);
  const int64_t* off = offsets.data_ptr<int64_t>();
  if (nl == 0) return {idx, val, offsets};
  std::vector<at::Tensor> gcs(nl), ecs(nl);
  for (int64_t l = 0; l < nl; ++l) {
    gcs[l] = gs[l].contiguous();
    ecs[l] = residuals[l].contiguous();
  }
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gs[0].scalar_type(), "dgp_into", [&] {
    std::vector<LayerIO<scalar_t>> L(nl);
    int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* vp = val.data_ptr<scalar_t>();
    for (int64_t l = 0; l < nl; ++l) {
      L[l] = io_of<scalar_t>(gcs[l]);
      L[l].e = ecs[l].data_ptr<scalar_t>();
      L[l].eo = residuals_out[l].data_ptr<scalar_t>();
      L[l].idx = ip + off[l];
      L[l].val = vp + off[l];
    }
    bad = run_layers_into<scalar_t>(L, top, keep, at::get_num_threads(),
                                    hint.data_ptr<int64_t>());
  });
  if (bad >= 0) {
    const std::string i = std::to_string(bad);
    TORCH_CHECK_VALUE(false, nan_message("gs[" + i + "]", true, "residuals[" + i + "]"));
  }
  return {idx, val, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_multi_cpu(at::TensorList gs, double top,
                                                                double keep) {
  return multi_impl(gs, nullptr, top, keep);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_ef_multi_cpu(at::TensorList gs,
                                                                   at::TensorList residuals,
                                                                   double top, double keep) {
  return multi_impl(gs, &residuals, top, keep);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_ef_multi_hint_cpu(
    at::TensorList gs, at::TensorList residuals, const at::Tensor& hint, double top,
    double keep) {
  return multi_impl(gs, &residuals, top, keep, &hint);
}

}  // namespace dgp

TORCH_LIBRARY_IMPL(dgp, CPU, m) {
  m.impl("select", &dgp::select_cpu);
  m.impl("select_ef", &dgp::select_ef_cpu);
  m.impl("prune", &dgp::prune_cpu);
  m.impl("prune_", &dgp::prune_inplace_cpu);
  m.impl("select_multi", &dgp::select_multi_cpu);
  m.impl("select_ef_multi", &dgp::select_ef_multi_cpu);
  m.impl("select_ef_multi_hint", &dgp::select_ef_multi_hint_cpu);
  m.impl("select_ef_multi_into", &dgp::select_ef_multi_into_cpu);
}

// ------------------------------------------------------------------ Python module
// Importing dgp_kernels._C registers the kernels above. The module also exposes the SIMD
// level so tests can force every compaction path (clamped to what the CPU supports).
extern "C" {

static PyObject* py_simd_level(PyObject*, PyObject*) {
  return PyUnicode_FromString(dgp::simd_name(dgp::simd_current()));
}

static PyObject* py_simd_best(PyObject*, PyObject*) {
  return PyUnicode_FromString(dgp::simd_name(static_cast<dgp::Simd>(dgp::simd_best())));
}

static PyObject* py_set_simd_level(PyObject*, PyObject* arg) {
  const char* s = PyUnicode_AsUTF8AndSize(arg, nullptr);
  if (!s) return nullptr;
  const std::string name(s);
  int level;
  if (name == "scalar") level = 0;
  else if (name == "avx2") level = 1;
  else if (name == "avx512") level = 2;
  else if (name == "best") level = dgp::simd_best();
  else {
    PyErr_Format(PyExc_ValueError,
                 "simd level must be one of 'scalar', 'avx2', 'avx512', 'best'; got '%s'", s);
    return nullptr;
  }
  if (level > dgp::simd_best()) {
    PyErr_Format(PyExc_ValueError, "this CPU supports simd levels up to '%s'; '%s' requested",
                 dgp::simd_name(static_cast<dgp::Simd>(dgp::simd_best())), s);
    return nullptr;
  }
  dgp::g_simd_level.store(level);
  Py_RETURN_NONE;
}

static PyObject* py_set_sampling(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  dgp::g_sample_enabled.store(on != 0);
  Py_RETURN_NONE;
}

static PyObject* py_set_prefetch(PyObject*, PyObject* arg) {
  const long lines = PyLong_AsLong(arg);
  if (lines == -1 && PyErr_Occurred()) return nullptr;
  if (lines < 0 || lines > 4096) {
    PyErr_Format(PyExc_ValueError, "prefetch distance must be in [0, 4096] lines, got %ld", lines);
    return nullptr;
  }
  const int old = dgp::prefetch_lines().exchange(static_cast<int>(lines));
  return PyLong_FromLong(old);
}

static PyObject* py_one_sweep(PyObject*, PyObject* arg) {
  const char* s = PyUnicode_AsUTF8AndSize(arg, nullptr);
  if (!s) return nullptr;
  const std::string dt(s);
  bool v = false;
#if DGP_X86
  const dgp::Simd lvl = dgp::simd_current();
  if (dt == "float32") v = dgp::one_sweep_vectorized<float>(lvl);
  else if (dt == "float64") v = dgp::one_sweep_vectorized<double>(lvl);
  else if (dt == "float16") v = dgp::one_sweep_vectorized<c10::Half>(lvl);
  else if (dt == "bfloat16") v = dgp::one_sweep_vectorized<c10::BFloat16>(lvl);
#endif
  return PyBool_FromLong(v);
}

static PyObject* py_path_counts(PyObject*, PyObject* arg) {
  const int reset = PyObject_IsTrue(arg);
  if (reset < 0) return nullptr;
  PyObject* d = Py_BuildValue(
      "{s:L,s:L,s:L,s:L,s:L,s:L,s:L}", "direct", (long long)dgp::g_path_count[0].load(), "radix",
      (long long)dgp::g_path_count[1].load(), "sampled", (long long)dgp::g_path_count[2].load(),
      "sampled_fallback", (long long)dgp::g_path_count[3].load(), "hint",
      (long long)dgp::g_path_count[4].load(), "hint_miss", (long long)dgp::g_path_count[5].load(),
      "hint_in_range", (long long)dgp::g_path_count[6].load());
  if (reset)
    for (auto& c : dgp::g_path_count) c.store(0);
  return d;
}

static PyMethodDef kMethods[] = {
    {"path_counts", py_path_counts, METH_O,
     "Counts of layers analysed per path since the last reset; path_counts(True) resets."},
    {"set_sampling", py_set_sampling, METH_O,
     "Enable/disable the sampled-bracket analysis of large layers (tests force both paths)."},
    {"set_prefetch", py_set_prefetch, METH_O,
     "Software prefetch distance of the float32 SIMD sweeps in 64-byte lines (0 = off); "
     "returns the previous value. A tuning knob: results never depend on it."},
    {"one_sweep", py_one_sweep, METH_O,
     "Whether select_ef_multi_into reads g and e once for hinted layers of this dtype name "
     "('float32', ...) at the current SIMD level."},
    {"simd_level", py_simd_level, METH_NOARGS, "Compaction path in use: scalar, avx2 or avx512."},
    {"simd_best", py_simd_best, METH_NOARGS, "Best compaction path this CPU supports."},
    {"set_simd_level", py_set_simd_level, METH_O,
     "Force a compaction path ('scalar', 'avx2', 'avx512' or 'best'); for tests."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                                     "dgp_kernels CPU kernels (importing registers them)", -1,
                                     kMethods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
}
