"""GPU smoke: meta_loss backward and prefill on CUDA under bf16 autocast (fast weights stay fp32).
Skipped without CUDA. Run on a GPU box: python -m pytest -q -m gpu tests/test_ttt_gpu.py -s"""

from __future__ import annotations

import os
import time

import pytest
import torch

from ttt import ModelConfig, TTTModel


@pytest.mark.gpu
def test_meta_loss_backward_and_prefill_on_cuda() -> None:
    name = os.environ.get("TTT_GPU_PRESET", "debug")
    T = int(os.environ.get("TTT_GPU_T", "1024"))
    cfg = ModelConfig.from_name(name)
    torch.manual_seed(0)
    m = TTTModel(cfg).cuda()
    x = torch.randint(0, cfg.vocab_size, (1, T + 1), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = m.meta_loss(x, checkpoint=True)
        loss.backward()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = m.prefill(x[:, :-1])
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    assert torch.isfinite(loss) and all(
        torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None
    )
    assert all(v.dtype == torch.float32 for v in out.state.fast.values())
    assert torch.isfinite(out.token_nll).all()
    print(
        f"{name} T={T}: meta_loss fwd+bwd {(t1 - t0) / T * 1e3:.4f} s/1K tok, prefill {(t2 - t1) / T * 1e3:.4f} s/1K tok"
    )
