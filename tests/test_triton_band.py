"""Our Triton band-attention kernels (``ttt/triton_band.py``) against float64 math on the CPU, through Triton's
interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set before triton compiles anything, and the GPU
tests of the same session need it unset). Skipped where triton is not installed (CPU wheels of torch ship
without it); the same kernels run compiled, in bf16, in ``tests/test_ttt_gpu.py``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _interpreter_ok() -> str | None:
    """Why the interpreter cannot run here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it comes with CUDA builds of torch)"
    import numpy as np

    if (
        int(np.__version__.split(".")[0]) >= 2
    ):  # its scalars are 1-element arrays, which numpy 2 will not index
        return "Triton's CPU interpreter needs numpy < 2"
    return None


def _run(script: str, interpret: bool = True) -> str:
    """Run script in a fresh interpreter (under Triton's CPU interpreter unless ``interpret=False``)."""
    reason = _interpreter_ok() if interpret else None
    if importlib.util.find_spec("triton") is None:
        reason = "triton is not installed (it comes with CUDA builds of torch)"
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_triton_backend_on_cpu_says_what_it_needs() -> None:
    """Asked for by name on CPU (no interpreter): a clear error, whether or not triton is installed."""
    import torch

    from ttt.attention import attention

    q = torch.zeros(1, 2, 8, 32)
    with pytest.raises(AssertionError, match="triton"):
        attention(q, q, q, window=4, backend="triton")


def test_split_head_dim_covers_the_presets_and_refuses_odd_tails() -> None:
    from ttt.triton_band import split_head_dim

    assert split_head_dim(80) == (64, 16) and split_head_dim(64) == (64, 0) and split_head_dim(96) == (64, 32)
    assert split_head_dim(128) == (128, 0) and split_head_dim(48) == (32, 16)
    assert split_head_dim(72) is None and split_head_dim(112) is None and split_head_dim(8) is None


def test_band_kernels_equal_float64_in_the_interpreter() -> None:
    """Forward (out, log-sum-exp) and backward (dq over every key, dk/dv from ``kv_grad_from``) == float64 math:
    chunk shapes (queries the last Tq of Tk keys), square prefixes, GQA, head dims with and without a tail, a
    window wider than every distance, blocks where the unmasked middle loop runs, and a key range."""
    out = _run(
        """
        import math, torch
        from ttt import triton_band as tb
        from ttt.attention import band_mask

        def ref(q, k, v, w, lo=0, hi=None):
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            m = band_mask(q.shape[2], k.shape[2], w)
            m[:, :lo] = False
            m[:, hi or k.shape[2]:] = False
            s = s.masked_fill(~m, float("-inf"))
            return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)

        torch.manual_seed(0)
        worst = 0.0
        for B, H, Hkv, tq, tk, D, w in [(1, 2, 2, 40, 100, 80, 30), (2, 4, 2, 64, 64, 32, 17),
                                        (1, 2, 1, 70, 200, 48, 64), (1, 1, 1, 130, 130, 64, None),
                                        (1, 1, 1, 256, 1024, 80, 512), (1, 2, 2, 33, 300, 80, 200)]:
            q = torch.randn(B, tq, H, D).transpose(1, 2)  # strided, as the model's projections give it
            k, v = torch.randn(B, Hkv, tk, D), torch.randn(B, Hkv, tk, D)
            out, lse = tb.band_forward(q, k, v, w)
            qd, kd, vd = (t.double().requires_grad_(True) for t in (q, k, v))
            ro, rl = ref(qd, kd, vd, w)
            go = torch.randn_like(ro)
            ro.backward(go)
            start = tk - tq // 2
            dq, dk, dv = tb.band_backward(q, k, v, out, lse, go.float(), w, kv_grad_from=start)
            assert dk.shape[2] == tk - start
            for a, b in ((out, ro), (lse, rl), (dq, qd.grad), (dk, kd.grad[:, :, start:]), (dv, vd.grad[:, :, start:])):
                worst = max(worst, (a.double() - b).abs().max().item() / b.abs().max().item())
        q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 160, 32), torch.randn(1, 2, 160, 32)
        out, lse = tb.band_forward(q, k, v, 64, k_range=(50, 120))
        ro, rl = ref(q.double(), k.double(), v.double(), 64, 50, 120)
        worst = max(worst, (out.double() - ro).abs().max().item(), (lse.double() - rl).abs().max().item())
        print("worst", worst)
        """
    )
    worst = float(out.split()[-1])
    assert worst < 1e-5, out


