// libFuzzer target for the C++ wire decoder (csrc/cpu/codec_core.h), built with
// AddressSanitizer and UBSan; see README.md in this folder for the command.
//
// Input: byte 0 is a mode byte, the rest is the payload. Mode bit 0 set: the harness
// recomputes the checksum over the payload body before decoding, so mutations reach the
// structural checks behind the CRC (otherwise nearly every mutant stops there). Mode bit 1:
// the layer count and numels read from the payload's own table are passed back as the
// expected model (the checks against a model are exercised; without it, none expected).
// Every accepted payload is walked in checked mode into a k-sized buffer and then again
// in unchecked mode (the accumulator's second pass), and its values are checked.
#include <cstdint>
#include <cstring>
#include <vector>

#include "codec_core.h"

namespace w = dgp::wire;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  std::vector<uint8_t> p(data + 1, data + size);
  if ((mode & 1) && p.size() >= w::kCrcBytes) {
    const uint32_t c = w::crc32(p.data(), p.size() - w::kCrcBytes);
    std::memcpy(p.data() + p.size() - w::kCrcBytes, &c, 4);
  }
  std::vector<int64_t> expected;
  const int64_t* exp_ptr = nullptr;
  int64_t n_exp = -1;
  if (mode & 2) {
    try {
      w::Parsed P0 = w::parse(p.data(), p.size(), nullptr, -1);
      for (const w::Entry& E : P0.layers) expected.push_back(static_cast<int64_t>(E.numel));
      exp_ptr = expected.data();
      n_exp = static_cast<int64_t>(expected.size());
    } catch (const w::Error&) {
      return 0;
    }
  }
  try {
    w::Parsed P = w::parse(p.data(), p.size(), exp_ptr, n_exp);
    for (size_t i = 0; i < P.layers.size(); ++i) {
      const w::Entry& E = P.layers[i];
      std::vector<uint64_t> out(static_cast<size_t>(E.coding == w::kImplicit ? 0 : E.k));
      w::walk_indices<true>(p.data(), E, i, [&](uint64_t j, uint64_t x) {
        if (j >= out.size()) __builtin_trap();  // the walker promised never to pass k
        if (x >= E.numel) __builtin_trap();
        out[j] = x;
      });
      w::check_values(p.data(), E, i);
      uint64_t count = 0, last = 0;
      w::walk_indices<false>(p.data(), E, i, [&](uint64_t j, uint64_t x) {
        if (j >= out.size() || out[j] != x || (count && x <= last)) __builtin_trap();
        last = x;
        ++count;
      });
      if (E.coding != w::kImplicit && count != E.k) __builtin_trap();
    }
  } catch (const w::Error&) {
  }
  return 0;
}
