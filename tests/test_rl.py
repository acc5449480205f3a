import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import rl
import common
import sft

ROOT = Path(__file__).resolve().parents[1]


def lr_contrast(images, *_):
    """A simple reward the tiny model can move: left half brighter than the right half."""
    out = []
    for im in images:
        a = np.asarray(im.convert("L"), dtype=np.float32) / 255
        out.append(float(a[:, : a.shape[1] // 2].mean() - a[:, a.shape[1] // 2:].mean()))
    return {"reward": out}


def nan_below(images, *_):
    """lr_contrast, NaN for an image whose reward is under PSR_TEST_NAN_BELOW: which sample fails
    depends on the image alone, not on how samples are batched over ranks."""
    r = lr_contrast(images)["reward"]
    return {"reward": [float("nan") if v < float(os.environ["PSR_TEST_NAN_BELOW"]) else v for v in r]}


def nan_for_first(images, *_):
    r = lr_contrast(images)["reward"]
    r[0] = float("nan")
    return {"reward": r}


def test_sde_step_noise_zero_is_euler():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 16, 64, generator=g), torch.randn(3, 16, 64, generator=g)
    x_next, lp, mean, std = rl.sde_step(x, v, 0.7, 0.6, noise_level=0.0, generator=g)
    assert std == 0.0
    assert torch.allclose(x_next, sft.euler_step(x, v, 0.7, 0.6), atol=1e-7)  # the sampler's own Euler step
    assert torch.all(lp == 0)  # no density for a deterministic step


def test_sde_step_formula_and_log_prob():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 8, 64, generator=g), torch.randn(2, 8, 64, generator=g)
    s, sn, a = 0.8, 0.7, 0.7
    x_next, lp, mean, std = rl.sde_step(x, v, s, sn, noise_level=a, generator=torch.Generator().manual_seed(5))
    dt = sn - s
    want_std = a * math.sqrt(s / (1 - s))
    assert std == pytest.approx(want_std)
    want_mean = x * (1 + want_std ** 2 / (2 * s) * dt) + v * (1 + want_std ** 2 * (1 - s) / (2 * s)) * dt
    assert torch.allclose(mean, want_mean, atol=1e-6)
    normal = torch.distributions.Normal(want_mean, want_std * math.sqrt(-dt))
    assert torch.allclose(lp, normal.log_prob(x_next).mean(dim=(1, 2)), atol=1e-5)
    # given prev_sample it scores that sample instead of drawing one
    _, lp2, _, _ = rl.sde_step(x, v, s, sn, noise_level=a, prev_sample=x_next)
    assert torch.equal(lp, lp2)
    # at sigma == 1 the denominator uses the schedule's second sigma
    _, _, _, std1 = rl.sde_step(x, v, 1.0, 0.96, noise_level=a, generator=g, second_sigma=0.96)
    assert std1 == pytest.approx(a * math.sqrt(1 / (1 - 0.96)))
    # ... and without it the step raises instead of silently taking a deterministic step
    with pytest.raises(ValueError, match="second sigma"):
        rl.sde_step(x, v, 1.0, 0.96, noise_level=a, generator=g)


def test_group_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = rl.group_advantages(r, g)
    m, sd = 2.0, math.sqrt(2 / 3)
    assert torch.allclose(adv[:3], (r[:3] - m) / (sd + 1e-4))
    assert torch.all(adv[3:] == 0)
    assert rl.group_advantages(torch.tensor([0.0, 100.0]), torch.tensor([0, 0]), clip=0.5).abs().max() == 0.5
    with pytest.raises(ValueError, match=r"group\(s\) \[1\] have no samples"):
        rl.group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="no rewards"):
        rl.group_advantages(torch.tensor([]), torch.tensor([], dtype=torch.long))


def test_nan_rewards_are_excluded():
    prompts = [{"id": "a"}, {"id": "b"}]
    rewards = torch.tensor([1.0, float("nan"), 3.0, float("nan"), float("nan"), float("nan")], dtype=torch.float64)
    cfg = rl.Config()
    adv, finite, dropped = rl.advantages_for(rewards, prompts, 3, cfg)
    assert finite.tolist() == [True, False, True, False, False, False]
    assert dropped == ["b"]
    assert adv[1] == 0 and adv[0] < 0 < adv[2]  # the group's stats ignore the NaN sample


