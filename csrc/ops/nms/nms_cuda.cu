// CUDA NMS in two launches for any number of images: an IoU bitmask kernel, then the suppression pass on
// the GPU (one thread block per image), so the mask never travels to the host and nothing syncs.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "ops/nms/nms.h"
#include "ops/nms/nms_ops.h"

namespace fastcv {
namespace {

using Word = unsigned long long;
constexpr int kWordBits = 64;
constexpr int kKeepThreads = 256;

// Block (x = column word, y = row word, z = image); thread t handles row y*64+t against the block's
// 64 columns. Only the upper triangle is computed: the pass below never reads the rest.
template <class S>
__global__ void nms_mask_kernel(const S* __restrict__ boxes, const int64_t* __restrict__ labels, int64_t k,
                                int64_t words, compute_t<S> threshold, Word* __restrict__ mask) {
  using T = compute_t<S>;
  const int64_t col_blk = blockIdx.x, row_blk = blockIdx.y, img = blockIdx.z;
  if (col_blk < row_blk) return;
  __shared__ T col_box[kWordBits][5];
  __shared__ int64_t col_label[kWordBits];
  const int64_t col0 = col_blk * kWordBits;
  const int ncols = int(std::min<int64_t>(kWordBits, k - col0));
  const S* image_boxes = boxes + img * k * 4;
  const int64_t* image_labels = labels ? labels + img * k : nullptr;
  if (threadIdx.x < ncols) {
    const S* b = image_boxes + (col0 + threadIdx.x) * 4;
    T* c = col_box[threadIdx.x];
    c[0] = to_float(b[0]), c[1] = to_float(b[1]), c[2] = to_float(b[2]), c[3] = to_float(b[3]);
    c[4] = nms::box_area(c[0], c[1], c[2], c[3]);
    if (image_labels) col_label[threadIdx.x] = image_labels[col0 + threadIdx.x];
  }
  __syncthreads();
  const int64_t i = row_blk * kWordBits + threadIdx.x;
  if (i >= k) return;
  const S* b = image_boxes + i * 4;
  const T x1 = to_float(b[0]), y1 = to_float(b[1]), x2 = to_float(b[2]), y2 = to_float(b[3]);
  const T area = nms::box_area(x1, y1, x2, y2);
  const int64_t label = image_labels ? image_labels[i] : 0;
  Word bits = 0;
  for (int c = col_blk == row_blk ? threadIdx.x + 1 : 0; c < ncols; ++c) {
    if (image_labels && col_label[c] != label) continue;
    const T* o = col_box[c];
    if (nms::iou(x1, y1, x2, y2, area, o[0], o[1], o[2], o[3], o[4]) > threshold) bits |= Word(1) << c;
  }
  mask[(img * k + i) * words + col_blk] = bits;
}

// Greedy pass over one image's mask, 64 boxes at a time: thread 0 resolves the 64 boxes of a word from
// the diagonal words (staged in shared memory), then all threads fold the kept boxes' rows into the
// `removed` words to the right. Stops once max_keep boxes are kept.
__global__ void nms_keep_kernel(const Word* __restrict__ mask, const int64_t* __restrict__ n_valid,
                                Word* __restrict__ removed, int64_t k, int64_t words, int64_t max_keep,
                                int64_t* __restrict__ keep, int64_t* __restrict__ count) {
  const int64_t img = blockIdx.x;
  const Word* m = mask + img * k * words;
  Word* rem = removed + img * words;
  int64_t* out = keep + img * max_keep;
  const int64_t n = n_valid ? std::max<int64_t>(0, std::min<int64_t>(n_valid[img], k)) : k;
  __shared__ Word diag[kWordBits];
  __shared__ int kept_rows[kWordBits];  // rows of the current word kept, for the others to fold in
  __shared__ int kept_in_word;
  __shared__ int64_t kept_total;
  if (threadIdx.x == 0) kept_total = 0;
  __syncthreads();
  for (int64_t blk = 0; blk * kWordBits < n; ++blk) {
    const int64_t base = blk * kWordBits;
    const int rows = int(std::min<int64_t>(kWordBits, n - base));
    if (threadIdx.x < rows) diag[threadIdx.x] = m[(base + threadIdx.x) * words + blk];
    __syncthreads();
    if (threadIdx.x == 0) {
      Word r = rem[blk];
      int64_t total = kept_total;
      int count = 0;
      for (int t = 0; t < rows && total < max_keep; ++t) {
        if ((r >> t) & 1) continue;
        kept_rows[count++] = t;
        out[total++] = base + t;
        r |= diag[t];
      }
      kept_in_word = count;
      kept_total = total;
    }
    __syncthreads();
    if (kept_total >= max_keep) break;  // the same value in every thread: a uniform exit
    // A counted loop over independent loads, which the compiler unrolls to keep several in flight.
    const int count = kept_in_word;
    for (int64_t w = blk + 1 + threadIdx.x; count && w < words; w += blockDim.x) {
      Word acc = rem[w];
#pragma unroll 8
      for (int r = 0; r < count; ++r) acc |= m[(base + kept_rows[r]) * words + w];
      rem[w] = acc;
    }
    __syncthreads();
  }
  const int64_t total = kept_total;
  for (int64_t p = total + threadIdx.x; p < max_keep; p += blockDim.x) out[p] = -1;
  if (threadIdx.x == 0) count[img] = total;
}

void check_cuda_tensor(const TensorView& t, const char* arg, const TensorView& like) {
  check_device(t, arg, DeviceType::CUDA);
  check_arg(t.device_index == like.device_index, arg, " must be on the same CUDA device as boxes");
  check_contiguous(t, arg);
}

}  // namespace

void nms_mask_cuda(const TensorView& boxes, const TensorView* labels, double iou_threshold,
                   const TensorView& mask, uintptr_t stream) {
  check_shape(boxes, "boxes", {-1, -1, 4});
  const int64_t batch = boxes.size(0), k = boxes.size(1), words = (k + kWordBits - 1) / kWordBits;
  check_cuda_tensor(boxes, "boxes", boxes);
  check_shape(mask, "mask", {batch, k, words});
  check_dtype(mask, "mask", DType::Int64);
  check_cuda_tensor(mask, "mask", boxes);
  if (labels) {
    check_shape(*labels, "labels", {batch, k});
    check_dtype(*labels, "labels", DType::Int64);
    check_cuda_tensor(*labels, "labels", boxes);
  }
  check_arg(iou_threshold >= 0.0 && iou_threshold <= 1.0, "iou_threshold must be in [0, 1]");
  check_arg(words <= 65535 && batch <= 65535, "nms on CUDA: at most 4,194,240 boxes and 65,535 images per call");
  if (batch == 0 || k == 0) return;
  DeviceGuard guard(boxes);
  const dim3 grid{unsigned(words), unsigned(words), unsigned(batch)};
  dispatch_floating(boxes.dtype, "boxes", [&](auto tag) {
    using S = decltype(tag);
    using T = compute_t<S>;
    nms_mask_kernel<S><<<grid, kWordBits, 0, as_stream(stream)>>>(
        boxes.ptr<S>(), optional_ptr<int64_t>(labels), k, words,
        nms::compute_threshold<T>(iou_threshold), mask.ptr<Word>());
  });
  FASTCV_CUDA_CHECK_LAUNCH("nms_mask_kernel");
}

void nms_keep_cuda(const TensorView& mask, const TensorView* n_valid, const TensorView& removed,
                   const TensorView& keep, const TensorView& count, uintptr_t stream) {
  check_shape(mask, "mask", {-1, -1, -1});
  const int64_t batch = mask.size(0), k = mask.size(1), words = mask.size(2);
  check_arg(words == (k + kWordBits - 1) / kWordBits, "mask must have ceil(K/64) words per row");
  check_dtype(mask, "mask", DType::Int64);
  check_cuda_tensor(mask, "mask", mask);
  check_shape(removed, "removed", {batch, words});
  check_dtype(removed, "removed", DType::Int64);
  check_cuda_tensor(removed, "removed", mask);
  check_shape(keep, "keep", {batch, -1});
  check_dtype(keep, "keep", DType::Int64);
  check_cuda_tensor(keep, "keep", mask);
  check_shape(count, "count", {batch});
  check_dtype(count, "count", DType::Int64);
  check_cuda_tensor(count, "count", mask);
  if (n_valid) {
    check_shape(*n_valid, "n_valid", {batch});
    check_dtype(*n_valid, "n_valid", DType::Int64);
    check_cuda_tensor(*n_valid, "n_valid", mask);
  }
  if (batch == 0) return;
  DeviceGuard guard(mask);
  nms_keep_kernel<<<unsigned(batch), kKeepThreads, 0, as_stream(stream)>>>(
      mask.ptr<Word>(), optional_ptr<int64_t>(n_valid), removed.ptr<Word>(), k, words,
      keep.size(1), keep.ptr<int64_t>(), count.ptr<int64_t>());
  FASTCV_CUDA_CHECK_LAUNCH("nms_keep_kernel");
}

}  // namespace fastcv
