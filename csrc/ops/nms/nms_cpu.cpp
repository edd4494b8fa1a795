// CPU NMS: sort, gather the boxes into structure-of-arrays in processing order, then a blocked greedy
// pass whose inner loop (one kept box against a run of later boxes) the compiler vectorises, with the
// later boxes split across threads. Labels (batched_nms) become independent segments run in parallel.
#include <algorithm>
#include <numeric>
#include <vector>

#include "common/check.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "common/radix_sort.h"
#include "ops/nms/nms.h"
#include "ops/nms/nms_ops.h"

namespace fastcv {
namespace {

using nms::iou;

template <class T>
struct BoxColumns {  // boxes in processing order, one array per coordinate
  std::vector<T> x1, y1, x2, y2, area;
  explicit BoxColumns(int64_t n) : x1(n), y1(n), x2(n), y2(n), area(n) {}
};

// removed[j] |= iou(i, j) > threshold for j in [j0, j1). The hot loop: branch-free so it vectorises.
template <class T>
inline void suppress_body(const BoxColumns<T>& b, int64_t i, int64_t j0, int64_t j1, T threshold,
                          uint8_t* __restrict removed) {
  const T ix1 = b.x1[i], iy1 = b.y1[i], ix2 = b.x2[i], iy2 = b.y2[i], ia = b.area[i];
  const T* __restrict x1 = b.x1.data();
  const T* __restrict y1 = b.y1.data();
  const T* __restrict x2 = b.x2.data();
  const T* __restrict y2 = b.y2.data();
  const T* __restrict area = b.area.data();
  for (int64_t j = j0; j < j1; ++j) {
    const T o = iou(ix1, iy1, ix2, iy2, ia, x1[j], y1[j], x2[j], y2[j], area[j]);
    removed[j] |= uint8_t(o > threshold);
  }
}

FASTCV_CPU_CLONES void suppress(const BoxColumns<float>& b, int64_t i, int64_t j0, int64_t j1, float t, uint8_t* r) {
  suppress_body(b, i, j0, j1, t, r);
}
FASTCV_CPU_CLONES void suppress(const BoxColumns<double>& b, int64_t i, int64_t j0, int64_t j1, double t, uint8_t* r) {
  suppress_body(b, i, j0, j1, t, r);
}

// Greedy NMS over [s0, s1) in index order. Blocks of kBlock boxes are resolved serially among
// themselves; then the block's kept boxes suppress everything after it, in parallel over cache-sized
// chunks. The result is exactly the sequential greedy one.
template <class T>
void nms_segment(const BoxColumns<T>& b, int64_t s0, int64_t s1, T threshold, uint8_t* removed, int nthreads) {
  constexpr int64_t kBlock = 256, kChunk = 1024;
  std::vector<int64_t> kept;
  kept.reserve(kBlock);
  for (int64_t b0 = s0; b0 < s1; b0 += kBlock) {
    const int64_t b1 = std::min(s1, b0 + kBlock);
    kept.clear();
    for (int64_t i = b0; i < b1; ++i) {
      if (removed[i]) continue;
      kept.push_back(i);
      suppress(b, i, i + 1, b1, threshold, removed);
    }
    if (kept.empty() || b1 == s1) continue;
    parallel_for(b1, s1, kChunk, nthreads, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; c += kChunk)
        for (int64_t i : kept) suppress(b, i, c, std::min(c1, c + kChunk), threshold, removed);
    });
  }
}

template <class S>
using Key = compute_t<S>;

// One greedy NMS problem: candidate i has score[i], label[i] (when labels are used) and uses row
// box_row[i] of the boxes tensor (row i when box_row is empty).
template <class T>
struct Problem {
  std::vector<T> score;
  std::vector<int64_t> label, box_row;
  int64_t size() const { return int64_t(score.size()); }
};