def test_window_step_with_triton_equals_math_in_the_interpreter() -> None:
    """A TTT chunk step's attention as the model calls it (``attention_in_window``, new keys written into the
    window): the triton path's out and gradients (q, the new keys and values) == explicit attention over the
    concatenated keys; the window buffers receive the new keys; auto does not pick the interpreter."""
    out = _run(
        """
        import torch
        from ttt.attention import BACKEND_CALLS, attention, attention_in_window, auto_backend

        torch.manual_seed(1)
        B, H, Hkv, D, b, w = 2, 4, 2, 80, 48, 100
        q = torch.randn(B, H, b, D, requires_grad=True)
        k, v = (torch.randn(B, Hkv, b, D, requires_grad=True) for _ in range(2))
        # token-major window buffers, as the graphed prefill's ring holds them (ttt/graphs.py RingKV)
        kw, vw = (torch.randn(B, w - 1 + b, Hkv, D).transpose(1, 2) for _ in range(2))
        cache_k, cache_v = kw[:, :, : w - 1].clone(), vw[:, :, : w - 1].clone()
        assert auto_backend(q.detach(), w - 1 + b, w) != "triton"  # auto never sends CPU work to the interpreter
        o = attention_in_window(q, k, v, kw, vw, window=w, backend="triton")
        assert BACKEND_CALLS["triton"] == 1
        assert torch.equal(kw[:, :, w - 1:], k.detach()) and torch.equal(vw[:, :, w - 1:], v.detach())
        go = torch.randn_like(o)
        got = (o, *torch.autograd.grad(o, (q, k, v), go))
        qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        r = attention(qd, torch.cat((cache_k.double(), kd), 2), torch.cat((cache_v.double(), vd), 2), window=w,
                      backend="math")
        want = (r, *torch.autograd.grad(r, (qd, kd, vd), go.double()))
        print("worst", max((a.double() - b).abs().max().item() / b.abs().max().item() for a, b in zip(got, want)))
        """
    )
    assert float(out.split()[-1]) < 1e-5, out


def test_second_order_kernels_equal_float64_in_the_interpreter() -> None:
    """``backend="triton2"`` (``ttt/triton_band2.py``): out, the first gradients taken with create_graph, and the
    gradients of <(dq, dk, dv), random cotangents> with respect to q, k, v and the output cotangent (the
    Hessian-vector products meta_loss takes) == float64 autograd of explicit attention. Chunk shapes, a square
    causal one, GQA, head dims split in two (80 = 64 + 16, 48 = 32 + 16) and not (64, 32), a window wider than
    every distance."""
    out = _run(
        """
        import torch
        from ttt.attention import attention

        torch.manual_seed(0)
        worst = 0.0
        for B, H, Hkv, tq, tk, D, w in [(1, 2, 2, 40, 100, 80, 30), (2, 4, 2, 64, 64, 32, 17),
                                        (1, 2, 1, 70, 200, 48, 64), (1, 1, 1, 130, 130, 64, None),
                                        (1, 2, 2, 33, 150, 80, 200)]:
            q = torch.randn(B, tq, H, D).transpose(1, 2)  # strided, as the model's projections give it
            k, v = torch.randn(B, Hkv, tk, D), torch.randn(B, Hkv, tk, D)
            go = torch.randn(B, H, tq, D)
            cot = (torch.randn(B, H, tq, D), torch.randn(B, Hkv, tk, D), torch.randn(B, Hkv, tk, D))
            res = []
            for be, dt in (("triton2", torch.float32), ("math", torch.float64)):
                qq, kk, vv = (t.detach().to(dt).requires_grad_(True) for t in (q, k, v))
                g = go.to(dt).requires_grad_(True)
                o = attention(qq, kk, vv, window=w, backend=be)
                first = torch.autograd.grad(o, (qq, kk, vv), g, create_graph=True)
                inner = sum((a * c.to(dt)).sum() for a, c in zip(first, cot))
                res.append((o, *first, *torch.autograd.grad(inner, (qq, kk, vv, g))))
            for a, b in zip(*res):
                worst = max(worst, (a.double() - b).abs().max().item() / b.abs().max().item())
        print("worst", worst)
        """
    )
    assert float(out.split()[-1]) < 1e-5, out


