"""
Reward-batching ops for the RL hot loop, each a Triton kernel beside its plain-torch reference.

(a) crop_resize_normalize: boxes of a batch of uint8 images -> the normalized 224x224 crops DINO
    embeds, one launch for all boxes instead of a PIL loop. It computes what rewards.dino_pixels
    computes with PIL (shorter side to 256, the long side int()-truncated as torchvision does,
    centre crop 224): PIL's bicubic (a = -0.5, support widened when shrinking, so it antialiases)
    in PIL's own 22-bit fixed point with uint8 rounding after each pass, then ImageNet mean/std.
    The torch reference does the same integer arithmetic with gathers.
(b) gaussian_logprob_mean: the SDE step's log density of x_next under N(mean, std^2), averaged
    over all non-batch dims, in one pass per batch row.
(c) group_advantages: per-group (r - mean) / (std + eps), population std, clipped.

Imports: common.py only, as every file of kernels/ (tests/test_layout.py). (a) and (b) have their
torch references here. (a)'s boxes come in as integers (rewards.int_boxes makes them) and its resize
follows common.resize_plan, the rule rewards.dino_pixels uses; tests/test_kernels.py and
tests/test_rewards.py compare it with that PIL path. (c)'s formula is rl.py's (rl.group_advantages,
with its checks and the Flow-GRPO citation), so it has no second copy here: the test compares the
kernel with rl.group_advantages, and bench_kernels.py times it against that function.
"""

import math
import os

import torch
import torch.nn.functional as F

from common import resize_plan

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PRECISION_BITS = 22  # PIL's fixed point for 8-bit resampling: coefficients are ints scaled by 2^22


def pil_bicubic_coeffs(in_size, out_size, first=0, count=224):
    """PIL's bicubic resampling of one axis (Resample.c: precompute_coeffs, normalize_coeffs_8bpc)
    for output pixels first .. first+count-1 -> (xmin [count] int, kk [count, K] int fixed point).
    The filter is a = -0.5 cubic, its support stretched by the scale when shrinking (antialiasing);
    each output's weights are normalized to sum 1, then rounded to ints away from zero."""
    if in_size == out_size:  # PIL skips an axis that keeps its size: identity weights
        return list(range(first, first + count)), [[1 << PRECISION_BITS] for _ in range(count)]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale

    def cubic(x):
        x = abs(x)
        if x < 1.0:
            return (1.5 * x - 2.5) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * -0.5
        return 0.0

    ksize = int(math.ceil(support)) * 2 + 1
    xmins, kks = [], []
    for xx in range(first, first + count):
        center = (xx + 0.5) * scale
        xmin = max(0, int(center - support + 0.5))
        xmax = min(in_size, int(center + support + 0.5)) - xmin
        w = [cubic((x + xmin - center + 0.5) / filterscale) for x in range(xmax)]
        total = sum(w)
        w = [v / total if total != 0.0 else v for v in w]
        k = [int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else int(0.5 + v * (1 << PRECISION_BITS)) for v in w]
        xmins.append(xmin)
        kks.append(k + [0] * (ksize - len(k)))
    return xmins, kks


def crop_plan(box):
    """The coefficient tables of one box: x then y (xmin, kk) for the 224 centre-crop outputs."""
    w, h = box[2] - box[0], box[3] - box[1]
    nw, nh, left, top = resize_plan(w, h)
    return pil_bicubic_coeffs(w, nw, left), pil_bicubic_coeffs(h, nh, top)


def fixed_to_u8(acc):
    """PIL's clip8 of an accumulator that started at 2^21: floor(acc / 2^22) clipped to 0..255."""
    return torch.clamp(torch.div(acc + (1 << (PRECISION_BITS - 1)), 1 << PRECISION_BITS, rounding_mode="floor"), 0, 255)


def crop_resize_normalize_reference(images, image_index, boxes):
    """images [N,H,W,3] uint8; image_index [M]; boxes: M integer boxes -> [M,3,224,224] float32.
    PIL's two passes in integers: horizontal (rounded to uint8), then vertical, on the crop."""
    out = []
    mean = torch.tensor(MEAN, device=images.device)[:, None, None]
    std = torch.tensor(STD, device=images.device)[:, None, None]
    for i, (x1, y1, x2, y2) in zip(image_index.tolist(), boxes):
        patch = images[i, y1:y2, x1:x2].long()                                  # [h, w, 3]
        (xmin, xk), (ymin, yk) = crop_plan((x1, y1, x2, y2))
        xk, yk = torch.tensor(xk, device=images.device), torch.tensor(yk, device=images.device)
        xi = (torch.tensor(xmin, device=images.device)[:, None] + torch.arange(xk.shape[1], device=images.device)).clamp(max=x2 - x1 - 1)
        yi = (torch.tensor(ymin, device=images.device)[:, None] + torch.arange(yk.shape[1], device=images.device)).clamp(max=y2 - y1 - 1)
        horiz = fixed_to_u8((patch[:, xi, :] * xk[None, :, :, None]).sum(2))  # [h, 224, K, 3] -> [h, 224, 3]
        vert = fixed_to_u8((horiz[yi, :, :] * yk[:, :, None, None]).sum(1))   # [224, K, 224, 3] -> [224, 224, 3]
        out.append((vert.permute(2, 0, 1).float() / 255.0 - mean) / std)
    return torch.stack(out)


