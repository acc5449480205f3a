"""
Reward-batching ops for the RL hot loop, each a Triton kernel beside its plain-torch reference.

(a) crop_resize_normalize: boxes of a batch of uint8 images -> the normalized 224x224 crops DINO
    embeds (shorter side to 256 bicubic, centre crop 224, ImageNet mean/std), one launch for all
    boxes instead of a PIL loop. Bicubic is PyTorch's (a = -0.75, half-pixel centres, edges
    clamped to the box), so the torch reference is F.interpolate on each crop.
(b) gaussian_logprob_mean: the SDE step's log density of x_next under N(mean, std^2), averaged
    over all non-batch dims, in one pass per batch row.
(c) group_advantages: per-group (r - mean) / (std + eps), population std, clipped (rl.group_advantages).
"""

import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def int_boxes(boxes, sizes):
    """Float boxes -> the integer pixel boxes rewards.crop uses (floor/ceil, clamped to the image)."""
    out = []
    for (x1, y1, x2, y2), (w, h) in zip(boxes, sizes):
        b = (max(0, math.floor(x1)), max(0, math.floor(y1)), min(w, math.ceil(x2)), min(h, math.ceil(y2)))
        out.append(b if b[2] - b[0] >= 2 and b[3] - b[1] >= 2 else (0, 0, w, h))
    return out


