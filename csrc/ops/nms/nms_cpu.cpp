// CPU NMS: sort (radix), gather the boxes into structure-of-arrays in score order, then a blocked greedy
// pass. The inner loop (one kept box against a run of later boxes) is branch-free so the compiler
// vectorises it; later boxes sit in chunks sorted by x1 with a bucket index, so a kept box visits only
// the boxes whose x-range can overlap its own, and the chunks are split across threads. The decisions
// are exactly those of the sequential greedy algorithm. Labels (batched_nms) become independent
// segments run in parallel.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common/check.h"
#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "compute/radix_sort.h"
#include "ops/nms/nms.h"
#include "ops/nms/nms_ops.h"

namespace fastcv {
namespace {

using nms::iou;

// Suppression flags are 32-bit, as wide as the coordinates: the vectorised loop then covers 16 boxes
// per iteration (AVX-512) instead of the 64 that byte flags force, so short ranges stay vectorised.
using Flag = uint32_t;

template <class T>
struct BoxColumns {  // boxes in processing order, one array per coordinate
  std::vector<T> x1, y1, x2, y2, area;
  explicit BoxColumns(int64_t n = 0) { resize(n); }
  void resize(int64_t n) {
    for (auto* v : {&x1, &y1, &x2, &y2, &area}) v->resize(n);
  }
};

template <class T>
struct Box {
  T x1, y1, x2, y2, area;
};

template <class T>
Box<T> box_at(const BoxColumns<T>& b, int64_t i) {
  return {b.x1[i], b.y1[i], b.x2[i], b.y2[i], b.area[i]};
}

// Whether a box can meet another with a positive overlap. The others (empty, inverted, NaN) have IoU 0
// or NaN with every box, so they never suppress one and are never suppressed.
template <class T>
bool can_overlap(const Box<T>& a) {
  return a.x2 > a.x1 && a.y2 > a.y1;
}

// removed[j] |= iou(a, b[j]) > threshold for j in [j0, j1). The hot loop: branch-free so it vectorises.
template <class T>
FASTCV_ISA_INLINE void suppress_body(const Box<T>& a, const BoxColumns<T>& b, int64_t j0, int64_t j1, T threshold,
                          Flag* __restrict removed) {
  const T* __restrict x1 = b.x1.data();
  const T* __restrict y1 = b.y1.data();
  const T* __restrict x2 = b.x2.data();
  const T* __restrict y2 = b.y2.data();
  const T* __restrict area = b.area.data();
  for (int64_t j = j0; j < j1; ++j) {
    const T o = iou(a.x1, a.y1, a.x2, a.y2, a.area, x1[j], y1[j], x2[j], y2[j], area[j]);
    removed[j] |= Flag(o > threshold);
  }
}

FASTCV_ISA_DISPATCH(void, suppress, suppress_body,
                    (const Box<float>& a, const BoxColumns<float>& b, int64_t j0, int64_t j1, float t, Flag* r),
                    (a, b, j0, j1, t, r))
FASTCV_ISA_DISPATCH(void, suppress, suppress_body,
                    (const Box<double>& a, const BoxColumns<double>& b, int64_t j0, int64_t j1, double t, Flag* r),
                    (a, b, j0, j1, t, r))

// The boxes of a segment in chunks of `chunk` consecutive score positions, each chunk sorted by x1 and
// holding only boxes that can overlap. A kept box then visits, in each later chunk, only the x1 range
// that can meet it: for random boxes a small fraction of the chunk.
template <class T>
struct XSortedChunks {
  BoxColumns<T> boxes;
  std::vector<int64_t> position;  // the score position of each slot
  std::vector<int64_t> begin;     // chunk c holds slots [begin[c], begin[c + 1])
  std::vector<Flag> removed;      // per slot, while the chunk lies ahead of the greedy pass
  // Per chunk, an index on x1: bucket(x) = floor((x - x_min) * inv_width) clamped to [0, buckets),
  // a non-decreasing function of x, and first[b] = the first slot whose x1 is in bucket b or later.
  struct Index {
    T max_width, x_min, inv_width;
    int64_t buckets, first;  // first: offset of this chunk's entries in bucket_first
  };
  std::vector<Index> index;
  std::vector<int64_t> bucket_first;

