"""
What the real recipe costs on one GPU: the full-size FLUX.1 Kontext transformer (19 double and 38
single blocks, 3072 wide, 24 heads of 128) with random weights, built on the GPU in bf16 (sft.py's
random_kontext), and random text embeddings of T5 / CLIP shape. Phases:

  sft-N   one SFT step at 512px with N = 2, 3, 4 references (LoRA rank 512, gradient checkpointing)
  rl      one RL iteration: one prompt, group 6, 28 SDE steps with log-prob tracking, then the
          update on every step but the last (LoRA rank 64)
  rewards the reward models at real size with random weights (DINO ViT-S/16, Grounding DINO tiny,
          HPSv3 on Qwen2-VL-7B, the Qwen2.5-VL-7B judge), timed separately on the 6 images

each with the torch and the triton attention where asked. Prints seconds, peak GPU memory and
throughput per phase and writes them to a JSON as it goes, so a cut-off run still reports.

    python kernels/profile_kontext.py --out prof.json                  # GPU, full size
    python kernels/profile_kontext.py --small --device cpu --out p.json  # CPU, narrow and shallow
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rl  # noqa: E402
import sft  # noqa: E402
import common


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device):
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.device(device).type == "cuda" else float("nan")


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def text_inputs(m, b, device, text_len):
    g = torch.Generator().manual_seed(0)
    dim = m.transformer.config.joint_attention_dim
    pooled = m.transformer.config.pooled_projection_dim
    return (torch.randn(b, text_len, dim, generator=g).to(device, m.dtype),
            torch.randn(b, pooled, generator=g).to(device, m.dtype))


def profile_sft(m, n_refs, res, args, kernels):
    sft.use_kernels(m.transformer, kernels)
    cfg = sft.Config(pe="frame", guidance=2.5)
    lat = res // 8
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 16, lat, lat, generator=g).to(args.device)
    noise = torch.randn(1, 16, lat, lat, generator=g).to(args.device)
    refs = [torch.randn(1, 16, lat, lat, generator=g).to(args.device) for _ in range(n_refs)]
    t5, pooled = text_inputs(m, 1, args.device, args.text_len)
    params = [p for n, p in m.transformer.named_parameters() if "lora_" in n and ".sft." in n]
    opt = torch.optim.AdamW(params, lr=1e-4)
    reset_peak(args.device)
    times = []
    for i in range(1 + args.repeats):
        sync(args.device)
        t0 = time.time()
        loss = sft.group_loss(m, m.transformer, x0, noise, torch.tensor([0.5]), refs, t5, pooled, cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        if i:  # the first step allocates optimizer state and compiles kernels
            times.append(time.time() - t0)
    del opt
    tokens = args.text_len + (lat // 2) ** 2 * (1 + n_refs)
    s = sum(times) / len(times)
    return {"phase": f"sft-{n_refs}", "kernels": kernels, "seconds": s, "peak_gb": peak_gb(args.device),
            "tokens_per_s": tokens / s, "seq_len": tokens, "loss": loss.item()}


def profile_rl(m, res, args, kernels, params, opt):
    sft.use_kernels(m.transformer, kernels)
    cfg = rl.Config(resolution=res, steps=args.rl_steps, group_size=args.group, pe="frame", guidance=2.5)
    lat = res // 8
    g = torch.Generator().manual_seed(2)
    refs = [torch.randn(1, 16, lat, lat, generator=g).to(args.device) for _ in range(2)]
    ref_tok = torch.cat([sft.pack(r) for r in refs], 1).to(m.dtype)
    t5, pooled = text_inputs(m, 1, args.device, args.text_len)
    inputs = (t5, pooled, ref_tok, [(lat // 2, lat // 2)] * 2)
    reset_peak(args.device)
    sync(args.device)
    t0 = time.time()
    ro = rl.rollout(m, m.transformer, inputs, list(range(args.group)), cfg)
    sync(args.device)
    t_sample = time.time() - t0
    mem_sample = peak_gb(args.device)
    ro.advantages = torch.randn(args.group, generator=g)
    ro.train_mask = torch.ones(args.group, dtype=torch.bool)
    update_steps = args.update_steps or args.rl_steps - 1
    cfg.steps = update_steps + 1  # update() trains on steps 0 .. cfg.steps - 2
    reset_peak(args.device)
    sync(args.device)
    t0 = time.time()
    stats = rl.update(m, params, opt, [ro], cfg)
    sync(args.device)
    t_update = time.time() - t0
    full = (args.rl_steps - 1) / update_steps
    return {"phase": "rl", "kernels": kernels, "sample_s": t_sample, "sample_peak_gb": mem_sample,
            "sample_images_per_s": args.group / t_sample, "update_s": t_update * full,
            "update_steps_timed": update_steps, "update_peak_gb": peak_gb(args.device),
            "iteration_s": t_sample + t_update * full, "ratio_first": stats["ratio_first"],
            "images": len(ro.images)}


def random_reward_models(device, small):
    """Reward models of the real sizes (or tiny ones with --small) with random weights."""
    import rewards
    from transformers import (AutoImageProcessor, AutoTokenizer, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, ViTConfig, ViTModel)

    if small:
        tiny = "tiny-models"
        mix = rewards.RewardMix(rewards.Detector("tiny", device, tiny_dir=tiny), rewards.DinoEmbedder("tiny", device, tiny),
                                rewards.LocalJudge("tiny", device, max_tokens=8, tiny_dir=tiny),
                                rewards.HPSv3("tiny", "tiny", tiny_dir=tiny, device=device))
        return mix
    dtype = torch.bfloat16
    tiny_vl = tiny.tiny_path("judge", "tiny-models")  # tokenizer and chat template only
    tok = AutoTokenizer.from_pretrained(tiny_vl)
    ids = {s: tok.convert_tokens_to_ids(s) for s in tiny.QWEN_SPECIAL}
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text7b = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, bos_token_id=ids["<|endoftext|>"],
                  eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vit = ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                     intermediate_size=1536, patch_size=16, image_size=224), add_pooling_layer=False)
            gd = GroundingDinoForObjectDetection(GroundingDinoConfig())
            judge_model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
                text_config=text7b, vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=3584,
                                                       intermediate_size=3420, num_heads=16, window_size=112,
                                                       fullatt_block_indexes=[7, 15, 23, 31]), **special))
            hps_model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
                text_config=text7b, vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16),
                **special))
            head = rewards.hps_head(3584)
    finally:
        torch.set_default_dtype(old)
    detector = rewards.Detector.__new__(rewards.Detector)
    det_proc = rewards.Detector("tiny", "cpu", tiny_dir="tiny-models").processor
    detector.__dict__.update(processor=det_proc, model=gd.eval(), device=device, box_threshold=0.35,
                             text_threshold=0.25)
    det_proc.image_processor.size = {"shortest_edge": 800, "longest_edge": 1333}
    embed = rewards.DinoEmbedder.__new__(rewards.DinoEmbedder)
    embed.__dict__.update(model=vit.eval(), device=device, fast=torch.device(device).type == "cuda")
    judge = rewards.LocalJudge.__new__(rewards.LocalJudge)
    judge.__dict__.update(tok=tok, ip=AutoImageProcessor.from_pretrained(tiny_vl, min_pixels=256 * 28 * 28,
                                                                         max_pixels=512 * 512),
                          model=judge_model.eval(), device=device, max_tokens=64)
    judge_model.generation_config.pad_token_id = ids["<|endoftext|>"]
    hps = rewards.HPSv3.__new__(rewards.HPSv3)
    hps_tok = AutoTokenizer.from_pretrained(tiny_vl)
    hps_tok.add_special_tokens({"additional_special_tokens": [rewards.REWARD_TOKEN]})
    prompt_file = Path(tiny.tiny_path("hpsv3", "tiny-models")) / "hps_prompt.py"
    hps.__dict__.update(model=hps_model.eval(), head=head.eval(), tok=hps_tok, device=device,
                        ip=AutoImageProcessor.from_pretrained(tiny_vl, min_pixels=256 * 28 * 28,
                                                              max_pixels=256 * 28 * 28),
                        reward_id=hps_tok.convert_tokens_to_ids(rewards.REWARD_TOKEN),
                        prompt=rewards.read_hps_prompt(str(prompt_file)))
    return rewards.RewardMix(detector, embed, judge, hps, concurrent=False)


def profile_rewards(mix, images, device):
    from world.scenes import draw_reference

    import random

    subjects = [{"shape": "star", "color": "red", "texture": "striped", "phase": 0},
                {"shape": "circle", "color": "blue", "texture": "dotted", "phase": 1}]
    refs = [draw_reference(s, images[0].size[0], random.Random(k)) for k, s in enumerate(subjects)]
    n = len(images)
    args = (images, [refs] * n, [["star", "circle"]] * n, ["the star and the circle"] * n, ["attribute"] * n)
    out = {"phase": "rewards", "images": n}
    import rewards

    for name, fn in (("psr", lambda: rewards.psr_reward(images, args[1], args[2], mix.detector, mix.embed)),
                     ("judge", lambda: rewards.judge_scores(mix.judge, images, args[3], args[4])),
                     ("hps", lambda: mix.hps(images, args[3]))):
        fn()  # warm-up
        reset_peak(device)
        sync(device)
        t0 = time.time()
        fn()
        sync(device)
        out[f"{name}_s"] = time.time() - t0
        out[f"{name}_peak_gb"] = peak_gb(device)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profile.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="narrow, shallow model, 128px: a CPU check of the script")
    ap.add_argument("--phases", default="sft,rl,rewards")
    ap.add_argument("--kernels", default="torch,triton", help="attention for the SFT steps")
    ap.add_argument("--sft-refs", default="2,3,4")
    ap.add_argument("--sft-rank", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rl-kernels", default="triton", help="attention for the RL iteration")
    ap.add_argument("--update-steps", type=int, default=0, help="time the update on this many steps and scale")
    ap.add_argument("--grad-ckpt", type=int, default=1)
    args = ap.parse_args()
    small = args.small
    res = 128 if small else 512
    args.text_len = 16 if small else 512
    args.group, args.rl_steps = (2, 3) if small else (6, 28)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    phases = args.phases.split(",")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": []}
    results["device"] = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"

    def record(row):
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(results, indent=1))

    common.cuda_setup()
    m = None
    if "sft" in phases or "rl" in phases:
        t0 = time.time()
        dims = dict(layers=1, single_layers=1, heads=2) if small else {}
        m = common.random_kontext(args.device, dtype, **dims)
        if args.grad_ckpt:
            m.transformer.enable_gradient_checkpointing()
        m.transformer.train()
        record({"phase": "build", "seconds": time.time() - t0, "peak_gb": peak_gb(args.device),
                "transformer_params": sum(p.numel() for p in m.transformer.parameters())})
    if "sft" in phases:  # LoRA rank 512 on the paper's targets, gradient checkpointing on
        rank_ = args.sft_rank if not small else 8
        common.add_lora(m.transformer, rank_, rank_, name="sft")
        m.transformer.set_adapter("sft")
        for n_refs in [int(n) for n in args.sft_refs.split(",")]:
            for k in [k for k in args.kernels.split(",") if k]:
                try:
                    record({**profile_sft(m, n_refs, res, args, k), "lora_rank": rank_})
                except Exception as e:  # reported; a CUDA fault ends the process, so phases run apart
                    record({"phase": f"sft-{n_refs}", "kernels": k, "error": f"{type(e).__name__}: {str(e)[:300]}",
                        "where": traceback.format_exc()[-1500:]})
                    raise
        m.transformer.delete_adapters("sft")
    if "rl" in phases:  # a fresh rank-64 LoRA (in a real run the SFT LoRA is fused into the base first)
        params = common.add_lora(m.transformer, 64 if not small else 4, 128 if not small else 8, name="rl")
        m.transformer.set_adapter("rl")
        opt = torch.optim.AdamW(params, lr=1e-5)
        try:
            record(profile_rl(m, res, args, args.rl_kernels, params, opt))
        except Exception as e:
            record({"phase": "rl", "kernels": args.rl_kernels, "error": f"{type(e).__name__}: {str(e)[:300]}",
                            "where": traceback.format_exc()[-1500:]})
            raise
    if "rewards" in phases:
        from PIL import Image

        try:
            t0 = time.time()
            mix = random_reward_models(args.device, small)
            record({"phase": "reward-build", "seconds": time.time() - t0})
            images = [Image.new("RGB", (res, res), (40 * i, 90, 160)) for i in range(args.group)]
            record(profile_rewards(mix, images, args.device))
        except Exception as e:
            record({"phase": "rewards", "error": f"{type(e).__name__}: {str(e)[:300]}",
                            "where": traceback.format_exc()[-1500:]})
            raise


if __name__ == "__main__":
    main()