def resize_plan(box):
    """Resized size of a box's crop (shorter side 256) and the centre-crop offsets."""
    w, h = box[2] - box[0], box[3] - box[1]
    s = 256 / min(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    return nw, nh, int(round((nw - 224) / 2.0)), int(round((nh - 224) / 2.0))


def crop_resize_normalize_reference(images, image_index, boxes):
    """images [N,H,W,3] uint8; image_index [M]; boxes: M integer boxes -> [M,3,224,224] float32."""
    out = []
    mean = torch.tensor(MEAN, device=images.device)[:, None, None]
    std = torch.tensor(STD, device=images.device)[:, None, None]
    for i, (x1, y1, x2, y2) in zip(image_index.tolist(), boxes):
        patch = images[i, y1:y2, x1:x2].permute(2, 0, 1)[None].float() / 255.0
        nw, nh, left, top = resize_plan((x1, y1, x2, y2))
        big = F.interpolate(patch, size=(nh, nw), mode="bicubic", align_corners=False)[0]
        out.append((big[:, top: top + 224, left: left + 224] - mean) / std)
    return torch.stack(out)


if triton is not None:

    @triton.jit
    def _cubic(t, A: tl.constexpr):
        """PyTorch's cubic convolution weights for the 4 taps at distances 1+t, t, 1-t, 2-t."""
        x0 = t + 1.0
        w0 = ((A * x0 - 5.0 * A) * x0 + 8.0 * A) * x0 - 4.0 * A
        w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0
        x2 = 1.0 - t
        w2 = ((A + 2.0) * x2 - (A + 3.0)) * x2 * x2 + 1.0
        w3 = 1.0 - w0 - w1 - w2
        return w0, w1, w2, w3

    @triton.jit
    def _crop_kernel(IMG, IDX, BOX, PLAN, OUT, H, W, m0, m1, m2, s0, s1, s2, BLOCK: tl.constexpr):
        """One program per (crop, block of output pixels); every channel done here."""
        c_id = tl.program_id(0)
        pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = pix < 224 * 224
        oy, ox = pix // 224, pix % 224
        img = tl.load(IDX + c_id)
        x1, y1 = tl.load(BOX + c_id * 4), tl.load(BOX + c_id * 4 + 1)
        x2, y2 = tl.load(BOX + c_id * 4 + 2), tl.load(BOX + c_id * 4 + 3)
        nw, nh = tl.load(PLAN + c_id * 4), tl.load(PLAN + c_id * 4 + 1)
        left, top = tl.load(PLAN + c_id * 4 + 2), tl.load(PLAN + c_id * 4 + 3)
        bw, bh = x2 - x1, y2 - y1
        # half-pixel centres: source = (dst + 0.5) * in/out - 0.5, within the crop
        sx = ((ox + left).to(tl.float32) + 0.5) * (bw.to(tl.float32) / nw.to(tl.float32)) - 0.5
        sy = ((oy + top).to(tl.float32) + 0.5) * (bh.to(tl.float32) / nh.to(tl.float32)) - 0.5
        fx, fy = tl.floor(sx), tl.floor(sy)
        wx0, wx1, wx2, wx3 = _cubic(sx - fx, -0.75)
        wy0, wy1, wy2, wy3 = _cubic(sy - fy, -0.75)
        ix, iy = fx.to(tl.int32), fy.to(tl.int32)
        base = IMG + img.to(tl.int64) * H * W * 3
        for ch in tl.static_range(3):
            acc = tl.zeros((BLOCK,), tl.float32)
            for j in tl.static_range(4):
                yy = tl.minimum(tl.maximum(iy - 1 + j, 0), bh - 1) + y1
                wy = wy0 if j == 0 else (wy1 if j == 1 else (wy2 if j == 2 else wy3))
                row = tl.zeros((BLOCK,), tl.float32)
                for i in tl.static_range(4):
                    xx = tl.minimum(tl.maximum(ix - 1 + i, 0), bw - 1) + x1
                    wx = wx0 if i == 0 else (wx1 if i == 1 else (wx2 if i == 2 else wx3))
                    v = tl.load(base + (yy * W + xx) * 3 + ch, mask=valid, other=0).to(tl.float32)
                    row += wx * v
                acc += wy * row
            mean = m0 if ch == 0 else (m1 if ch == 1 else m2)
            std = s0 if ch == 0 else (s1 if ch == 1 else s2)
            tl.store(OUT + (c_id * 3 + ch) * 224 * 224 + pix, (acc / 255.0 - mean) / std, mask=valid)

    @triton.jit
    def _logprob_kernel(X, MEAN_, STD_, OUT, N, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        std = tl.load(STD_ + row)
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < N
            x = tl.load(X + row.to(tl.int64) * N + offs, mask=m, other=0.0).to(tl.float32)
            mu = tl.load(MEAN_ + row.to(tl.int64) * N + offs, mask=m, other=0.0).to(tl.float32)
            acc += tl.where(m, (x - mu) * (x - mu), 0.0)
        sq = tl.sum(acc, 0) / N
        # mean over elements of -(x-mu)^2 / (2 std^2) - log std - log sqrt(2 pi)
        tl.store(OUT + row, -sq / (2.0 * std * std) - tl.log(std) - 0.9189385332046727)

    @triton.jit
    def _advantage_kernel(R, G, OUT, N, eps, clip, BLOCK: tl.constexpr):
        """One program per group; N is small (prompts x group size), so each program scans all of it."""
        g = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        # fp64 sums: a group of equal rewards must give exactly 0, not rounding noise / eps
        r = tl.load(R + offs, mask=m, other=0.0).to(tl.float64)
        mine = m & (tl.load(G + offs, mask=m, other=-1) == g)
        n = tl.sum(mine.to(tl.float64), 0)
        mean = tl.sum(tl.where(mine, r, 0.0), 0) / n
        var = tl.sum(tl.where(mine, (r - mean) * (r - mean), 0.0), 0) / n
        adv = ((r - mean) / (tl.sqrt(var) + eps)).to(tl.float32)
        adv = tl.minimum(tl.maximum(adv, -clip), clip)
        tl.store(OUT + offs, adv, mask=mine)


def crop_resize_normalize(images, image_index, boxes):
    """Triton version of crop_resize_normalize_reference: all boxes in one launch."""
    m = len(boxes)
    out = torch.empty(m, 3, 224, 224, device=images.device, dtype=torch.float32)
    if m == 0:
        return out
    box = torch.tensor(boxes, dtype=torch.int32, device=images.device)
    plan = torch.tensor([resize_plan(b) for b in boxes], dtype=torch.int32, device=images.device)
    n, h, w, _ = images.shape
    block = 65536 if os.environ.get("TRITON_INTERPRET") == "1" else 1024  # few big programs in the interpreter
    _crop_kernel[(m, triton.cdiv(224 * 224, block))](images.contiguous(), image_index.to(torch.int32).contiguous(),
                                                    box, plan, out, h, w, *MEAN, *STD, BLOCK=block)
    return out


def gaussian_logprob_mean_reference(x, mean, std):
    """x, mean [B, ...]; std [B] (the step's std * sqrt(-dt)). Mean over non-batch dims."""
    std = std.reshape(-1, *([1] * (x.dim() - 1)))
    lp = -((x.float() - mean.float()) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=tuple(range(1, x.dim())))


def gaussian_logprob_mean(x, mean, std):
    b = x.shape[0]
    n = x[0].numel()
    out = torch.empty(b, device=x.device, dtype=torch.float32)
    std = torch.as_tensor(std, device=x.device, dtype=torch.float32).expand(b).contiguous()
    _logprob_kernel[(b,)](x.contiguous(), mean.contiguous(), std, out, n, BLOCK=1024)
    return out


def group_advantages_reference(rewards, group_ids, eps=1e-4, clip=5.0):
    """The formula itself lives in rl.py (rl.group_advantages); kernels/ only accelerates it."""
    from rl import group_advantages

    return group_advantages(rewards, group_ids, eps, clip).to(rewards.device)


def group_advantages(rewards, group_ids, eps=1e-4, clip=5.0):
    n = rewards.numel()
    out = torch.empty(n, device=rewards.device, dtype=torch.float32)
    k = int(group_ids.max()) + 1
    _advantage_kernel[(k,)](rewards.float().contiguous(), group_ids.to(torch.int32).contiguous(), out, n, eps, clip,
                            BLOCK=max(16, triton.next_power_of_2(n)))
    return out
