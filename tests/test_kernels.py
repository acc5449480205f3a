"""Triton kernels against their torch references.

On CPU these run under TRITON_INTERPRET=1 (conftest sets it), in fp32. With TRITON_INTERPRET=0 and
a GPU, the same tests run the compiled kernels on CUDA in bf16 and fp16, and the tests marked
`cuda` add Kontext-like shapes and every autotuner tile.

The fused q/k norm + RoPE is held to flash-attention's rule (tests/test_flash_attn.py there: "the
numerical error is at most twice the numerical error of a Pytorch implementation"): against an fp64
run of the reference, its error may be at most twice that of the reference run in the tested
dtype, plus a few units in the last place of the largest value (which only matters in fp32, where
both errors are rounding-sized).
"""
import math

import pytest
import torch

import common
import rewards
import sft
from kernels import qk_norm_rope as K
from kernels import reward_ops as R

INTERPRET = K.INTERPRET
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(DEVICE is None or K.triton is None,
                                  reason="needs TRITON_INTERPRET=1 or a CUDA device")
cuda = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (compiled kernels)")
DTYPES = [torch.float32] if INTERPRET else [torch.bfloat16, torch.float16]


def rope_tables(n_text, target_hw, ref_hws, axes=(8, 28, 28)):
    """FluxPosEmbed's cos, sin [L, D] for text at 0, then sft.position_ids' frame-wise image ids."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.cat([torch.zeros(n_text, 3), sft.position_ids(target_hw, ref_hws, "frame")])
    cos, sin = FluxPosEmbed(10000, list(axes))(ids)
    return cos.float(), sin.float()


def norm_rope_inputs(dtype, b, h, d, n_text, target_hw, ref_hws, device, weight_grad=False, seed=0):
    """Projections q_txt, k_txt [b, n_text, h, d], q_img, k_img [b, L_img, h, d], the four norm
    weights (text q, k; image q, k) and the rope tables, as a Kontext attention layer sees them."""
    g = torch.Generator().manual_seed(seed)
    axes = {64: (8, 28, 28), 128: (16, 56, 56)}[d]
    cos, sin = [t.to(device) for t in rope_tables(n_text, target_hw, ref_hws, axes)]
    L_img = cos.shape[0] - n_text
    # projections of a trained model are not unit-scale; 3x and a per-channel spread test the statistics
    xs = [(3 * torch.randn(b, n, h, d, generator=g) * torch.linspace(0.2, 2, d)).to(device, dtype).requires_grad_()
          for n in (n_text, n_text, L_img, L_img)]
    ws = [(0.5 + torch.rand(d, generator=g)).to(device, dtype).requires_grad_(weight_grad) for _ in range(4)]
    return xs, ws, cos, sin


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_within_torch_error(got, low, truth, name):
    """|got - truth| <= 2 |low - truth| + 4 ulp(max |truth|), maxima over the tensor."""
    floor = 4 * torch.finfo(low.dtype).eps * truth.abs().max().item()
    err, bound = max_err(got, truth), 2 * max_err(low, truth) + floor
    assert err <= bound, f"{name}: kernel error {err:.3g} > bound {bound:.3g} (torch's own {max_err(low, truth):.3g})"


GPU_TILE = (16, 2, 4)  # compiled tests take one tile unless they test the autotuner (each tile compiles)


def check_norm_rope(dtype, b, h, d, n_text, target_hw, ref_hws, device, tile=None, weight_grad=False,
                    autotune=False):
    """Forward and every gradient of the fused op against the fp64 reference, within the rule above."""
    tile = tile or (None if autotune or INTERPRET else GPU_TILE)
    xs, ws, cos, sin = norm_rope_inputs(dtype, b, h, d, n_text, target_hw, ref_hws, device, weight_grad)
    text = n_text > 0
    args = lambda t, w: ((t[0], t[1]) if text else (None, None)) + (t[2], t[3]) + (  # noqa: E731
        (w[0], w[1]) if text else None, (w[2], w[3]))
    old, K.TILE = K.TILE, tile
    try:
        got = K.qk_norm_rope(*args(xs, ws), cos, sin)
        low = K.qk_norm_rope_reference(*args(xs, ws), cos, sin)
        x64 = [x.detach().double().requires_grad_() for x in xs]
        w64 = [w.detach().double().requires_grad_(weight_grad) for w in ws]
        truth = K.qk_norm_rope_reference(*args(x64, w64), cos.double(), sin.double())
        for o, lo, t, name in zip(got, low, truth, "qk"):
            assert o.dtype == lo.dtype and o.shape == t.shape
            assert_within_torch_error(o, lo, t, name)
        g = torch.Generator().manual_seed(1)
        dout = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(device) for t in truth]
        wanted = [i for i in range(4) if text or i >= 2]
        inputs = lambda t, w: [t[i] for i in wanted] + ([w[i] for i in wanted] if weight_grad else [])  # noqa: E731
        loss = lambda outs: sum((o.double() * g_).sum() for o, g_ in zip(outs, dout))  # noqa: E731
        grads = torch.autograd.grad(loss(got), inputs(xs, ws))
    finally:
        K.TILE = old
    grads_low = torch.autograd.grad(loss(low), inputs(xs, ws))
    grads_truth = torch.autograd.grad(loss(truth), inputs(x64, w64))
    names = [f"d{n}" for n in ("q_txt", "k_txt", "q_img", "k_img", "wq_txt", "wk_txt", "wq_img", "wk_img")]
    names = [names[i] for i in wanted] + ([names[4 + i] for i in wanted] if weight_grad else [])
    for gr, lo, t, name in zip(grads, grads_low, grads_truth, names):
        assert gr.dtype == lo.dtype
        assert_within_torch_error(gr, lo, t, name)


@needs_triton
@pytest.mark.parametrize("n_refs", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_matches_reference(n_refs, dtype):
    # 7 text tokens + 3x3 target + odd-sized refs from sft.position_ids: neither stream is a multiple
    # of the interpreter's tile of 8 tokens, and 3 heads are not a multiple of its 2
    ref_hws = [(3, 3), (2, 3), (3, 1), (1, 2)][:n_refs]
    check_norm_rope(dtype, 2 if n_refs == 1 else 1, 3, 64, 7, (3, 3), ref_hws, DEVICE)


@needs_triton
@pytest.mark.parametrize("tile", [(4, 1, 1), (2, 4, 1)] if INTERPRET else [(16, 2, 4), (64, 1, 8)])
def test_qk_norm_rope_tiles_head_dim_128_and_weight_grads(tile):
    # head dim 128 (Kontext's), one head, other tiles, and the norm weights' gradients (atomics)
    check_norm_rope(DTYPES[0], 1, 1, 128, 5, (2, 3), [(3, 2), (2, 2)], DEVICE, tile, weight_grad=True)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_single_stream(dtype):
    # single-stream blocks: one joint sequence, no text stream and no text weights
    check_norm_rope(dtype, 2, 2, 64, 0, (3, 2), [(2, 3)], DEVICE, weight_grad=True)


def test_reference_is_diffusers():
    """The reference is diffusers' computation bit for bit: RMSNorm, cat, apply_rotary_emb."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    cos, sin = rope_tables(3, (2, 2), [(2, 2)])
    for dtype in (torch.float32, torch.bfloat16):
        xs, ws, _, _ = norm_rope_inputs(dtype, 2, 3, 64, 3, (2, 2), [(2, 2)], "cpu")
        norms = []
        for w in ws:
            n = RMSNorm(64, eps=1e-6).to(dtype)
            n.weight.data.copy_(w.detach())
            norms.append(n)
        q = torch.cat([norms[0](xs[0]), norms[2](xs[2])], 1)
        k = torch.cat([norms[1](xs[1]), norms[3](xs[3])], 1)
        want = [apply_rotary_emb(t, (cos, sin), sequence_dim=1) for t in (q, k)]
        got = K.qk_norm_rope_reference(*xs, ws[:2], ws[2:], cos, sin)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_qk_norm_rope_refuses_bad_tables():
    xs, ws, cos, sin = norm_rope_inputs(torch.float32, 1, 2, 64, 3, (2, 2), [(2, 2)], "cpu")
    with pytest.raises(ValueError, match="rows"):
        K.qk_norm_rope(*xs, ws[:2], ws[2:], cos[1:], sin[1:])
    with pytest.raises(ValueError, match="width"):
        K.qk_norm_rope(*xs, ws[:2], ws[2:], cos[:, :8], sin[:, :8])


