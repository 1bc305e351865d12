"""Preflight: the GPU kernels checked on a machine without a GPU, so that they pass the first time they
meet one.

- Triton: every kernel compiled ahead of time for sm_80 and sm_90 (triton.compile of an ASTSource for a
  GPUTarget) by calling the op wrappers of lifeiqa_fast/triton/ on CPU tensors with the launch replaced
  by the compile. The arguments go through Triton's own binder, so they are specialised as on a real
  launch (an int equal to 1 becomes a constant, a pointer or int divisible by 16 is marked so). Cases:
  Life-IQA's shapes (batch 2 and 64), the kernels' size limits, and the test suite's edge shapes (every
  size 1), each in fp32, bf16, fp16 and fp64. Each compiled kernel must fit the target's shared memory
  (opt-in maximum per block) and, outside fp64, spill no register at Life-IQA's shapes (ptxas -v's
  spill stores, Triton's ptxas); a spill at an edge or limit shape is noted, not failed.
- CUDA: the resource usage of every kernel in the loaded _C (registers, stack frame, static shared
  memory, per architecture), read from the binary with cuobjdump (the CUDA toolkit's, or the one
  Triton ships): outside fp64 no kernel may use stack, where spilled registers would go (ptxas's
  spill counts are not in the binary; no stack means no spill).

    python -m lifeiqa_fast.preflight [--json FILE] [--record]     # exit status 1 if a check fails

--record writes lifeiqa_fast/preflight.json, the Triton sources (sha256) whose every check passed, which
lifeiqa_fast.info() reports and tests/test_preflight.py holds to the current sources.

TRITON_INTERPRET must be unset (the interpreter replaces the kernels that are compiled here).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

from . import _ext

# Dynamic shared memory a block may opt in to (CUDA C programming guide, compute capabilities table).
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class Check:
    """One kernel compiled (Triton) or found in _C (CUDA) for one target."""
    backend: str  # "triton" or "cuda"
    op: str
    kernel: str
    target: str  # "sm_80", ...
    case: str  # the shapes and dtype (Triton), the template arguments (CUDA)
    fp64: bool
    life_iqa: bool = True  # at Life-IQA's shapes (CUDA: every kernel), where a spill is a failure
    ok: bool = True
    error: str = ""  # why not ok
    note: str = ""  # what is worth knowing but passes (a spill at an edge or limit shape)
    registers: int | None = None
    stack: int | None = None  # bytes of stack frame per thread: where spilled registers go
    spills: int | None = None  # bytes of spill stores (Triton, from ptxas -v; CUDA: unknown, stack bounds it)
    shared: int | None = None  # bytes: Triton's dynamic shared memory; CUDA's static shared memory


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    if os.path.exists(home):
        return home
    with contextlib.suppress(ImportError, RuntimeError):  # Triton's own (RuntimeError: it has none)
        from triton import knobs
        return knobs.nvidia.cuobjdump.path
    return None


def resource_usage(path: str) -> list[tuple[str, str, dict]]:
    """(architecture, mangled function name, {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}) of every
    kernel in a cubin or in the fatbinaries of a shared library, from cuobjdump --dump-resource-usage."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit's bin/ or Triton's backends/nvidia/bin/)")
    text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                          check=True).stdout
    found, arch, name = [], None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function "):
            name = line[len("Function "):].rstrip(":")
        elif name is not None and line.startswith("REG:"):
            found.append((arch, name, {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}))
            name = None
    return found


# ---------------------------------------------------------------------------------------------------------
# Triton


