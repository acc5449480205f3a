"""Triton kernels against their torch references.

On CPU these run under TRITON_INTERPRET=1 (conftest sets it). With TRITON_INTERPRET=0 and a GPU,
the same tests run the compiled kernels on CUDA, and the tests marked `cuda` add bf16 and
Kontext-sized shapes.
"""
import math

import pytest
import torch

import common
import rewards
import sft
from kernels import attention as A
from kernels import reward_ops as R

INTERPRET = A.INTERPRET
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(DEVICE is None or A.triton is None,
                                  reason="needs TRITON_INTERPRET=1 or a CUDA device")
cuda = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (compiled kernels)")

# max |error| allowed against the fp32 reference, per dtype (forward, gradients)
# (fp32 on a GPU runs its dots in tf32, hence the looser bound there)
TOL = {torch.float32: (1e-5, 1e-5) if INTERPRET else (5e-3, 1e-2), torch.float16: (2e-3, 4e-3),
       torch.bfloat16: (1.6e-2, 3e-2)}


def rope_tables(n_text, target_hw, ref_hws, axes=(8, 28, 28)):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.cat([torch.zeros(n_text, 3), sft.position_ids(target_hw, ref_hws, "frame")])
    cos, sin = FluxPosEmbed(10000, list(axes))(ids)
    return cos.float(), sin.float()


def check_attention(dtype, b, h, d, n_text, target_hw, ref_hws, device):
    torch.manual_seed(0)
    axes = (8, 28, 28) if d == 64 else (16, 56, 56)
    cos, sin = [t.to(device) for t in rope_tables(n_text, target_hw, ref_hws, axes)]
    L = cos.shape[0]
    q, k, v = [torch.randn(b, L, h, d, device=device).to(dtype).requires_grad_() for _ in range(3)]
    out = A.rope_attention(q, k, v, cos, sin)
    ref = A.rope_attention_reference(*(x.float() for x in (q, k, v)), cos, sin)
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    fwd_tol, bwd_tol = TOL[dtype]
    assert (out.float() - ref).abs().max().item() < fwd_tol
    for g, r, name in zip(grads, ref_grads, "qkv"):
        err = (g.float() - r).abs().max().item()
        assert err < bwd_tol * max(1.0, r.abs().max().item()), (name, err)


@needs_triton
@pytest.mark.parametrize("n_refs", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] if INTERPRET else [torch.float16, torch.bfloat16])
def test_rope_attention_matches_reference(n_refs, dtype):
    # 7 text tokens + 3x3 target + odd-sized refs: L is odd and never a multiple of the tile
    ref_hws = [(3, 3), (2, 3), (3, 1), (1, 2)][:n_refs]
    check_attention(dtype, 2, 2, 64, 7, (3, 3), ref_hws, DEVICE)


@needs_triton
def test_rope_attention_head_dim_128():
    check_attention(torch.float32 if INTERPRET else torch.bfloat16, 1, 2, 128, 5, (2, 3), [(3, 2), (2, 2)], DEVICE)


def test_reference_rope_is_diffusers_rope():
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rope_tables(3, (2, 2), [(2, 2)])
    x = torch.randn(2, cos.shape[0], 3, 64)
    assert torch.equal(A.apply_rope(x, cos, sin), apply_rotary_emb(x, (cos, sin), sequence_dim=1))


@needs_triton
def test_transformer_with_triton_processor_equals_torch(tiny_dir):
    m = common.load_kontext("tiny", DEVICE, torch.float32 if INTERPRET else torch.bfloat16, tiny_dir)
    g = torch.Generator().manual_seed(0)
    x, refs = [torch.randn(1, n, 64, generator=g).to(DEVICE, m.dtype) for n in (16, 32)]
    t5, pooled = common.encode_text(m, ["the star and the ring"], 16)
    sig = torch.tensor([0.6], device=DEVICE)
    want = sft.velocity(m, x, refs, sig, t5, pooled, (4, 4), [(4, 4), (4, 4)])
    sft.use_kernels(m.transformer, "triton")
    got = sft.velocity(m, x, refs, sig, t5, pooled, (4, 4), [(4, 4), (4, 4)])
    sft.use_kernels(m.transformer, "torch")
    again = sft.velocity(m, x, refs, sig, t5, pooled, (4, 4), [(4, 4), (4, 4)])
    assert torch.equal(again, want)  # switching back restores diffusers' own processor
    tol = 1e-4 if INTERPRET else 3e-2 * want.abs().max().item()  # bf16 on a GPU
    assert (got - want).abs().max().item() < tol


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
def test_rope_attention_cuda_kontext_like(dtype, n_refs):
    # 512 text + 32x32 target + refs at reduced width: the real sequence structure, odd tails included
    check_attention(dtype, 1, 4, 128, 77, (24, 24), [(24, 24)] * n_refs, "cuda")


def test_profile_script_runs_small_on_cpu(tmp_path, tiny_dir):
    """kernels/profile_kontext.py at reduced width and depth: every phase runs and reports numbers."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "profile.json"
    res = subprocess.run([sys.executable, str(root / "kernels" / "profile_kontext.py"), "--small", "--device", "cpu",
                          "--kernels", "torch", "--rl-kernels", "torch", "--out", str(out)],
                         capture_output=True, text=True, cwd=root, env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["phase"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) >= {"build", "sft-2", "sft-3", "sft-4", "rl", "reward-build", "rewards"}
    assert not any("error" in r for r in rows.values())
    assert rows["sft-4"]["seq_len"] > rows["sft-2"]["seq_len"] and rows["sft-2"]["seconds"] > 0
    assert rows["rl"]["ratio_first"] == 1.0 and rows["rl"]["images"] == 2
