// 2-D convolutions through oneDNN, as XLA FFI handlers for XLA:CPU (built by onednn.py).
//
// Layouts are JAX's: activations NHWC, kernels HWIO; float32, or bfloat16 throughout (the
// operands and the result of a call must share one type; checked). oneDNN reads and writes
// the activations in place (nhwc) and picks its own blocked layout for the kernel ("any"); the
// kernel and the kernel gradient are reordered to and from HWIO around each call (at most
// 1.3 M floats for the paper's network, against 10-60 GFLOP of convolution).
//
// Three handlers, one per pass:
//   alexnet_onednn_conv_fwd          y  = conv(x, w)
//   alexnet_onednn_conv_bwd_data     dx = d conv / dx applied to dy
//   alexnet_onednn_conv_bwd_weights  dw = d conv / dw applied to dy
// each with attributes stride, pad_top, pad_left, pad_bottom, pad_right.
//
// oneDNN parallelises each call over all cores itself (OpenMP), so calls are serialised: XLA
// may run independent thunks concurrently, and two oneDNN calls at once would each want every
// core.

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dims = dnnl::memory::dims;
using tag = dnnl::memory::format_tag;

struct Geometry {
  dims src, weights, dst, strides, pad_l, pad_r;
};

// oneDNN's dims are (N, C, H, W) and (O, I, KH, KW) whatever the memory layout.
Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, int64_t stride, int64_t pad_top,
                      int64_t pad_left, int64_t pad_bottom, int64_t pad_right) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4)
    throw std::invalid_argument("activations and kernel must be 4-D (NHWC, HWIO)");
  return {{x[0], x[3], x[1], x[2]}, {w[3], w[2], w[0], w[1]}, {y[0], y[3], y[1], y[2]},
          {stride, stride}, {pad_top, pad_left}, {pad_bottom, pad_right}};
}

using dtype = dnnl::memory::data_type;

dtype Type(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return dtype::f32;
    case ffi::DataType::BF16: return dtype::bf16;
    default: throw std::invalid_argument("only float32 and bfloat16 are supported");
  }
}

// The one element type of a call's operands and result.
dtype CallType(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, const ffi::AnyBuffer& out) {
  if (a.element_type() != b.element_type() || a.element_type() != out.element_type())
    throw std::invalid_argument("operands and result must have the same element type");
  return Type(a.element_type());
}

dnnl::memory::desc Desc(const dims& d, tag t, dtype type) { return dnnl::memory::desc(d, type, t); }

struct Context {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::mutex mutex;
};

Context& Ctx() {
  static Context* context = new Context();  // Never destroyed: outlives every XLA thread.
  return *context;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g, dtype t) {
  return dnnl::convolution_forward::primitive_desc(
      Ctx().engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Desc(g.src, tag::nhwc, t), Desc(g.weights, tag::any, t), Desc(g.dst, tag::nhwc, t),
      g.strides, g.pad_l, g.pad_r);
}

// Both backward passes take the same arguments: the geometry, and the forward pass as a hint.
template <typename BackwardPrimitiveDesc>
BackwardPrimitiveDesc BackwardDesc(const Geometry& g, dtype t) {
  return BackwardPrimitiveDesc(Ctx().engine, dnnl::algorithm::convolution_direct,
                               Desc(g.src, tag::nhwc, t), Desc(g.weights, tag::any, t),
                               Desc(g.dst, tag::nhwc, t), g.strides, g.pad_l, g.pad_r,
                               ForwardDesc(g, t));
}

// `user` (HWIO) in the layout `wanted`: the same memory when they agree, else a reordered copy.
dnnl::memory InLayout(dnnl::memory user, const dnnl::memory::desc& wanted) {
  if (user.get_desc() == wanted) return user;
  dnnl::memory copy(wanted, Ctx().engine);
  dnnl::reorder(user, copy).execute(Ctx().stream, user, copy);
  return copy;
}