@needs_triton
def test_transformer_with_triton_processor_equals_torch(tiny_dir):
    m = common.load_kontext("tiny", DEVICE, torch.float32 if INTERPRET else torch.bfloat16, tiny_dir)
    g = torch.Generator().manual_seed(0)
    x, refs = [torch.randn(1, n, 64, generator=g).to(DEVICE, m.dtype) for n in (16, 32)]
    t5, pooled = common.encode_text(m, ["the star and the ring"], 16)
    sig = torch.tensor([0.6], device=DEVICE)

    def run():
        xg = x.clone().requires_grad_()
        v = sft.velocity(m, xg, refs, sig, t5, pooled, (4, 4), [(4, 4), (4, 4)])
        return v, torch.autograd.grad(v.float().square().sum(), xg)[0]

    want, want_dx = run()
    sft.use_kernels(m.transformer, "triton")
    got, got_dx = run()
    sft.use_kernels(m.transformer, "torch")
    again, _ = run()
    assert torch.equal(again, want)  # switching back restores diffusers' own processor
    tol = 1e-4 if INTERPRET else 3e-2  # bf16 on a GPU: relative to the largest value
    assert max_err(got, want) < tol * max(1.0, want.abs().max().item())
    assert max_err(got_dx, want_dx) < tol * max(1.0, want_dx.abs().max().item())


