"""CPU checks of the latency benchmark's bookkeeping: memory formulas and the summary's ratios."""

from __future__ import annotations

import json

import pytest
import torch

from eval.bench_latency import PAPER_PREFILL, _summary, bench_memory, merge_runs, plot_latency, prefill_series
from eval.flops import prefill_flops_per_token
from ttt import ModelConfig, TTTModel


def test_memory_formula_matches_a_real_state_and_cache() -> None:
    torch.manual_seed(0)
    e2e = TTTModel(ModelConfig.from_name("debug", vocab_size=64, window=16, ttt_chunk=8)).bfloat16()
    fa = TTTModel(ModelConfig.fa_control("debug", vocab_size=64)).bfloat16()
    x = torch.randint(0, 64, (1, 48))
    st = e2e.prefill(x).state
    fa_kv = sum(
        k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in fa.prefill(x).state.kv
    )
    m = bench_memory({"e2e": e2e, "fa": fa}, 48)
    assert m["fa_kv_bytes"] == fa_kv
    fast = sum(t.numel() * t.element_size() for t in st.fast.values())
    assert m["ttt_fast_bytes"] == fast
    # the SWA part: window - 1 cached tokens in every layer (pending chunk tokens excluded)
    prefix_kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in st.kv[:-1])
    assert m["ttt_swa_kv_bytes"] == pytest.approx(prefix_kv * e2e.cfg.n_layers / (e2e.cfg.n_layers - 1))


def test_summary_ratios() -> None:
    M = 1 << 20
    res = {
        "device": "x",
        "prefill_batch1": [
            {"T": 8192, "e2e": {"s_per_1k": 0.05}},
            {"T": 131072, "e2e": {"s_per_1k": 0.06, "mfu": 0.3}, "fa": {"s_per_1k": 0.09}},
            {"T": M, "e2e": {"s_per_1k": 0.066}, "fa": {"s_per_1k": 0.66}},
        ],
        "decode": [
            {"ctx": 8192, "e2e": {"ms_per_token_mean": 5.0}},
            {"ctx": M, "e2e": {"ms_per_token_mean": 5.5}},
            {"ctx": 131072, "e2e": {"ms_per_token_mean": 5.0}, "fa": {"error": "OOM"}},
        ],  # fmt: skip
        "memory": [{"T": 131072, "fa_over_ttt": 10.5}],
        "train": {"e2e_over_fa": 3.0},
    }
    s = _summary(res, "3b")
    assert s["prefill_speedup_vs_fa_128k_3b"] == pytest.approx(1.5)
    assert s["prefill_speedup_vs_fa_1m_3b"] == pytest.approx(10.0)
    assert s["prefill_flatness_128k_over_8k"] == pytest.approx(1.2)
    assert s["prefill_flatness_1m_over_128k"] == pytest.approx(1.1)
    assert s["decode_flatness_1m_over_8k"] == pytest.approx(1.1)
    assert s["decode_speedup_vs_fa_128k"] is None  # FA failed: no ratio is invented
    assert s["state_memory_ratio_128k"] == 10.5 and s["meta_train_slowdown_vs_fa_8k"] == 3.0


def test_fa_block_with_chunked_mlp_equals_the_block() -> None:
    """The 1M full-attention timing runs a block with its MLP in slices: same values as Block.forward (fp64),
    for slices that divide T and ones that do not."""
    from eval.bench_latency import fa_block_mlp_chunked

    torch.manual_seed(0)
    fa = TTTModel(ModelConfig.fa_control("debug", vocab_size=64)).double()
    x = torch.randn(2, 50, fa.cfg.d_model, dtype=torch.float64)
    for blk in fa.blocks:
        ref, _ = blk(x, None, "math")
        for chunk in (7, 25, 50, 64):
            torch.testing.assert_close(fa_block_mlp_chunked(blk, x, chunk), ref, rtol=1e-12, atol=1e-12)


