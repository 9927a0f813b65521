// The cut of an exact top-k mask, per row, as an XLA FFI handler (CPU): for each
// row of values (rows, n) and its count m, the m-th largest value's order-preserving
// bits and the first kept position among the values equal to it -- what
// pemn_jax/ops/topk.py's `_cut` computes by 32 count passes, here by a radix select
// (one histogram pass over the row, then only over the values sharing the cut's top
// bits). Built and loaded by pemn_jax/kernels/topk_cut.py; see its docstring.
#include <cstdint>
#include <cstring>
#include <vector>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// float32 -> uint32 with the same order (topk.py's `_ordered_bits`); with Abs, the
// order of the absolute values (the sign bit cleared, then set).
template <bool Abs>
inline uint32_t Ordered(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if (Abs) return b | 0x80000000u;
  return (b >> 31) ? ~b : (b | 0x80000000u);
}

// The m-th largest bits of row v (n values) and the first kept tie position.
template <bool Abs>
void Cut(const float* v, int64_t n, int64_t m, uint32_t* thr_out, uint32_t* start_out) {
  if (m < 1) m = 1;
  if (m > n) m = n;
  // pass 1: the top 11 bits
  uint32_t hist[2048];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < n; ++i) hist[Ordered<Abs>(v[i]) >> 21]++;
  int64_t need = m;  // still to keep at and below the current bucket
  int b = 2047;
  for (;; --b) {
    if (hist[b] >= need) break;
    need -= hist[b];
  }
  uint32_t prefix = uint32_t(b) << 21;
  std::vector<uint32_t> cand;
  cand.reserve(hist[b]);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = Ordered<Abs>(v[i]);
    if ((u >> 21) == uint32_t(b)) cand.push_back(u);
  }
  // then 11 and 10 bits over the candidates
  const int shifts[2] = {10, 0}, widths[2] = {11, 10};
  int64_t ties = 0;  // values equal to the cut (set by the last digit)
  for (int s = 0; s < 2; ++s) {
    int nb = 1 << widths[s];
    uint32_t mask = uint32_t(nb - 1);
    std::memset(hist, 0, sizeof(uint32_t) * nb);
    for (uint32_t u : cand) hist[(u >> shifts[s]) & mask]++;
    int d = nb - 1;
    for (;; --d) {
      if (hist[d] >= need) break;
      need -= hist[d];
    }
    prefix |= uint32_t(d) << shifts[s];
    ties = hist[d];
    if (s == 0) {
      size_t k = 0;
      for (uint32_t u : cand)
        if (((u >> shifts[s]) & mask) == uint32_t(d)) cand[k++] = u;
      cand.resize(k);
    }
  }
  *thr_out = prefix;
  if (ties == need) {
    *start_out = 0;
    return;
  }
  int64_t seen = 0;
  for (int64_t i = n - 1; i >= 0; --i) {
    if (Ordered<Abs>(v[i]) == prefix && ++seen == need) {
      *start_out = uint32_t(i);
      return;
    }
  }
  *start_out = 0;  // not reached: need <= ties
}

ffi::Error TopkCutImpl(ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> kept,
                       ffi::ResultBuffer<ffi::U32> thr, ffi::ResultBuffer<ffi::U32> start,
                       bool magnitude) {
  auto dims = values.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("values must be (rows, n)");
  int64_t rows = dims[0], n = dims[1];
  if (kept.element_count() != rows) return ffi::Error::InvalidArgument("one count per row");
  for (int64_t r = 0; r < rows; ++r)
    (magnitude ? Cut<true> : Cut<false>)(values.typed_data() + r * n, n, kept.typed_data()[r],
                                         thr->typed_data() + r, start->typed_data() + r);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnTopkCut, TopkCutImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Attr<bool>("magnitude"));