@needs_triton
def test_crop_resize_normalize_matches_reference():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 70, 90, 3), dtype=torch.uint8, device=DEVICE)
    boxes = rewards.int_boxes([(3.2, 4.7, 50.1, 60.0), (10, 10, 89, 30), (0, 0, 1, 1)], [(90, 70)] * 3)
    index = torch.tensor([0, 1, 1], device=DEVICE)
    got = R.crop_resize_normalize(images, index, boxes)
    want = R.crop_resize_normalize_reference(images, index, boxes)
    assert got.shape == (3, 3, 224, 224)
    assert (got - want).abs().max().item() < 1e-4
    # and both are the PIL path bench.py scores with (rewards.dino_pixels: PIL bicubic, antialiased)
    from PIL import Image

    ims = [Image.fromarray(images[i].cpu().numpy()) for i in index.tolist()]
    pil = rewards.dino_preprocess(ims, boxes).to(got.device)
    assert (got - pil).abs().max().item() < 1e-3


@needs_triton
def test_gaussian_logprob_matches_reference():
    torch.manual_seed(0)
    x, mean = torch.randn(3, 16, 8, 9, device=DEVICE), torch.randn(3, 16, 8, 9, device=DEVICE)
    std = torch.tensor([0.3, 0.5, 1.2], device=DEVICE)
    got = R.gaussian_logprob_mean(x, mean, std)
    want = R.gaussian_logprob_mean_reference(x, mean, std)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-6)
    # and the reference is the Gaussian density itself
    d = torch.distributions.Normal(mean[1].flatten(), std[1])
    assert math.isclose(want[1].item(), d.log_prob(x[1].flatten()).mean().item(), abs_tol=1e-5)


