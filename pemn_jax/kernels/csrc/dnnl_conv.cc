// oneDNN 2-D convolutions (NHWC input, OHWI kernel, float32) as XLA FFI handlers:
// forward, input gradient (backward data) and kernel gradient (backward weights, OIHW:
// the plain layouts oneDNN reorders its blocked ones to and from fastest).
// Built and loaded by pemn_jax/kernels/dnnl_conv.py; see its docstring.
//
// Each handler takes (a, b) buffers and writes one result; the attributes are the
// strides, the explicit padding (top, bottom, left, right) and the number of groups
// (g: the channels of the input and output split into g groups; depthwise: g = c).
// Primitives are built once per geometry and kept; every execution gets its own
// scratchpad (user mode).
// Executions run one at a time in a process: XLA runs independent thunks at once
// (e.g. a step's kernel gradients), and two oneDNN calls side by side, each with all
// the OpenMP threads, took 2-3x as long each (ResNet-20 step: 4% slower overall).

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "dnnl.hpp"
#include "omp.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct Prims {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_d_pd;
  dnnl::convolution_backward_data bwd_d;
  dnnl::convolution_backward_weights::primitive_desc bwd_w_pd;
  dnnl::convolution_backward_weights bwd_w;
  memory::desc x_md, w_md, y_md, dw_md;  // the callers' layouts: NHWC, OHWI, NHWC, OIHW
};

std::mutex cache_mu;
// Held while a handler runs (see the top of this file).
std::mutex run_mu;
std::map<Key, std::shared_ptr<Prims>> cache;

// The kernel's descriptor: (k, kh, kw, c/g) memory (OHWI) or, with ohwi false,
// (k, c/g, kh, kw) (OIHW); with g > 1 groups, oneDNN's (g, k/g, c/g, kh, kw) dims
// over the same memory (the output channels of a group are contiguous).
memory::desc Kernel(int64_t k, int64_t cg, int64_t kh, int64_t kw, int64_t g, bool ohwi) {
  if (g == 1) return memory::desc({k, cg, kh, kw}, dt::f32, ohwi ? tag::ohwi : tag::oihw);
  memory::dims strides = ohwi ? memory::dims{k / g * kh * kw * cg, kh * kw * cg, 1, kw * cg, cg}
                              : memory::dims{k / g * cg * kh * kw, cg * kh * kw, kh * kw, kw, 1};
  return memory::desc({g, k / g, cg, kh, kw}, dt::f32, strides);
}

// x: (n, h, w, c); kernel (k, kh, kw, c/g); y: (n, oh, ow, k); g groups.
std::shared_ptr<Prims> Get(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                           ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr, int64_t g) {
  Key key{x[0], x[1], x[2], x[3], w[1], w[2], w[0], sh, sw, pt, pb, pl, pr, g};
  std::lock_guard<std::mutex> lock(cache_mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto& eng = Engine();
  auto p = std::make_shared<Prims>();
  p->x_md = memory::desc({x[0], x[3], x[1], x[2]}, dt::f32, tag::nhwc);
  p->y_md = memory::desc({y[0], y[3], y[1], y[2]}, dt::f32, tag::nhwc);
  p->w_md = Kernel(w[0], w[3], w[1], w[2], g, true);
  p->dw_md = Kernel(w[0], w[3], w[1], w[2], g, false);
  memory::desc w_any(p->w_md.get_dims(), dt::f32, tag::any);
  memory::dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  p->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, p->x_md,
      w_any, p->y_md, strides, pad_l, pad_r, attr);
  p->fwd = dnnl::convolution_forward(p->fwd_pd);
  p->bwd_d_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, p->x_md, w_any, p->y_md, strides, pad_l, pad_r,
      p->fwd_pd, attr);
  p->bwd_d = dnnl::convolution_backward_data(p->bwd_d_pd);
  p->bwd_w_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, p->x_md, w_any, p->y_md, strides, pad_l, pad_r,
      p->fwd_pd, attr);
  p->bwd_w = dnnl::convolution_backward_weights(p->bwd_w_pd);
  cache[key] = p;
  return p;
}

// A scratchpad of the size the primitive asks for, owned by the caller (left
// uninitialized: the primitive writes before it reads).
struct Scratch {
  std::unique_ptr<char[]> bytes;
  memory mem;
  explicit Scratch(const memory::desc& md)
      : bytes(new char[md.get_size() + 64]), mem(md, Engine(), Aligned()) {}
  void* Aligned() {
    auto a = reinterpret_cast<std::uintptr_t>(bytes.get());
    return reinterpret_cast<void*>((a + 63) & ~std::uintptr_t(63));
  }
};

