"""
tiny.py - seeded, randomly initialized models of the real classes, small enough for a CPU.

No machine here can download weights, so the tests and the `tiny` presets run the real loading code
on these: each builder makes a model of the very class the real checkpoint uses (FluxTransformer2DModel,
AutoencoderKL, CLIP, T5, Grounding DINO, DINO ViT, Qwen2.5-VL, HPSv3's Qwen2-VL, a Qwen2 LLM), saves
it with `save_pretrained` and the stages load it back with `from_pretrained`. Tokenizers are trained
locally with the `tokenizers` library. The weights are random, so their pictures are noise: the
shapes world (world/, `python -m world`) trains small models of the same classes that do learn.

Every stage names a tiny model by the string "tiny" in its model knob; `tiny_path(kind, tiny_dir)`
builds it once (rank 0, atomically) and returns its folder. The tiny Kontext itself is built in
common.py beside load_kontext (the loader resolves "tiny" without importing this file); tiny.py
imports only common.py, and each checkpoint here is written from its published format, not with
the stages' loaders, so that loading it tests those loaders.
"""

import re
from pathlib import Path

import torch

from common import build_tiny_kontext, build_tiny_tokenizer, ensure_tiny_model


def tiny_path(name, tiny_dir):
    """The folder of tiny model `name`, built on first use."""
    builders = {"kontext": build_tiny_kontext, "detector": tiny_grounding_dino, "dino": tiny_dino,
                "judge": tiny_qwen_vl, "hpsv3": tiny_hpsv3, "clip": tiny_clip, "llm": tiny_llm}
    return str(ensure_tiny_model(tiny_dir, name, builders[name]))


# ----------------------------------------------------------------------------------------------
# Reward models: Grounding DINO, DINO ViT, the Qwen2.5-VL judge, HPSv3, CLIP (DreamBench).

TINY_CATEGORY_WORDS = ["circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "ring",
                       "dog", "cat", "hat", "scarf", "person", "cup", "chair", "bottle", "car", "bird"]


def tiny_grounding_dino(folder, seed=0):
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    torch.manual_seed(seed)
    words = sorted(set(re.findall(r"[a-z]+", " ".join(TINY_CATEGORY_WORDS))))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + words
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    backbone = SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64,
                          out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    cfg = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, num_queries=20,
                              encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                              encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=3,
                              encoder_n_points=2, decoder_n_points=2, max_text_len=64)
    GroundingDinoForObjectDetection(cfg).save_pretrained(folder)
    GroundingDinoProcessor(GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
                           tok).save_pretrained(folder)


def tiny_dino(folder, seed=0):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(folder)


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]


QWEN_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
             "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
             "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen_vl(folder, kind="qwen2_5_vl", seed=0):
    """A tiny Qwen2.5-VL (judge) or Qwen2-VL (HPSv3 backbone), with a locally trained BPE tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor)

    torch.manual_seed(seed)
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["[Thought]: [Score]: 0 1 2 3 4 5 6 7 8 9 10 . the image follows instruction score rate overall "
              "picture attributes action background subjects good bad END"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=QWEN_SPECIAL))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=QWEN_CHAT)
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIAL}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if kind == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=32, out_hidden_size=32, intermediate_size=32, num_heads=2,
                      fullatt_block_indexes=[0], window_size=56)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special))
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **special))
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(folder)


HPS_TINY_PROMPT = (
    '# Prompt constants for the tiny HPSv3 stand-in (the real ones are read from the hpsv3 package).\n'
    'INSTRUCTION = "rate the picture for {text_prompt} ."\n'
    'prompt_with_special_token = " overall score <|Reward|> END"\n')


HPS_REWARD_TOKEN = "<|Reward|>"  # the token HPSv3 reads its score at (rewards.REWARD_TOKEN)


def tiny_hpsv3(folder, seed=1):
    """HPSv3's layout in tiny: a Qwen2-VL backbone folder (base/) and HPSv3.safetensors holding a
    Qwen2-VL with the reward token added (embeddings resized) plus rm_head, the MLP
    hidden -> 1024 -> 16 -> 2 (keys rm_head.0, .3, .5), whose weights are drawn at std 0.5 so that
    scores differ between images."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLForConditionalGeneration

    folder = Path(folder)
    tiny_qwen_vl(folder / "base", kind="qwen2_vl", seed=seed)
    tok = AutoTokenizer.from_pretrained(folder / "base")
    tok.add_special_tokens({"additional_special_tokens": [HPS_REWARD_TOKEN]})
    config = AutoConfig.from_pretrained(folder / "base")
    model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    torch.manual_seed(seed)
    hidden, head = config.text_config.hidden_size, {}
    for k, (n_out, n_in) in ((0, (1024, hidden)), (3, (16, 1024)), (5, (2, 16))):
        head[f"rm_head.{k}.weight"] = torch.empty(n_out, n_in).normal_(0.0, 0.5)
        head[f"rm_head.{k}.bias"] = torch.empty(n_out).normal_(0.0, 0.5)
    state = {**{k: v.contiguous() for k, v in model.state_dict().items()}, **head}
    save_file(state, str(folder / "HPSv3.safetensors"))
    (folder / "hps_prompt.py").write_text(HPS_TINY_PROMPT)


def tiny_clip(folder, seed=0):
    """A tiny CLIPModel (bench.py's DreamBench CLIP-I / CLIP-T) with its processor's two parts."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tok = build_tiny_tokenizer(16)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


# ----------------------------------------------------------------------------------------------
# make_data.py's local LLM backend.

def tiny_llm(folder, seed=0):
    """A tiny random Qwen2 causal LM with the tiny Qwen tokenizer: the local LLM backend's stand-in."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tiny_path("judge", Path(folder).parent))
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