// Solves a problem; writes the kept candidates, best first, into keep (at most max_keep) and returns
// how many. Labels become independent segments, run in parallel.
template <class S>
int64_t solve(const TensorView& boxes, const Problem<compute_t<S>>& pb, double iou_threshold, int64_t max_keep,
              int64_t* keep, int nthreads) {
  using T = compute_t<S>;
  const int64_t n = pb.size();
  if (n == 0 || max_keep <= 0) return 0;
  const bool labels = !pb.label.empty();
  const std::vector<int64_t>& label = pb.label;

  // by_score: candidates best first. Processing order: the same, grouped by label (stable), so each
  // label is a contiguous segment in score order.
  std::vector<int64_t> by_score(n);
  std::iota(by_score.begin(), by_score.end(), int64_t(0));
  {
    std::vector<decltype(descending_key(T()))> keys(n);
    for (int64_t i = 0; i < n; ++i) keys[i] = descending_key(pb.score[i]);
    radix_sort_pairs(keys, by_score);
  }
  std::vector<int64_t> order = by_score;
  if (labels) {
    std::vector<uint64_t> keys(n);
    for (int64_t p = 0; p < n; ++p) keys[p] = ascending_key(label[order[p]]);
    radix_sort_pairs(keys, order);
  }

  const S* bp = boxes.ptr<S>();
  const int64_t bs0 = boxes.stride(0), bs1 = boxes.stride(1);
  BoxColumns<T> cols(n);
  parallel_for(0, n, 4096, nthreads, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const S* box = bp + (pb.box_row.empty() ? order[p] : pb.box_row[order[p]]) * bs0;
      cols.x1[p] = to_float(box[0]);
      cols.y1[p] = to_float(box[bs1]);
      cols.x2[p] = to_float(box[2 * bs1]);
      cols.y2[p] = to_float(box[3 * bs1]);
      cols.area[p] = nms::box_area(cols.x1[p], cols.y1[p], cols.x2[p], cols.y2[p]);
    }
  });

  std::vector<uint8_t> removed(n, 0);
  const T threshold = nms::compute_threshold<T>(iou_threshold);
  if (!labels) {
    nms_segment(cols, 0, n, threshold, removed.data(), nthreads);
  } else {
    std::vector<std::pair<int64_t, int64_t>> segments;  // [begin, end) in processing order
    for (int64_t p = 0; p < n;) {
      int64_t q = p + 1;
      while (q < n && label[order[q]] == label[order[p]]) ++q;
      segments.emplace_back(p, q);
      p = q;
    }
    // Largest first: the cost grows with the square of a segment's size, so this balances threads.
    std::sort(segments.begin(), segments.end(), [](auto& a, auto& b) { return a.second - a.first > b.second - b.first; });
    if (segments.size() == 1 || segments[0].second - segments[0].first > n / 2) {
      for (auto& seg : segments) nms_segment(cols, seg.first, seg.second, threshold, removed.data(), nthreads);
    } else {
      parallel_for(0, int64_t(segments.size()), 1, nthreads, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k)
          nms_segment(cols, segments[k].first, segments[k].second, threshold, removed.data(), 1);
      });
    }
  }

  std::vector<uint8_t> kept(n, 0);
  for (int64_t p = 0; p < n; ++p) kept[order[p]] = !removed[p];
  int64_t count = 0;
  for (int64_t p = 0; p < n && count < max_keep; ++p)
    if (kept[by_score[p]]) keep[count++] = by_score[p];
  return count;
}

template <class S>
int64_t nms_typed(const TensorView& boxes, const TensorView& scores, const TensorView* labels, double iou_threshold,
                  int64_t* keep, int nthreads) {
  const int64_t n = boxes.size(0);
  Problem<compute_t<S>> pb;
  pb.score.resize(n);
  const S* sp = scores.ptr<S>();
  for (int64_t i = 0; i < n; ++i) pb.score[i] = to_float(sp[i * scores.stride(0)]);
  if (labels) {
    pb.label.resize(n);
    const int64_t* lp = labels->ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) pb.label[i] = lp[i * labels->stride(0)];
  }
  return solve<S>(boxes, pb, iou_threshold, n, keep, nthreads);
}

// Image b of batched_nms_padded: the top_k best (box, class) pairs scoring above score_threshold. A
// bounded heap of the best so far: after the first top_k, most pairs are rejected by one comparison.
template <class S>
Problem<compute_t<S>> image_candidates(const TensorView& scores, double score_threshold, int64_t top_k) {
  using T = compute_t<S>;
  const int64_t n = scores.size(0), classes = scores.size(1);
  const int64_t s0 = scores.stride(0), s1 = scores.stride(1);
  const S* sp = scores.ptr<S>();
  const T threshold = T(score_threshold);  // already rounded to the scores' dtype by the caller
  struct Pair {
    T score;
    int64_t flat;  // box * classes + class: lower wins ties
  };
  // Heap order: the worst pair on top.
  const auto better = [](const Pair& a, const Pair& b) { return a.score > b.score || (a.score == b.score && a.flat < b.flat); };
  std::vector<Pair> heap;
  heap.reserve(std::min<int64_t>(top_k, n * classes));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < classes; ++c) {
      const T s = to_float(sp[i * s0 + c * s1]);
      if (!(s > threshold)) continue;  // also drops NaN
      const Pair p{s, i * classes + c};
      if (int64_t(heap.size()) < top_k) {
        heap.push_back(p);
        std::push_heap(heap.begin(), heap.end(), better);
      } else if (better(p, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), better);
        heap.back() = p;
        std::push_heap(heap.begin(), heap.end(), better);
      }
    }
  Problem<T> pb;
  for (const Pair& p : heap) {
    pb.score.push_back(p.score);
    pb.label.push_back(p.flat % classes);
    pb.box_row.push_back(p.flat / classes);
  }
  return pb;
}