if triton is not None:

    @triton.jit
    def _crop_kernel(IMG, IDX, BOX, XMIN, XK, YMIN, YK, OUT, H, W, m0, m1, m2, s0, s1, s2,
                     KX: tl.constexpr, KY: tl.constexpr, BLOCK: tl.constexpr):
        """One program per (crop, block of output pixels), every channel here. PIL's two passes in
        its int32 fixed point: each vertical tap's row is first resampled horizontally and rounded
        to uint8 (as PIL's intermediate image is), then the rows are combined and rounded."""
        c_id = tl.program_id(0)
        pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = pix < 224 * 224
        oy, ox = pix // 224, pix % 224
        img = tl.load(IDX + c_id)
        x1, y1 = tl.load(BOX + c_id * 4), tl.load(BOX + c_id * 4 + 1)
        x2, y2 = tl.load(BOX + c_id * 4 + 2), tl.load(BOX + c_id * 4 + 3)
        xmin = tl.load(XMIN + c_id * 224 + ox, mask=valid, other=0)
        ymin = tl.load(YMIN + c_id * 224 + oy, mask=valid, other=0)
        base = IMG + img.to(tl.int64) * H * W * 3
        half = 1 << 21
        for ch in tl.static_range(3):
            acc = tl.full((BLOCK,), half, tl.int32)
            for j in range(KY):
                wy = tl.load(YK + (c_id * 224 + oy) * KY + j, mask=valid, other=0)
                yy = tl.minimum(ymin + j, y2 - y1 - 1) + y1  # a zero weight may point past the crop
                row = tl.full((BLOCK,), half, tl.int32)
                for i in range(KX):
                    wx = tl.load(XK + (c_id * 224 + ox) * KX + i, mask=valid, other=0)
                    xx = tl.minimum(xmin + i, x2 - x1 - 1) + x1
                    v = tl.load(base + (yy * W + xx) * 3 + ch, mask=valid, other=0).to(tl.int32)
                    row += v * wx
                row = tl.minimum(tl.maximum(row >> 22, 0), 255)
                acc += row * wy
            val = tl.minimum(tl.maximum(acc >> 22, 0), 255).to(tl.float32)
            mean = m0 if ch == 0 else (m1 if ch == 1 else m2)
            std = s0 if ch == 0 else (s1 if ch == 1 else s2)
            tl.store(OUT + (c_id * 3 + ch) * 224 * 224 + pix, (val / 255.0 - mean) / std, mask=valid)

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
    """Triton version of crop_resize_normalize_reference: all boxes in one launch. The coefficient
    tables are built on the host (cheap, per box) and padded to the batch's widest filter."""
    m = len(boxes)
    out = torch.empty(m, 3, 224, 224, device=images.device, dtype=torch.float32)
    if m == 0:
        return out
    plans = [crop_plan(b) for b in boxes]
    kx = max(len(p[0][1][0]) for p in plans)
    ky = max(len(p[1][1][0]) for p in plans)

    def table(axis, k):
        mins = torch.tensor([p[axis][0] for p in plans], dtype=torch.int32)
        ks = torch.tensor([[row + [0] * (k - len(row)) for row in p[axis][1]] for p in plans], dtype=torch.int32)
        return mins.to(images.device), ks.to(images.device)

    xmin, xk = table(0, kx)
    ymin, yk = table(1, ky)
    box = torch.tensor(boxes, dtype=torch.int32, device=images.device)
    n, h, w, _ = images.shape
    block = 65536 if os.environ.get("TRITON_INTERPRET") == "1" else 256  # few big programs in the interpreter
    _crop_kernel[(m, triton.cdiv(224 * 224, block))](
        images.contiguous(), image_index.to(torch.int32).contiguous(), box, xmin, xk, ymin, yk, out, h, w,
        *MEAN, *STD, KX=kx, KY=ky, BLOCK=block)
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


def group_advantages(rewards, group_ids, eps=1e-4, clip=5.0):
    """rl.group_advantages in one launch: group ids 0..k-1, every group non-empty (rl.py checks)."""
    n = rewards.numel()
    out = torch.empty(n, device=rewards.device, dtype=torch.float32)
    k = int(group_ids.max()) + 1
    _advantage_kernel[(k,)](rewards.float().contiguous(), group_ids.to(torch.int32).contiguous(), out, n, eps, clip,
                            BLOCK=max(16, triton.next_power_of_2(n)))
    return out