  int64_t bucket(const Index& ix, T x) const {
    const T f = (x - ix.x_min) * ix.inv_width;
    if (!(f > T(0))) return 0;  // also NaN
    return f >= T(ix.buckets) ? ix.buckets - 1 : int64_t(f);
  }
};

// Widest vector of the CPU kernels (16 floats in AVX-512): ranges are rounded to it so the vectorised
// loop never falls into its scalar remainder, which costs as much as the vector part for short ranges.
constexpr int64_t kLanes = 16;
int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Chunk c's bucket index over its m real slots: about 8 boxes a bucket, or one bucket (the whole
// chunk) when x1 is not finite or all equal.
template <class T>
void index_chunk(XSortedChunks<T>& xs, int64_t c, int64_t m) {
  const int64_t s0 = xs.begin[c], s1 = s0 + m;
  T width = 0, x_min = std::numeric_limits<T>::infinity(), x_max = -x_min;
  for (int64_t slot = s0; slot < s1; ++slot) {
    width = std::max(width, xs.boxes.x2[slot] - xs.boxes.x1[slot]);
    x_min = std::min(x_min, xs.boxes.x1[slot]), x_max = std::max(x_max, xs.boxes.x1[slot]);
  }
  auto& ix = xs.index[c];
  const bool finite = std::isfinite(x_min) && std::isfinite(x_max) && x_max > x_min;
  ix = {width, x_min, T(0), finite ? std::max<int64_t>(1, m / 8) : 1, ix.first};
  if (finite) ix.inv_width = T(ix.buckets) / (x_max - x_min);
  if (!std::isfinite(ix.inv_width)) ix.buckets = 1, ix.inv_width = 0;
  int64_t* first = xs.bucket_first.data() + ix.first;
  int64_t b = 0;
  for (int64_t slot = s0; slot < xs.begin[c + 1]; ++slot) {
    const int64_t sb = slot < s1 ? xs.bucket(ix, xs.boxes.x1[slot]) : ix.buckets - 1;  // padding: last
    while (b <= sb) first[b++] = slot;
  }
  while (b <= ix.buckets) first[b++] = xs.begin[c + 1];
}

// Chunk c: the boxes of score positions [p0, p1) that can overlap, sorted by x1, then padding slots
// (position -1, coordinates +inf, area NaN: IoU NaN with every box, so never marked).
template <class T>
void fill_chunk(XSortedChunks<T>& xs, const BoxColumns<T>& cols, int64_t c, int64_t p0, int64_t p1) {
  int64_t* pos = xs.position.data() + xs.begin[c];
  int64_t m = 0;
  for (int64_t p = p0; p < p1; ++p)
    if (can_overlap(box_at(cols, p))) pos[m++] = p;
  std::sort(pos, pos + m, [&](int64_t a, int64_t b) { return cols.x1[a] < cols.x1[b]; });
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t slot = xs.begin[c]; slot < xs.begin[c + 1]; ++slot) {
    const Box<T> box = xs.position[slot] >= 0 ? box_at(cols, xs.position[slot]) : Box<T>{inf, inf, inf, inf, T(NAN)};
    xs.boxes.x1[slot] = box.x1, xs.boxes.y1[slot] = box.y1, xs.boxes.x2[slot] = box.x2;
    xs.boxes.y2[slot] = box.y2, xs.boxes.area[slot] = box.area;
  }
  index_chunk(xs, c, m);
}

template <class T>
XSortedChunks<T> sort_chunks(const BoxColumns<T>& cols, int64_t s0, int64_t s1, int64_t chunk, int nthreads) {
  const int64_t nchunks = (s1 - s0 + chunk - 1) / chunk;
  const auto chunk_end = [&](int64_t c) { return std::min(s1, s0 + (c + 1) * chunk); };
  XSortedChunks<T> xs;
  xs.begin.assign(nchunks + 1, 0);
  xs.index.resize(nchunks);
  int64_t entries = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    int64_t count = 0;
    for (int64_t p = s0 + c * chunk; p < chunk_end(c); ++p) count += can_overlap(box_at(cols, p));
    xs.begin[c + 1] = xs.begin[c] + round_up(count);  // chunks hold whole vectors
    xs.index[c].first = entries;
    entries += std::max<int64_t>(1, count / 8) + 1;
  }
  const int64_t slots = xs.begin[nchunks];
  xs.boxes.resize(slots);
  xs.position.assign(slots, -1);
  xs.removed.assign(slots, 0);
  xs.bucket_first.resize(entries);
  parallel_for(0, nchunks, 1, nthreads, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fill_chunk(xs, cols, c, s0 + c * chunk, chunk_end(c));
  });
  return xs;
}