def test_meta_loss_gradients_with_triton2_equal_math_in_the_interpreter() -> None:
    """meta_loss's parameter gradients with the TTT blocks' attention on ``triton2`` == on ``math`` (fp32). Two
    TTT blocks, so the inner gradient of the first one's MLP runs through the second one's attention and the outer
    gradient through that attention's backward (with one TTT block no second derivative of attention arises);
    GQA and not; 97 tokens over a 64-token window (the cache is cut); with per-chunk checkpointing too."""
    out = _run(
        """
        import torch
        from ttt import inner
        from ttt.config import ModelConfig
        from ttt.model import TTTModel

        torch.manual_seed(0)
        worst = 0.0
        for kvh in (None, 2):
            m = TTTModel(ModelConfig.from_name("debug", n_kv_heads=kvh, n_ttt_layers=2))
            tok = torch.randint(0, m.cfg.vocab_size, (2, 97))
            got = {}
            for be, ck in (("math", False), ("triton2", False), ("triton2", True)):
                inner.META_BACKEND = be
                m.zero_grad()
                loss = m.meta_loss(tok, checkpoint=ck)
                loss.backward()
                got[be, ck] = [loss.detach()] + [p.grad.clone() for p in m.parameters()]
            for key in (("triton2", False), ("triton2", True)):
                for a, b in zip(got[key], got["math", False]):
                    worst = max(worst, (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12))
        print("worst", worst)
        """
    )
    assert float(out.split()[-1]) < 1e-4, out


def test_meta_loss_keeps_explicit_attention_on_cpu() -> None:
    """On CPU (and in fp32 without autocast) meta_loss's TTT blocks run explicit attention; triton2 by name on CPU
    says what it needs."""
    import torch

    from ttt import inner
    from ttt.attention import attention

    h = torch.zeros(1, 4, 8)
    assert inner.meta_backend(h, 64) == "math"
    q = torch.zeros(1, 2, 8, 32)
    with pytest.raises(AssertionError, match="triton"):
        attention(q, q, q, window=4, backend="triton2")


