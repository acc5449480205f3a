"""
Per-head RMSNorm and Flux's 3-axis RoPE of q and k, fused into one Triton kernel (forward and
backward) that writes q and k straight into the joint [text; image] sequence attention reads.

What it replaces, in diffusers' FluxAttnProcessor, for each of the 57 attention layers:

    q = norm_q(q_img); eq = norm_added_q(q_txt)      # RMSNorm over each head's D channels
    q = cat([eq, q], 1)                               # the joint sequence, text first
    q = apply_rotary_emb(q, (cos, sin))               # channel pairs (a, b) -> (a cos - b sin, b cos + a sin)

and the same for k. Eagerly that is about twenty elementwise kernels per tensor, most of them
reading or writing an fp32 copy; here one launch reads each projection once and writes the rotated
q and k once ([B, L_txt + L_img, H, D], bf16), with the statistics and the rotation in fp32 and a
single rounding at the end. The backward recomputes the statistics from the saved projections, so
nothing but the inputs is kept for it.

Tables: FluxPosEmbed's cos, sin are [L, D] with each value repeated for its channel pair; the
kernel reads the first of each pair through a stride-2 view (no copy), once per token block, and
reuses it for every head and for both q and k of that block.

`qk_norm_rope_reference` is the same computation as diffusers does it (tests check it bit for bit
against diffusers' own RMSNorm and apply_rotary_emb); `qk_norm_rope` is the Triton path, an
autograd Function. Tests compare them, also under TRITON_INTERPRET=1 on CPU.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference needs no triton
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Reference: exactly what diffusers' FluxAttnProcessor does (RMSNorm, cat, apply_rotary_emb).

def _compute_dtype(x):
    """fp32 for fp16/bf16/fp32 inputs, as diffusers' `.float()`; fp64 stays fp64 (the tests' truth)."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm(x, weight, eps):
    """diffusers' RMSNorm: fp32 statistics; the result is cast to a half-precision weight's dtype
    before the weight multiplies it (so a bf16 model rounds twice here)."""
    var = x.to(_compute_dtype(x)).pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(var + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return y * weight


def apply_rope(x, cos, sin):
    """x [B, L, H, D]; cos, sin [L, D] (pairs repeated). Pair (a, b) -> (a cos - b sin, b cos + a sin)."""
    a, b = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-b, a], -1).flatten(-2)
    up = _compute_dtype(x)
    return (x.to(up) * cos[None, :, None] + rot.to(up) * sin[None, :, None]).to(x.dtype)


def qk_norm_rope_reference(q_txt, k_txt, q_img, k_img, w_txt, w_img, cos, sin, eps=1e-6):
    """q_*, k_* [B, L_*, H, D] (the text pair may be None: single-stream blocks); w_txt, w_img the
    (q, k) norm weights [D]; cos, sin [L_txt + L_img, D]. Returns q, k [B, L_txt + L_img, H, D]."""
    q, k = rms_norm(q_img, w_img[0], eps), rms_norm(k_img, w_img[1], eps)
    if q_txt is not None:
        q = torch.cat([rms_norm(q_txt, w_txt[0], eps), q], 1)
        k = torch.cat([rms_norm(k_txt, w_txt[1], eps), k], 1)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


# ----------------------------------------------------------------------------------------------
# Triton kernels. A program takes BLOCK_T tokens of one stream (text blocks first, then image
# blocks, so no block straddles the seam) and HEADS heads of one batch item, for both q and k:
# grid (text blocks + image blocks, B, cdiv(H, HEADS)). Inputs and outputs are contiguous
# [B, L, H, D]; element (b, l, h, d) sits at ((b * L + l) * H + h) * D + d.