// Slots of chunk c holding every box whose x-range can overlap a's: x1 < a.x2 and x2 > a.x1, so
// x1 > a.x1 - max_width. Both ends come from the bucket index (a superset: bucket() is monotone); the
// lower end is pushed down past the rounding of the widths (relative error under 2^-23 in float).
template <class T>
std::pair<int64_t, int64_t> overlap_range(const XSortedChunks<T>& xs, int64_t c, const Box<T>& a) {
  const auto& ix = xs.index[c];
  const T slack = sizeof(T) == 4 ? T(1 + 1.0 / (1 << 20)) : T(1 + 1.0 / (int64_t(1) << 40));
  const T low = std::nextafter(T(a.x1 - ix.max_width * slack), -std::numeric_limits<T>::infinity());
  const int64_t* first = xs.bucket_first.data() + ix.first;
  const int64_t lo = first[xs.bucket(ix, low)], hi = first[xs.bucket(ix, a.x2) + 1];
  // Widen to whole vectors (chunks start on a multiple of kLanes and hold a multiple of it).
  const int64_t begin = xs.begin[c] + (lo - xs.begin[c]) / kLanes * kLanes;
  return {begin, begin + round_up(hi - begin)};
}

// Greedy NMS over [s0, s1) in index (score) order, exactly as the sequential algorithm decides it.
// Blocks of kBlock boxes are resolved serially among themselves; then the block's kept boxes suppress
// the rest of their chunk (in score order) and, in parallel, every later chunk (by x1 ranges).
template <class T>
void nms_segment(const BoxColumns<T>& cols, int64_t s0, int64_t s1, T threshold, Flag* removed, int nthreads) {
  constexpr int64_t kBlock = 256, kChunk = 1024;  // kChunk a multiple of kBlock: blocks never straddle chunks
  const int64_t nchunks = (s1 - s0 + kChunk - 1) / kChunk;
  XSortedChunks<T> xs = nchunks > 1 ? sort_chunks(cols, s0, s1, kChunk, nthreads) : XSortedChunks<T>{};
  Flag* ahead_removed = xs.removed.data();
  std::vector<int64_t> kept;
  kept.reserve(kBlock);
  for (int64_t b0 = s0; b0 < s1; b0 += kBlock) {
    const int64_t c = (b0 - s0) / kChunk, chunk_end = std::min(s1, s0 + (c + 1) * kChunk);
    if (nchunks > 1 && (b0 - s0) % kChunk == 0)  // chunk c becomes current: take over its flags
      for (int64_t slot = xs.begin[c]; slot < xs.begin[c + 1] && xs.position[slot] >= 0; ++slot)
        removed[xs.position[slot]] |= xs.removed[slot];
    const int64_t b1 = std::min(chunk_end, b0 + kBlock);
    kept.clear();
    for (int64_t i = b0; i < b1; ++i) {
      if (removed[i]) continue;
      kept.push_back(i);
      // Past b1 too, up to whole vectors: i is kept, so suppressing later boxes now is what greedy does.
      suppress(box_at(cols, i), cols, i + 1, std::min(s1, i + 1 + round_up(b1 - i - 1)), threshold, removed);
    }
    if (kept.empty() || b1 == s1) continue;
    // Task 0: the rest of chunk c; task t > 0: chunk c + t. Threads only when the block's work
    // (pairs before pruning) outweighs handing it out.
    const int threads = int64_t(kept.size()) * (s1 - b1) >= (int64_t(1) << 17) ? nthreads : 1;
    parallel_for(0, nchunks - c, 1, threads, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t i : kept) {
          const Box<T> a = box_at(cols, i);
          if (t == 0) {
            suppress(a, cols, b1, std::min(s1, b1 + round_up(chunk_end - b1)), threshold, removed);
          } else if (can_overlap(a)) {
            const auto range = overlap_range(xs, c + t, a);
            suppress(a, xs.boxes, range.first, range.second, threshold, ahead_removed);
          }
        }
      }
    });
  }
}

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

  std::vector<Flag> removed(n, 0);
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

// A (box, class) pair of batched_nms_padded. The order: higher score first, then lower flat index.
template <class T>
struct Candidate {
  T score;
  int64_t flat;  // box * classes + class
  bool operator<(const Candidate& o) const { return score > o.score || (score == o.score && flat < o.flat); }
};