def tiny_policy(tiny_dir, tiny_data, dtype=torch.float32):
    m = common.load_kontext("tiny", "cpu", dtype, tiny_dir)
    samples, cache = common.load_dataset(m, tiny_data, 64, 16)
    params = rl.prepare_policy(m, rl.Config(lora_rank=4, lora_alpha=8), None)
    with torch.no_grad():  # a non-zero adapter (peft starts B at 0), so the checks see the LoRA's numerics
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype))
    return m, samples, cache, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ratio_is_exactly_one_on_fresh_rollouts(tiny_dir, tiny_data, dtype):
    """The update's log-prob of a fresh rollout equals the rollout's own, bit for bit, at every step.
    bf16 emulates the GPU on the CPU: bf16 base weights, the fp32 LoRA common.add_lora keeps, and
    rl.numerics' bf16 autocast around sampling and training alike (Flow-GRPO,
    scripts/train_flux_kontext.py, samples and trains under the same `autocast()` context)."""
    m, samples, cache, params = tiny_policy(tiny_dir, tiny_data, dtype)
    assert m.dtype == dtype and {p.dtype for p in params} == {torch.float32}
    cfg = rl.Config(resolution=64, steps=5, group_size=4)
    inputs = rl.encode_prompt(m, cache, samples[0], m.device)
    ro = rl.rollout(m, m.transformer, inputs, [11, 12, 13, 14], cfg)
    assert ro.latents.shape[:2] == (6, 4) and ro.log_probs.shape == (5, 4) and len(ro.images) == 4
    ro.advantages = torch.ones(4)
    for j in range(cfg.steps - 1):
        _, ratio, _ = rl.step_loss(m, m.transformer, ro, j, cfg)
        assert torch.equal(ratio, torch.ones(4)), (dtype, j, ratio - 1)
    if dtype == torch.bfloat16:  # the context matters: the same step in fp32 matmuls moves the ratio
        with torch.autocast("cpu", enabled=False):
            orig = rl.numerics
            rl.numerics = lambda m_: torch.autocast("cpu", enabled=False)
            try:
                _, ratio, _ = rl.step_loss(m, m.transformer, ro, 1, cfg)
            finally:
                rl.numerics = orig
        assert not torch.equal(ratio, torch.ones(4))


def test_rollout_at_noise_zero_is_the_sampler(tiny_dir, tiny_data):
    """rollout(noise_level=0) is the plain ODE sampler: the same final latents and images."""
    m, samples, cache, params = tiny_policy(tiny_dir, tiny_data)
    cfg = rl.Config(resolution=64, steps=5)
    t5, pooled, refs, hws = inputs = rl.encode_prompt(m, cache, samples[1], m.device)
    seeds = [3, 4, 5]
    ro = rl.rollout(m, m.transformer, inputs, seeds, cfg, noise_level=0.0)
    assert torch.all(ro.log_probs == 0)
    noise = torch.cat([sft.initial_noise(1, 16, 8, 8, s, "cpu", torch.float32) for s in seeds])
    plain = sft.sample_latents(m, t5.expand(3, -1, -1), pooled.expand(3, -1), refs.expand(3, -1, -1), hws, 64, 64,
                               0, cfg.steps, cfg.guidance, cfg.pe, noise=noise)
    assert torch.equal(ro.latents[-1], sft.pack(plain))
    images = common.tensor_to_pil(common.decode_latents(m, plain))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ro.images, images))


def test_kl_term_is_the_gaussian_mean_distance(tiny_dir, tiny_data):
    """beta * ||mean - mean_ref||^2 / (2 std^2), std without sqrt(-dt), as Flow-GRPO
    (scripts/train_flux_kontext.py, the `kl_loss` line of the training loop); 0 with the adapter at 0."""
    m, samples, cache, params = tiny_policy(tiny_dir, tiny_data)
    cfg = rl.Config(resolution=64, steps=4, beta=0.5)
    inputs = rl.encode_prompt(m, cache, samples[0], m.device)
    ro = rl.rollout(m, m.transformer, inputs, [1, 2], cfg)
    ro.advantages = torch.tensor([1.0, -1.0])
    j = 1
    loss, ratio, kl = rl.step_loss(m, m.transformer, ro, j, cfg)
    t5, pooled, refs, hws = inputs
    s, sn = float(ro.sigmas[j]), float(ro.sigmas[j + 1])

    def mean_of(adapter_on):
        if not adapter_on:
            m.transformer.disable_adapters()
        v = sft.velocity(m, ro.latents[j], refs.expand(2, -1, -1), torch.full((2,), s), t5.expand(2, -1, -1),
                         pooled.expand(2, -1), (4, 4), hws, cfg.pe, cfg.guidance)
        m.transformer.enable_adapters()
        return rl.sde_step(ro.latents[j], v, s, sn, cfg.noise_level, prev_sample=ro.latents[j + 1],
                           second_sigma=float(ro.sigmas[1]))[2:]

    with torch.no_grad():
        (mean, std), (mean_ref, _) = mean_of(True), mean_of(False)
    want = ((mean - mean_ref) ** 2).mean(dim=(1, 2)) / (2 * std ** 2)
    assert torch.all(want > 0) and torch.allclose(kl, want, rtol=1e-4, atol=0)
    policy = torch.maximum(-ro.advantages * ratio, -ro.advantages * ratio.clamp(1 - 1e-4, 1 + 1e-4))
    assert torch.allclose(loss.detach(), policy + 0.5 * want, rtol=1e-5)
    with torch.no_grad():
        for p in params:
            p.zero_()
    assert torch.all(rl.step_loss(m, m.transformer, ro, j, cfg)[2] == 0)