template <typename F>
ffi::Error Guarded(F&& body) {
  try {
    std::lock_guard<std::mutex> lock(Ctx().mutex);
    body();  // Waits on the stream itself, while the memory objects it made are alive.
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution failed: ") + e.what());
  } catch (const std::invalid_argument& e) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      std::string("oneDNN convolution: ") + e.what());
  } catch (const std::exception& e) {  // XLA's FFI does not catch: never let one escape.
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  }
}

ffi::Error ConvForward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t stride, int64_t pad_top,
                       int64_t pad_left, int64_t pad_bottom, int64_t pad_right) {
  return Guarded([&] {
    Geometry g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), stride, pad_top,
                              pad_left, pad_bottom, pad_right);
    dtype t = CallType(x, w, *y);
    auto& c = Ctx();
    auto pd = ForwardDesc(g, t);
    dnnl::memory src(Desc(g.src, tag::nhwc, t), c.engine, x.untyped_data());
    dnnl::memory wei(Desc(g.weights, tag::hwio, t), c.engine, w.untyped_data());
    dnnl::memory dst(Desc(g.dst, tag::nhwc, t), c.engine, y->untyped_data());
    dnnl::memory wei_pd = InLayout(wei, pd.weights_desc());
    dnnl::convolution_forward(pd).execute(
        c.stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei_pd}, {DNNL_ARG_DST, dst}});
    c.stream.wait();
  });
}

ffi::Error ConvBackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                            int64_t stride, int64_t pad_top,
                            int64_t pad_left, int64_t pad_bottom, int64_t pad_right) {
  return Guarded([&] {
    Geometry g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), stride,
                              pad_top, pad_left, pad_bottom, pad_right);
    dtype t = CallType(dy, w, *dx);
    auto& c = Ctx();
    auto pd = BackwardDesc<dnnl::convolution_backward_data::primitive_desc>(g, t);
    dnnl::memory diff_dst(Desc(g.dst, tag::nhwc, t), c.engine, dy.untyped_data());
    dnnl::memory wei(Desc(g.weights, tag::hwio, t), c.engine, w.untyped_data());
    dnnl::memory diff_src(Desc(g.src, tag::nhwc, t), c.engine, dx->untyped_data());
    dnnl::memory wei_pd = InLayout(wei, pd.weights_desc());
    dnnl::convolution_backward_data(pd).execute(
        c.stream,
        {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei_pd}, {DNNL_ARG_DIFF_SRC, diff_src}});
    c.stream.wait();
  });
}

ffi::Error ConvBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                               ffi::Result<ffi::AnyBuffer> dw, int64_t stride, int64_t pad_top,
                               int64_t pad_left, int64_t pad_bottom, int64_t pad_right) {
  return Guarded([&] {
    Geometry g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), stride, pad_top,
                              pad_left, pad_bottom, pad_right);
    dtype t = CallType(x, dy, *dw);
    auto& c = Ctx();
    auto pd = BackwardDesc<dnnl::convolution_backward_weights::primitive_desc>(g, t);
    dnnl::memory src(Desc(g.src, tag::nhwc, t), c.engine, x.untyped_data());
    dnnl::memory diff_dst(Desc(g.dst, tag::nhwc, t), c.engine, dy.untyped_data());
    dnnl::memory diff_wei(Desc(g.weights, tag::hwio, t), c.engine, dw->untyped_data());
    bool reorder = pd.diff_weights_desc() != diff_wei.get_desc();
    dnnl::memory diff_wei_pd = reorder ? dnnl::memory(pd.diff_weights_desc(), c.engine) : diff_wei;
    dnnl::convolution_backward_weights(pd).execute(
        c.stream,
        {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_wei_pd}});
    if (reorder) dnnl::reorder(diff_wei_pd, diff_wei).execute(c.stream, diff_wei_pd, diff_wei);
    c.stream.wait();
  });
}

}  // namespace

#define ALEXNET_CONV_ATTRS                                                                  \
  .Attr<int64_t>("stride").Attr<int64_t>("pad_top").Attr<int64_t>("pad_left")              \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlexnetOnednnConvFwd, ConvForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() ALEXNET_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlexnetOnednnConvBwdData, ConvBackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() ALEXNET_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlexnetOnednnConvBwdWeights, ConvBackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() ALEXNET_CONV_ATTRS);