template <class S>
void padded_typed(const TensorView& boxes, const TensorView& scores, double iou_threshold, double score_threshold,
                  int64_t top_k, const TensorView& indices, const TensorView& labels, const TensorView& count,
                  int nthreads) {
  const int64_t batch = boxes.size(0), max_keep = indices.size(1);
  // Images in parallel; inside an image the work runs serially (nested parallel_for calls do).
  parallel_for(0, batch, 1, nthreads, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> kept(max_keep);
    for (int64_t b = b0; b < b1; ++b) {
      const Problem<compute_t<S>> pb = image_candidates<S>(scores.select0(b), score_threshold, top_k);
      const int64_t c = solve<S>(boxes.select0(b), pb, iou_threshold, max_keep, kept.data(), 1);
      int64_t* out_index = indices.ptr<int64_t>() + b * max_keep;
      int64_t* out_label = labels.ptr<int64_t>() + b * max_keep;
      for (int64_t k = 0; k < max_keep; ++k) {
        out_index[k] = k < c ? pb.box_row[kept[k]] : -1;
        out_label[k] = k < c ? pb.label[kept[k]] : -1;
      }
      count.ptr<int64_t>()[b] = c;
    }
  });
}

}  // namespace

int64_t nms_cpu(const TensorView& boxes, const TensorView& scores, const TensorView* labels,
                double iou_threshold, const TensorView& keep, int nthreads) {
  check_shape(boxes, "boxes", {-1, 4});
  const int64_t n = boxes.size(0);
  check_shape(scores, "scores", {n});
  check_dtype(scores, "scores", boxes.dtype);
  check_shape(keep, "keep", {n});
  check_dtype(keep, "keep", DType::Int64);
  check_contiguous(keep, "keep");
  for (const TensorView* t : {&boxes, &scores, &keep}) check_device(*t, "tensors", DeviceType::CPU);
  if (labels) {
    check_shape(*labels, "idxs", {n});
    check_dtype(*labels, "idxs", DType::Int64);
    check_device(*labels, "idxs", DeviceType::CPU);
  }
  check_arg(iou_threshold >= 0.0 && iou_threshold <= 1.0, "iou_threshold must be in [0, 1]");
  return dispatch_floating(boxes.dtype, "boxes", [&](auto tag) {
    return nms_typed<decltype(tag)>(boxes, scores, labels, iou_threshold, keep.ptr<int64_t>(), nthreads);
  });
}

void batched_nms_padded_cpu(const TensorView& boxes, const TensorView& scores, double iou_threshold,
                            double score_threshold, int64_t pre_nms_top_k, const TensorView& indices,
                            const TensorView& labels, const TensorView& count, int nthreads) {
  check_shape(boxes, "boxes", {-1, -1, 4});
  const int64_t batch = boxes.size(0), n = boxes.size(1);
  check_shape(scores, "scores", {batch, n, -1});
  check_dtype(scores, "scores", boxes.dtype);
  check_shape(indices, "indices", {batch, -1});
  check_shape(labels, "labels", {batch, indices.size(1)});
  for (const TensorView* t : {&indices, &labels}) {
    check_dtype(*t, "indices and labels", DType::Int64);
    check_contiguous(*t, "indices and labels");
  }
  check_shape(count, "count", {batch});
  check_dtype(count, "count", DType::Int64);
  check_contiguous(count, "count");
  for (const TensorView* t : {&boxes, &scores, &indices, &labels, &count}) check_device(*t, "tensors", DeviceType::CPU);
  check_arg(iou_threshold >= 0.0 && iou_threshold <= 1.0, "iou_threshold must be in [0, 1]");
  check_arg(pre_nms_top_k >= 0, "pre_nms_top_k must be >= 0");
  dispatch_floating(boxes.dtype, "boxes", [&](auto tag) {
    padded_typed<decltype(tag)>(boxes, scores, iou_threshold, score_threshold, pre_nms_top_k, indices, labels, count,
                                nthreads);
  });
}

}  // namespace fastcv