if triton is not None:

    @triton.jit
    def _rotate(y, c, s, T: tl.constexpr, HALF: tl.constexpr, SIGN: tl.constexpr):
        """y [T, 2*HALF] fp32, c, s [T, HALF]: each channel pair (a, b) -> (a c - SIGN b s, b c + SIGN a s).
        SIGN = 1 is the rotation; SIGN = -1 its transpose (the backward)."""
        a, b = tl.split(tl.reshape(y, (T, HALF, 2)))
        s = s * SIGN
        return tl.reshape(tl.join(a * c - b * s, b * c + a * s), (T, 2 * HALF))

    @triton.jit
    def _block(L_T, L_I, COS, SIN, s_cl, s_cd, D: tl.constexpr, BLOCK_T: tl.constexpr):
        """Which stream this program's tokens belong to, their rows in it and in the joint sequence,
        and their half tables c, s [BLOCK_T, D/2] (fp32)."""
        pid = tl.program_id(0)
        n_txt = tl.cdiv(L_T, BLOCK_T)
        txt = pid < n_txt
        rows = tl.where(txt, pid, pid - n_txt) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T], within the stream
        live = rows < tl.where(txt, L_T, L_I)
        joint = rows + tl.where(txt, 0, L_T)  # [T], within [text; image]
        j = tl.arange(0, D // 2)
        at = joint[:, None] * s_cl + j[None, :] * s_cd
        c = tl.load(COS + at, mask=live[:, None], other=1.0).to(tl.float32)
        s = tl.load(SIN + at, mask=live[:, None], other=0.0).to(tl.float32)
        return txt, rows, live, joint, c, s

    @triton.jit
    def _norm_rope_tile(X, O, w, x_at, o_at, mask, c, s, eps, D: tl.constexpr, T: tl.constexpr):
        """One head of T tokens: x [T, D] -> rope(x * rsqrt(mean(x^2) + eps) * w), one rounding."""
        x = tl.load(X + x_at, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)  # [T]
        y = _rotate(x * r[:, None] * w[None, :], c, s, T, D // 2, 1.0)
        tl.store(O + o_at, y.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_grad_tile(X, G, DX, w, x_at, o_at, mask, c, s, eps, D: tl.constexpr, T: tl.constexpr):
        """The backward of one tile: writes dx [T, D] and returns this tile's d loss / d w [D]."""
        x = tl.load(X + x_at, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)  # [T], recomputed: cheaper than storing it
        xhat = x * r[:, None]
        g = tl.load(G + o_at, mask=mask, other=0.0).to(tl.float32)
        gy = _rotate(g, c, s, T, D // 2, -1.0)  # d loss / d (xhat * w)
        gxhat = gy * w[None, :]
        # y = x r with r = (mean(x^2) + eps)^-1/2:  dx = r (g - xhat mean(g xhat))
        dx = r[:, None] * (gxhat - xhat * (tl.sum(gxhat * xhat, 1) / D)[:, None])
        tl.store(DX + x_at, dx.to(DX.dtype.element_ty), mask=mask)
        return tl.sum(gy * xhat, 0)

    @triton.jit
    def _fwd_kernel(XQ_T, XK_T, XQ_I, XK_I, WQ_T, WK_T, WQ_I, WK_I, COS, SIN, OQ, OK,
                    L_T, L_I, H, eps, s_cl, s_cd,
                    D: tl.constexpr, BLOCK_T: tl.constexpr, HEADS: tl.constexpr):
        txt, rows, live, joint, c, s = _block(L_T, L_I, COS, SIN, s_cl, s_cd, D, BLOCK_T)
        XQ, XK = tl.where(txt, XQ_T, XQ_I), tl.where(txt, XK_T, XK_I)
        d = tl.arange(0, D)
        wq = tl.load(tl.where(txt, WQ_T, WQ_I) + d).to(tl.float32)
        wk = tl.load(tl.where(txt, WK_T, WK_I) + d).to(tl.float32)
        b = tl.program_id(1).to(tl.int64)  # offsets pass 2^31 at batch 6 x 5632 tokens x 24 heads x 128 soon
        x_at = ((b * tl.where(txt, L_T, L_I) + rows) * H)[:, None] * D + d[None, :]  # [T, D], head 0
        o_at = ((b * (L_T + L_I) + joint) * H)[:, None] * D + d[None, :]
        for i in tl.static_range(HEADS):  # unrolled: the loads of every head can be in flight at once
            h = tl.program_id(2) * HEADS + i
            mask = (live & (rows * 0 + h < H))[:, None]  # [T, 1] (a tensor: the interpreter mis-types a scalar here)
            _norm_rope_tile(XQ + h * D, OQ + h * D, wq, x_at, o_at, mask, c, s, eps, D, BLOCK_T)
            _norm_rope_tile(XK + h * D, OK + h * D, wk, x_at, o_at, mask, c, s, eps, D, BLOCK_T)

    @triton.jit
    def _bwd_kernel(XQ_T, XK_T, XQ_I, XK_I, WQ_T, WK_T, WQ_I, WK_I, COS, SIN, GQ, GK,
                    DXQ_T, DXK_T, DXQ_I, DXK_I, DW, L_T, L_I, H, eps, s_cl, s_cd,
                    D: tl.constexpr, BLOCK_T: tl.constexpr, HEADS: tl.constexpr, WANT_DW: tl.constexpr):
        txt, rows, live, joint, c, s = _block(L_T, L_I, COS, SIN, s_cl, s_cd, D, BLOCK_T)
        XQ, XK = tl.where(txt, XQ_T, XQ_I), tl.where(txt, XK_T, XK_I)
        DXQ, DXK = tl.where(txt, DXQ_T, DXQ_I), tl.where(txt, DXK_T, DXK_I)
        d = tl.arange(0, D)
        wq = tl.load(tl.where(txt, WQ_T, WQ_I) + d).to(tl.float32)
        wk = tl.load(tl.where(txt, WK_T, WK_I) + d).to(tl.float32)
        b = tl.program_id(1).to(tl.int64)
        x_at = ((b * tl.where(txt, L_T, L_I) + rows) * H)[:, None] * D + d[None, :]
        o_at = ((b * (L_T + L_I) + joint) * H)[:, None] * D + d[None, :]
        dwq = tl.zeros((D,), tl.float32)
        dwk = tl.zeros((D,), tl.float32)
        for i in tl.static_range(HEADS):
            h = tl.program_id(2) * HEADS + i
            mask = (live & (rows * 0 + h < H))[:, None]  # [T, 1] (a tensor: the interpreter mis-types a scalar here)
            dwq += _norm_rope_grad_tile(XQ + h * D, GQ + h * D, DXQ + h * D, wq, x_at, o_at, mask, c, s, eps, D,
                                        BLOCK_T)
            dwk += _norm_rope_grad_tile(XK + h * D, GK + h * D, DXK + h * D, wk, x_at, o_at, mask, c, s, eps, D,
                                        BLOCK_T)
        if WANT_DW:  # DW [4, D] fp32: rows q_txt, k_txt, q_img, k_img (order of the sum varies: fp32 rounding)
            slot = tl.where(txt, 0, 2)
            tl.atomic_add(DW + slot * D + d, dwq)
            tl.atomic_add(DW + (slot + 1) * D + d, dwk)


# Tiles: BLOCK_T tokens x HEADS heads per program, and warps. A few hundred programs at least at
# L = 2560 and batch 1 keep the card's 132 multiprocessors busy; the autotuner picks per head dim
# and dtype on first use. The interpreter takes one small tile that splits the tests' short
# sequences into several blocks with ragged ends (TILE overrides it; the tests vary it).
CONFIGS = [(8, 2, 2), (8, 4, 4), (16, 2, 4), (16, 4, 4), (16, 8, 8), (32, 1, 4), (32, 2, 8), (64, 1, 8)]
TILE = None  # (BLOCK_T, HEADS, num_warps): skip the autotuner (tests; the interpreter uses (8, 2, 1))
DW_TILE = (16, 2, 4)  # the weight-gradient backward accumulates with atomics: never benchmarked twice

if triton is not None:
    _configs = [triton.Config({"BLOCK_T": t, "HEADS": h}, num_warps=w) for t, h, w in CONFIGS]
    _fwd_tuned = triton.autotune(_configs, key=["D", "H"])(_fwd_kernel)
    _bwd_tuned = triton.autotune(_configs, key=["D", "H"])(_bwd_kernel)


def _launch(kernel, tuned, L_T, L_I, B, H, *args, **constexprs):
    """Runs `kernel` at TILE (or the interpreter's tile), else autotuned; `tuned` None: DW_TILE."""
    tile = TILE or ((8, 2, 1) if INTERPRET else None) or (None if tuned is not None else DW_TILE)
    if tile is None:
        grid = lambda meta: (triton.cdiv(L_T, meta["BLOCK_T"]) + triton.cdiv(L_I, meta["BLOCK_T"]), B,  # noqa: E731
                             triton.cdiv(H, meta["HEADS"]))
        tuned[grid](*args, **constexprs)
        return
    t, h, w = tile
    grid = (triton.cdiv(L_T, t) + triton.cdiv(L_I, t), B, triton.cdiv(H, h))
    kernel[grid](*args, **constexprs, BLOCK_T=t, HEADS=h, num_warps=w)


def _half(table, D):
    """[L, D] with pairs repeated -> its [L, D/2] view of every other column (no copy); [L, D/2] as is."""
    if table.shape[-1] == D:
        return table[:, ::2]
    if table.shape[-1] == D // 2:
        return table
    raise ValueError(f"rope tables of width {table.shape[-1]} for head dim {D} (want {D} or {D // 2})")


def _output_dtype(x, w):
    """diffusers' RMSNorm returns the weight's dtype when it is fp16/bf16, else the promoted type."""
    return w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.promote_types(x.dtype, w.dtype)


class _QKNormRope(torch.autograd.Function):
    """q_txt, k_txt and their weights may be None (single-stream blocks): the kernel then gets an
    empty text stream (L_T = 0) whose pointers are the image ones, never read."""

    @staticmethod
    def forward(ctx, q_txt, k_txt, q_img, k_img, wq_t, wk_t, wq_i, wk_i, cos_h, sin_h, eps):
        ctx.has_txt = q_txt is not None
        q_img, k_img = q_img.contiguous(), k_img.contiguous()
        q_txt, k_txt = (q_txt.contiguous(), k_txt.contiguous()) if ctx.has_txt else (q_img, k_img)
        wq_t, wk_t = (wq_t, wk_t) if ctx.has_txt else (wq_i, wk_i)
        B, L_I, H, D = q_img.shape
        L_T = q_txt.shape[1] if ctx.has_txt else 0
        oq = torch.empty(B, L_T + L_I, H, D, device=q_img.device, dtype=_output_dtype(q_img, wq_i))
        ok = torch.empty_like(oq)
        xs, ws = (q_txt, k_txt, q_img, k_img), [w.contiguous() for w in (wq_t, wk_t, wq_i, wk_i)]
        _launch(_fwd_kernel, _fwd_tuned, L_T, L_I, B, H, *xs, *ws, cos_h, sin_h, oq, ok, L_T, L_I, H, eps,
                cos_h.stride(0), cos_h.stride(1), D=D)
        ctx.save_for_backward(*xs, *ws, cos_h, sin_h)
        ctx.eps, ctx.L_T = eps, L_T
        return oq, ok

    @staticmethod
    def backward(ctx, gq, gk):
        xs, ws, (cos_h, sin_h) = ctx.saved_tensors[:4], ctx.saved_tensors[4:8], ctx.saved_tensors[8:]
        B, L_I, H, D = xs[2].shape
        L_T = ctx.L_T
        want_dw = any(ctx.needs_input_grad[4:8])
        dxs = [torch.empty_like(x) for x in xs[2:]]
        dxs = ([torch.empty_like(x) for x in xs[:2]] if ctx.has_txt else dxs) + dxs
        dw = torch.zeros(4, D, device=gq.device, dtype=torch.float32) if want_dw else dxs[0]
        _launch(_bwd_kernel, None if want_dw else _bwd_tuned, L_T, L_I, B, H, *xs, *ws, cos_h, sin_h,
                gq.contiguous(), gk.contiguous(), *dxs, dw, L_T, L_I, H, ctx.eps, cos_h.stride(0), cos_h.stride(1),
                D=D, WANT_DW=want_dw)
        dws = [dw[i].to(w.dtype) if want_dw else None for i, w in enumerate(ws)]
        if not ctx.has_txt:
            dxs[:2], dws[:2] = [None, None], [None, None]
        return (*dxs, *dws, None, None, None)


def qk_norm_rope(q_txt, k_txt, q_img, k_img, w_txt, w_img, cos, sin, eps=1e-6):
    """The fused path; arguments and result as qk_norm_rope_reference. q_*, k_* [B, L_*, H, D] with a
    power-of-two D (fp16/bf16 on CUDA, any float in the interpreter); cos, sin [L, D] or [L, D/2]."""
    if triton is None:
        raise RuntimeError("triton is not installed; use --kernels torch")
    if not (q_img.is_cuda or INTERPRET):
        raise RuntimeError("qk_norm_rope runs on CUDA, or on CPU under TRITON_INTERPRET=1; use --kernels torch")
    D = q_img.shape[-1]
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim {D} unsupported (a power of two from 16)")
    L = (0 if q_txt is None else q_txt.shape[1]) + q_img.shape[1]
    if cos.shape[0] != L:
        raise ValueError(f"rope tables have {cos.shape[0]} rows for a sequence of {L}")
    w_txt = (None, None) if q_txt is None else w_txt
    return _QKNormRope.apply(q_txt, k_txt, q_img, k_img, *w_txt, *w_img, _half(cos, D), _half(sin, D), eps)