def test_one_update_moves_log_probs_with_the_advantage(tiny_dir, tiny_data):
    """The PPO step raises the log-probability of every positive-advantage sample's trajectory and
    lowers every negative one's (summed over the trained steps)."""
    m, samples, cache, params = tiny_policy(tiny_dir, tiny_data)
    cfg = rl.Config(resolution=64, steps=6, group_size=8, lr=1e-2)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    inputs = rl.encode_prompt(m, cache, samples[0], m.device)
    ro = rl.rollout(m, m.transformer, inputs, list(range(8)), cfg)
    ro.advantages = adv = torch.tensor([1.0, -1.0] * 4)
    ro.train_mask = torch.ones(8, dtype=torch.bool)
    stats = rl.update(m, params, opt, [ro], cfg)
    assert stats["ratio_first"] == 1.0 and stats["trained_samples"] == 8
    assert stats["optimizer_steps"] == 1  # one rollout batch: a batch is never split over optimizer steps
    with torch.no_grad():
        delta = sum(torch.log(rl.step_loss(m, m.transformer, ro, j, cfg)[1]) for j in range(cfg.steps - 1))
    assert torch.all(delta[adv > 0] > 0) and torch.all(delta[adv < 0] < 0), delta


def x0_token_errors(m, ro, cfg, sigma):
    """|x0_hat - x0|^2 per sample and token [B, L] of the model's prediction from the rollout's clean
    samples noised to `sigma` [B] with fixed noise (seed 3): what an NFT step should move."""
    t5, pooled, refs, hws = ro.inputs
    x0, b = ro.latents[-1], len(sigma)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    t = sigma.view(b, 1, 1)
    xt = (1 - t) * x0 + t * eps
    with torch.no_grad():
        v = sft.velocity(m, xt, refs.expand(b, -1, -1), sigma, t5.expand(b, -1, -1), pooled.expand(b, -1), (4, 4),
                         hws, cfg.pe, cfg.guidance)
    return ((xt - t * v - x0) ** 2).mean(dim=2)


def nft_setup(tiny_dir, tiny_data, adv):
    m, samples, cache, params = tiny_policy(tiny_dir, tiny_data)
    cfg = rl.Config(resolution=64, steps=5, group_size=len(adv), algo="nft", optimizer_steps=1)
    inputs = rl.encode_prompt(m, cache, samples[0], m.device)
    ro = rl.rollout(m, m.transformer, inputs, list(range(len(adv))), cfg, noise_level=0.0)
    ro.advantages = torch.tensor(adv)
    ro.train_mask = torch.ones(len(adv), dtype=torch.bool)
    return m, params, cfg, ro, (params, [p.detach().clone() for p in params])


def test_nft_loss_is_flat_at_the_old_copy_for_average_samples(tiny_dir, tiny_data):
    """r = 0.5 (advantage 0) and the policy equal to the old copy: the positive and negative pulls
    cancel exactly (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py lines 928-960), so such a sample
    teaches nothing; with a non-zero advantage the same point has a gradient."""
    m, params, cfg, ro, old = nft_setup(tiny_dir, tiny_data, [0.0, 0.0, 0.0])
    sig = rl.nft_timesteps(ro, cfg, 0)
    assert sig.shape == (cfg.steps, 3) and torch.all(sig > 0)
    loss, st = rl.nft_loss(m, m.transformer, ro, sig[1], 1, cfg, old, 0)
    loss.sum().backward()
    assert torch.all(st["old_deviate"] == 0)
    assert max(p.grad.abs().max().item() for p in params) < 1e-7
    for p in params:
        p.grad = None
    ro.advantages = torch.tensor([2.0, -1.0, 0.0])
    rl.nft_loss(m, m.transformer, ro, sig[1], 1, cfg, old, 0)[0].sum().backward()
    assert max(p.grad.abs().max().item() for p in params) > 1e-4
    # the window keeps the highest-noise steps only
    cfg.timestep_window, cfg.nft_steps = 2, 0
    w = rl.nft_timesteps(ro, cfg, 0)
    assert w.shape == (2, 3) and set(w.flatten().tolist()) <= set(ro.sigmas[:2].tolist())


def test_nft_update_pulls_toward_good_samples_and_away_from_bad(tiny_dir, tiny_data):
    """A few NFT steps with advantage +5 on sample 0 and -5 on sample 1 (r = 1 and 0): the policy's
    x0 prediction from the same noisy points moves toward sample 0 and away from sample 1; the old
    copy follows the policy by EMA (decay 0 here: it equals the policy afterwards)."""
    m, params, cfg, ro, old = nft_setup(tiny_dir, tiny_data, [5.0, -5.0])
    cfg.lr, cfg.nft_decay_rate = 1e-3, 0.0
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sig = torch.full((2,), float(ro.sigmas[2]))
    before = x0_token_errors(m, ro, cfg, sig).mean(dim=1)  # [B]
    for it in range(3):
        stats = rl.update_nft(m, params, opt, [ro], cfg, [[0, 1]], old, it)
    after = x0_token_errors(m, ro, cfg, sig).mean(dim=1)
    assert after[0] < before[0] and after[1] > before[1], (before, after)
    assert stats["nft_decay"] == 0 and all(torch.equal(p, o) for p, o in zip(*old))


