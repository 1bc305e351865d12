"""What lifeiqa_fast was built with and which implementation impl="auto" picks, per op and device.

`python -m lifeiqa_fast.info` prints it; `lifeiqa_fast.info()` returns it as a dict.
`python -m lifeiqa_fast.info --build` adds the resource usage of every CUDA kernel in the loaded _C
(registers, stack, static shared memory per architecture; lifeiqa_fast.preflight.cuda_checks).
"""
from __future__ import annotations

import os
import platform

import torch

from .. import _ext
from .._version import __version__
from ..ops._impl import CPU_REFERENCE_FROM, choose, cpu_capability, preflight_record, triton_status, validation
from ..ops.cross_attention import MAX_HEAD_DIM, MAX_QUERIES, NATIVE_MAX_ROWS
from ..ops.gcn import MAX_TOKENS

OPS = ("grid_pool", "gcn", "cross_attention", "moe")  # the ops with CPU, CUDA and Triton kernels
CPU_ONLY = ("attend_memory",)  # ops with a CPU kernel only: GPUs run their composite path


def _kernel_limits() -> dict[str, str]:
    """Per op, the sizes its native and Triton kernels take (beyond them auto runs the composite ops)."""
    return {"gcn": f"at most {MAX_TOKENS} tokens per image",
            "cross_attention": f"at most {MAX_QUERIES} query tokens, heads of at most {MAX_HEAD_DIM} channels",
            "attend_memory": f"CPU only, fp32 and bf16; auto takes it without autograd for at most {NATIVE_MAX_ROWS} "
                             f"query rows (B * Nq)"}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info() -> dict:
    """Versions, the compiled extension, the devices, and per op and device type the auto choice and why
    (CPU and CUDA whether or not a GPU is present: what a model moved there would run)."""
    from ..preflight import cuda_preflight  # here: `python -m lifeiqa_fast.preflight` runs it as __main__

    devices = ["cpu", "cuda"]
    built_cuda = bool(_ext.BUILD_INFO.get("cuda"))
    arch_list = _ext.BUILD_INFO.get("cuda_arch_list")
    ops = {}
    for op in OPS + CPU_ONLY:
        kernels = {
            "cpu": _ext.has_kernel(op, "cpu"),
            "cuda": _ext.has_kernel(op, "cuda"),
            "triton": triton_status()[0] and op not in CPU_ONLY,
        }
        validated = {backend: validation(op, backend) for backend in ("cuda", "triton")}
        record = preflight_record(op)
        # What each GPU kernel was checked for without a GPU: the CUDA kernels' architectures as compiled
        # into _C and their resources read from it; the Triton kernels' targets from the preflight record
        # of their current source.
        checked = {"cuda": {"compiled_for": arch_list.split(";") if kernels["cuda"] and arch_list else [],
                            "preflight": cuda_preflight().get(op) if kernels["cuda"] else None},
                   "triton": {"compiled_for": record["targets"] if record else [],
                              "preflight": f"passed with Triton {record['triton']} ({record['checks']} kernel "
                                           f"compilations)" if record else None}}
        auto = {}
        for device in devices:
            impl, reason = choose(op, device, "auto")
            auto[device] = {"impl": impl, "reason": reason}
        # where measured data for this kind of CPU make auto run the reference instead (CPU_REFERENCE_FROM)
        reference_from = {str(dtype).removeprefix("torch."): rows for (name, dtype), rows
                          in CPU_REFERENCE_FROM.get(cpu_capability(), {}).items() if name == op}
        ops[op] = {"kernels": kernels, "preflight": checked, "gpu_validation": validated, "auto": auto,
                   "kernel_limits": _kernel_limits().get(op), "cpu_reference_from_rows": reference_from}
    return {
        "versions": {
            "lifeiqa_fast": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda (torch build)": torch.version.cuda,
            "triton": _version("triton"),
            "timm": _version("timm"),
        },
        "extension": {
            "loaded": _ext.LOADED,
            "error": _ext.LOAD_ERROR,
            "backends": (["CPU"] if _ext.LOADED else []) + (["CUDA"] if _ext.LOADED and built_cuda else []),
            "cuda_arch_list": _ext.BUILD_INFO.get("cuda_arch_list"),
        },
        "devices": {
            "cpu": f"{_cpu_model()}, {os.cpu_count()} cores, {cpu_capability()}",
            "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "ops": ops,
    }


def format_info(report: dict) -> str:
    lines = ["lifeiqa_fast " + report["versions"]["lifeiqa_fast"]]
    lines += [f"  {k}: {v}" for k, v in report["versions"].items() if k != "lifeiqa_fast"]
    ext = report["extension"]
    state = "loaded, backends " + ", ".join(ext["backends"]) if ext["loaded"] else f"NOT loaded ({ext['error']})"
    lines.append(f"compiled extension _C: {state}")
    if ext["cuda_arch_list"]:
        lines.append(f"  CUDA architectures: {ext['cuda_arch_list']}")
    cuda = report["devices"]["cuda"]
    lines.append(f"devices: cpu ({report['devices']['cpu']})" + "".join(f", cuda:{i} ({n})" for i, n in enumerate(cuda)))
    lines.append("ops:")
    for op, entry in report["ops"].items():
        k = entry["kernels"]
        lines.append(f"  {op}: kernels cpu={'yes' if k['cpu'] else 'no'} cuda={'yes' if k['cuda'] else 'no'} "
                     f"triton={'yes' if k['triton'] else 'no'}")
        if op in CPU_ONLY:
            lines.append("    GPU kernels: none (GPUs run its composite path)")
        for backend, record in entry["gpu_validation"].items() if op not in CPU_ONLY else ():
            checked = entry["preflight"][backend]
            built = f"compiled for {', '.join(checked['compiled_for'])}" if checked["compiled_for"] else "not compiled"
            if checked["preflight"]:
                built = f"preflight {checked['preflight']}; {built}"
            elif backend == "triton":
                built = "no preflight at this source (python -m lifeiqa_fast.preflight --record)"
            status = f"validated on {record['gpu']} ({record['date']})" if record else "never validated on a GPU"
            lines.append(f"    {backend} kernel: {built}; {status}")
        for device, choice in entry["auto"].items():
            lines.append(f"    auto on {device}: {choice['impl']} ({choice['reason']})")
        for dtype, rows in entry["cpu_reference_from_rows"].items():
            lines.append(f"    auto on cpu, {dtype}: the reference from {rows} rows (measured faster on this kind of "
                         f"CPU: lifeiqa_fast.ops._impl.CPU_REFERENCE_FROM)")
        if entry["kernel_limits"]:
            lines.append(f"    kernel limits: {entry['kernel_limits']} (beyond them auto runs composite)")
    return "\n".join(lines)
