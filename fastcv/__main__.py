"""python -m fastcv info | doctor | archs | bench | check"""
from __future__ import annotations

import argparse
import sys


def archs(expect: str | None, module: str | None) -> int:
    from fastcv import _C, fatbin

    module = module or _C.__file__
    expect = _C.build_info["cuda_archs"] if expect is None else expect
    if not expect:
        print("no CUDA architectures asked for (a build without CUDA kernels): nothing to check")
        return 0
    if fatbin.asked(expect) is None:
        print(f"'{expect}' depends on the build machine or nvcc; pass --expect with explicit architectures")
        return 0
    have = fatbin.module_contents(module)
    print(f"{module}\n  SASS: {', '.join(f'sm_{a}' for a in sorted(have.sass)) or 'none'}\n"
          f"  PTX:  {', '.join(f'compute_{a}' for a in sorted(have.ptx)) or 'none'}")
    problems = fatbin.verify(module, expect)
    for problem in problems:
        print(f"  PROBLEM: {problem} (asked: {expect})")
    if not problems:
        print(f"  exactly the architectures asked for ({expect})")
    return 1 if problems else 0


def archs_of_wheel(wheel: str, expect: str | None) -> int:
    """The wheel's recorded architectures must be the ones expected (when given) and the ones its module holds."""
    import tempfile

    from fastcv import fatbin

    with tempfile.TemporaryDirectory() as tmp:
        record, module = fatbin.wheel_record(wheel, tmp)
        recorded = record["cuda_archs"]
        print(f"{wheel}: records CUDA architectures '{recorded}', nvcc {record['nvcc'] or 'none'}"
              + (f" (from {record['nvcc_from']})" if record["nvcc_from"] else "")
              + f", CPU instruction sets {', '.join(record['cpu_isas'])}")
        if expect is not None and fatbin.asked(expect) != fatbin.asked(recorded):
            print(f"  PROBLEM: the wheel records '{recorded}', not the expected '{expect}'")
            return 1
        return archs(recorded if expect is None else expect, module)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastcv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build configuration, GPUs and whether the build covers them")
    p = sub.add_parser("archs", help="read the GPU code in the compiled module with cuobjdump and check it is exactly "
                                     "the CUDA architectures asked for (exit 1 if not)")
    p.add_argument("--expect", metavar="ARCHS", help="a CMake architecture list (default: the one the module was "
                                                     "built for, FASTCV_CUDA_ARCHS)")
    p.add_argument("--module", metavar="PATH", help="the compiled file to read (default: fastcv's _C module)")
    p.add_argument("--wheel", metavar="PATH", help="check a built wheel instead: the architectures its metadata "
                                                   "records against the module it carries (and --expect)")
    doctor = sub.add_parser(
        "doctor", help="explain this installation: the facts of info, which kernels each op runs on each device "
                       "and why, and each problem found with the command that fixes it",
        description="Explains this installation: versions, the build, the CPU, the GPUs and whether the build "
                    "covers them, which kernels each op runs on each device and why, and each problem found "
                    "with the command that fixes it.",
        epilog="Exit status: 0 when no problem is found, 1 when there is one.")
    doctor.add_argument("--json", action="store_true", help="print the same facts as JSON")
    for name, text in (("bench", "time every op against its PyTorch/torchvision reference"),
                       ("check", "check every op's results against its reference, without timing")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        p.add_argument("--op", action="append", help="only this op (repeatable)")
        p.add_argument("--quick", action="store_true", help="the smaller set of cases, shorter timing")
        p.add_argument("--match", metavar="TEXT", help="only the cases whose name contains TEXT")
        p.add_argument("--models", action="store_true",
                       help="whole networks instead of single ops: torchvision's against fastcv's (minutes)")
        if name == "bench":
            p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
            p.add_argument("--plot", metavar="PATH",
                           help="also draw each case's speedup to PATH (.png, .svg, .pdf); needs matplotlib: "
                                'pip install "fastcv[plot]"')
            p.add_argument("--from", dest="from_json", metavar="JSON", nargs="+", action="extend",
                           help="with --plot: draw the runs in these files (written by --json; a CPU and a "
                                "GPU run can share the picture) instead of running the benchmarks; --op and "
                                "--match still pick the cases")
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastcv.doctor import info

        info()
        return
    if args.command == "archs":
        raise SystemExit(archs_of_wheel(args.wheel, args.expect) if args.wheel else archs(args.expect, args.module))
    if args.command == "doctor":
        from fastcv.doctor import doctor

        raise SystemExit(doctor(as_json=args.json))
    plot = getattr(args, "plot", None)
    if plot:
        from fastcv.benchmarks.plot import require_matplotlib

        try:
            require_matplotlib()
        except ModuleNotFoundError as e:
            raise SystemExit(f"python -m fastcv bench --plot: {e}") from None
    if getattr(args, "from_json", None):
        if not plot:
            parser.error("--from needs --plot PATH: it draws the runs in the files, it does not run anything")
        if args.json:
            parser.error("--from runs nothing, so there is nothing new for --json to write")
        from fastcv.benchmarks.plot import plot_files

        try:
            plot_files(args.from_json, plot, ops=args.op, match=args.match)
        except (OSError, ValueError) as e:
            raise SystemExit(f"python -m fastcv bench --from: {e}") from None
        print(f"wrote {plot}")
        return
    from fastcv.benchmarks.runner import failure_message, run

    cases = None
    if args.models:
        from fastcv.benchmarks import models

        cases = models.cases(args.device)
    rows = run(device=args.device, quick=args.quick, ops=args.op, json_path=getattr(args, "json", None),
               check_only=args.command == "check", match=args.match, plot_path=plot, cases=cases)
    failed = failure_message(rows)
    if failed:
        raise SystemExit(f"python -m fastcv {args.command}: {failed}")


if __name__ == "__main__":
    main(sys.argv[1:])
