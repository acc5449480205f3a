"""
Times every kernel against what it replaces, in one run, and prints the ratios.

The attention block as users meet it: from the q, k, v projections of both streams to the
attention output, i.e. per-head RMSNorm of q and k, the [text; image] concatenation, Flux's RoPE
and attention, at Kontext shapes (24 heads of 128, bf16, L = 512 text + 1024 target + 1024 per
reference, N = 1..4 references, batch 1 and 6), forward and forward+backward, three ways:

  eager     diffusers' own modules (RMSNorm, torch.cat, apply_rotary_emb), then SDPA's flash backend
  compiled  the same norm + cat + RoPE under torch.compile (dynamic batch and length), then SDPA flash
  fused     kernels/qk_norm_rope.py (one Triton kernel each way), then SDPA flash

plus the norm + RoPE part alone (with the bandwidth it achieves: bytes it must move over time)
and SDPA alone, the floor all three share. Times are medians of repeated runs (CUDA events);
ratios compare paths measured in the same run. The gradients are those of training a LoRA: into
the projections, not into the frozen norm weights. Then the reward ops against their torch forms.

    python kernels/bench_kernels.py --out bench.json                    # a GPU, the real shapes
    TRITON_INTERPRET=1 python kernels/bench_kernels.py --small --out b.json  # CPU smoke test
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import qk_norm_rope as K  # noqa: E402
from kernels import reward_ops as R  # noqa: E402

TEXT, TARGET, HEADS, HEAD_DIM = 512, (32, 32), 24, 128  # Kontext at 512 px: 32x32 tokens per image


# ----------------------------------------------------------------------------------------------
# Timing: medians of repeated runs; CUDA events on a GPU, the wall clock on CPU.

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def once_ms(fn, device):
    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


QUICK = False  # --small: one warm-up and one timing (the interpreter takes seconds per launch)


def median_ms(fn, device, budget_ms=200.0, min_reps=5, max_reps=100):
    """Median of repeated timings after two warm-up calls; as many repeats as fit budget_ms."""
    fn()
    if QUICK:
        return once_ms(fn, device)
    fn()
    sync(device)
    first = once_ms(fn, device)
    reps = int(min(max_reps, max(min_reps, budget_ms / max(first, 1e-3))))
    return statistics.median([first] + [once_ms(fn, device) for _ in range(reps - 1)])


# ----------------------------------------------------------------------------------------------
# The three ways of computing norm + cat + RoPE; each maps (q_txt, k_txt, q_img, k_img, cos, sin)
# -> q, k [B, L_txt + L_img, H, D].

def flux_tables(n_text, target_hw, n_refs, device, axes):
    """FluxPosEmbed's cos, sin [L, D] for text at 0, then the frame-wise ids of sft.position_ids."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    import sft

    ids = torch.cat([torch.zeros(n_text, 3), sft.position_ids(target_hw, [target_hw] * n_refs, "frame")])
    cos, sin = FluxPosEmbed(10000, list(axes))(ids)
    return cos.float().to(device), sin.float().to(device)


def make_norms(d, device, dtype):
    """The four RMSNorms of an attention layer (image q, k; text q, k), weights near 1 as trained."""
    from diffusers.models.normalization import RMSNorm

    g = torch.Generator().manual_seed(0)
    norms = []
    for _ in range(4):
        n = RMSNorm(d, eps=1e-6).to(device, dtype).requires_grad_(False)
        n.weight.copy_((0.8 + 0.4 * torch.rand(d, generator=g)).to(device, dtype))
        norms.append(n)
    return norms


def eager_norm_rope(norms):
    """diffusers' FluxAttnProcessor, line for line: norm each stream, cat text first, rotate."""
    from diffusers.models.embeddings import apply_rotary_emb

    norm_q, norm_k, norm_added_q, norm_added_k = norms

    def run(q_txt, k_txt, q_img, k_img, cos, sin):
        q = torch.cat([norm_added_q(q_txt), norm_q(q_img)], 1)
        k = torch.cat([norm_added_k(k_txt), norm_k(k_img)], 1)
        return apply_rotary_emb(q, (cos, sin), sequence_dim=1), apply_rotary_emb(k, (cos, sin), sequence_dim=1)

    return run


def fused_norm_rope(norms):
    w_img, w_txt = (norms[0].weight, norms[1].weight), (norms[2].weight, norms[3].weight)
    return lambda q_txt, k_txt, q_img, k_img, cos, sin: K.qk_norm_rope(q_txt, k_txt, q_img, k_img, w_txt, w_img,
                                                                       cos, sin)