@needs_triton
def test_group_advantages_matches_reference():
    torch.manual_seed(0)
    r = torch.randn(18, device=DEVICE)
    r[12:] = 0.5  # a group with no spread: advantages 0
    g = torch.tensor([0] * 6 + [2] * 6 + [1] * 6, device=DEVICE)
    import rl  # the formula is rl.py's; the kernel only accelerates it

    got, want = R.group_advantages(r, g), rl.group_advantages(r, g).to(DEVICE)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.all(want[12:] == 0)
    assert torch.allclose(want[:6], ((r[:6] - r[:6].mean()) / (r[:6].std(unbiased=False) + 1e-4)).clamp(-5, 5))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_refs", [1, 4])
def test_qk_norm_rope_cuda_kontext_like(dtype, n_refs):
    # 512 text tokens + a 32x32 target + 16x16 refs, 24 heads of 128: the real structure; bf16 through
    # the autotuner (which compiles and times every tile on first use)
    check_norm_rope(dtype, 1, 24, 128, 512, (32, 32), [(16, 16)] * n_refs, "cuda", autotune=dtype == torch.bfloat16)


@cuda
@pytest.mark.parametrize("tile", K.CONFIGS)
def test_qk_norm_rope_cuda_every_tile(tile):
    # every tile the autotuner may pick gives a correct result (ragged text, 3 heads)
    check_norm_rope(torch.bfloat16, 2, 3, 128, 77, (9, 7), [(5, 6), (7, 3)], "cuda", tile, weight_grad=True)


def test_gpu_check_runs_small_on_cpu(tmp_path):
    """kernels/gpu_check.sh with GPU_CHECK_SMALL=1: every part (kernel tests, the benchmark, the
    profile's SFT, RL and reward phases, the report) runs at toy size and lands in the one JSON."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    # The script's per-part limits (80-110 s, 470 in all) are sized for the GPU. At toy size a part
    # takes about 8 CPU seconds, but on a CPU that other jobs share its wall time grows without bound
    # (measured: 195-303 s a part at load 11). 600 s a part still fails a part that hangs.
    limits = {k: "600" for k in ("T_TESTS", "T_BENCH", "T_SFT", "T_RL", "T_REWARDS")}
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "OUT": str(out), "WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, **limits, "BUDGET": "3000"}
    res = subprocess.run(["bash", str(root / "kernels" / "gpu_check.sh")], capture_output=True, text=True, cwd=root,
                         env=env)
    assert res.returncode == 0, res.stdout[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [p["part"] for p in report["parts"]] == ["tests", "bench", "sft", "rl", "rewards"]
    assert all(p["rc"] == 0 and not p["timed_out"] for p in report["parts"]), report["parts"]
    tests = report["tests"]["interp"]
    assert tests["tests"] >= 2 and tests["failures"] == tests["errors"] == 0
    rows = report["bench"]["attention"]
    assert [(r["refs"], r["mode"]) for r in rows] == [(2, "fwd"), (2, "fwd+bwd")]
    for r in rows:  # every path timed, and the fused and compiled paths compute what eager does (fp32)
        assert min(r["eager_ms"], r["compiled_ms"], r["fused_ms"], r["sdpa_ms"]) > 0
        assert max(r["max_err_vs_eager"].values()) < 1e-4
    prof = {r["phase"]: r for r in report["profile"]}
    assert set(prof) == {"build", "sft-2", "sft-3", "sft-4", "rl", "reward-build", "rewards"}
    assert not any("error" in r for r in prof.values())
    assert prof["sft-4"]["seq_len"] > prof["sft-2"]["seq_len"] and prof["sft-2"]["seconds"] > 0
    assert prof["rl"]["ratio_first"] == 1.0 and prof["rl"]["images"] == 2
    assert all(prof["rewards"][f"{k}_s"] > 0 for k in ("psr", "judge_local", "judge_client", "hps"))
    hours = report["gpu_hours"]
    assert hours["sft"]["torch"]["arithmetic"].startswith("350000 samples (8 x 43750 steps)")
    assert hours["rl"]["arithmetic"].startswith("1000 iterations x 8 prompts") and hours["rl"]["rewards_measured"]
    assert hours["total_gpu_hours"] == hours["sft"]["torch"]["gpu_hours"] + hours["rl"]["gpu_hours"]
