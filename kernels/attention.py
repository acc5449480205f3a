"""
Flash attention with Flux's rotary embedding applied inside the kernel (forward and backward).

Flux rotates q and k by a per-token angle per channel pair (three axes: index, row, col), then
runs attention. Done separately, the rotation reads and writes q and k once more in fp32; here
each tile of q or k is rotated in registers right after it is loaded, so rotated q and k never
touch memory. The backward recomputes the rotation the same way and rotates dq and dk back.

Layout is diffusers' own, [B, L, H, D], so the processor needs no transposes. cos/sin are the
[L, D] tables FluxPosEmbed makes (pairs repeated); the kernel reads every other column.

`rope_attention_reference` (RoPE, then PyTorch's scaled_dot_product_attention) is the reference;
`rope_attention` is the Triton path. Tests compare them, also under TRITON_INTERPRET=1 on CPU.
"""

import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs no triton
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Reference: exactly what diffusers' FluxAttnProcessor does.

def apply_rope(x, cos, sin):
    """x [B, L, H, D]; cos, sin [L, D] (pairs repeated). Pair (a, b) -> (a cos - b sin, b cos + a sin)."""
    a, b = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-b, a], -1).flatten(-2)
    return (x.float() * cos[None, :, None] + rot * sin[None, :, None]).to(x.dtype)


def rope_attention_reference(q, k, v, cos, sin, scale=None):
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Triton kernels.

