#pragma once
// Entry points of the nms op family, called from nms_bind.cpp.
#include <cstdint>

#include "common/tensor_view.h"

namespace fastcv {

// Greedy NMS on the CPU over boxes [N,4] and scores [N] (any strides, one floating dtype). With labels
// [N] (int64), boxes of different labels never suppress each other (batched_nms). Writes the kept
// indices, highest score first (ties: lower index first), into keep [N] and returns how many.
int64_t nms_cpu(const TensorView& boxes, const TensorView& scores, const TensorView* labels,
                double iou_threshold, const TensorView& keep, int nthreads);

// batched_nms_padded on the CPU, candidate selection included: per image b, the pre_nms_top_k best
// (box, class) pairs of scores [B,N,C] above score_threshold (given in the scores' precision), NMS per
// class over boxes [B,N,4] (class_boxes: [B,N*C,4], a box per pair, row box * C + class); the first M kept
// go to indices [B,M] (box index) and labels [B,M] (class), -1 after them, and their number to count [B].
void batched_nms_padded_cpu(const TensorView& boxes, const TensorView& scores, double iou_threshold,
                            double score_threshold, int64_t pre_nms_top_k, bool class_boxes,
                            const TensorView& indices, const TensorView& labels, const TensorView& count,
                            int nthreads);

#ifdef FASTCV_WITH_CUDA
// For each image b of boxes [B,K,4] (contiguous, sorted by score): mask [B,K,ceil(K/64)] (int64) gets
// bit j%64 of word j/64 in row i set when j > i, box i suppresses box j, and (with labels) the labels match.
void nms_mask_cuda(const TensorView& boxes, const TensorView* labels, double iou_threshold,
                   const TensorView& mask, uintptr_t stream);
// The suppression pass over that mask, on the GPU, one thread block per image: keeps at most keep.size(1)
// boxes among the first n_valid[b] (all K without n_valid), writes their positions into keep [B,M]
// (-1 after them) and their number into count [B]. removed [B,ceil(K/64)] (int64) must be zeroed.
void nms_keep_cuda(const TensorView& mask, const TensorView* n_valid, const TensorView& removed,
                   const TensorView& keep, const TensorView& count, uintptr_t stream);
#endif

}  // namespace fastcv
