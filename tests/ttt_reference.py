"""Independent float64 reference of the TTT-E2E model, written from ``ttt-e2e.md`` (not from ttt/).

Deliberately naive: attention loops over queries and slices the visible keys; RoPE uses complex numbers;
test-time training recomputes the whole sequence for every chunk with per-chunk weights. Used only by tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    if w is None:
        return x
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope_complex(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, T, H, D), absolute positions 0..T-1, interleaved pairs as complex numbers."""
    B, T, H, D = x.shape
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # (T, D/2)
    rot = torch.polar(torch.ones_like(ang), ang)[None, :, None, :]  # (1, T, 1, D/2)
    xc = torch.view_as_complex(x.reshape(B, T, H, D // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).reshape(B, T, H, D)


def _attend_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, T, Hkv, D): query t sees keys max(0, t-window+1)..t."""
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    outs = []
    for t in range(T):
        lo = 0 if window is None else max(0, t - window + 1)
        s = torch.einsum("bhd,bjhd->bhj", q[:, t], k[:, lo : t + 1]) / math.sqrt(D)
        outs.append(torch.einsum("bhj,bjhd->bhd", s.softmax(-1), v[:, lo : t + 1]))
    return torch.stack(outs, 1)  # (B, T, H, D)


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def ref_logits(sd: dict, cfg, tokens: torch.Tensor, prime_of_pos=None) -> torch.Tensor:
    """Logits (B, T, V). prime_of_pos(layer, t) -> (w1, w2, w3) for the row-shared prime MLP at position t
    (None: W0 from sd). Per-position weights let the reference express 'chunk i uses W_{i-1}'."""
    g = lambda name: sd.get(name)  # noqa: E731
    eps, H, Hkv, D = cfg.norm_eps, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = sd["tok_emb.weight"][tokens]
    B, T, _ = h.shape
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        x = _rms(h, g(p + "attn_norm.weight"), eps)
        q = (x @ sd[p + "attn.wq.weight"].T).view(B, T, H, D)
        k = (x @ sd[p + "attn.wk.weight"].T).view(B, T, Hkv, D)
        v = (x @ sd[p + "attn.wv.weight"].T).view(B, T, Hkv, D)
        q, k = _rms(q, g(p + "attn.q_norm.weight"), eps), _rms(k, g(p + "attn.k_norm.weight"), eps)
        q, k = _rope_complex(q, cfg.rope_theta), _rope_complex(k, cfg.rope_theta)
        a = _attend_loop(q, k, v, cfg.window).reshape(B, T, H * D) @ sd[p + "attn.wo.weight"].T
        h = h + _rms(a, g(p + "attn_post.weight"), eps)
        if i >= cfg.n_layers - cfg.n_ttt_layers:
            x = _rms(h, g(p + "prime_norm.weight"), eps)
            outs = []
            for t in range(T):
                w = (
                    prime_of_pos(i, t)
                    if prime_of_pos
                    else tuple(sd[p + f"prime.{n}.weight"] for n in ("w1", "w2", "w3"))
                )
                outs.append(_swiglu(x[:, t], *w))
            h = h + _rms(torch.stack(outs, 1), g(p + "prime_post.weight"), eps)
        x = _rms(h, g(p + "mlp_norm.weight"), eps)
        m = _swiglu(x, sd[p + "mlp.w1.weight"], sd[p + "mlp.w2.weight"], sd[p + "mlp.w3.weight"])
        h = h + _rms(m, g(p + "mlp_post.weight"), eps)
    h = _rms(h, sd["ln_f.weight"], eps)
    return h @ sd.get("lm_head.weight", sd["tok_emb.weight"]).T


def ref_ttt(sd: dict, cfg, tokens: torch.Tensor, create_graph: bool = False):
    """Reference TTT over ONE sequence (1, T): returns (token_nll (T,), chunk_losses, weights W_0..W_n).

    Chunk i (inputs i*b .. i*b+b-1) is scored with W_i (= W_{i-1} in the paper's 1-based naming); a chunk
    whose last target is known takes one SGD step, gradient clipped by global norm over all fast weights.
    """
    b, T = cfg.ttt_chunk, tokens.shape[1]
    layers = list(range(cfg.n_layers - cfg.n_ttt_layers, cfg.n_layers))
    W = [{(i, n): sd[f"blocks.{i}.prime.{n}.weight"] for i in layers for n in ("w1", "w2", "w3")}]
    n_chunks = math.ceil(T / b)
    nll = torch.zeros(T, dtype=torch.float64)
    losses = []
    for c in range(n_chunks):
        if not create_graph:
            W[c] = {key: w.detach().requires_grad_(True) for key, w in W[c].items()}
        prime = lambda i, t, c=c: tuple(W[min(t // b, c)][(i, n)] for n in ("w1", "w2", "w3"))  # noqa: E731
        logits = ref_logits(sd, cfg, tokens, prime)[0]  # (T, V)
        lo, hi = c * b, min(c * b + b, T - 1)  # inputs of chunk c that have a target
        if hi <= lo:
            break
        tok_nll = F.cross_entropy(logits[lo:hi], tokens[0, lo + 1 : hi + 1], reduction="none")
        nll[lo + 1 : hi + 1] = tok_nll.detach()
        tgt = tokens[0, lo + 1 : hi + 1]
        keep = torch.ones_like(tok_nll) if cfg.bos_id is None else (tgt != cfg.bos_id).to(tok_nll.dtype)
        loss = (tok_nll * keep).sum() / keep.sum().clamp(min=1.0)
        losses.append(loss)
        if hi - lo == b:  # complete chunk: one clipped SGD step
            keys = list(W[c])
            grads = torch.autograd.grad(loss, [W[c][key] for key in keys], create_graph=create_graph)
            norm = torch.sqrt(sum((gr * gr).sum() for gr in grads))
            scale = torch.clamp(cfg.ttt_clip / norm, max=1.0)
            W.append({key: W[c][key] - cfg.ttt_lr * scale * gr for key, gr in zip(keys, grads, strict=True)})
    return nll, losses, W


def prefill_distance(a, b) -> tuple[float, float]:
    """Largest fast-weight and token-NLL differences between two ``PrefillOutput``s (same sequence)."""
    fast = max((a.state.fast[k] - b.state.fast[k]).abs().max().item() for k in a.state.fast)
    return fast, (a.token_nll.float() - b.token_nll.float()).abs().max().item()
