// Argument checks of attention's entry points: what a caller that bypasses fastcv.ops gets instead of
// a crash.
#include <string>

#include "common/check.h"
#include "ops/attention/attention_ops.h"

namespace fastcv {

namespace {

DType compute_dtype(DType dt) { return dt == DType::Float64 ? DType::Float64 : DType::Float32; }

void check_floating(const TensorView& t, const char* arg) {
  if (t.dtype != DType::Float32 && t.dtype != DType::Float64 && t.dtype != DType::Float16 &&
      t.dtype != DType::BFloat16)
    throw ArgError(std::string(arg) + " must be a floating tensor (float32, float64, float16 or bfloat16), got " +
                   dtype_name(t.dtype));
}

void check_same(const TensorView& t, const char* arg, const TensorView& q, DeviceType device) {
  check_device(t, arg, device);
  check_dtype(t, arg, q.dtype);
}

// Rows are read as runs: the last dimension must be contiguous.
void check_rows(const TensorView& t, const char* arg) {
  check_arg(t.size(3) <= 1 || t.stride(3) == 1, arg, "'s last dimension must be contiguous (stride 1)");
}

}  // namespace

AttentionShape check_attention_args(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView* mask, const TensorView& out, const TensorView& lse,
                                    DeviceType device) {
  check_floating(q, "query");
  check_device(q, "query", device);
  check_shape(q, "query", {-1, -1, -1, -1});
  check_shape(k, "key", {q.size(0), -1, -1, q.size(3)});
  check_shape(v, "value", {q.size(0), k.size(1), k.size(2), -1});
  check_same(k, "key", q, device);
  check_same(v, "value", q, device);
  check_rows(q, "query");
  check_rows(k, "key");
  check_rows(v, "value");
  const AttentionShape sh{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  if (sh.hkv > 0 ? sh.hq % sh.hkv != 0 : sh.hq != 0)
    throw ArgError("the query's heads (" + std::to_string(sh.hq) + ") must be a multiple of the key's (" +
                   std::to_string(sh.hkv) + ")");
  if (mask) {
    check_shape(*mask, "attn_mask", {sh.b, sh.hq, sh.l, sh.s});
    check_device(*mask, "attn_mask", device);
    check_dtype(*mask, "attn_mask", compute_dtype(q.dtype));
  }
  check_shape(out, "out", {sh.b, sh.hq, sh.l, sh.dv});
  check_same(out, "out", q, device);
  check_contiguous(out, "out");
  check_shape(lse, "lse", {sh.b, sh.hq, sh.l});
  check_device(lse, "lse", device);
  check_dtype(lse, "lse", compute_dtype(q.dtype));
  check_contiguous(lse, "lse");
  return sh;
}

void check_attention_grads(const TensorView& grad_out, const TensorView& dq, const TensorView& dk,
                           const TensorView& dv, const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& out, const TensorView* grad_mask) {
  const struct {
    const TensorView& t;
    const char* arg;
    const TensorView& like;
    bool contiguous;
  } pairs[] = {{grad_out, "grad_out", out, false}, {dq, "grad_query", q, true}, {dk, "grad_key", k, true},
               {dv, "grad_value", v, true}};
  for (const auto& p : pairs) {
    check_shape(p.t, p.arg, {p.like.size(0), p.like.size(1), p.like.size(2), p.like.size(3)});
    check_same(p.t, p.arg, q, q.device);
    if (p.contiguous) check_contiguous(p.t, p.arg);
    check_rows(p.t, p.arg);
  }
  if (grad_mask) {
    check_shape(*grad_mask, "grad_mask", {q.size(0), q.size(1), q.size(2), k.size(2)});
    check_device(*grad_mask, "grad_mask", q.device);
    check_dtype(*grad_mask, "grad_mask", compute_dtype(q.dtype));
  }
}

}  // namespace fastcv
