"""
tiny.py - seeded, randomly initialized models of the real classes, small enough for a CPU.

No machine here can download weights, so the tests and the `tiny` presets run the real loading code
on these: each builder makes a model of the very class the real checkpoint uses (FluxTransformer2DModel,
AutoencoderKL, CLIP, T5, Grounding DINO, DINO ViT, Qwen2.5-VL, HPSv3's Qwen2-VL, a Qwen2 LLM), saves
it with `save_pretrained` and the stages load it back with `from_pretrained`. Tokenizers are trained
locally with the `tokenizers` library. The weights are random, so their pictures are noise: the
shapes world (world.py) trains small models of the same classes that do learn.

Every stage names a tiny model by the string "tiny" in its model knob; `tiny_path(kind, tiny_dir)`
builds it once (rank 0, atomically) and returns its folder.
"""

import json
import re
from pathlib import Path

import torch

from common import ensure_tiny_model


def tiny_path(name, tiny_dir):
    """The folder of tiny model `name`, built on first use."""
    builders = {"kontext": lambda d: save_components(tiny_kontext_components(), d, "FluxKontextPipeline"),
                "detector": tiny_grounding_dino, "dino": tiny_dino, "judge": tiny_qwen_vl, "hpsv3": tiny_hpsv3,
                "clip": tiny_clip, "llm": tiny_llm}
    return str(ensure_tiny_model(tiny_dir, name, builders[name]))


# ----------------------------------------------------------------------------------------------
# FLUX.1 Kontext: transformer, VAE, CLIP and T5 text encoders, one shared BPE tokenizer.

TINY_WORDS = (
    "a an the and of with on in at to left right above below under top next near side behind front "
    "place put show make scene picture photo image background wearing holding sitting standing "
    "red green blue yellow purple orange white black pink brown gray striped dotted checkered plain "
    "circle square triangle star diamond hexagon cross ring dog cat hat scarf chef table chair "
    "is are it its their them together beside between small large big bright dark new other alone"
)


def build_tiny_tokenizer(max_len, words=TINY_WORDS):
    """A small BPE tokenizer trained locally with the `tokenizers` library (no download); `words` are
    the corpus, so each of them ends up one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    corpus = words.split() + [words] * 4 + list("abcdefghijklmnopqrstuvwxyz0123456789.,")
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=max_len)


def tiny_kontext_components(seed=0):
    """Seeded random models of the real classes, small enough for CPU (head dim 64 as the kernels want)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = build_tiny_tokenizer(16)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=32,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return dict(transformer=transformer, vae=vae, text_encoder=clip, tokenizer=tok,
                text_encoder_2=t5, tokenizer_2=tok, scheduler=scheduler)


def save_components(components, folder, pipeline_class):
    """Writes a diffusers pipeline folder (model_index.json plus one subfolder per component)."""
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.0"}
    for name, module in components.items():
        module.save_pretrained(Path(folder) / name)
        lib = "diffusers" if type(module).__module__.startswith("diffusers") else "transformers"
        index[name] = [lib, type(module).__name__]
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=1))


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


def tiny_hpsv3(folder, seed=1):
    """A tiny Qwen2-VL backbone folder plus HPSv3.safetensors: backbone, resized embeddings and rm_head."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tiny_qwen_vl(folder / "base", kind="qwen2_vl", seed=seed)
    from rewards import build_hps_model

    model, head, tok = build_hps_model(str(folder / "base"), "cpu", torch.float32)
    torch.manual_seed(seed)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    state = {**{k: v.contiguous() for k, v in model.state_dict().items()},
             **{f"rm_head.{k}": v for k, v in head.state_dict().items()}}
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
