"""
What the real recipe costs on one GPU: the full-size FLUX.1 Kontext transformer (19 double and 38
single blocks, 3072 wide, 24 heads of 128) with random weights, built on the GPU in bf16 (sft.py's
random_kontext), and random text embeddings of T5 / CLIP shape. Phases:

  sft-N   one SFT step at 512px with N = 2, 3, 4 references (LoRA rank 512, gradient checkpointing)
  rl      one RL iteration: one prompt, group 6, 28 SDE steps with log-prob tracking, then the
          update on every step but the last (LoRA rank 64)
  rewards the reward models at real size with random weights (DINO ViT-S/16, Grounding DINO tiny,
          HPSv3 on Qwen2-VL-7B, the Qwen2.5-VL-7B judge in-process and through the HTTP client RL
          uses for a served judge), timed separately on the 6 images

each with the torch and the triton attention where asked. Prints seconds, peak GPU memory and
throughput per phase and writes them to a JSON as it goes, so a cut-off run still reports.
`--report DIR` gathers kernels/gpu_check.sh's parts into its one JSON, with the GPU-hours of the
paper's recipe (350K SFT samples, configs/kontext.json's RL iterations) worked out from the rows.

    python kernels/profile_kontext.py --out prof.json                  # GPU, full size
    python kernels/profile_kontext.py --small --device cpu --out p.json  # CPU, same code, narrow and shallow
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import rl  # noqa: E402
import sft  # noqa: E402


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device):
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.device(device).type == "cuda" else None


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


def reward_architectures(small):
    """Configs of the reward models at their real sizes: Grounding DINO tiny (Swin-T + BERT-base,
    transformers' defaults), DINO ViT-S/16, Qwen2.5-VL-7B (the judge) and Qwen2-VL-7B (HPSv3's
    backbone). small: the same classes narrow and shallow, so that this path runs on a CPU."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig, ViTConfig

    if not small:
        text7b = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        return dict(vit=ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                                  patch_size=16, image_size=224),
                    gdino=GroundingDinoConfig(), det_size={"shortest_edge": 800, "longest_edge": 1333},
                    text=text7b, judge_vision=dict(depth=32, hidden_size=1280, out_hidden_size=3584,
                                                   intermediate_size=3420, num_heads=16, window_size=112,
                                                   fullatt_block_indexes=[7, 15, 23, 31]),
                    hps_vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16),
                    judge_pixels=(256 * 28 * 28, 512 * 512), hps_pixels=256 * 28 * 28, judge_tokens=64)
    text = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    swin = SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64,
                      out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4])
    return dict(vit=ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              patch_size=16, image_size=224),
                gdino=GroundingDinoConfig(backbone_config=swin, text_config=BertConfig(
                    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
                    d_model=32, num_queries=20, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
                    decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=3,
                    encoder_n_points=2, decoder_n_points=2),
                det_size={"shortest_edge": 64, "longest_edge": 64}, text=text,
                judge_vision=dict(depth=1, hidden_size=32, out_hidden_size=32, intermediate_size=32, num_heads=2,
                                  window_size=56, fullatt_block_indexes=[0]),
                hps_vision=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
                judge_pixels=(56 * 56, 112 * 112), hps_pixels=56 * 56, judge_tokens=4)