// The top_k best pairs of boxes [r0, r1) of one image scoring above score_threshold. A bounded heap of
// the best so far (worst on top): after the first top_k, most pairs are rejected by one comparison.
template <class S>
std::vector<Candidate<compute_t<S>>> best_candidates(const TensorView& scores, double score_threshold,
                                                     int64_t top_k, int64_t r0, int64_t r1) {
  using T = compute_t<S>;
  const int64_t classes = scores.size(1), s0 = scores.stride(0), s1 = scores.stride(1);
  const S* sp = scores.ptr<S>();
  const T threshold = T(score_threshold);  // already rounded to the scores' dtype by the caller
  std::vector<Candidate<T>> heap;
  heap.reserve(std::min<int64_t>(top_k, (r1 - r0) * classes));
  for (int64_t i = r0; i < r1; ++i)
    for (int64_t c = 0; c < classes; ++c) {
      const T s = to_float(sp[i * s0 + c * s1]);
      if (!(s > threshold)) continue;  // also drops NaN
      const Candidate<T> p{s, i * classes + c};
      if (int64_t(heap.size()) < top_k) {
        heap.push_back(p);
        std::push_heap(heap.begin(), heap.end());
      } else if (p < heap.front()) {
        std::pop_heap(heap.begin(), heap.end());
        heap.back() = p;
        std::push_heap(heap.begin(), heap.end());
      }
    }
  return heap;
}

// One image's NMS problem: its top_k candidates, the rows split over `nthreads` threads (each keeps its
// own top_k; the merge keeps the top_k of those under the same order, so the result does not depend on
// the split).
// class_boxes: each (box, class) pair has its own box, row box * classes + class (a detector's per-class
// regression); else the classes share row `box`.
template <class S>
Problem<compute_t<S>> image_problem(const TensorView& scores, double score_threshold, int64_t top_k, bool class_boxes,
                                    int nthreads) {
  using T = compute_t<S>;
  const int64_t n = scores.size(0), classes = scores.size(1);
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, n * classes / 65536)));
  std::vector<std::vector<Candidate<T>>> found(parts);
  parallel_for(0, parts, 1, parts, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      found[p] = best_candidates<S>(scores, score_threshold, top_k, n * p / parts, n * (p + 1) / parts);
  });
  std::vector<Candidate<T>> all;
  for (auto& f : found) all.insert(all.end(), f.begin(), f.end());
  if (int64_t(all.size()) > top_k) {
    std::nth_element(all.begin(), all.begin() + top_k, all.end());
    all.resize(top_k);
  }
  Problem<T> pb;
  for (const auto& p : all) {
    pb.score.push_back(p.score);
    pb.label.push_back(p.flat % classes);
    pb.box_row.push_back(class_boxes ? p.flat : p.flat / classes);
  }
  return pb;
}

template <class S>
void padded_typed(const TensorView& boxes, const TensorView& scores, double iou_threshold, double score_threshold,
                  int64_t top_k, bool class_boxes, const TensorView& indices, const TensorView& labels,
                  const TensorView& count, int nthreads) {
  const int64_t batch = boxes.size(0), max_keep = indices.size(1), rows_per_box = class_boxes ? scores.size(2) : 1;
  // Images in parallel; with fewer images than threads (inference), the threads share each image.
  const int inner = batch >= nthreads ? 1 : nthreads;
  parallel_for(0, batch, 1, batch >= nthreads ? nthreads : 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> kept(max_keep);
    for (int64_t b = b0; b < b1; ++b) {
      const Problem<compute_t<S>> pb = image_problem<S>(scores.select0(b), score_threshold, top_k, class_boxes, inner);
      const int64_t c = solve<S>(boxes.select0(b), pb, iou_threshold, max_keep, kept.data(), inner);
      int64_t* out_index = indices.ptr<int64_t>() + b * max_keep;
      int64_t* out_label = labels.ptr<int64_t>() + b * max_keep;
      for (int64_t k = 0; k < max_keep; ++k) {
        out_index[k] = k < c ? pb.box_row[kept[k]] / rows_per_box : -1;
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
                            double score_threshold, int64_t pre_nms_top_k, bool class_boxes,
                            const TensorView& indices, const TensorView& labels, const TensorView& count,
                            int nthreads) {
  check_shape(scores, "scores", {-1, -1, -1});
  const int64_t batch = scores.size(0), n = scores.size(1);
  check_shape(boxes, "boxes", {batch, class_boxes ? n * scores.size(2) : n, 4});
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
    padded_typed<decltype(tag)>(boxes, scores, iou_threshold, score_threshold, pre_nms_top_k, class_boxes, indices,
                                labels, count, nthreads);
  });
}

}  // namespace fastcv
