"""Compiles the Triton attention kernels (kernels/attention.py) for an H100/H200 (sm_90) without a GPU
and reports each configuration's shared memory (must stay within the 227 KB a block can have) and, from
ptxas -v on the generated PTX, registers and spills.

    python bench/compile_attention_triton.py                 # the default list below
    python bench/compile_attention_triton.py --all-configs   # every autotune config that the pruning keeps

Needs fastcv installed (a CPU-only or editable install is enough: nothing runs on a GPU).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastcv.kernels import attention as attn  # noqa: E402

TARGET = GPUTarget("cuda", 90, 64)
SHARED_MAX = 227 * 1024

# Argument types by name; pointers are filled in per dtype. Strides and sizes as int32 (the runtime
# picks i64 only for values past 2^31).
_SCALARS_F32 = {"qk_scale", "scale", "inv_keep"}
_SCALARS_I64 = {"seed"}


def _signature(fn, ptr_types, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        elif name in _SCALARS_F32:
            sig[name] = "fp32"
        elif name in _SCALARS_I64:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def _attrs(fn, sig):
    # What the launcher sees at run time for ordinary shapes: 16-byte aligned pointers, and strides and
    # sizes divisible by 16 (the row strides of contiguous tensors with D a multiple of 16).
    div16 = {"sqb", "sqh", "sql", "skb", "skh", "skn", "svb", "svh", "svn", "sdb", "sdh", "sdl", "L", "S", "D"}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if sig[name].startswith("*") or name in div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _ptxas_info(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                           capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return f"regs={regs[-1] if regs else '?'} spill_st/ld={'/'.join(spills[-1]) if spills else '?'}"


def compile_one(kind, dtype, d, block_m, block_n, warps, stages, causal=True, mask=False, dropout=False):
    tl_dtype = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[dtype]
    block_d = max(16, triton.next_power_of_2(d))
    flags = {"IS_CAUSAL": causal, "HAS_MASK": mask, "DROPOUT": dropout, "BLOCK_D": block_d,
             "EVEN_D": block_d == d, "PRECISION": "ieee", "UPCAST": False, "BLOCK_M": block_m, "BLOCK_N": block_n}
    if kind == "fwd":
        fn = attn._fwd_kernel
        ptrs = {"Q": tl_dtype, "K": tl_dtype, "V": tl_dtype, "Mask": "*fp32", "Out": tl_dtype, "Lse": "*fp32"}
    elif kind == "kv":
        fn = attn._bwd_dkdv_kernel.fn  # under its heuristics wrapper
        flags["MASK_COLS"] = False
        ptrs = {"Q": tl_dtype, "K": tl_dtype, "V": tl_dtype, "Mask": "*fp32", "DO": tl_dtype, "Lse": "*fp32",
                "Delta": "*fp32", "DK": tl_dtype, "DV": tl_dtype}
    else:
        fn = attn._bwd_dq_kernel
        ptrs = {"Q": tl_dtype, "K": tl_dtype, "V": tl_dtype, "Mask": "*fp32", "DO": tl_dtype, "Lse": "*fp32",
                "Delta": "*fp32", "DQ": tl_dtype}
    sig = _signature(fn, ptrs, flags)
    src = ASTSource(fn=fn, signature=sig, constexprs=flags, attrs=_attrs(fn, sig))
    t0 = time.time()
    compiled = triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
    shared = compiled.metadata.shared
    info = _ptxas_info(compiled.asm["ptx"])
    ok = "ok" if shared <= SHARED_MAX else "TOO MUCH SHARED MEMORY"
    if "wgmma" in compiled.asm["ptx"]:
        info += " wgmma"
    print(f"{kind:3s} {dtype} D={d:3d} BM={block_m:3d} BN={block_n:3d} w={warps} s={stages} causal={int(causal)} "
          f"mask={int(mask)} drop={int(dropout)}: shared={shared / 1024:6.1f} KB {info} "
          f"({time.time() - t0:.1f} s) {ok}", flush=True)
    return shared <= SHARED_MAX


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--all-configs", action="store_true", help="every candidate of the table, not only the defaults")
    args = ap.parse_args()
    cases = []
    for (kind, d, es), shapes in attn._TABLE.items():
        dtypes = ("fp16", "bf16") if es == 2 else ("fp32",)
        for dtype in dtypes:
            if dtype == "bf16" and d == 256:
                continue
            for shape in (shapes if args.all_configs else shapes[:1]):
                cases.append((kind, dtype, d, *shape))
    ok = True
    for case in cases:
        ok &= compile_one(*case)
    # the other code paths (no causal, a mask, dropout), with the defaults the launcher takes for a mask
    for kind in ("fwd", "kv", "q"):
        ok &= compile_one(kind, "bf16", 128, *attn._default(kind, 128, 2, True), causal=False, mask=True, dropout=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
