"""Where and in what precision the model runs: device choice, dtype choice, autocast and matmul settings."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt2scratch.config import GPTConfig
from gpt2scratch.errors import DeviceError, UsageError

log = logging.getLogger(__name__)

# float64 is for inference only (the CLI offers it to generate and serve): exact comparisons in tests, where a
# kernel's summation order can never flip a sampled token.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MEMINFO = Path("/proc/meminfo")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is a DeviceError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but no CUDA GPU is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {name!r} asked for, but MPS is not available here; use --device cpu or auto")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype: ``auto`` is bf16 where the hardware does bf16, fp16 on older CUDA GPUs, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32  # MPS and CPUs without bf16 units: fp32 is the fast and safe choice
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise DeviceError("float16 is not supported on the CPU; use --dtype bfloat16 or float32")
    return dtype


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: a CUDA GPU's free memory, MemAvailable of /proc/meminfo for the
    CPU; None where we cannot tell (no /proc/meminfo, other devices)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file counts in kB
    return None


def check_model_fits(
    config: GPTConfig, device: torch.device, bytes_per_param: int, purpose: str, hint: str, shards: int = 1
) -> None:
    """UsageError, before anything is allocated, if ``bytes_per_param`` bytes for each of the model's parameters,
    split into ``shards`` (FSDP's ranks), exceed the memory free on ``device``: the one check of a model's size, for
    training and for loading weights."""
    params = config.num_params()
    needed, available = bytes_per_param * params // shards, available_memory(device)
    if available is not None and needed > available:
        count = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
        raise UsageError(
            f"a model of {count} parameters needs at least {needed / 1e9:.2f} GB {purpose}, more than the "
            f"{available / 1e9:.2f} GB free; {hint}"
        )


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes: weights stay fp32, matmuls run in ``dtype``."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Flash attention first, then memory-efficient, cuDNN and math. PyTorch may otherwise pick cuDNN's kernels, which
# build a graph for each new shape: 46 ms a call on an H100 when decoding in bf16 with a key length that grows by one
# every step, against 0.09 ms for flash or memory-efficient attention.
ATTENTION_ORDER = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
]


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA, the attention kernels tried in ATTENTION_ORDER; elsewhere PyTorch's own choice."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(ATTENTION_ORDER, set_priority=True)


def configure_matmul(device: torch.device) -> None:
    """Turn on the fastest fp32 matmul path that is still fp32-exact on this machine.

    On CUDA this leaves 'highest' (fp32-exact, what inference wants); training turns on TF32 there itself
    (training/fast.py's ``configure_cuda``). On CPUs, PyTorch's default
    fp32 matmul may run a slow vector path (MKL's AVX2 path on AMD CPUs); precision 'medium' sends it to oneDNN,
    which on CPUs without AMX still computes in fp32. We measure that here and keep 'medium' only if the error
    against float64 stays at fp32 level.
    """
    if device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 768, generator=generator)
    b = torch.randn(768, 256, generator=generator)
    exact = a.double() @ b.double()
    torch.set_float32_matmul_precision("medium")
    error = ((a @ b).double() - exact).abs().max().item() / exact.abs().max().item()
    if error > 1e-5:  # bf16 inside (e.g. an AMX CPU): not fp32 any more
        torch.set_float32_matmul_precision("highest")
    log.debug("fp32 matmul precision %s (relative error %.1e)", torch.get_float32_matmul_precision(), error)


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS between training steps.

    By default every tensor above 32 MB is a fresh mmap, and each step re-faults its pages from the kernel (zeroing
    4 KB at a time), which at 124M parameters on a CPU is a large share of a step. With mmap off and trimming
    deferred, freed memory stays in the heap and is reused. Peak memory is unchanged; only glibc on Linux is affected.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**30)


HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # from <linux/mman.h>, Linux 6.1 and later


@contextlib.contextmanager
def on_huge_pages(device: torch.device) -> Iterator[None]:
    """On a CPU, back the memory mapped inside the block (new weights, typically) with 2 MB pages, where Linux can.

    A decoding step streams every weight once; through 4 KB pages that is a TLB miss every 4 KB, 60,000 per bf16 124M
    step. PyTorch asks for huge pages only with THP_MEM_ALLOC_ENABLE=1 set before it starts, and most kernels give
    them only on request (THP "madvise"), so the regions mapped here are collapsed afterwards (MADV_COLLAPSE): the
    124M model's bf16 matrix-vector products then take 7% less time (2.5-10% per decoding step, measured on an AMX
    Xeon VM), for ~0.5 s of CPU once, when the 0.5 GB of bf16 and packed weights are copied onto huge pages.
    Elsewhere (older kernels, other systems, THP off) this does nothing.
    """
    before = _mapped_regions() if device.type == "cpu" else set()
    yield
    new = _mapped_regions() - before if device.type == "cpu" else set()
    if not new:
        return
    import ctypes

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start, end in new:
        first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if last > first and madvise(first, last - first, MADV_COLLAPSE) != 0:
            log.debug("no huge pages for %x-%x (errno %d)", first, last, ctypes.get_errno())


def _mapped_regions() -> set[tuple[int, int]]:
    """The writable anonymous mappings of this process of at least one huge page: (start, end) addresses."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    regions = set()
    for line in lines:
        fields = line.split()
        if fields[1].startswith("rw") and len(fields) == 5:  # not the heap, which may be large and mostly not ours
            start, end = (int(address, 16) for address in fields[0].split("-"))
            if end - start >= HUGE_PAGE:
                regions.add((start, end))
    return regions
