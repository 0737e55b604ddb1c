// CPU kernels of the dgp:: wire-codec ops (schemas: dgp_kernels/codec/wire.py).
//
// Thin ATen adapters around the torch-free core in codec_core.h: argument checks
// (TORCH_CHECK_VALUE/TYPE), output allocation, and the client/layer scheduling of the
// accumulator. A malformed payload raises ValueError whose message starts with
// "PayloadError: "; the Python wrappers turn it into dgp_kernels.codec.PayloadError.
#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "thread_pool.h"

#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "codec_core.h"

namespace dgp {
namespace {

namespace w = ::dgp::wire;

constexpr const char* kPayloadError = "PayloadError: ";

// Work below this many payload bytes is done on one thread: a fork-join costs ~5-30 us
// (more when another process holds a core), more than a small model's whole decode. Threads
// come from the select kernels' pool (thread_pool.h), never an OpenMP region, whose idle
// workers spin for milliseconds after it under the default OMP_WAIT_POLICY.
constexpr int64_t kParallelMinValues = 1 << 18;

uint8_t wire_dtype_of(const at::Tensor& v, int64_t layer) {
  switch (v.scalar_type()) {
    case at::kFloat: return w::kF32;
    case at::kBFloat16: return w::kBF16;
    case at::kHalf: return w::kF16;
    default:
      TORCH_CHECK_TYPE(false, "values[", layer, "] has dtype ", v.scalar_type(),
                       "; the wire carries float32, bfloat16 or float16 values");
  }
}

void check_bytes(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, name, " must be a uint8 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1 && t.is_contiguous(), name,
                    " must be a contiguous 1-D CPU tensor");
}

const uint8_t* bytes_ptr(const at::Tensor& t) {
  static const uint8_t kEmpty = 0;  // data_ptr of an empty tensor may be null
  return t.numel() ? t.const_data_ptr<uint8_t>() : &kEmpty;
}

[[noreturn]] void payload_error(const w::Error& e) {
  TORCH_CHECK_VALUE(false, kPayloadError, e.what());
  __builtin_unreachable();
}

// --------------------------------------------------------------------------- encode
at::Tensor wire_encode(const c10::List<std::optional<at::Tensor>>& indices, at::TensorList values,
                       at::IntArrayRef numels, at::IntArrayRef codings, bool aligned,
                       const at::Tensor& meta) {
  const int64_t L = static_cast<int64_t>(values.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(indices.size()) == L && static_cast<int64_t>(numels.size()) == L &&
                        static_cast<int64_t>(codings.size()) == L,
                    "wire_encode: indices, values, numels and codings must have one entry per layer, got ",
                    indices.size(), ", ", L, ", ", numels.size(), ", ", codings.size());
  TORCH_CHECK_VALUE(L <= 0xffffffffLL, "wire_encode: at most 2^32-1 layers, got ", L);
  check_bytes(meta, "meta");
  static const int64_t kNoIndex = 0;  // stands in for the data_ptr of an empty index tensor
  std::vector<w::LayerSpec> specs(static_cast<size_t>(L));
  std::vector<at::Tensor> keep;  // holds the index tensors alive (List returns copies)
  keep.reserve(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor& v = values[i];
    TORCH_CHECK_VALUE(v.device().is_cpu() && v.dim() == 1 && v.is_contiguous(), "values[", i,
                      "] must be a contiguous 1-D CPU tensor");
    TORCH_CHECK_VALUE(numels[i] >= 0, "numels[", i, "] must be >= 0, got ", numels[i]);
    TORCH_CHECK_VALUE(codings[i] >= -1 && codings[i] < w::kNumCodings, "codings[", i,
                      "] must be -1 (automatic) or a coding id in [0, ", int(w::kNumCodings), "), got ",
                      codings[i]);
    w::LayerSpec& s = specs[static_cast<size_t>(i)];
    s.numel = static_cast<uint64_t>(numels[i]);
    s.k = static_cast<uint64_t>(v.numel());
    s.vdtype = wire_dtype_of(v, i);
    s.vals = static_cast<const uint8_t*>(v.const_data_ptr());
    s.forced = static_cast<int>(codings[i]);
    std::optional<at::Tensor> ix = indices.get(static_cast<size_t>(i));
    if (ix.has_value()) {
      const at::Tensor& t = *ix;
      TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "indices[", i, "] must be int64, got ", t.scalar_type());
      TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1 && t.is_contiguous(), "indices[", i,
                        "] must be a contiguous 1-D CPU tensor");
      TORCH_CHECK_VALUE(t.numel() == v.numel(), "indices[", i, "] has ", t.numel(), " entries but values[", i,
                        "] has ", v.numel());
      keep.push_back(t);
      s.idx = t.numel() ? t.const_data_ptr<int64_t>() : &kNoIndex;
    }
  }
  uint32_t num_meta = 0;
  std::vector<w::LayerPlan> plans(static_cast<size_t>(L));
  try {
    num_meta = w::parse_meta(bytes_ptr(meta), static_cast<size_t>(meta.numel()), w::kHeaderBytes);
    for (int64_t i = 0; i < L; ++i)
      plans[static_cast<size_t>(i)] = w::plan_layer(specs[static_cast<size_t>(i)], aligned, static_cast<size_t>(i));
  } catch (const w::Error& e) {
    payload_error(e);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, "force_coding: ", e.what());
  }
  const size_t n = w::encoded_size(static_cast<size_t>(meta.numel()), specs, plans);
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kByte));
  w::write_payload(out.mutable_data_ptr<uint8_t>(), n, aligned, bytes_ptr(meta),
                   static_cast<size_t>(meta.numel()), num_meta, specs, plans);
  return out;
}