def random_reward_models(device, small):
    """The reward models (rewards.py's classes) around random weights of reward_architectures' sizes,
    built on `device` (bf16 on a GPU); tokenizers and processors come from the tiny models' folders."""
    import rewards
    import tiny
    from transformers import (AutoImageProcessor, AutoTokenizer, GroundingDinoForObjectDetection,
                              Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, ViTModel)

    arch = reward_architectures(small)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    tiny_vl = tiny.tiny_path("judge", "tiny-models")  # tokenizer and chat template only
    tok = AutoTokenizer.from_pretrained(tiny_vl)
    ids = {s: tok.convert_tokens_to_ids(s) for s in tiny.QWEN_SPECIAL}
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = dict(arch["text"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init directly in dtype on the device: seconds even at 7B
    try:
        with torch.device(device):
            vit = ViTModel(arch["vit"], add_pooling_layer=False)
            gd = GroundingDinoForObjectDetection(arch["gdino"])
            judge_model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
                text_config=text, vision_config=arch["judge_vision"], **special))
            hps_model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
                text_config=text, vision_config=arch["hps_vision"], **special))
            head = rewards.hps_head(text["hidden_size"]).float()
    finally:
        torch.set_default_dtype(old)
    detector = rewards.Detector.__new__(rewards.Detector)
    det_proc = rewards.Detector("tiny", "cpu", tiny_dir="tiny-models").processor
    det_proc.image_processor.size = arch["det_size"]
    detector.__dict__.update(program=None, processor=det_proc, model=gd.eval(), device=device, box_threshold=0.35,
                             text_threshold=0.25)
    embed = rewards.DinoEmbedder.__new__(rewards.DinoEmbedder)
    embed.__dict__.update(model=vit.eval(), device=device, fast=torch.device(device).type == "cuda")
    judge = rewards.LocalJudge.__new__(rewards.LocalJudge)
    lo, hi = arch["judge_pixels"]
    judge.__dict__.update(program=None, tok=tok, ip=AutoImageProcessor.from_pretrained(tiny_vl, min_pixels=lo,
                                                                                      max_pixels=hi),
                          model=judge_model.eval(), device=device, max_tokens=arch["judge_tokens"],
                          temperature=0.2, seed=0)
    judge_model.generation_config.pad_token_id = ids["<|endoftext|>"]
    hps = rewards.HPSv3.__new__(rewards.HPSv3)
    hps_tok = AutoTokenizer.from_pretrained(tiny_vl)
    hps_tok.add_special_tokens({"additional_special_tokens": [rewards.REWARD_TOKEN]})
    prompt_file = Path(tiny.tiny_path("hpsv3", "tiny-models")) / "hps_prompt.py"
    px = arch["hps_pixels"]
    hps.__dict__.update(model=hps_model.eval(), head=head.eval(), tok=hps_tok, device=device,
                        ip=AutoImageProcessor.from_pretrained(tiny_vl, min_pixels=px, max_pixels=px),
                        reward_id=hps_tok.convert_tokens_to_ids(rewards.REWARD_TOKEN),
                        prompt=rewards.read_hps_prompt(str(prompt_file)))
    return rewards.RewardMix(detector, embed, judge, hps, concurrent=False)


def judge_server(judge):
    """An OpenAI-compatible /chat/completions on localhost that answers with `judge` (one request at a
    time; None: a fixed answer at once). rewards.EndpointJudge, the RL trainer's client, talks to it
    as it would to a vLLM server: PNG and base64 encoding, HTTP, parsing, all timed."""
    import base64
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = body["messages"][0]["content"]
            prompt = next(c["text"] for c in content if c["type"] == "text")
            url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
            image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
            with lock:
                answer = "[Score]: 5" if judge is None else judge([image], [prompt], 1)[0]
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def profile_rewards(mix, images, device):
    """Seconds and peak memory of each reward term on the group's images: PSR (Grounding DINO +
    DINO), the judge in-process, the judge through its HTTP client (against judge_server, with the
    model and with a fixed answer: the client's own cost), HPSv3."""
    from world.scenes import draw_reference

    import random

    import rewards

    subjects = [{"shape": "star", "color": "red", "texture": "striped", "phase": 0},
                {"shape": "circle", "color": "blue", "texture": "dotted", "phase": 1}]
    refs = [draw_reference(s, images[0].size[0], random.Random(k)) for k, s in enumerate(subjects)]
    n = len(images)
    instr, subsets = ["the star and the circle"] * n, ["attribute"] * n
    servers = {"model": judge_server(mix.judge), "fixed": judge_server(None)}
    client = {k: rewards.EndpointJudge(f"http://127.0.0.1:{s.server_address[1]}/v1", "judge", max_tokens=64)
              for k, s in servers.items()}
    out = {"phase": "rewards", "images": n, "judge_max_tokens": mix.judge.max_tokens}
    try:
        for name, fn in (("psr", lambda: rewards.psr_reward(images, [refs] * n, [["star", "circle"]] * n,
                                                             mix.detector, mix.embed)),
                         ("judge_local", lambda: rewards.judge_scores(mix.judge, images, instr, subsets)),
                         ("judge_client", lambda: rewards.judge_scores(client["model"], images, instr, subsets)),
                         ("judge_client_overhead", lambda: rewards.judge_scores(client["fixed"], images, instr,
                                                                                subsets)),
                         ("hps", lambda: mix.hps(images, instr))):
            fn()  # warm-up
            reset_peak(device)
            sync(device)
            t0 = time.time()
            fn()
            sync(device)
            out[f"{name}_s"] = time.time() - t0
            out[f"{name}_peak_gb"] = peak_gb(device)
    finally:
        for s in servers.values():
            s.shutdown()
    return out


# ----------------------------------------------------------------------------------------------
# The GPU-hours of the paper's recipe on this card, and the one JSON of kernels/gpu_check.sh.

