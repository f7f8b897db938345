"""Device and dtype choice, the fp32 matmul path, and the allocator setting."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2scratch import device as devices
from gpt2scratch.errors import DeviceError


def test_auto_device_is_cpu_without_accelerators() -> None:
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("an accelerator is present")
    assert devices.pick_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:3", "mps", "tpu", "nope"])
def test_absent_or_unknown_device_is_a_device_error(name: str) -> None:
    if name.startswith("cuda") and torch.cuda.device_count() > 3:
        pytest.skip("this machine has the GPU")
    if name == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(DeviceError) as err:
        devices.pick_device(name)
    assert "\n" not in str(err.value) and name in str(err.value)


def test_auto_dtype_on_cpu_follows_the_hardware() -> None:
    expected = torch.bfloat16 if devices.cpu_has_bf16() else torch.float32
    assert devices.pick_dtype("auto", torch.device("cpu")) == expected
    assert devices.pick_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(DeviceError, match="float16"):
        devices.pick_dtype("float16", torch.device("cpu"))


def test_fp32_matmuls_stay_fp32_exact_after_configure() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        devices.configure_matmul(torch.device("cpu"))
        g = torch.Generator().manual_seed(1)
        a, b = torch.randn(128, 768, generator=g), torch.randn(768, 3072, generator=g)
        exact = a.double() @ b.double()
        error = ((a @ b).double() - exact).abs().max() / exact.abs().max()
        assert error < 1e-5  # bf16 inside would give ~1e-3
    finally:
        torch.set_float32_matmul_precision(before)


def test_autocast_is_off_for_fp32() -> None:
    with devices.autocast(torch.device("cpu"), torch.float32):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with devices.autocast(torch.device("cpu"), torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


HEAP_PROBE = """
import sys, torch
from gpt2scratch.device import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
x = torch.full((1 << 24,), 2.0)  # 64 MB: glibc would normally mmap it, and unmap it when freed
heap = [line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
start, end = (int(v, 16) for v in heap[0].split()[0].split("-"))
print(start <= x.data_ptr() < end, float(x.sum()))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator")
@pytest.mark.parametrize(("mode", "in_heap"), [("keep", "True"), ("default", "False")])
def test_keep_freed_memory_serves_large_tensors_from_the_heap(mode: str, in_heap: str) -> None:
    """Large tensors come from the heap, where freed memory is reused, instead of fresh mmaps (the control: not by
    default). The result is unchanged."""
    result = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [in_heap, str(2.0 * (1 << 24))]


HUGE_PAGES_PROBE = """
import torch
from gpt2scratch import device
with device.on_huge_pages(torch.device("cpu")):
    weights = torch.ones(16 * 2**20 // 4)  # 16 MB: a mapping of its own
inside = False
for line in open("/proc/self/smaps"):
    if not line[0].isupper():  # a mapping's first line: its address range
        start, end = (int(a, 16) for a in line.split()[0].split("-"))
        inside = start <= weights.data_ptr() < end
    elif inside and line.startswith("AnonHugePages:"):
        print(line.split()[1])
"""


def test_memory_mapped_inside_on_huge_pages_gets_huge_pages() -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    release = tuple(int(n) for n in platform.release().split(".")[:2] if n.isdigit())
    if platform.system() != "Linux" or release < (6, 1) or not thp.exists() or "[madvise]" not in thp.read_text():
        pytest.skip("needs Linux 6.1+ (MADV_COLLAPSE) with transparent huge pages on request only")
    # A fresh process: one whose allocator was told to keep freed memory (keep_freed_memory) maps nothing new.
    done = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], capture_output=True, text=True, check=True)
    assert int(done.stdout) >= 8 * 1024  # kB on 2 MB pages, which the "madvise" setting gives only when asked