def _triton_cases():
    """(op, case name, a function of the dtype that calls the op's Triton wrappers) for every case."""
    from .triton import cross_attention, gcn, grid_pool, moe

    def t(*shape, dtype):
        return torch.zeros(*shape, dtype=dtype)

    def grid_pool_case(B, H, W, C, g, channels_last_view):
        def call(dt):
            x = t(B, C, H, W, dtype=dt).permute(0, 2, 3, 1) if channels_last_view else t(B, H, W, C, dtype=dt)
            grid_pool.grid_pool_forward(x, g)
            grid_pool.grid_pool_backward(t(B, g * g, C, dtype=dt), H, W, g)
        return call

    def gcn_case(B, N, D, adj):
        def call(dt):
            H1, H2 = max(D // 2, 1), max(D // 4, 1)
            a = {"fixed": None, "shared": t(N, N, dtype=dt), "per image": t(B, N, N, dtype=dt)}[adj]
            gcn.gcn_forward(t(B, N, D, dtype=dt), a, t(D, H1, dtype=dt), t(H1, dtype=dt), t(H1, H2, dtype=dt),
                            t(H2, dtype=dt), t(H2, D, dtype=dt), t(D, dtype=dt))
        return call

    def attention_case(B, Nq, Nk, D, H, layers):
        def call(dt):
            kv = t(B, Nk, layers, 2, D, dtype=dt)[:, :, layers - 1]  # one layer of the decoder's K/V GEMM
            w = [t(D, dtype=dt), t(D, dtype=dt), t(D, D, dtype=dt), t(D, dtype=dt), t(D, D, dtype=dt), t(D, dtype=dt)]
            cross_attention.cross_attention_forward(t(B, Nq, D, dtype=dt), kv, *w, H, 1e-5)
        return call

    def moe_case(T, D, E, k, dense, masked):
        def call(dt):
            F = 4 * D
            mask = t(T, k, F, dtype=dt) if masked else None
            moe.moe_forward(t(T, D, dtype=dt), t(E, D, dtype=dt), t(E, dtype=dt), t(E, F, D, dtype=dt),
                            t(E, F, dtype=dt), t(E, D, F, dtype=dt), t(E, D, dtype=dt), k, mask, dense)
        return call

    cases = [
        ("grid_pool", "Life-IQA (2, 14, 14, 512) grid 7", grid_pool_case(2, 14, 14, 512, 7, False)),
        ("grid_pool", "Life-IQA NCHW view (2, 512, 14, 14) grid 7", grid_pool_case(2, 14, 14, 512, 7, True)),
        ("grid_pool", "edge (1, 1, 1, 1) grid 1", grid_pool_case(1, 1, 1, 1, 1, False)),
        ("grid_pool", "odd (3, 5, 9, 20) grid 3", grid_pool_case(3, 5, 9, 20, 3, False)),
    ]
    for adj in ("fixed", "shared", "per image"):
        cases += [("gcn", f"Life-IQA B=2 N=6 D=384, {adj} graph", gcn_case(2, 6, 384, adj)),
                  ("gcn", f"edge B=N=D=1, {adj} graph", gcn_case(1, 1, 1, adj))]
    cases += [
        ("gcn", "limit N=32 D=384 B=64", gcn_case(64, 32, 384, "fixed")),
        ("cross_attention", "Life-IQA B=2 Nq=6 Nk=49 D=384 heads=6", attention_case(2, 6, 49, 384, 6, 2)),
        ("cross_attention", "Life-IQA B=64 Nq=6 Nk=49 D=384 heads=6", attention_case(64, 6, 49, 384, 6, 2)),
        ("cross_attention", "edge B=Nq=Nk=D=heads=1", attention_case(1, 1, 1, 1, 1, 1)),
        ("cross_attention", "limit Nq=64 head_dim=128", attention_case(2, 64, 49, 128, 1, 1)),
    ]
    for dense in (True, False):
        way = "dense" if dense else "grouped"
        for masked in (False, True):
            drop = ", dropout mask" if masked else ""
            cases += [("moe", f"Life-IQA T=12 D=384 E=8 k=2, {way}{drop}", moe_case(12, 384, 8, 2, dense, masked)),
                      ("moe", f"Life-IQA T=384 D=384 E=8 k=2, {way}{drop}", moe_case(384, 384, 8, 2, dense, masked))]
        cases.append(("moe", f"edge T=D=E=k=1, {way}", moe_case(1, 1, 1, 1, dense, False)))
    return cases


@contextlib.contextmanager
def _launches_compiled(target, on_compile):
    """Within: a Triton launch binds its arguments as a real launch does, then compiles for `target`
    (a GPUTarget) and calls on_compile(kernel name, compiled kernel or the exception) instead of running."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(target)
    seen, binders = {}, {}

    def run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if self not in binders:  # as JITFunction.create_binder: made once per kernel
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        key = (self.__name__, repr(signature), repr(constexprs), repr(attrs), repr(options))
        if key not in seen:
            try:
                seen[key] = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                           options=options.__dict__)
            except Exception as exc:  # noqa: BLE001 - every failure is a finding, reported with its kernel
                seen[key] = exc
            on_compile(self.__name__, seen[key])

    original = JITFunction.run
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:600]


def triton_checks(targets=tuple(TARGETS), dtypes=tuple(DTYPES), ops=None, progress=None) -> list[Check]:
    """Compile every Triton kernel of every case (of `ops`, None: all) for each target and dtype; one
    Check per distinct compilation within a case and dtype (another case reaching the same
    specialisation is checked again, under its own name; Triton's cache makes it cheap)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the Triton preflight compiles kernels: run it with TRITON_INTERPRET unset")
    from triton.backends.compiler import GPUTarget

    checks = []
    for target_name in targets:
        capability, smem_limit = TARGETS[target_name]
        for op, case, call in _triton_cases():
            if ops is not None and op not in ops:
                continue
            for dtype_name in dtypes:
                fp64 = dtype_name == "fp64"

                def record(kernel, result, op=op, case=f"{case}, {dtype_name}", fp64=fp64):
                    check = Check("triton", op, kernel, target_name, case, fp64,
                                  life_iqa=case.startswith("Life-IQA"))
                    if isinstance(result, BaseException):
                        check.ok, check.error = False, _message(result)
                    else:
                        _triton_resources(check, result, smem_limit)
                    checks.append(check)
                    if progress is not None:
                        progress(check)

                with _launches_compiled(GPUTarget("cuda", capability, 32), record):
                    try:
                        call(DTYPES[dtype_name])
                    except Exception as exc:  # noqa: BLE001 - a wrapper that fails before any launch
                        record("(wrapper)", exc)
    return checks


def _ptxas_usage(ptx: str, arch: str) -> dict:
    """{"registers", "stack", "spills"} of the one kernel in ptx, from ptxas -v (Triton's ptxas)."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name={arch}", src, "-o",
                              os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else None  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "stack": number(r"(\d+) bytes stack frame"),
            "spills": number(r"(\d+) bytes spill stores")}


def _triton_resources(check: Check, compiled, smem_limit: int) -> None:
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    check.shared = int(compiled.metadata.shared)
    usage = _ptxas_usage(compiled.asm["ptx"], sm_arch_from_capability(compiled.metadata.target.arch))
    check.registers, check.stack, check.spills = usage["registers"], usage["stack"], usage["spills"]
    _judge(check, smem_limit)


def _judge(check: Check, smem_limit: int | None) -> None:
    """Fails a kernel that cannot launch (shared memory over the target's limit) or that spills at
    Life-IQA's shapes outside fp64; notes a spill elsewhere."""
    problems = []
    if smem_limit is not None and check.shared is not None and check.shared > smem_limit:
        problems.append(f"needs {check.shared} bytes of shared memory, {check.target} allows {smem_limit}")
    spilled = check.spills if check.spills is not None else check.stack
    what = "spill stores" if check.spills is not None else "stack (where spills go)"
    if spilled:
        if check.fp64 or not check.life_iqa:
            check.note = f"{spilled} bytes of {what}" + ("" if check.fp64 else " at this edge/limit shape")
        else:
            problems.append(f"{spilled} bytes of {what} at Life-IQA's shapes outside fp64")
    if problems:
        check.ok, check.error = False, "; ".join(problems)


# ---------------------------------------------------------------------------------------------------------
# CUDA


_CUDA_OP = re.compile(r"^_(grid_pool|gcn|cross_attention|moe)_")


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines() if len(out.splitlines()) == len(names) else names


def _kernel_and_template(demangled: str) -> tuple[str, str]:
    """("_moe_route_kernel", "float") from "lifeiqa_fast::(anonymous namespace)::_moe_route_kernel<float>(...)"."""
    head = demangled.replace("(anonymous namespace)::", "").split("(")[0]
    name = head.split("<")[0].rsplit("::", 1)[-1]
    return name, head[head.find("<") + 1:head.rfind(">")] if "<" in head else ""


def cuda_checks() -> list[Check]:
    """One Check per kernel and architecture in the loaded _C's fatbinaries (none when it has no CUDA)."""
    path = _ext.library_path()
    if path is None or not _ext.BUILD_INFO.get("cuda"):
        return []
    usage = resource_usage(str(path))
    checks = []
    for (arch, _, res), name in zip(usage, _demangle([name for _, name, _ in usage])):
        kernel, template = _kernel_and_template(name)
        op = _CUDA_OP.search(kernel)
        check = Check("cuda", op.group(1) if op else "?", kernel, arch, f"<{template}>",
                      fp64=template.split(",")[0].strip() == "double",
                      registers=res.get("REG"), stack=res.get("STACK"), shared=res.get("SHARED"))
        _judge(check, None)
        checks.append(check)
    return checks


@functools.lru_cache(maxsize=None)
def cuda_preflight() -> dict[str, str]:
    """Per op, what cuda_checks() found in the loaded _C, in words ({} without CUDA kernels; every op
    "not checked" where cuobjdump is missing). Cached: info() reports it."""
    try:
        checks = cuda_checks()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        return {op: f"not checked ({exc})" for op in _ext.BUILD_INFO.get("cuda_sources", {})}
    found = {}
    for op, entry in summary(checks).get("cuda", {}).items():
        failed = [c for c in checks if c.op == op and not c.ok]
        found[op] = (f"passed: {entry['checks']} kernel builds (dtype, template, architecture), no stack (no spill) "
                     f"outside fp64" if not failed else
                     f"FAILED: {failed[0].kernel} {failed[0].case} on {failed[0].target}: {failed[0].error}")
    return found


def summary(checks: list[Check]) -> dict:
    """{backend: {op: {"targets": [...], "checks": n, "failed": n}}}."""
    out: dict = {}
    for c in checks:
        entry = out.setdefault(c.backend, {}).setdefault(c.op, {"targets": [], "checks": 0, "failed": 0})
        if c.target not in entry["targets"]:
            entry["targets"].append(c.target)
        entry["checks"] += 1
        entry["failed"] += not c.ok
    return out


def _record(checks: list[Check], version: str) -> None:
    from .ops._impl import PREFLIGHT_RECORD, source_hash
    records = []
    for op, entry in summary(checks).get("triton", {}).items():
        if entry["failed"] == 0:
            records.append({"op": op, "backend": "triton", "source": source_hash(op, "triton"), "triton": version,
                            "targets": entry["targets"], "checks": entry["checks"],
                            "date": datetime.date.today().isoformat()})
    PREFLIGHT_RECORD.write_text(json.dumps({"records": records}, indent=1) + "\n")
    print(f"recorded {[r['op'] for r in records]} in {PREFLIGHT_RECORD}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lifeiqa_fast.preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every check to this file")
    parser.add_argument("--targets", default=",".join(TARGETS), help="Triton targets (default: sm_80,sm_90)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="Triton dtypes (default: fp32,bf16,fp16,fp64)")
    parser.add_argument("--ops", default=None, help="Triton ops (default: all)")
    parser.add_argument("--no-triton", action="store_true", help="only the CUDA resource check")
    parser.add_argument("--no-cuda", action="store_true", help="only the Triton compile")
    parser.add_argument("--record", action="store_true",
                        help="record the Triton sources that passed in lifeiqa_fast/preflight.json (all targets "
                             "and dtypes only)")
    args = parser.parse_args(argv)
    from .info import OPS

    for option, given, known in (("--targets", args.targets, TARGETS), ("--dtypes", args.dtypes, DTYPES),
                                 ("--ops", args.ops or "", OPS)):
        unknown = [v for v in given.split(",") if v and v not in known]
        if unknown:
            parser.error(f"{option}: unknown {unknown}, choose from {list(known)}")
    if args.record and (args.targets, args.dtypes, args.ops, args.no_triton) != (",".join(TARGETS),
                                                                               ",".join(DTYPES), None, False):
        parser.error("--record needs every op, target and dtype")  # before minutes of compiling
    import triton

    def show(c: Check) -> None:
        state = "ok  " if c.ok else "FAIL"
        print(f"{state} {c.backend:6} {c.target} {c.kernel:32} regs={c.registers} stack={c.stack} "
              f"spills={c.spills} smem={c.shared}  {c.case}" + "".join(f"\n     {t}" for t in (c.error, c.note) if t),
              flush=True)

    checks = []
    if not args.no_triton:
        checks += triton_checks(tuple(args.targets.split(",")), tuple(args.dtypes.split(",")),
                                ops=args.ops.split(",") if args.ops else None, progress=show)
    for c in [] if args.no_cuda else cuda_checks():
        show(c)
        checks.append(c)
    report = {"triton": triton.__version__, "torch": torch.__version__, "summary": summary(checks),
              "checks": [asdict(c) for c in checks]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.record:
        _record(checks, triton.__version__)
    failed = [c for c in checks if not c.ok]
    print(f"preflight with Triton {triton.__version__}: {len(checks) - len(failed)} of {len(checks)} checks "
          f"passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