// --------------------------------------------------------------------------- decode
w::Parsed parse_checked(const at::Tensor& data, at::OptionalIntArrayRef expected) {
  const int64_t ne = expected.has_value() ? static_cast<int64_t>(expected->size()) : -1;
  return w::parse(bytes_ptr(data), static_cast<size_t>(data.numel()),
                  expected.has_value() ? expected->data() : nullptr, ne);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wire_decode(const at::Tensor& data,
                                                                       at::OptionalIntArrayRef expected,
                                                                       bool allow_nonfinite) {
  check_bytes(data, "data");
  const uint8_t* d = bytes_ptr(data);
  try {
    w::Parsed P = parse_checked(data, expected);
    const int64_t L = static_cast<int64_t>(P.layers.size());
    int64_t total_k = 0;
    uint64_t vbegin = 0, vend = 0;
    at::Tensor header = at::empty({4}, at::TensorOptions().dtype(at::kLong));
    at::Tensor table = at::empty({L, 7}, at::TensorOptions().dtype(at::kLong));
    int64_t* h = header.mutable_data_ptr<int64_t>();
    h[0] = P.flags;
    h[1] = P.num_meta;
    h[2] = static_cast<int64_t>(P.meta_off);
    h[3] = static_cast<int64_t>(P.meta_len);
    int64_t* tb = table.mutable_data_ptr<int64_t>();
    for (int64_t i = 0; i < L; ++i) {
      const w::Entry& E = P.layers[static_cast<size_t>(i)];
      if (i == 0) vbegin = E.value_off;
      vend = E.value_off + E.k * w::value_size(E.vdtype);
      int64_t* row = tb + 7 * i;
      row[0] = static_cast<int64_t>(E.numel);
      row[1] = static_cast<int64_t>(E.k);
      row[2] = E.coding;
      row[3] = E.vdtype;
      row[4] = E.param;
      row[5] = E.coding == w::kImplicit ? -1 : total_k;
      row[6] = static_cast<int64_t>(E.value_off - vbegin);
      if (E.coding != w::kImplicit) total_k += static_cast<int64_t>(E.k);
    }
    at::Tensor idx = at::empty({total_k}, at::TensorOptions().dtype(at::kLong));
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    for (int64_t i = 0; i < L; ++i) {
      const w::Entry& E = P.layers[static_cast<size_t>(i)];
      if (E.coding != w::kImplicit) {
        int64_t* o = ip + tb[7 * i + 5];
        w::walk_indices<true>(d, E, static_cast<size_t>(i),
                              [o](uint64_t j, uint64_t x) { o[j] = static_cast<int64_t>(x); });
      }
      if (!allow_nonfinite) w::check_values(d, E, static_cast<size_t>(i));
    }
    at::Tensor vals = at::empty({static_cast<int64_t>(vend - vbegin)}, at::TensorOptions().dtype(at::kByte));
    if (vend > vbegin) std::memcpy(vals.mutable_data_ptr<uint8_t>(), d + vbegin, vend - vbegin);
    return {header, table, idx, vals};
  } catch (const w::Error& e) {
    payload_error(e);
  }
}

// Full validation of one client against the server's model; throws w::Error.
w::Parsed validate(const uint8_t* d, size_t n, const int64_t* expected, int64_t ne, const int64_t* aligned_ks,
                   int64_t n_aligned, bool allow_nonfinite) {
  w::Parsed P = w::parse(d, n, expected, ne);
  for (size_t i = 0; i < P.layers.size(); ++i) {
    const w::Entry& E = P.layers[i];
    if (P.aligned()) {
      if (n_aligned < 0)
        w::fail("aligned payload, but the server passed no aligned positions (indices=) to place its values");
      if (static_cast<int64_t>(E.k) != aligned_ks[i])
        w::fail("layer ", i, ": aligned payload has k = ", E.k, " values but the broadcast positions number ",
                aligned_ks[i]);
    }
    w::check_layer(d, E, i, allow_nonfinite);
  }
  return P;
}

void wire_validate(const at::Tensor& data, at::OptionalIntArrayRef expected, at::OptionalIntArrayRef aligned_ks,
                   bool allow_nonfinite) {
  check_bytes(data, "data");
  const int64_t ne = expected.has_value() ? static_cast<int64_t>(expected->size()) : -1;
  const int64_t na = aligned_ks.has_value() ? static_cast<int64_t>(aligned_ks->size()) : -1;
  TORCH_CHECK_VALUE(na < 0 || na == ne, "aligned_ks needs expected_numels of the same length");
  try {
    validate(bytes_ptr(data), static_cast<size_t>(data.numel()), ne >= 0 ? expected->data() : nullptr, ne,
             na >= 0 ? aligned_ks->data() : nullptr, na, allow_nonfinite);
  } catch (const w::Error& e) {
    payload_error(e);
  }
}

// ----------------------------------------------------------------------- accumulate
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while (!(man & 0x400u));
      bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <uint8_t DT>
inline float load_value(const uint8_t* v, uint64_t j) {
  if constexpr (DT == w::kF32) {
    float f;
    std::memcpy(&f, v + 4 * j, 4);
    return f;
  } else if constexpr (DT == w::kBF16) {
    const uint32_t bits = static_cast<uint32_t>(w::ld16(v + 2 * j)) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  } else {
    return half_to_float(w::ld16(v + 2 * j));
  }
}

// out[x] = out[x] + v (unweighted) or out[x] + float(w) * v, one rounding each, no FMA
// (the extension is built without -mfma and with ISO C++, so nothing is contracted); this
// is exactly what index_add_ computes in the Python fallback.
template <uint8_t DT, bool kWeighted>
void add_layer(const uint8_t* d, const w::Entry& E, size_t layer, bool aligned, const int64_t* apos, float wt,
               float* out) {
  const uint8_t* v = d + E.value_off;
  auto add = [&](uint64_t j, uint64_t x) {
    const float val = load_value<DT>(v, j);
    if constexpr (kWeighted) {
      const float t = wt * val;
      out[x] = out[x] + t;
    } else {
      out[x] = out[x] + val;
    }
  };
  if (E.coding == w::kImplicit) {
    if (aligned) {
      for (uint64_t j = 0; j < E.k; ++j) add(j, static_cast<uint64_t>(apos[j]));
    } else {
      for (uint64_t j = 0; j < E.k; ++j) add(j, j);
    }
    return;
  }
  w::walk_indices<false>(d, E, layer, add);
}

template <bool kWeighted>
void add_layer_any(const uint8_t* d, const w::Entry& E, size_t layer, bool aligned, const int64_t* apos,
                   float wt, float* out) {
  switch (E.vdtype) {
    case w::kF32: add_layer<w::kF32, kWeighted>(d, E, layer, aligned, apos, wt, out); break;
    case w::kBF16: add_layer<w::kBF16, kWeighted>(d, E, layer, aligned, apos, wt, out); break;
    default: add_layer<w::kF16, kWeighted>(d, E, layer, aligned, apos, wt, out); break;
  }
}

at::Tensor wire_accumulate(at::TensorList payloads, std::optional<at::ArrayRef<double>> weights,
                           at::TensorList out, at::TensorList aligned_indices, bool allow_nonfinite,
                           bool all_or_nothing) {
  const int64_t C = static_cast<int64_t>(payloads.size());
  const int64_t L = static_cast<int64_t>(out.size());
  TORCH_CHECK_VALUE(!weights.has_value() || static_cast<int64_t>(weights->size()) == C, "weights has ",
                    weights.has_value() ? weights->size() : 0, " entries for ", C, " payloads");
  std::vector<int64_t> numels(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& o = out[l];
    TORCH_CHECK_TYPE(o.scalar_type() == at::kFloat, "out[", l, "] must be float32, got ", o.scalar_type());
    TORCH_CHECK_VALUE(o.device().is_cpu() && o.is_contiguous(), "out[", l, "] must be a contiguous CPU tensor");
    numels[static_cast<size_t>(l)] = o.numel();
  }
  const bool have_aligned = !aligned_indices.empty();
  std::vector<int64_t> aks;
  if (have_aligned) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(aligned_indices.size()) == L, "aligned_indices has ",
                      aligned_indices.size(), " tensors for ", L, " layers");
    aks.resize(static_cast<size_t>(L));
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor& a = aligned_indices[l];
      TORCH_CHECK_TYPE(a.scalar_type() == at::kLong, "aligned_indices[", l, "] must be int64");
      TORCH_CHECK_VALUE(a.device().is_cpu() && a.dim() == 1 && a.is_contiguous(), "aligned_indices[", l,
                        "] must be a contiguous 1-D CPU tensor");
      const int64_t* p = a.numel() ? a.const_data_ptr<int64_t>() : nullptr;
      int64_t prev = -1;
      for (int64_t j = 0; j < a.numel(); ++j) {
        TORCH_CHECK_VALUE(p[j] > prev && p[j] < numels[static_cast<size_t>(l)], "aligned_indices[", l,
                          "] must be strictly increasing in [0, ", numels[static_cast<size_t>(l)], "), got ", p[j],
                          " at position ", j);
        prev = p[j];
      }
      aks[static_cast<size_t>(l)] = a.numel();
    }
  }
  for (int64_t c = 0; c < C; ++c) check_bytes(payloads[c], "payloads[i]");

  // Pass 1: validate every client completely (nothing is written yet).
  at::Tensor status = at::zeros({C}, at::TensorOptions().dtype(at::kLong));
  int64_t* st = status.mutable_data_ptr<int64_t>();
  std::vector<w::Parsed> parsed(static_cast<size_t>(C));
  int64_t total_bytes = 0;
  for (int64_t c = 0; c < C; ++c) total_bytes += payloads[c].numel();
  const int threads = total_bytes >= kParallelMinValues ? at::get_num_threads() : 1;
  ThreadPool& pool = ThreadPool::get();
  pool.run(C, threads, [&](int64_t c) {
    try {
      const at::Tensor& p = payloads[c];
      parsed[static_cast<size_t>(c)] =
          validate(bytes_ptr(p), static_cast<size_t>(p.numel()), numels.data(), L,
                   have_aligned ? aks.data() : nullptr, have_aligned ? L : -1, allow_nonfinite);
    } catch (const w::Error&) {
      st[c] = 1;
    } catch (...) {  // e.g. std::bad_alloc: reject, never let an exception leave the task
      st[c] = 2;
    }
  });
  for (int64_t c = 0; c < C; ++c)
    TORCH_CHECK(st[c] != 2, "wire_accumulate: internal error while validating payload ", c);
  if (all_or_nothing)
    for (int64_t c = 0; c < C; ++c)
      if (st[c] != 0) return status;  // strict mode: one rejection -> nothing is added

  // Pass 2: add the accepted clients, layer by layer (layers in parallel), each element
  // receiving its clients' contributions in client order -> deterministic for any thread count.
  std::vector<float*> optr(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) optr[static_cast<size_t>(l)] = out[l].numel() ? out[l].mutable_data_ptr<float>() : nullptr;
  auto add_clients = [&](int64_t l) {
    const int64_t* apos = have_aligned && aligned_indices[l].numel() ? aligned_indices[l].const_data_ptr<int64_t>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      if (st[c] != 0) continue;
      const w::Parsed& P = parsed[static_cast<size_t>(c)];
      const w::Entry& E = P.layers[static_cast<size_t>(l)];
      const uint8_t* d = bytes_ptr(payloads[c]);
      if (weights.has_value()) {
        add_layer_any<true>(d, E, static_cast<size_t>(l), P.aligned(), apos, static_cast<float>((*weights)[c]),
                            optr[static_cast<size_t>(l)]);
      } else {
        add_layer_any<false>(d, E, static_cast<size_t>(l), P.aligned(), apos, 1.0f, optr[static_cast<size_t>(l)]);
      }
    }
  };
  std::atomic<bool> failed{false};
  pool.run(L, threads, [&](int64_t l) {
    try {
      add_clients(l);
    } catch (...) {  // validated payloads do not throw here; never let one leave the task
      failed = true;
    }
  });
  TORCH_CHECK(!failed.load(), "wire_accumulate: internal error while adding a validated payload");
  return status;
}

}  // namespace

TORCH_LIBRARY_IMPL(dgp, CPU, m) {
  m.impl("wire_encode", &wire_encode);
  m.impl("wire_decode", &wire_decode);
  m.impl("wire_validate", &wire_validate);
  m.impl("wire_accumulate", &wire_accumulate);
}

}  // namespace dgp