// A kernel's reorder on the calling thread alone: a few thousand floats, which
// take ~10x longer when the sleeping OpenMP threads are woken for them.
// (The thread's OpenMP setting is restored even if the reorder throws: this XLA
// thread runs the following convolutions too.)
struct OneThread {
  int threads = omp_get_max_threads();
  OneThread() { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(threads); }
};

void Reorder(memory& from, memory& to, dnnl::stream& s) {
  OneThread one;
  dnnl::reorder(from, to).execute(s, from, to);
}

// The kernel in the layout the primitive wants (reordered from OHWI if it differs).
memory KernelIn(const memory::desc& want, memory plain, dnnl::stream& s) {
  if (want == plain.get_desc()) return plain;
  memory other(want, Engine());
  Reorder(plain, other, s);
  return other;
}

template <typename F>
ffi::Error Guard(F f) {
  try {
    f();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("pemn_jax dnnl_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

static ffi::Error FwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                          int64_t pb, int64_t pl, int64_t pr, int64_t g) {
  return Guard([&] {
    auto p = Get(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr, g);
    auto& eng = Engine();
    dnnl::stream s(eng);
    std::lock_guard<std::mutex> run(run_mu);
    memory xm(p->x_md, eng, x.typed_data()), ym(p->y_md, eng, y->typed_data());
    memory wm = KernelIn(p->fwd_pd.weights_desc(), memory(p->w_md, eng, w.typed_data()), s);
    Scratch scratch(p->fwd_pd.scratchpad_desc());
    p->fwd.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym},
                       {DNNL_ARG_SCRATCHPAD, scratch.mem}});
    s.wait();
  });
}

static ffi::Error BwdDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                              ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                              int64_t pb, int64_t pl, int64_t pr, int64_t g) {
  return Guard([&] {
    auto p = Get(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr, g);
    auto& eng = Engine();
    dnnl::stream s(eng);
    std::lock_guard<std::mutex> run(run_mu);
    memory dym(p->y_md, eng, dy.typed_data()), dxm(p->x_md, eng, dx->typed_data());
    memory wm = KernelIn(p->bwd_d_pd.weights_desc(), memory(p->w_md, eng, w.typed_data()), s);
    Scratch scratch(p->bwd_d_pd.scratchpad_desc());
    p->bwd_d.execute(s, {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wm},
                         {DNNL_ARG_DIFF_SRC, dxm}, {DNNL_ARG_SCRATCHPAD, scratch.mem}});
    s.wait();
  });
}

static ffi::Error BwdWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                 ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                                 int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t g) {
  return Guard([&] {
    auto d = dw->dimensions();  // (k, c/g, kh, kw)
    std::vector<int64_t> ohwi{d[0], d[2], d[3], d[1]};
    auto p = Get(x.dimensions(), ohwi, dy.dimensions(), sh, sw, pt, pb, pl, pr, g);
    auto& eng = Engine();
    dnnl::stream s(eng);
    std::lock_guard<std::mutex> run(run_mu);
    memory xm(p->x_md, eng, x.typed_data()), dym(p->y_md, eng, dy.typed_data());
    memory dwplain(p->dw_md, eng, dw->typed_data());
    auto want = p->bwd_w_pd.diff_weights_desc();
    bool same = want == p->dw_md;
    memory dwm = same ? dwplain : memory(want, eng);
    Scratch scratch(p->bwd_w_pd.scratchpad_desc());
    p->bwd_w.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym},
                         {DNNL_ARG_DIFF_WEIGHTS, dwm}, {DNNL_ARG_SCRATCHPAD, scratch.mem}});
    if (!same) Reorder(dwm, dwplain, s);
    s.wait();
  });
}

#define PEMN_BIND                                                                    \
  ffi::Ffi::Bind()                                                                   \
      .Arg<ffi::Buffer<ffi::F32>>()                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                                  \
      .Ret<ffi::Buffer<ffi::F32>>()                                                  \
      .Attr<int64_t>("sh")                                                           \
      .Attr<int64_t>("sw")                                                           \
      .Attr<int64_t>("pt")                                                           \
      .Attr<int64_t>("pb")                                                           \
      .Attr<int64_t>("pl")                                                           \
      .Attr<int64_t>("pr")                                                           \
      .Attr<int64_t>("g")

XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnDnnlConvFwd, FwdImpl, PEMN_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnDnnlConvBwdData, BwdDataImpl, PEMN_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PemnDnnlConvBwdWeights, BwdWeightsImpl, PEMN_BIND);

// The oneDNN version the library was built against, for diagnostics.
extern "C" const char* PemnDnnlVersion() {
  static std::string v = [] {
    auto* ver = dnnl_version();
    return std::to_string(ver->major) + "." + std::to_string(ver->minor) + "." +
           std::to_string(ver->patch);
  }();
  return v.c_str();
}