def test_kernels_compile_for_the_h100_and_spill_little() -> None:
    """Every kernel (band attention first and second order, norm + RoPE, split-KV decode), at the configs the code
    launches, compiles ahead of time for sm_90
    (Triton's own ptxas, no GPU needed), and its per-thread stack (register spills) stays small: a config that
    spills kilobytes (the second-order kernels at (64, 64, 4 warps) spill 1.9-2.7 KB at head dim 128) fails."""
    out = _run(
        """
        import os, re, subprocess, tempfile
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from ttt import triton_band as tb, triton_band2 as t2

        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")

        def stack(fn, ptrs, consts, warps, stages):
            sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n.endswith("scale") else "i32")
                   for n in fn.arg_names}
            idx = {(fn.arg_names.index(n),): v for n, v in consts.items()}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=idx), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": stages})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
            return int(re.search(r"STACK:(\\d+)", usage.stdout).group(1))

        bf, f32 = "*bf16", "*fp32"
        worst = 0
        for d0, d1 in ((64, 16), (64, 0)):
            split = dict(D0=d0, D1=d1)
            for m, n, w, s in {tb.FWD_CONFIG, tb.CHUNK_FWD_CONFIG}:
                worst = max(worst, stack(tb._band_fwd, {**dict.fromkeys("Q K V OUT".split(), bf), "L": f32,
                                                        "KLO": "*i32"},
                                         dict(KLO_PTR=True, **split, BLOCK_M=m, BLOCK_N=n), w, s))
            m, n, w, s = tb.DQ_CONFIG
            worst = max(worst, stack(tb._band_dq, {**dict.fromkeys("Q K V DO".split(), bf), "L": f32, "DELTA": f32,
                                                   "DQ": f32, "KLO": "*i32"},
                                     dict(KLO_PTR=True, **split, BLOCK_M=m, BLOCK_N=n), w, s))
            m, n, w, s = tb.DKDV_CONFIG
            worst = max(worst, stack(tb._band_dkdv, {**dict.fromkeys("Q K V DO".split(), bf),
                                                     **dict.fromkeys("L DELTA DK DV".split(), f32)},
                                     dict(**split, BLOCK_M=m, BLOCK_N=n), w, s))
        ptrs = {**dict.fromkeys("Q K V DO GQ GK GV".split(), bf),
                **dict.fromkeys("L DELTA C E PGV QB DOB KB VB".split(), f32)}
        for d in (64, 80, 96, 128):
            m, n, w, s = t2.hvp_config(d)
            d0, d1 = tb.split_head_dim(d)
            for fn in (t2._rows, t2._hvp_q, t2._hvp_kv):
                worst = max(worst, stack(fn, ptrs, dict(D0=d0, D1=d1, BLOCK_M=m, BLOCK_N=n), w, s))
        from ttt import triton_norm_rope as nr

        for inter in (True, False):
            worst = max(worst, stack(nr._norm_rope, {**dict.fromkeys("X OUT NORMED".split(), bf),
                                                     **dict.fromkeys("W COS SIN".split(), f32), "eps": "fp32"},
                                     dict(D=80, BLOCK_D=128, BLOCK_R=nr.BLOCK_ROWS, NORM=True, INTERLEAVED=inter,
                                          WRITE_NORMED=True), 4, 3))
        from ttt import triton_decode as td

        for rep in (1, 2, 4, 8):
            rep_p, block_n, warps = td.launch_config(rep)
            worst = max(worst, stack(td._split, {**dict.fromkeys("Q K V".split(), bf), "VALID": "*i1",
                                                 **dict.fromkeys("M L ACC".split(), f32)},
                                     dict(HAS_VALID=True, D=80, BLOCK_D=128, REP_P=rep_p, SPLIT=td.SPLIT,
                                          BLOCK_N=block_n), warps, 3))
        worst = max(worst, stack(td._merge, {**dict.fromkeys("M L ACC".split(), f32), "OUT": bf},
                                 dict(D=80, BLOCK_D=128, BLOCK_S=16), 4, 3))
        print("stack", worst)
        """,
        interpret=False,
    )
    assert int(out.split()[-1]) <= 320, out  # the first-order kernels run fast at 56-104; D=96 hvp: 288