def gpu_hours(rows):
    """From the measured rows: SFT = the preset's batch x steps samples (350K), each at 2/3/4
    references with sft.ref_probs, one sample costing one batch-1 step (forward, backward, optimizer;
    a batch-8 step amortizes the optimizer over 8, so this errs high); RL = iterations x
    prompts_per_iter groups, each a rollout of G images, the update and the rewards of the G images
    (the three terms run one after another here; overlapped, as RewardMix can, they cost less)."""
    c_sft = common.parse_config(sft.Config, "sft", ["--preset", "kontext"])
    c_rl = common.parse_config(rl.Config, "rl", ["--preset", "kontext"])
    samples = c_sft.batch_size * c_sft.steps
    out = {"sft": {}, "rl": {}}
    for k in sorted({r.get("kernels") for r in rows if r.get("phase", "").startswith("sft-") and "seconds" in r}):
        t = {r["phase"]: r["seconds"] for r in rows if r.get("kernels") == k and "seconds" in r}
        if all(f"sft-{n}" in t for n in (2, 3, 4)):
            terms = [(p, t[f"sft-{n}"]) for p, n in zip(c_sft.ref_probs, (2, 3, 4))]
            per = sum(p * ti for p, ti in terms)
            mix = " + ".join(f"{p} x {ti:.3f} s" for p, ti in terms)
            out["sft"][k] = {"gpu_hours": samples * per / 3600, "seconds_per_sample": per,
                             "arithmetic": f"{samples} samples ({c_sft.batch_size} x {c_sft.steps} steps) x "
                                           f"({mix}) / 3600 = {samples * per / 3600:.1f} GPU-h"}
    rl_row = next((r for r in rows if r.get("phase") == "rl" and "iteration_s" in r), None)
    rew = next((r for r in rows if r.get("phase") == "rewards" and "psr_s" in r), None)
    if rl_row:
        reward_s = rew["psr_s"] + rew["judge_client_s"] + rew["hps_s"] if rew else 0.0
        group_s = rl_row["iteration_s"] + reward_s
        groups = c_rl.iterations * c_rl.prompts_per_iter
        out["rl"] = {"kernels": rl_row["kernels"], "gpu_hours": groups * group_s / 3600, "seconds_per_group": group_s,
                     "rewards_measured": rew is not None,
                     "arithmetic": f"{c_rl.iterations} iterations x {c_rl.prompts_per_iter} prompts x "
                                   f"({rl_row['sample_s']:.1f} s rollout of {rl_row['images']} images + "
                                   f"{rl_row['update_s']:.1f} s update + {reward_s:.1f} s rewards) / 3600 = "
                                   f"{groups * group_s / 3600:.1f} GPU-h"}
    best = min((v["gpu_hours"] for v in out["sft"].values()), default=None)
    if best is not None and out["rl"]:
        out["total_gpu_hours"] = best + out["rl"]["gpu_hours"]
    return out


def junit_summary(path):
    """pytest's --junitxml file -> counts and each failure's name and first lines."""
    import xml.etree.ElementTree as ET

    if not Path(path).exists():
        return {"error": f"{path} missing (the tests did not finish)"}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failed.append({"test": case.get("name"), "message": (bad.get("message") or "")[:400]})
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {
        "seconds": float(suite.get("time", 0)), "failed": failed}


def write_report(work, out):
    """kernels/gpu_check.sh's parts (in `work`) -> one JSON: card and versions, each part's exit
    status and seconds, the kernel tests, the benchmark, the profile rows and the GPU-hours."""
    work = Path(work)
    read = lambda name: json.loads((work / name).read_text()) if (work / name).exists() else None  # noqa: E731
    profile = read("profile.json") or {"rows": []}
    report = {"card": (work / "gpu.txt").read_text() if (work / "gpu.txt").exists() else None,
              "parts": [json.loads(line) for line in (work / "parts.jsonl").read_text().splitlines()]
              if (work / "parts.jsonl").exists() else [],
              "tests": {k: junit_summary(work / f"tests_{k}.xml") for k in ("interp", "cuda")
                        if (work / f"tests_{k}.xml").exists()} or {"error": "no test results (see the log)"},
              "bench": read("bench.json"), "profile": profile["rows"], "gpu_hours": gpu_hours(profile["rows"])}
    tmp = Path(str(out) + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    return report


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
    ap.add_argument("--rl-kernels", default="torch", help="attention for the RL iteration")
    ap.add_argument("--update-steps", type=int, default=0, help="time the update on this many steps and scale")
    ap.add_argument("--grad-ckpt", type=int, default=1)
    ap.add_argument("--report", default="", help="folder of gpu_check.sh's parts: write their one JSON to --out")
    args = ap.parse_args()
    if args.report:
        gh = write_report(args.report, args.out)["gpu_hours"]
        print(json.dumps(gh, indent=1))
        return
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