def test_nft_training_draws_never_share_a_seed():
    """Every (iteration, draw k, sample) and the timesteps' stream get their own seed: a sum of the
    indices, as sample_seed takes, gave noise draw k of sample i + 101 the seed of draw k + 1 of sample i."""
    cfg = rl.Config(algo="nft")
    seeds = [rl.nft_seed(cfg, it, k, i) for it in range(3) for k in list(range(10)) + ["timesteps"] for i in range(512)]
    assert len(set(seeds)) == len(seeds)
    assert rl.nft_seed(cfg, 0, 0, 101) != rl.nft_seed(cfg, 0, 1, 0)
    assert rl.nft_seed(rl.Config(algo="nft", seed=1), 0, 0, 0) != rl.nft_seed(cfg, 0, 0, 0)


def test_token_advantages_follow_the_subject_boxes():
    """--subject_credit: on a 4x4 token grid of a 32 px image (8 px a token), a box over the left
    half gives its two left columns the subject's advantage, a box over half a token shares that
    token with the image's advantage by area, and a missed subject (no box) places nothing."""
    a = rl.token_advantages(0.5, [2.0, -1.0], [(0, 0, 16, 32), None], 32, 4).view(4, 4)
    assert torch.allclose(a[:, :2], torch.full((4, 2), 2.0)) and torch.allclose(a[:, 2:], torch.full((4, 2), 0.5))
    b = rl.token_advantages(1.0, [-1.0], [(24, 0, 28, 8)], 32, 4).view(4, 4)  # half of token (0, 3)
    assert b[0, 3].item() == pytest.approx(0.5 * -1.0 + 0.5 * 1.0) and torch.all(b.flatten()[:3] == 1.0)
    # two boxes over one token: the mean of their advantages, the image's gets no share
    c = rl.token_advantages(9.0, [1.0, 3.0], [(0, 0, 8, 8), (0, 0, 8, 8)], 32, 4).view(4, 4)
    assert c[0, 0].item() == pytest.approx(2.0) and c[1, 1].item() == 9.0


def test_subject_advantages_normalise_each_subject_in_its_group():
    """Each subject's similarity against the same subject in its group's other members, exactly as
    group_advantages does the reward; a NaN-scored member is left out of its group."""
    per = [[0.9, 0.1], [0.5, 0.3], [0.1, 0.5], None, [0.2, 0.2], [0.4, 0.4]]
    finite = torch.tensor([True, True, True, False, True, True])
    got = rl.subject_advantages(per, finite, 3, 5.0)
    for k in range(2):
        want = rl.group_advantages(torch.tensor([per[i][k] for i in range(3)]), torch.zeros(3, dtype=torch.long))
        assert [got[i][k] for i in range(3)] == pytest.approx(want.tolist(), abs=1e-6)
    assert got[3] is None and got[4] == pytest.approx([-1.0, -1.0], abs=1e-3) and got[5] == pytest.approx([1.0, 1.0], abs=1e-3)


def test_nft_token_advantages_equal_per_sample_when_constant_and_pull_by_region(tiny_dir, tiny_data):
    """A per-token advantage map that is constant over a sample gives exactly the per-sample loss;
    one that is +5 on the top half of sample 0's tokens and -5 on its bottom half pulls the x0
    prediction toward the sample on the top half and away from it on the bottom."""
    m, params, cfg, ro, old = nft_setup(tiny_dir, tiny_data, [2.0, -1.0])
    sig = rl.nft_timesteps(ro, cfg, 0)
    L = ro.latents.shape[2]
    old_values = [o.clone() for o in old[1]]
    with torch.no_grad():  # a policy away from the old copy, so r = 0.5 is not flat either
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    per_sample = rl.nft_loss(m, m.transformer, ro, sig[1], 1, cfg, old, 0)[0]
    ro.advantages = torch.tensor([2.0, -1.0])[:, None].expand(2, L).clone()
    per_token = rl.nft_loss(m, m.transformer, ro, sig[1], 1, cfg, old, 0)[0]
    assert torch.allclose(per_sample, per_token, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        for p, o in zip(params, old_values):
            p.copy_(o)
    ro.advantages = torch.zeros(2, L)
    ro.advantages[0, : L // 2], ro.advantages[0, L // 2:] = 5.0, -5.0
    cfg.lr, cfg.nft_decay_rate = 1e-3, 0.0
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    s = torch.full((2,), float(ro.sigmas[2]))

    def errors():  # sample 0's error on its top and bottom tokens
        e = x0_token_errors(m, ro, cfg, s)[0]
        return e[: L // 2].mean(), e[L // 2:].mean()

    before = errors()
    for it in range(3):
        rl.update_nft(m, params, opt, [ro], cfg, [[0, 1]], old, it)
    after = errors()
    assert after[0] < before[0] and after[1] > before[1], (before, after)


def test_optimizer_plan_shuffles_across_prompts():
    """Flow-GRPO (scripts/train_flux_kontext.py, `perm = torch.randperm(total_batch_size)` then the
    rebatch into num_batches_per_epoch) shuffles the samples across prompts before splitting them
    into optimizer steps; here the unit is a rollout batch (samples of one prompt share a batch), and
    the plan depends only on (seed, iteration) and the batches, never on the world size."""
    cfg = rl.Config(optimizer_steps=2, group_size=6, prompts_per_iter=4, rollout_batch=3)
    batches = rl.rollout_batches(cfg)
    assert batches == [list(range(k, k + 3)) for k in range(0, 24, 3)]
    plan = rl.optimizer_plan(batches, 3, cfg)
    assert len(plan) == 2 and sorted(sum(plan, [])) == list(range(24)) and [len(c) for c in plan] == [12, 12]
    assert plan == rl.optimizer_plan(batches, 3, cfg) and plan != rl.optimizer_plan(batches, 4, cfg)
    assert plan[0] != list(range(12))  # shuffled, not the prompts in order
    assert all(sorted(c[k: k + 3]) == c[k: k + 3] and c[k] % 3 == 0 for c in plan for k in range(0, 12, 3))
    # untrained samples leave the plan; a batch with none left is not recomputed at all
    assert rl.optimizer_plan([[0, 2], [], [7]], 0, cfg) in ([[0, 2], [7]], [[7], [0, 2]])
    assert rl.optimizer_plan([[], []], 0, cfg) == [] and rl.optimizer_plan([[5]], 0, cfg) == [[5]]
    assert rl.rollout_batches(rl.Config(group_size=6, prompts_per_iter=2, rollout_batch=4)) == \
        [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]


def run_rl(tmp, tiny_data, tiny_dir, out, *extra, nproc=1, die=None, env=None):
    base = ["--preset", "tiny", "--data", str(tiny_data), "--out", str(out), "--tiny_dir", tiny_dir,
            "--sft_lora", "none", "--n_eval", "2", "--eval_every", "0", "--measure_overhead", "false", *extra]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "rl.py"), *base]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(ROOT / "rl.py"),
               *base, "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    if die:
        env["PSR_DIE_AT"] = die  # common.maybe_die kills the run there
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)


