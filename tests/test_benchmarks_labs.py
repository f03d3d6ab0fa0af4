"""The labs benchmark's memory accounting (benchmarks/labs.py): which pages count as CUDA-only."""

from __future__ import annotations

import psutil
import pytest

from benchmarks.labs import _CUDA_LIBRARY, _tree_memory


@pytest.mark.parametrize(
    "path",
    [
        "/venv/lib/python3.11/site-packages/nvidia/cublas/lib/libcublas.so.12",
        "/venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so",
        "/venv/lib/python3.11/site-packages/torch/lib/libc10_cuda.so",
        "/venv/lib/python3.11/site-packages/triton/_C/libtriton.so",
        "/usr/local/cuda/lib64/libcudart.so.12.4.127",
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/opt/libs/libcudnn_ops.so.9",
    ],
)
def test_cuda_only_libraries_are_recognised(path: str) -> None:
    assert _CUDA_LIBRARY.search(path)


@pytest.mark.parametrize(
    "path",
    [
        "/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so",
        "/venv/lib/python3.11/site-packages/torch/lib/libtorch.so",
        "/venv/lib/python3.11/site-packages/torch/lib/libc10.so",
        "/usr/lib/x86_64-linux-gnu/libcurl.so.4",  # "libcu..." but not CUDA
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "[heap]",
    ],
)
def test_cpu_libraries_are_not_counted_as_cuda(path: str) -> None:
    assert not _CUDA_LIBRARY.search(path)


def test_tree_memory_of_this_process_is_consistent() -> None:
    import torch  # a CUDA build maps its CUDA libraries at import, a CPU build has none

    pss, rss_max, cuda = _tree_memory(psutil.Process())
    assert pss > 0 and rss_max > 0
    assert 0 <= cuda <= pss
    assert (cuda > 0) == (torch.version.cuda is not None)