def test_norm_rope_kernel_equals_float64_and_prefill_is_unchanged_in_the_interpreter() -> None:
    """``ttt/triton_norm_rope.py``: RMSNorm + RoPE in one kernel == float64 ``_rope(_rms_norm(x))`` (interleaved
    pairs and halves, with and without the norm, head dims 80/64/48/16, strided input whose strides the output
    keeps), and a streamed prefill with the prefix's norm + RoPE fused gives the NLL and caches of the usual path."""
    out = _run(
        """
        import torch
        from ttt import ModelConfig, TTTModel, model as tm
        from ttt.triton_norm_rope import norm_rope

        torch.manual_seed(0)
        worst = 0.0
        for B, H, T, D, inter, norm in [(2, 3, 37, 80, True, True), (1, 4, 50, 64, False, True),
                                        (1, 2, 33, 16, True, False), (2, 2, 20, 48, False, False)]:
            x = torch.randn(B, T, H, D).transpose(1, 2)  # (B, H, T, D) view of a (B, T, H, D) projection
            w = torch.rand(D) + 0.5
            cos, sin = tm.rope_table(5, T, D, 10000.0, x.device, torch.float32)
            got, normed = norm_rope(x, w if norm else None, 1e-6, cos, sin, inter, want_normed=True)
            assert got.stride() == x.stride()
            nd = tm._rms_norm(x.double(), w.double(), 1e-6) if norm else x.double()
            ref = tm._rope(nd, *tm.rope_table(5, T, D, 10000.0, x.device, torch.float64), inter)
            worst = max(worst, (got.double() - ref).abs().max().item(), (normed.double() - nd).abs().max().item())
        for inter, qk in ((True, True), (False, False)):
            m = TTTModel(ModelConfig.from_name("debug", n_ttt_layers=2, rope_interleaved=inter, qk_norm=qk))
            tok = torch.randint(0, m.cfg.vocab_size, (2, 150))
            res = []
            for flag in (False, True):
                tm.FUSED_NORM_ROPE = flag
                with torch.no_grad():
                    a = m.prefill(tok[:, :70])
                    b = m.prefill(tok[:, 70:], a.state)
                res.append([a.token_nll, b.token_nll, *(t for kv in b.state.kv for t in kv)])
            worst = max(worst, max((x - y).abs().max().item() for x, y in zip(*res)))
        print("worst", worst)
        """
    )
    assert float(out.split()[-1]) < 1e-5, out


def test_split_kv_decode_equals_float64_and_decoding_is_unchanged_in_the_interpreter() -> None:
    """``ttt/triton_decode.py``: one query per row over a cache split into several programs == float64 SDPA
    (GQA with 1, 2, 3 and 4 query heads per kv head, head dims 80/64/48/16, a masked static buffer, views of a
    longer buffer, caches shorter than one split); and a TTT-E2E and a full-attention ``DecodeSession`` give the
    same logits with it as with SDPA."""
    out = _run(
        """
        import torch
        import torch.nn.functional as F
        from ttt import ModelConfig, TTTModel, decode, triton_decode as td

        torch.manual_seed(0)
        td.SPLIT = 128  # several splits on small caches
        worst = 0.0
        for B, H, Hkv, n, D, masked in [(1, 4, 4, 1000, 80, False), (2, 8, 2, 300, 64, True), (1, 2, 1, 77, 48, True),
                                        (1, 3, 3, 5, 16, False), (1, 6, 2, 260, 64, True)]:
            q = torch.randn(B, 1, H, D).transpose(1, 2)
            k, v = (torch.randn(B, Hkv, n + 7, D)[:, :, :n] for _ in range(2))
            valid = None
            if masked:
                valid = torch.rand(n) < 0.6
                valid[0] = True
            got = td.split_kv_attention(q, k, v, valid)
            mask = None if valid is None else valid.view(1, 1, 1, -1)
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                 enable_gqa=H != Hkv)
            worst = max(worst, (got.double() - ref).abs().max().item())
        td.usable = lambda q: True  # the interpreter stands in for CUDA
        for cfg in (ModelConfig.from_name("debug"), ModelConfig.fa_control("debug")):
            m = TTTModel(cfg).eval()
            st = m.prefill(torch.randint(0, cfg.vocab_size, (2, 90))).state
            feed = torch.randint(0, cfg.vocab_size, (20, 2))
            logits = []
            for kernel in ("sdpa", "auto"):
                decode.DECODE_KERNEL = kernel
                s = decode.DecodeSession(m, st, max_new_tokens=20, cuda_graph=False)
                logits.append(torch.stack([s.step(t) for t in feed]))
            worst = max(worst, (logits[0] - logits[1]).abs().max().item())
        print("worst", worst)
        """
    )
    assert float(out.split()[-1]) < 1e-5, out
