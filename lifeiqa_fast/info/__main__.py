"""python -m lifeiqa_fast.info [--build]: print what was built and what impl="auto" picks; --build adds
the resource usage of every CUDA kernel in the loaded _C."""
import sys

from . import format_info, info

print(format_info(info()))
if "--build" in sys.argv[1:]:
    from ..preflight import cuda_checks

    try:
        checks = cuda_checks()
    except (RuntimeError, OSError) as exc:  # no cuobjdump, or it failed
        sys.exit(f"CUDA kernels in _C: not checked ({exc})")
    print("CUDA kernels in _C (registers, stack bytes, static shared bytes):" if checks else
          "CUDA kernels in _C: none (built without CUDA, or _C not loaded)")
    for c in checks:
        state = "ok  " if c.ok else "FAIL"
        print(f"  {state} {c.target} {c.kernel} {c.case}: regs={c.registers} stack={c.stack} smem={c.shared}"
              + (f"  {c.error or c.note}" if c.error or c.note else ""))
