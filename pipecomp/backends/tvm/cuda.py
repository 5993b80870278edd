"""What can be known here about a CUDA build's GPU kernels: whether they compile for the board.

TVM 0.27 keeps a CUDA module's kernels as CUDA C source; its CUDA runtime compiles them with
NVRTC when the program is loaded, on the board. This machine has no GPU, but PyTorch's CUDA
wheels bring NVRTC (`nvidia-cuda-nvrtc`, driven through `cuda-bindings`) and the CUDA headers,
and the `tvm` extra adds CCCL's (`nvidia-cuda-cccl`): enough to compile the very source the
board will compile, with TVM's own NVRTC options, for the board's GPU architecture. A kernel
that would not compile on the board is reported here, at build time. Nothing here runs a kernel.
"""
from __future__ import annotations

import contextlib
import os


def compile_check(libraries: dict, target) -> str | None:
    """Compile the CUDA C of every module in `libraries` for `target`'s arch with NVRTC.

    Returns what was checked ("3 modules with NVRTC 13.0 for sm_87"), None if there is no CUDA
    C, or raises `CudaUnchecked` saying why it could not be checked here.
    """
    arch = target.attrs.get("arch")
    sources = [s for lib in libraries.values() for s in _cuda_sources(lib.mod)]
    if not sources:
        return None
    try:
        from tvm.support import nvcc
        with _pip_cuda_headers():
            version = _nvrtc_version()
            for source in sources:
                binary = nvcc.compile_cuda(source, target_format="cubin", arch=str(arch), compiler="nvrtc")
                if bytes(binary[:4]) != b"\x7fELF":
                    raise RuntimeError(f"NVRTC {version} gave no cubin")
    except Exception as e:  # no cuda-bindings, no headers, an arch this NVRTC does not know, a compile error
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise CudaUnchecked(f"NVRTC could not compile them for {arch} here ({type(e).__name__}: {reason})") from e
    return f"{len(sources)} module{'s' * (len(sources) != 1)} with NVRTC {version} for {arch}"


class CudaUnchecked(RuntimeError):
    """The CUDA kernels could not be compiled here; the message says why."""


def _nvrtc_version() -> str:
    from cuda.bindings import nvrtc
    err, major, minor = nvrtc.nvrtcVersion()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"nvrtcVersion failed: {err}")
    return f"{major}.{minor}"


def _cuda_sources(module) -> list:
    found = [module.inspect_source()] if module.kind == "cuda" else []
    for m in module.imports:
        found += _cuda_sources(m)
    return found


@contextlib.contextmanager
def _pip_cuda_headers():
    """TVM's NVRTC compile looks for headers under CUDA_PATH; point it at the pip packages'.

    A CUDA_PATH already set (a real toolkit) is left as it is.
    """
    if "CUDA_PATH" in os.environ:
        yield
        return
    from cuda.pathfinder import find_nvidia_header_directory
    cudart, cccl = find_nvidia_header_directory("cudart"), find_nvidia_header_directory("cccl")
    if cudart is None or cccl is None:
        raise RuntimeError("the CUDA headers are missing: pip install nvidia-cuda-runtime nvidia-cuda-cccl "
                           "(or set CUDA_PATH to a CUDA toolkit)")
    saved = {k: os.environ.get(k) for k in ("CUDA_PATH", "TVM_CUDA_NVRTC_EXTRA_OPTS")}
    os.environ["CUDA_PATH"] = os.path.dirname(cudart)
    os.environ["TVM_CUDA_NVRTC_EXTRA_OPTS"] = " ".join(filter(None, [saved["TVM_CUDA_NVRTC_EXTRA_OPTS"],
                                                                     f"-I{cccl}"]))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