def test_profile_summary_shares_and_categories() -> None:
    """Kernel names land in the right category; shares sum to 1; busy share = device time / wall time."""
    from eval.bench_latency import kernel_category, profile_summary

    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kernel_category("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "fused (compiled)"
    assert kernel_category("flex_attention_backward") == "attention"
    assert kernel_category(
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>"
    ) == ("elementwise (eager)")
    assert kernel_category("Memcpy DtoD (Device -> Device)") == "copy / cast"
    assert kernel_category("void at::native::cunn_SoftMaxForward<4>") == "softmax / loss"
    ev = [
        ("sm90_xmma_gemm_a", 6.0, 10),
        ("triton_poi_fused_1", 2.0, 40),
        ("vectorized_elementwise_kernel", 2.0, 90),
    ]
    s = profile_summary(ev, wall_ms=20.0, top=2)
    assert s["device_busy_ms"] == 10.0 and s["device_busy_share"] == 0.5 and s["kernel_launches"] == 140
    assert abs(sum(c["share"] for c in s["by_category"].values()) - 1.0) < 1e-12
    assert s["by_category"]["matmul"]["share"] == 0.6 and list(s["by_category"])[0] == "matmul"
    assert [k["name"] for k in s["top_kernels"]] == ["sm90_xmma_gemm_a", "triton_poi_fused_1"]


def test_merge_runs_pairs_each_length_from_the_last_file_that_timed_it(tmp_path) -> None:
    """Runs of one session merge per (length, system): a later file's timing wins, the others stay, the summary is
    recomputed, MFU re-derived from the median with ``eval.flops`` (a stale stored MFU is replaced); runs from
    another GPU are refused."""
    dev = {"gpu": "H100"}

    def run(name: str, prefill: list, **extra) -> str:  # noqa: ANN001, ANN003
        rec = {
            "device": dev,
            "config": {"preset": "3b", "vocab": 128256},
            "timestamp": name,
            "git_sha": "abc",
            "prefill_batch1": prefill,
        }
        (tmp_path / name).write_text(json.dumps({**rec, **extra}))
        return str(tmp_path / name)

    a = run("a.json", [{"T": 131072, "e2e": {"s_per_1k": 0.05}}, {"T": 8192, "e2e": {"s_per_1k": 0.04}}],
            profile=[{"T": 131072}])  # fmt: skip
    b = run("b.json", [{"T": 131072, "e2e": {"s_per_1k": 0.03, "median_ms": 0.03 * 131072, "mfu": 0.5},
                        "fa": {"s_per_1k": 0.06}}], matmul_peak_tflops=800.0)  # fmt: skip
    res = merge_runs([a, b])
    flops = prefill_flops_per_token(ModelConfig.from_name("3b", vocab_size=128256), 131072)
    assert res["summary"]["prefill_mfu"] == pytest.approx(flops * 1000 / 0.03 / 1e12 / 800.0, rel=1e-9)
    assert [r["T"] for r in res["prefill_batch1"]] == [8192, 131072]
    assert res["summary"]["prefill_speedup_vs_fa_128k_3b"] == pytest.approx(2.0)  # b's pair, not a's e2e
    assert res["summary"]["prefill_flatness_128k_over_8k"] == pytest.approx(0.75)
    assert res["profile"] == [{"T": 131072}] and [m["file"] for m in res["merged_from"]] == [
        "a.json",
        "b.json",
    ]
    other = tmp_path / "c.json"
    other.write_text(
        json.dumps({"device": {"gpu": "H200"}, "config": {"preset": "3b"}, "prefill_batch1": []})
    )
    with pytest.raises(AssertionError, match="different GPUs"):
        merge_runs([a, str(other)])


def test_latency_plot_draws_the_measured_series_and_the_papers(tmp_path) -> None:
    """The PNG's series are the JSON's batch-1 timings per system, sorted by length (failed sections left out),
    plus the paper's curves for the 3b shape only."""
    res = {"device": {"gpu": "H100"}, "prefill_batch1": [
        {"T": 131072, "e2e": {"s_per_1k": 0.03}, "fa": {"s_per_1k": 0.06}},
        {"T": 8192, "e2e": {"s_per_1k": 0.04}, "fa": {"error": "OOM"}},
    ]}  # fmt: skip
    assert prefill_series(res) == {
        "TTT-E2E (ours)": {8192: 0.04, 131072: 0.03},
        "FA, cuDNN (ours)": {131072: 0.06},
    }
    drawn = plot_latency(res, tmp_path / "p.png", "3b")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and set(PAPER_PREFILL) <= set(drawn)
    assert set(plot_latency(res, tmp_path / "q.png", "1b")) == set(prefill_series(res))
    with pytest.raises(AssertionError, match="no prefill timings"):
        plot_latency({"prefill_batch1": []}, tmp_path / "r.png", "3b")


def test_train_variants_switch_the_fast_path_off_and_restore_it() -> None:
    """``--train-math`` / ``--train-eager-ops`` time meta_loss with parts of the fast path off: inside the variant the
    switches say so (e2e-math: explicit attention, generic CE, eager second-order ops), and afterwards, even after an
    error, every switch is back; other kinds change nothing."""
    from eval.bench_latency import train_variant
    from ttt import inner
    from ttt import model as tm

    before = (inner.META_BACKEND, inner.META_XENT, tm.SECOND_ORDER_OPS)
    with train_variant("e2e-math"):
        assert (inner.META_BACKEND, inner.META_XENT, tm.SECOND_ORDER_OPS) == ("math", False, False)
    with pytest.raises(RuntimeError), train_variant("e2e-eager-ops"):
        assert (inner.META_BACKEND, inner.META_XENT, tm.SECOND_ORDER_OPS) == (before[0], before[1], False)
        raise RuntimeError("a failing step")
    with train_variant("e2e"):
        assert (inner.META_BACKEND, inner.META_XENT, tm.SECOND_ORDER_OPS) == before
    assert (inner.META_BACKEND, inner.META_XENT, tm.SECOND_ORDER_OPS) == before