def first_error(res):
    """A failed run's stderr, head and tail: under torchrun the failing rank's message comes first, then
    the other ranks' lost connections and the launcher's summary (CI once showed only those)."""
    return res.stderr if len(res.stderr) < 5000 else f"{res.stderr[:3000]}\n[...]\n{res.stderr[-2000:]}"


def log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def world_rl_args(root, out, *extra):
    return ["--preset", "shapes", "--model", str(root / "world" / "kontext"), "--data", str(root / "data"),
            "--out", str(out), "--sft_lora", str(root / "sft" / "lora"), "--reward", "brightness", *extra]


def held_out_rewards(root, loras, seeds, n_eval):
    """The reward of the model with `loras` fused on the last n_eval samples (those rl.py holds out),
    one mean per sampling seed, through rl.py's own held-out scoring (one noise a prompt, as the run's)."""
    cfg = common.parse_config(rl.Config, "rl", world_rl_args(root, root / "unused", "--eval_seeds", "1"))
    m = common.load_kontext(cfg.model, "cpu", torch.float32)
    for k, lora in enumerate(loras):
        common.load_lora_into(m.transformer, lora, fuse=True, name=f"l{k}")
    samples = common.load_samples(root / "data")
    cache = common.LatentCache(root / "data", samples)
    reward_fn = rl.build_reward(cfg, "cpu")
    out = []
    for seed in seeds:
        cfg.seed = seed
        out.append(float(np.mean(rl.score_held_out(m, samples[-n_eval:], cache, reward_fn, root / "data", cfg)[0]["reward"])))
    return out


def test_rl_learns_in_the_shapes_world(shapes_world, tmp_path):
    """Flow-GRPO on the world's SFT model raises the held-out reward by at least 3 times the
    seed-to-seed spread of the evaluation before any update. The reward is brightness: on the
    world's PSR mix the rise over a CI-sized run is inside the noise (see README, the shapes world).
    The run's own iteration-0 evaluation is the "before" of seed 0: it really precedes any update."""
    n_eval, seeds, iters = 16, [0, 1, 2, 3], 15
    cfg = common.parse_config(rl.Config, "rl", world_rl_args(
        shapes_world, tmp_path / "rl", "--iterations", str(iters), "--eval_every", str(iters), "--n_eval",
        str(n_eval), "--optimizer_steps", "1", "--lr", "1e-3", "--algo", "grpo", "--prompts_per_iter", "4",
        "--group_size", "6", "--eval_seeds", "1"))  # Flow-GRPO as the preset had it, whatever the preset says now
    rl.main(cfg)
    rows = log(tmp_path / "rl")
    assert [r["iter"] for r in rows] == list(range(iters + 1)) and "reward_mean" not in rows[0]
    assert all(r["ratio_first"] == 1.0 for r in rows[1:])  # the first batch of each iteration, as sampled
    before = held_out_rewards(shapes_world, [shapes_world / "sft" / "lora"], seeds, n_eval)
    assert rows[0]["eval_reward"] == pytest.approx(before[0], abs=1e-6)
    after = held_out_rewards(shapes_world, [shapes_world / "sft" / "lora", tmp_path / "rl" / "lora"], seeds, n_eval)
    rise, spread = np.mean(after) - np.mean(before), np.std(before)
    print(f"held-out reward before {before}, after {after}: rise {rise:.4f}, spread {spread:.4f}")
    assert rise > 3 * spread, (before, after)


