"""What the memory can stream, measured now: the bound on decode at small batch, where each step
reads every weight once. Shared by the peer comparison, the engine benchmark and the device check."""

from __future__ import annotations

import time
from pathlib import Path


def read_bandwidth_gbs(device: str = "cpu", nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """GB/s of a streaming read: `sum` over an `nbytes` float32 tensor, best of `repeats`."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def weight_bytes(model_dir: Path, element_size: int) -> int:
    """Bytes one decode step reads from an HF directory's weights at this element size: every stored
    tensor once (a tied LM head is stored once, as the embedding)."""
    from safetensors import safe_open

    numel = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                numel += n
    return numel * element_size