if triton is not None:

    @triton.jit
    def _rotate(x, c, s, BLOCK: tl.constexpr, HALF: tl.constexpr):
        """x [BLOCK, 2*HALF] (fp32), c, s [BLOCK, HALF]: rotate each interleaved channel pair."""
        a, b = tl.split(tl.reshape(x, (BLOCK, HALF, 2)))
        return tl.reshape(tl.join(a * c - b * s, b * c + a * s), (BLOCK, 2 * HALF))

    @triton.jit
    def _unrotate(x, c, s, BLOCK: tl.constexpr, HALF: tl.constexpr):
        """The transpose of _rotate, for gradients: (a, b) -> (a cos + b sin, b cos - a sin)."""
        a, b = tl.split(tl.reshape(x, (BLOCK, HALF, 2)))
        return tl.reshape(tl.join(a * c + b * s, b * c - a * s), (BLOCK, 2 * HALF))

    @triton.jit
    def _load_rot(X, COS, SIN, offs, L, stride_l, D: tl.constexpr, BLOCK: tl.constexpr):
        """Loads rows `offs` of one head ([BLOCK, D]) and rotates them; rows past L read as 0."""
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, D)
        h = tl.arange(0, HALF)
        row = offs[:, None] < L
        x = tl.load(X + offs[:, None] * stride_l + d[None, :], mask=row, other=0.0).to(tl.float32)
        c = tl.load(COS + offs[:, None] * D + 2 * h[None, :], mask=row, other=1.0)
        s = tl.load(SIN + offs[:, None] * D + 2 * h[None, :], mask=row, other=0.0)
        return _rotate(x, c, s, BLOCK, HALF)

    @triton.jit
    def _fwd_kernel(Q, K, V, COS, SIN, O, LSE, qk_scale, L, H,
                    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b, hd = bh // H, bh % H
        Q += b * sqb + hd * sqh
        K += b * skb + hd * skh
        V += b * svb + hd * svh
        O += b * sob + hd * soh
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        # scale folded into q, in log2 units so the softmax can use exp2
        q = (_load_rot(Q, COS, SIN, offs_m, L, sql, D, BLOCK_M) * qk_scale).to(Q.dtype.element_ty)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for start in range(0, L, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k = _load_rot(K, COS, SIN, offs_n, L, skl, D, BLOCK_N).to(Q.dtype.element_ty)
            v = tl.load(V + offs_n[:, None] * svl + d[None, :], mask=offs_n[:, None] < L, other=0.0)
            s = tl.dot(q, tl.trans(k))
            s = tl.where(offs_n[None, :] < L, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        rows = offs_m < L
        tl.store(O + offs_m[:, None] * sol + d[None, :], acc.to(O.dtype.element_ty), mask=rows[:, None])
        tl.store(LSE + bh * L + offs_m, m_i + tl.math.log2(l_i), mask=rows)

    @triton.jit
    def _bwd_delta_kernel(O, DO, DELTA, L, H, sob, sol, soh, sdb, sdl, sdh, D: tl.constexpr, BLOCK_M: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b, hd = bh // H, bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        rows = offs_m[:, None] < L
        o = tl.load(O + b * sob + hd * soh + offs_m[:, None] * sol + d[None, :], mask=rows, other=0.0)
        do = tl.load(DO + b * sdb + hd * sdh + offs_m[:, None] * sdl + d[None, :], mask=rows, other=0.0)
        tl.store(DELTA + bh * L + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < L)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, COS, SIN, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, L, H,
                         sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One block of keys: loops over all queries, accumulates dk (rotated frame) and dv."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b, hd = bh // H, bh % H
        HALF: tl.constexpr = D // 2
        Q += b * sqb + hd * sqh
        K += b * skb + hd * skh
        V += b * svb + hd * svh
        DO += b * sdb + hd * sdh
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        cols = offs_n[:, None] < L
        k = _load_rot(K, COS, SIN, offs_n, L, skl, D, BLOCK_N).to(Q.dtype.element_ty)
        v = tl.load(V + offs_n[:, None] * svl + d[None, :], mask=cols, other=0.0)
        dk = tl.zeros((BLOCK_N, D), tl.float32)
        dv = tl.zeros((BLOCK_N, D), tl.float32)
        for start in range(0, L, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            rows = offs_m < L
            q = _load_rot(Q, COS, SIN, offs_m, L, sql, D, BLOCK_M).to(Q.dtype.element_ty)
            do = tl.load(DO + offs_m[:, None] * sdl + d[None, :], mask=rows[:, None], other=0.0)
            lse = tl.load(LSE + bh * L + offs_m, mask=rows, other=float("inf"))
            delta = tl.load(DELTA + bh * L + offs_m, mask=rows, other=0.0)
            # transposed scores: [keys, queries]
            st = tl.dot(k, tl.trans(q)) * qk_scale
            pt = tl.math.exp2(st - lse[None, :])
            pt = tl.where(offs_n[:, None] < L, pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do)
            dpt = tl.dot(v, tl.trans(do))
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q)
        h = tl.arange(0, HALF)
        c = tl.load(COS + offs_n[:, None] * D + 2 * h[None, :], mask=cols, other=1.0)
        s = tl.load(SIN + offs_n[:, None] * D + 2 * h[None, :], mask=cols, other=0.0)
        dk = _unrotate(dk * sm_scale, c, s, BLOCK_N, HALF)
        tl.store(DK + b * skb + hd * skh + offs_n[:, None] * skl + d[None, :], dk.to(DK.dtype.element_ty), mask=cols)
        tl.store(DV + b * svb + hd * svh + offs_n[:, None] * svl + d[None, :], dv.to(DV.dtype.element_ty), mask=cols)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, COS, SIN, DO, LSE, DELTA, DQ, qk_scale, sm_scale, L, H,
                       sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One block of queries: loops over all keys, accumulates dq (rotated frame), rotates it back."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b, hd = bh // H, bh % H
        HALF: tl.constexpr = D // 2
        Q += b * sqb + hd * sqh
        K += b * skb + hd * skh
        V += b * svb + hd * svh
        DO += b * sdb + hd * sdh
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        rows = offs_m < L
        q = _load_rot(Q, COS, SIN, offs_m, L, sql, D, BLOCK_M).to(Q.dtype.element_ty)
        do = tl.load(DO + offs_m[:, None] * sdl + d[None, :], mask=rows[:, None], other=0.0)
        lse = tl.load(LSE + bh * L + offs_m, mask=rows, other=float("inf"))
        delta = tl.load(DELTA + bh * L + offs_m, mask=rows, other=0.0)
        dq = tl.zeros((BLOCK_M, D), tl.float32)
        for start in range(0, L, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k = _load_rot(K, COS, SIN, offs_n, L, skl, D, BLOCK_N).to(Q.dtype.element_ty)
            v = tl.load(V + offs_n[:, None] * svl + d[None, :], mask=offs_n[:, None] < L, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(offs_n[None, :] < L, p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        h = tl.arange(0, HALF)
        c = tl.load(COS + offs_m[:, None] * D + 2 * h[None, :], mask=rows[:, None], other=1.0)
        s = tl.load(SIN + offs_m[:, None] * D + 2 * h[None, :], mask=rows[:, None], other=0.0)
        dq = _unrotate(dq * sm_scale, c, s, BLOCK_M, HALF)
        tl.store(DQ + b * sqb + hd * sqh + offs_m[:, None] * sql + d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=rows[:, None])


def _configs(d):
    """Block sizes and launch settings; small tiles in the interpreter keep the CPU tests quick."""
    if INTERPRET:
        return dict(fwd=(16, 16, 4, 1), bwd=(16, 16, 4, 1))
    if d <= 64:
        return dict(fwd=(128, 64, 4, 3), bwd=(64, 64, 4, 2))
    return dict(fwd=(128, 64, 8, 3), bwd=(64, 64, 4, 2))  # the fastest tiles bench_kernels found on an H200


CONFIG_OVERRIDE = {}  # bench_kernels.py sets this to try other tiles


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


class _RopeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, scale):
        B, L, H, D = q.shape
        for x in (q, k, v):
            if x.stride(-1) != 1:
                raise ValueError("q, k, v need a contiguous last dimension")
        if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"rope_attention on CUDA takes fp16 or bf16, got {q.dtype}")
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        o = torch.empty_like(q)
        lse = torch.empty(B * H, L, device=q.device, dtype=torch.float32)
        cfg = {**_configs(D), **CONFIG_OVERRIDE}
        bm, bn, warps, stages = cfg["fwd"]
        qk_scale = scale * 1.4426950408889634  # log2(e)
        _fwd_kernel[(triton.cdiv(L, bm), B * H)](
            q, k, v, cos, sin, o, lse, qk_scale, L, H, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            D=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, cos, sin, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, cos, sin, o, lse = ctx.saved_tensors
        B, L, H, D = q.shape
        do = do.contiguous() if do.stride(-1) != 1 else do
        cfg = {**_configs(D), **CONFIG_OVERRIDE}
        bm, bn, warps, stages = cfg["bwd"]
        delta = torch.empty_like(lse)
        _bwd_delta_kernel[(triton.cdiv(L, bm), B * H)](o, do, delta, L, H, *_strides(o), *_strides(do), D=D,
                                                      BLOCK_M=bm)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        qk_scale = ctx.scale * 1.4426950408889634
        common = (qk_scale, ctx.scale, L, H, *_strides(q), *_strides(k), *_strides(v), *_strides(do))
        _bwd_dkdv_kernel[(triton.cdiv(L, bn), B * H)](q, k, v, cos, sin, do, lse, delta, dk, dv, *common,
                                                      D=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                                      num_stages=stages)
        _bwd_dq_kernel[(triton.cdiv(L, bm), B * H)](q, k, v, cos, sin, do, lse, delta, dq, *common,
                                                    D=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                                    num_stages=stages)
        return dq, dk, dv, None, None, None


def rope_attention(q, k, v, cos, sin, scale=None):
    """Fused RoPE + attention. q, k, v [B, L, H, D] (fp16/bf16, or fp32 in the interpreter);
    cos, sin [L, D] fp32 as FluxPosEmbed makes them. Returns [B, L, H, D]."""
    if triton is None:
        raise RuntimeError("triton is not installed; use --kernels torch")
    if q.shape[-1] % 16 or q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} unsupported (multiples of 16 up to 256)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RopeAttention.apply(q, k, v, cos, sin, scale)


# ----------------------------------------------------------------------------------------------
# The diffusers attention processor: the same projections and norms as FluxAttnProcessor, with the
# RoPE and attention replaced by one kernel.

class FusedRopeAttnProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("FusedRopeAttnProcessor takes no attention mask")
        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))
        q = attn.norm_q(heads(attn.to_q(hidden_states)))
        k = attn.norm_k(heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q, k, v = q.to(v.dtype), k.to(v.dtype), v
        if image_rotary_emb is None:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        else:
            out = rope_attention(q.contiguous(), k.contiguous(), v.contiguous(), *image_rotary_emb)
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        enc, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], 1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(enc.contiguous())
