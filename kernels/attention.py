"""
The attention processor of `--kernels triton`: diffusers' FluxAttnProcessor with the norm, cat and
RoPE of q and k done by one Triton kernel (kernels/qk_norm_rope.py), then PyTorch's
scaled_dot_product_attention (its flash backend on GPUs).

Why the rotation is no longer inside the attention kernel: an earlier kernel here rotated q and k
in registers inside a Triton flash attention, to save writing and re-reading the rotated q and k.
On an H200 it ran at 0.12-0.28x of RoPE + SDPA flash (kernels/README.md): K was rotated once per
query block inside the tensor-core loop, and that loop is what sets attention's speed. The most
that fusion could ever save is one write and one read of q and k: at L = 5632, batch 1, 24 heads
of 128 in bf16 that is 4 x 34.6 MB = 138 MB, about 0.03 ms at 4.3 TB/s, against the 5.8 ms that
RoPE + SDPA flash took there forward and backward (0.6%). The norm kernel reads and writes q and k
anyway, so the rotation rides along there, and attention is left to SDPA's tuned flash kernel.
"""

import torch
import torch.nn.functional as F

from kernels.qk_norm_rope import qk_norm_rope


class FusedNormRopeProcessor:
    """Same projections, outputs and dtypes as diffusers' FluxAttnProcessor (double-stream blocks
    pass the text as encoder_hidden_states; single-stream blocks have one joint stream)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None or image_rotary_emb is None:
            raise ValueError("FusedNormRopeProcessor takes no attention mask and needs the rotary tables")
        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  [B, L, H*D] -> [B, L, H, D]
        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        w_img = (attn.norm_q.weight, attn.norm_k.weight)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            eq, ek = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            w_txt = (attn.norm_added_q.weight, attn.norm_added_k.weight)
            q, k = qk_norm_rope(eq, ek, q, k, w_txt, w_img, *image_rotary_emb, eps=attn.norm_q.eps)
            v = torch.cat([ev, v], 1)
        else:
            q, k = qk_norm_rope(None, None, q, k, None, w_img, *image_rotary_emb, eps=attn.norm_q.eps)
        # q, k, v [B, L, H, D]; SDPA wants [B, H, L, D] (views: flash reads the [B, L, H, D] memory as is)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        enc, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], 1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(enc.contiguous())