def sdpa(q, k, v):
    """[B, L, H, D] in and out; the flash backend on a GPU (as diffusers' processor gets it there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention_block(norm_rope, x, cos, sin):
    """x: the six projections (q, k, v of text, then of image), [B, L_*, H, D] -> [B, L, H, D]."""
    q_txt, k_txt, v_txt, q_img, k_img, v_img = x
    q, k = norm_rope(q_txt, k_txt, q_img, k_img, cos, sin)
    return sdpa(q, k, torch.cat([v_txt, v_img], 1))


# ----------------------------------------------------------------------------------------------
# One shape: every path, forward and forward+backward.

def shape_inputs(b, n_refs, dims, device, dtype):
    """The six projections (requiring grad) at batch b with n_refs references, and their tables."""
    n_text, target_hw, heads, d, axes = dims
    cos, sin = flux_tables(n_text, target_hw, n_refs, device, axes)
    l_img = cos.shape[0] - n_text
    g = torch.Generator().manual_seed(b * 10 + n_refs)
    x = [(2 * torch.randn(b, n, heads, d, generator=g)).to(device, dtype).requires_grad_()
         for n in (n_text,) * 3 + (l_img,) * 3]
    for t in x[3:] + [cos, sin]:  # one compiled graph for every length, as training with 2-4 refs needs
        torch._dynamo.maybe_mark_dynamic(t, 1 if t.dim() == 4 else 0)
    return x, cos, sin


def fwd_and_train(fn, x):
    """fn(x) without autograd, and fn(x) then its gradients into the x that require them, as two
    callables; fn returns a tensor or a tuple of them."""
    dout = []

    def forward():
        with torch.no_grad():
            return fn(x)

    def train():
        out = fn(x)
        out = out if isinstance(out, tuple) else (out,)
        if not dout:
            dout.extend(torch.randn_like(o) for o in out)
        return torch.autograd.grad(out, [t for t in x if t.requires_grad], dout)

    return forward, train


def shape_rows(b, n_refs, dims, device, dtype, ways):
    x, cos, sin = shape_inputs(b, n_refs, dims, device, dtype)
    n_text, _, heads, d, _ = dims
    L = cos.shape[0]
    # correctness against the eager path before any timing (bf16: both round, differently)
    with torch.no_grad():
        want = attention_block(ways["eager"], x, cos, sin).float()
        errs = {k: (attention_block(f, x, cos, sin).float() - want).abs().max().item()
                for k, f in ways.items() if k != "eager"}
    q, k = ways["eager"](*x[:2], *x[3:5], cos, sin)
    qkv = [t.detach().requires_grad_() for t in (q, k, torch.cat([x[2], x[5]], 1))]
    elems = b * L * heads * d
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        pick = 0 if mode == "fwd" else 1
        r = {"batch": b, "refs": n_refs, "L": L, "mode": mode}
        r["sdpa_ms"] = median_ms(fwd_and_train(lambda t: sdpa(*t), qkv)[pick], device)
        for name, way in ways.items():
            r[f"{name}_ms"] = median_ms(fwd_and_train(lambda t, w=way: attention_block(w, t, cos, sin), x)[pick],
                                        device)
            part = lambda t, w=way: tuple(w(t[0], t[1], t[3], t[4], cos, sin))  # noqa: E731
            r[f"{name}_norm_rope_ms"] = median_ms(fwd_and_train(part, [x[0], x[1], x[2].detach(), x[3], x[4],
                                                                       x[5].detach()])[pick], device)
        # bytes norm + RoPE must move: read q, k, write q, k (fwd); read q, k, dq, dk, write dq, dk (bwd)
        moved = elems * 2 * x[0].element_size() * (2 if mode == "fwd" else 5)
        r["fused_norm_rope_gbps"] = moved / r["fused_norm_rope_ms"] / 1e6
        flops = 4 * b * heads * L * L * d * (1 if mode == "fwd" else 3.5)  # backward: 2.5x the forward's matmuls
        r["sdpa_tflops"] = flops / r["sdpa_ms"] / 1e9
        r["fused_vs_eager"] = r["eager_ms"] / r["fused_ms"]
        if "compiled" in ways:
            r["fused_vs_compiled"] = r["compiled_ms"] / r["fused_ms"]
            r["compiled_vs_eager"] = r["eager_ms"] / r["compiled_ms"]
        r["max_err_vs_eager"] = errs
        rows.append(r)
        print(f"B={b} N={n_refs} L={L:5d} {mode:7s} eager {r['eager_ms']:8.3f}"
              + (f" | compiled {r['compiled_ms']:8.3f}" if "compiled" in ways else "")
              + f" | fused {r['fused_ms']:8.3f} | sdpa {r['sdpa_ms']:8.3f} ({r['sdpa_tflops']:5.1f} TF/s) ms"
              + f" | x{r['fused_vs_eager']:.2f} vs eager"
              + (f", x{r['fused_vs_compiled']:.2f} vs compiled" if "compiled" in ways else "")
              + f" | norm+rope eager {r['eager_norm_rope_ms']:.3f}"
              + (f" compiled {r['compiled_norm_rope_ms']:.3f}" if "compiled" in ways else "")
              + f" fused {r['fused_norm_rope_ms']:.3f} ms ({r['fused_norm_rope_gbps']:.0f} GB/s)", flush=True)
    return rows


def attention_rows(batches, refs, dims, device, dtype, compile_backend):
    norms = make_norms(dims[3], device, dtype)  # one set: the compiled graph guards on these modules
    ways = {"eager": eager_norm_rope(norms), "fused": fused_norm_rope(norms)}
    if compile_backend != "none":
        ways["compiled"] = torch.compile(eager_norm_rope(norms), backend=compile_backend)
    rows = []
    for b in batches:
        for n in refs:
            try:
                rows += shape_rows(b, n, dims, device, dtype, ways)
            except Exception as e:  # reported in the table; the other shapes still run
                rows.append({"batch": b, "refs": n, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"B={b} N={n}: {rows[-1]['error']}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# Reward ops.

def reward_op_rows(device, small):
    n_img, size = (1, 64) if small else (24, 512)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n_img, size, size, 3), dtype=torch.uint8, device=device)
    g = torch.Generator().manual_seed(0)
    boxes, index = [], []
    for i in range(n_img):
        for _ in range(1 if small else 2):
            x1, y1 = torch.randint(0, size * 3 // 5, (2,), generator=g).tolist()
            w, h = torch.randint(size // 8, size * 2 // 5, (2,), generator=g).tolist()
            boxes.append((x1, y1, min(size, x1 + w), min(size, y1 + h)))
            index.append(i)
    index = torch.tensor(index, device=device)
    cases = [(f"crop_resize_normalize ({len(boxes)} boxes)", lambda: R.crop_resize_normalize_reference(images, index, boxes),
              lambda: R.crop_resize_normalize(images, index, boxes))]
    n, t = (2, 16) if small else (6, 1024)
    x, mean = torch.randn(n, t, 64, device=device), torch.randn(n, t, 64, device=device)
    std = torch.rand(n, device=device) + 0.1
    cases.append((f"gaussian_logprob_mean ({n}x{t}x64)", lambda: R.gaussian_logprob_mean_reference(x, mean, std),
                  lambda: R.gaussian_logprob_mean(x, mean, std)))
    r = torch.randn(48, device=device)
    gid = torch.arange(48, device=device) // 6
    import rl  # the formula is rl.py's; the kernel only accelerates it

    cases.append(("group_advantages (8 groups of 6)", lambda: rl.group_advantages(r, gid).to(r.device),
                  lambda: R.group_advantages(r, gid)))
    rows = []
    for name, ref, fast in cases:
        err = (ref() - fast()).abs().max().item()
        t_ref, t_fast = median_ms(ref, device), median_ms(fast, device)
        rows.append({"op": name, "torch_ms": t_ref, "triton_ms": t_fast, "speedup": t_ref / t_fast, "max_err": err})
        print(f"{name:38s} torch {t_ref:8.3f} ms | triton {t_fast:8.3f} ms | x{t_ref / t_fast:.2f} | max err {err:.1e}",
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1): a smoke test")
    ap.add_argument("--batches", default="1,6")
    ap.add_argument("--refs", default="1,2,3,4")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled path; none skips it")
    ap.add_argument("--no-reward-ops", action="store_true")
    args = ap.parse_args()
    global QUICK
    QUICK = args.small
    if args.small:
        device, dtype, dims = "cpu", torch.float32, (8, (4, 4), 2, 64, (8, 28, 28))
        batches, refs = [1], [2]
        if not K.INTERPRET:
            raise SystemExit("--small runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_kernels.py needs a CUDA GPU (or --small on the CPU)")
        device, dtype, dims = "cuda", torch.bfloat16, (TEXT, TARGET, HEADS, HEAD_DIM, (16, 56, 56))
        batches, refs = [int(b) for b in args.batches.split(",")], [int(n) for n in args.refs.split(",")]
        torch.backends.cuda.enable_cudnn_sdp(False)  # as common.cuda_setup: training never takes it
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    torch._dynamo.config.cache_size_limit = 64
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype),
              "attention": attention_rows(batches, refs, dims, device, dtype, args.compile_backend)}
    if not K.INTERPRET:  # the autotuner's picks (absent when the fused path never ran)
        result["tiles"] = {k: str(getattr(f, "best_config", None)) for k, f in (("fwd", K._fwd_tuned),
                                                                                 ("bwd", K._bwd_tuned))}
    if not args.no_reward_ops:
        result["reward_ops"] = reward_op_rows(device, args.small)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