@pytest.mark.parametrize("algo", ["grpo", "nft"])
def test_killed_run_resumes_to_same_lora(tmp_path, tiny_data, tiny_dir, algo):
    """SIGKILL at a random iteration, rerun: the same LoRA, and the log has each iteration once
    (rows past the checkpoint are dropped by "iter"; row 0 is the evaluation before any update).
    NFT's old copy is in the checkpoint too (with a decay, so it differs from the policy)."""
    args = ("--reward", "test_rl:lr_contrast", "--iterations", "4", "--prompts_per_iter", "2", "--eval_every", "2",
            "--algo", algo, "--nft_decay_rate", "0.3")
    a = run_rl(tmp_path, tiny_data, tiny_dir, tmp_path / "a", *args)
    assert a.returncode == 0, a.stderr[-2000:]
    kill_at = random.randint(1, 3)  # a random iteration after some work
    b = run_rl(tmp_path, tiny_data, tiny_dir, tmp_path / "b", *args, die=f"rl:{kill_at}")
    assert b.returncode != 0 and not (tmp_path / "b" / "lora").exists(), kill_at
    b = run_rl(tmp_path, tiny_data, tiny_dir, tmp_path / "b", *args)
    assert b.returncode == 0 and f"resumed from {tmp_path / 'b' / 'checkpoint.pt'} at iteration {kill_at}" in b.stdout, \
        b.stderr[-2000:]
    wa = load_file(tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors")
    wb = load_file(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = log(tmp_path / "b")
    assert [r["iter"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["iter"] for r in rows if "eval_reward" in r] == [0, 2, 4]
    assert rows[0]["eval_gain"] == 0 and "eval_sft" in rows[0]  # a fresh RL adapter is SFT itself
    assert all("eval_gain_se" in r and "eval_sft" not in r for r in rows[2::2])
    assert [r.get("rewards") for r in rows] == [r.get("rewards") for r in log(tmp_path / "a")]
    assert (tmp_path / "b" / "curves.png").exists()


# The multi-rank runs: G = 6, two prompts in rollout batches of 3 (partial groups), two iterations of
# 3 sampling steps, the fewest that show the second iteration's rollouts coming from the updated LoRA.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as torchrun runs each rank, so one process computes the same sums
MULTI = ("--reward", "test_rl:lr_contrast", "--iterations", "2", "--prompts_per_iter", "2", "--group_size", "6",
         "--rollout_batch", "3", "--steps", "3")


def lora_weights(out):
    return load_file(Path(out) / "lora" / "pytorch_lora_weights.safetensors")


def max_lora_diff(a, b):
    wa, wb = lora_weights(a), lora_weights(b)
    assert wa.keys() == wb.keys() and len(wa)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_data, tiny_dir):
    tmp = tmp_path_factory.mktemp("rl-one")
    res = run_rl(tmp, tiny_data, tiny_dir, tmp / "one", *MULTI, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-2000:]
    return tmp / "one"


def test_two_ranks_give_the_same_advantages_and_lora(tmp_path, tiny_data, tiny_dir, one_process):
    """Each of 2 ranks holds one prompt's two rollout batches; rewards, advantages and the final LoRA
    equal one process's. The LoRA carries the settings it is valid with."""
    two = run_rl(tmp_path, tiny_data, tiny_dir, tmp_path / "two", *MULTI, nproc=2)
    assert two.returncode == 0, first_error(two)
    a, b = log(one_process), log(tmp_path / "two")
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert len(ra["advantages"]) == 12 and ra["trained_samples"] == 12
        # the gradient sums over ranks add in another order: the last bits differ, then an image by a
        # pixel level here and there, and the advantages divide that by a small group std
        assert np.allclose(ra["rewards"], rb["rewards"], atol=1e-5)
        assert np.allclose(ra["advantages"], rb["advantages"], atol=2e-3)
    diff = max_lora_diff(one_process, tmp_path / "two")
    print(f"2 ranks vs one process: max |LoRA difference| {diff:.3g}")
    assert diff < 1e-5
    settings = common.lora_settings(tmp_path / "two" / "lora")
    assert set(settings) == set(common.MODEL_SETTINGS)
    assert {k: settings[k] for k in ("model", "pe", "guidance", "resolution")} == \
        {"model": "tiny", "pe": "frame", "guidance": 2.5, "resolution": 64}


def test_four_ranks_with_a_nan_sample_equal_one_process(tmp_path, tiny_data, tiny_dir, one_process):
    """4 gloo ranks, G = 6 (not divisible by 4: each rank samples half a group), one sample scored
    NaN in the first iteration: the same rewards, advantages, trained-sample count and, after two
    iterations, the same LoRA as one process. The NaN sample is picked by its image (its reward is
    the iteration's lowest in the NaN-free run), so it is the same sample whatever the split."""
    low = sorted(log(one_process)[0]["rewards"])[:2]
    env = {"PSR_TEST_NAN_BELOW": str((low[0] + low[1]) / 2)}
    args = [*MULTI]
    args[1] = "test_rl:nan_below"
    one = run_rl(tmp_path, tiny_data, tiny_dir, tmp_path / "one", *args, env={**env, **ONE_THREAD})
    assert one.returncode == 0, one.stderr[-2000:]
    four = run_rl(tmp_path, tiny_data, tiny_dir, tmp_path / "four", *args, nproc=4, env=env)
    assert four.returncode == 0, first_error(four)
    a, b = log(tmp_path / "one"), log(tmp_path / "four")
    assert a[0]["nan_rewards"] == 1 and a[0]["trained_samples"] == 11
    k = a[0]["rewards"].index(None)
    assert a[0]["advantages"][k] == 0 and "scored NaN and were excluded" in four.stdout
    for ra, rb in zip(a, b):
        assert [r is None for r in ra["rewards"]] == [r is None for r in rb["rewards"]]
        assert ra["trained_samples"] == rb["trained_samples"] and ra["optimizer_steps"] == rb["optimizer_steps"]
        assert np.allclose([r or 0 for r in ra["rewards"]], [r or 0 for r in rb["rewards"]], atol=1e-5)
        assert np.allclose(ra["advantages"], rb["advantages"], atol=2e-3)
    diff = max_lora_diff(tmp_path / "one", tmp_path / "four")
    print(f"4 ranks vs one process, one NaN sample: max |LoRA difference| {diff:.3g}")
    assert diff < 1e-5
    assert max_lora_diff(tmp_path / "one", one_process) > 1e-4  # the excluded sample changed the update


def test_nan_reward_sample_is_reported_not_trained(tmp_path, tiny_data, tiny_dir):
    res = run_rl(tmp_path, tiny_data, tiny_dir, tmp_path / "n", "--reward", "test_rl:nan_for_first",
                 "--iterations", "1", "--prompts_per_iter", "2", "--group_size", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    row = log(tmp_path / "n")[0]
    assert row["nan_rewards"] == 2  # the first image of each prompt's batch
    assert "scored NaN and were excluded" in res.stdout
    assert row["rewards"][0] is None and row["advantages"][0] == 0
    assert row["trained_samples"] <= 6


def test_sft_lora_settings_are_adopted_and_a_contradiction_refused(tmp_path, tiny_data, tiny_dir, monkeypatch):
    """An SFT LoRA trained with `--pe h`: rl.py takes pe=h from its config.json, and an explicit
    `--pe frame` is refused with a message naming both (before any model is loaded)."""
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    save_file({"unused": torch.zeros(1)}, str(sft_dir / "pytorch_lora_weights.safetensors"))  # a readable file
    (sft_dir / "config.json").write_text(json.dumps({"settings": {"pe": "h", "guidance": 2.5, "resolution": 64}}))
    base = ["--preset", "tiny", "--data", str(tiny_data), "--tiny_dir", tiny_dir, "--sft_lora", str(sft_dir),
            "--out", str(tmp_path / "rl")]
    cfg = common.parse_config(rl.Config, "rl", base + ["--pe", "frame"])
    with pytest.raises(SystemExit, match=r"--pe 'frame' contradicts pe='h'"):
        rl.main(cfg)

    class Loaded(Exception):
        pass

    def stop(*_, **__):
        raise Loaded

    monkeypatch.setattr(common, "load_kontext", stop)
    cfg = common.parse_config(rl.Config, "rl", base)
    with pytest.raises(Loaded):
        rl.main(cfg)
    assert cfg.pe == "h"


def test_curves_png_draws_rewards_gain_band_and_cosine(tmp_path):
    rows = [{"iter": 0, "eval_reward": 0.2, "eval_sft_reward": 0.2, "eval_gain": 0.0, "eval_gain_se": 0.0}] + \
        [{"iter": i, "reward_mean": 0.1 + 0.02 * i, "reward_std": 0.03, "grad_cos": 0.1 * i} for i in range(1, 6)] + \
        [{"iter": 5, "reward_mean": 0.2, "reward_std": 0.03, "eval_reward": 0.3, "eval_sft_reward": 0.2,
          "eval_gain": 0.1, "eval_gain_se": 0.02, "grad_cos": None}]
    rl.draw_curves(rows, tmp_path / "c.png")
    a = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    third = a.shape[1] // 3
    colours = [{tuple(c) for c in a[:, k * third:(k + 1) * third].reshape(-1, 3)} for k in range(3)]
    train, held, sft_col = common.CHART_COLORS[:3]
    assert {train, held, sft_col, common.band_color(train)} <= colours[0]
    assert {train, common.band_color(train)} <= colours[1]  # the paired gain, with its +-SE band
    assert train in colours[2] and common.band_color(train) not in colours[2]  # the cosine, no band
    rl.draw_curves([], tmp_path / "empty.png")  # a fresh run's first checkpoint has no eval yet


def test_paired_gain_and_its_standard_error():
    """Seeds of one prompt are averaged before the SE: the prompt is the unit of the SE."""
    base = np.array([0.5, 0.5, 0.2, 0.2, 0.9, 0.9])  # 3 prompts x 2 seeds
    d = np.array([0.1, 0.3, 0.0, 0.0, -0.1, 0.1])
    gain, se = rl.paired_gain(base + d, base, 3)
    per_prompt = np.array([0.2, 0.0, 0.0])
    assert gain == pytest.approx(d.mean()) and se == pytest.approx(per_prompt.std(ddof=1) / math.sqrt(3))
    gain, se = rl.paired_gain([1.0, float("nan"), 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], 2)  # a NaN pair is left out
    assert gain == pytest.approx(1.0) and se == 0.0
    assert math.isnan(rl.paired_gain([1.0], [0.0], 1)[1])


def test_paired_eval_shares_prompts_and_noise_with_sft(tiny_dir, tiny_data):
    """evaluate() scores SFT (the RL adapter off) and the policy on the same initial noise: with the
    adapter at zero (a fresh RL LoRA) the gain is exactly 0 image by image; with a trained adapter it
    is not, the SFT scores passed back in give the same answer as recomputing them, and the SFT
    scores are those of the model without the adapter."""
    m, samples, cache, params = tiny_policy(tiny_dir, tiny_data)
    cfg = rl.Config(resolution=64, steps=4, eval_seeds=2)
    held = samples[-3:]
    row = rl.evaluate(m, held, cache, lr_contrast, tiny_data, cfg)
    assert row["eval_images"] == 6 and len(row["eval_sft"]["reward"]) == 6 and row["eval_gain"] != 0
    again = rl.evaluate(m, held, cache, lr_contrast, tiny_data, cfg, sft_scores=row["eval_sft"])
    assert "eval_sft" not in again and again["eval_gain"] == row["eval_gain"]
    assert again["eval_gain_se"] == row["eval_gain_se"] > 0
    m.transformer.disable_adapters()
    plain = rl.score_held_out(m, held, cache, lr_contrast, tiny_data, cfg)[0]["reward"]
    m.transformer.enable_adapters()
    assert np.allclose(plain, row["eval_sft"]["reward"], atol=1e-6)
    seeds = [rl.eval_seeds(cfg, k) for k in range(3)]
    assert len({s for ss in seeds for s in ss}) == 6  # every image its own noise
    with torch.no_grad():
        for p in params:
            p.zero_()
    zero = rl.evaluate(m, held, cache, lr_contrast, tiny_data, cfg)
    assert zero["eval_gain"] == 0 and zero["eval_gain_se"] == 0 and zero["eval_reward"] == zero["eval_sft_reward"]


def test_gradient_cosines_read_the_gradients(tiny_dir, tiny_data):
    """Two rollout batches of the same samples, with equal or with negated advantages. One optimizer
    step: its two halves (one batch each, the same parameters) agree (grad_cos 1) or oppose (-1).
    Two optimizer steps (lr tiny): the consecutive steps' gradients do the same (grad_cos_steps)."""
    m, samples, cache, params = tiny_policy(tiny_dir, tiny_data)
    inputs = rl.encode_prompt(m, cache, samples[0], m.device)

    def two_batches(cfg, sign):
        a = rl.rollout(m, m.transformer, inputs, [1, 2, 3, 4], cfg, ids=[0, 1, 2, 3])
        b = rl.rollout(m, m.transformer, inputs, [1, 2, 3, 4], cfg, ids=[4, 5, 6, 7])
        a.advantages, b.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5]), sign * torch.tensor([1.0, -1.0, 0.5, -0.5])
        a.train_mask = b.train_mask = torch.ones(4, dtype=torch.bool)
        return [a, b]

    for sign in (1.0, -1.0):
        cfg = rl.Config(resolution=64, steps=4, group_size=4, lr=1e-9, optimizer_steps=1)
        stats = rl.update(m, params, torch.optim.AdamW(params, lr=cfg.lr), two_batches(cfg, sign), cfg)
        assert stats["optimizer_steps"] == 1 and stats["grad_cos_steps"] is None and stats["grad_norm"] > 0
        assert stats["grad_cos"] == pytest.approx(sign, abs=1e-5), stats
        cfg.optimizer_steps = 2
        stats = rl.update(m, params, torch.optim.AdamW(params, lr=cfg.lr), two_batches(cfg, sign), cfg)
        assert stats["optimizer_steps"] == 2 and stats["grad_cos"] is None  # one batch a step: no halves
        assert stats["grad_cos_steps"] == pytest.approx(sign, abs=1e-3), stats


def test_missing_sft_lora_names_the_stage(tmp_path, tiny_data, tiny_dir):
    res = run_rl(tmp_path, tiny_data, tiny_dir, tmp_path / "x", "--sft_lora", str(tmp_path / "nope"))
    assert res.returncode != 0 and "run `python sft.py --preset tiny` first" in res.stderr
