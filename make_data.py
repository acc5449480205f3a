"""
make_data.py - multi-subject training data for PSR (stage 1), in the dataset format of DESIGN 2.1.

The paper's pipeline (--source models, the default). Stage A: an LLM writes a scene prompt with n
subjects and one new-context prompt per subject; FLUX.1-dev renders the scene; Grounding DINO finds
and crops each subject; FLUX.1 Kontext re-renders each crop in its new context -> the references.
Filters drop scenes where a subject is missing, doubled or tiny, and references that drifted from
their crop (DINO). Stage B: Kontext re-edits an attribute or action for the tasks that need it, and
a VLM writes the final instruction, naming subjects by category only (the leak check: a parser of
the words bound to each subject, then a yes/no question to the VLM). The cache (VAE latents, T5/CLIP
embeddings) is then encoded so sft.py never runs the encoders; its size is printed at the start.

Ours, beyond the paper: the crop is the box clipped to the image; drops for a box outside the
image, two categories on one box, a reference unlike its crop; every knob and path is checked
before any model loads; models stay loaded across rounds where GPU memory allows.

A drawn source instead (--source package.module:function, named by a preset): a function
draw(index, seed, size, task_mix, id_offset) -> (id, task, instruction, subjects, target, refs, meta)
that needs no model. The tiny and shapes presets name the shapes world's, "world.scenes:draw_sample"
(distinct textured shapes, composed as the instruction says), so the tiny preset's pictures mean
something; this file never imports the world (common.load_named finds it by that name).

Each sample is a pure function of (seed, index): reruns skip finished ids, ranks split the ids,
and any two runs with the same seed and batch sizes write the same dataset. (Another gen_batch or
text_batch batches the kernels differently: the images agree up to rounding, not byte for byte.)

Run:
    python make_data.py --preset tiny                      # data/tiny/, the world's drawn shapes, CPU, seconds
    python make_data.py --preset tiny --preview 8          # plus preview.png, a contact sheet
    python make_data.py --preset tiny-models               # the whole model pipeline, tiny random models
    torchrun --nproc_per_node 8 make_data.py --preset kontext --llm http://llm:8000/v1 --llm_model Qwen2.5-7B-Instruct \
        --vlm http://vlm:8000/v1 --vlm_model Qwen2.5-VL-7B-Instruct
"""

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from common import (KONTEXT_ID, ROOT, TASKS, append_jsonl, barrier, build_cache, data_dir, ensure_writable,
                    image_grid, load_kontext, load_named, load_samples, maybe_die, model_dtype, open_run, parse_config,
                    print_config, rank, read_jsonl, resolve_model, run_stage, save_png, setup_dist, world,
                    write_json)
from rewards import iou


@dataclass
class Config:
    preset: str = ""
    out: str = ""                 # default data/<preset>
    source: str = "models"        # models (the paper's pipeline) | package.module:function, a drawer (see above)
    n_samples: int = 350000        # samples to make (the paper: about 350K); a resumed run makes only the missing ones
    resolution: int = 512
    task_mix: tuple = (1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5)  # weights in TASKS order
    seed: int = 0
    id_offset: int = 0            # held-out sets use another range of indices
    model: str = KONTEXT_ID       # encodes the cache (local folder, hub id, or "tiny")
    tiny_dir: str = "tiny-models"
    max_text_len: int = 512
    cache: bool = True             # encode targets, references and text into safetensors shards for sft.py/rl.py
    preview: int = 0               # write a contact sheet of this many finished samples (0: none)
    device: str = ""
    # the `models` source (DESIGN section 4)
    categories: str = "configs/objects365.txt"  # category names, one a line (Objects365 by default)
    llm: str = "template"         # template | a local instruct model (folder or hub id) | http(s)://host/v1
    llm_model: str = ""           # model name at an endpoint
    llm_key: str = ""              # API key for --llm when it is an endpoint URL
    llm_retries: int = 3          # asks per id when a reply does not parse or fails the leak check
    endpoint_retries: int = 4     # tries per request to an endpoint (exponential backoff), then the id waits for a rerun
    endpoint_backoff: float = 1.0  # seconds before the first retry, doubled each time
    vlm: str = "template"         # template | a local Qwen2.5-VL (folder or hub id) | http(s)://host/v1
    vlm_model: str = ""            # model name sent to the --vlm endpoint
    leak_question: bool = True    # ask a real VLM whether each instruction describes a subject's look (a "yes" drops it)
    t2i: str = "black-forest-labs/FLUX.1-dev"  # text-to-image model that draws each subject (folder or hub id)
    detector: str = "IDEA-Research/grounding-dino-tiny"  # open-vocabulary detector that boxes each category (folder or hub id)
    dino: str = "facebook/dino-vits16"  # DINO model of the consistency filter (folder or hub id)
    box_threshold: float = 0.35    # detector's box score threshold
    text_threshold: float = 0.25   # detector's text score threshold
    exact_once: bool = True       # drop a scene where a category is found more than once (or never), after NMS
    nms_iou: float = 0.5          # boxes of one category overlapping more than this are one object
    max_pair_iou: float = 0.7     # boxes of two categories overlapping more than this are one object: drop
    min_box_frac: float = 0.02    # smallest box area as a fraction of the image
    min_dino: float = 0.5         # smallest DINO similarity of a reference to its crop
    gen_steps: int = 28            # sampling steps of the T2I and the edit model
    t2i_guidance: float = 3.5      # T2I model's guidance
    edit_guidance: float = 2.5     # Kontext's guidance for the reference edits
    gen_batch: int = 4            # images per diffusion call (FLUX.1-dev scenes, Kontext references and edits)
    detect_batch: int = 16         # images per detector batch
    text_batch: int = 8           # prompts per local LLM/VLM generate call
    round_size: int = 256         # ids per rank per round (every phase runs over a round before the next)
    max_draws: float = 3.0        # give up after n_samples * max_draws ids (a pipeline that drops everything stops)
    keep_models: str = "auto"     # keep each phase's model loaded across rounds: yes | no | auto (yes until GPU memory runs out)


# ----------------------------------------------------------------------------------------------
# Writer: images first, then the samples.jsonl line, so a listed sample always has its files.

def ids_in(path):
    """Ids listed in a samples JSONL file (none if it does not exist yet)."""
    return {s["id"] for s in read_jsonl(path)} if Path(path).exists() else set()


def write_sample(out, sid, task, instruction, subjects, target, refs, meta, shard_file):
    rows = []
    for k, (s, im) in enumerate(zip(subjects, refs)):
        rel = f"refs/{sid}_{k}.png"
        save_png(Path(out) / rel, im)
        rows.append({"category": s["shape"] if "shape" in s else s["category"], "ref": rel})
    save_png(Path(out) / "targets" / f"{sid}.png", target)
    append_jsonl(shard_file, {"id": sid, "task": task, "instruction": instruction, "subjects": rows,
                              "target": f"targets/{sid}.png", "meta": meta})


def merge_rank_files(out):
    """Rank files -> samples.jsonl, ordered by id, each id once (a rerun may have written one twice)."""
    out = Path(out)
    rows = {}
    main = out / "samples.jsonl"
    for path in [main] + sorted(out.glob("samples.rank*.jsonl")):
        if path.exists():
            for row in read_jsonl(path):
                rows.setdefault(row["id"], row)
    ordered = sorted(rows.values(), key=lambda r: r["id"].split("-")[-1])
    from common import atomic_path

    with atomic_path(main) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    for path in out.glob("samples.rank*.jsonl"):
        path.unlink()
    return ordered


# ----------------------------------------------------------------------------------------------
# The `models` source (DESIGN 4). Sample i is a pure function of (seed, i): its task, categories and
# every noise draw come from (seed, i, purpose), so reruns and ranks agree on what it is.
# It runs in phases, one model family on the GPU at a time (see make_models at the end).

def load_categories(path):
    text, why = read_category_file(path)
    if why:
        raise SystemExit(f"[make_data] {why}")
    lines = [ln.split("#")[0].strip() for ln in text.splitlines() if not ln.startswith("#")]
    return sorted({category_name(n) for n in lines if n})


def category_name(name):
    """The detector's text for an Objects365 name: alternatives ("Cabinet/shelf") give the first,
    lowercased; a first alternative that lacks the head noun the second has ("Cutting/chopping
    Board") takes it from there: "cutting board", not "cutting"."""
    first, *rest = [part.strip() for part in name.lower().split("/")]
    if rest and len(rest[0].split()) > len(first.split()):
        first = " ".join([first] + rest[0].split()[len(first.split()):])
    return first


def draw_seed(seed, index, purpose):
    """A 63-bit seed for one random draw of sample `index` ("scene", "ref0", "edit", "llm1", ...):
    hashing keeps every (sample, purpose) pair apart, where seed + index + k collides across samples."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}/{index}/{purpose}".encode()).digest()[:8], "big") >> 1


def sample_rng(cfg, i, purpose):
    return random.Random(draw_seed(cfg.seed, i + cfg.id_offset, purpose))


EDIT_TASKS = ("attribute", "action", "complex")


def plan(cfg, i, pool):
    """Task and categories of sample i (ours: categories uniform over the pool, tasks by task_mix)."""
    rng = sample_rng(cfg, i, "plan")
    task = rng.choices(TASKS, weights=cfg.task_mix)[0]
    return task, rng.sample(pool, {"three": 3, "four": 4}.get(task, 2))


def sample_id(cfg, task, i):
    return f"{task}-{i + cfg.id_offset:07d}"


PLACES = ("a sunny park", "a kitchen counter", "a beach at sunset", "a snowy street", "a wooden table",
          "a living room", "a forest path", "a city rooftop", "a desert road", "a library shelf")
LOOKS = ("red", "blue", "green", "yellow", "striped", "spotted", "wooden", "metal", "fluffy", "shiny", "vintage",
         "small", "large", "white", "black", "golden")
# the template backend's edits: ones that make sense for any object, since a template cannot know
# what suits a subject (the LLM backend is asked for one that does)
TEMPLATE_EDITS = {"attribute": ("Give the {c} a small knitted hat.", "Paint the {c} bright purple.",
                                "Wrap a striped scarf around the {c}.", "Cover the {c} in a layer of snow.",
                                "Put a pair of sunglasses on the {c}.", "Make the {c} glow with a soft light."),
                  "action": ("Tilt the {c} to one side.", "Turn the {c} upside down.", "Lay the {c} on its side.",
                             "Turn the {c} to face the camera.", "Lift the {c} into the air.",
                             "Move the {c} to the front of the scene.")}
PROMPT_REQUEST = (
    "Write prompts for a text-to-image model. Subjects: {cats}. Reply with JSON only: "
    '{{"scene": "<one photo with all subjects together, each with a distinctive appearance>", '
    '"subjects": [{{"category": "<subject>", "prompt": "<that subject alone in a different place>"}}, ...]}}')
EDIT_REQUEST = (
    "A photo shows: {scene}\nPropose one {kind} edit for one of these subjects: {cats}. Choose a subject and an "
    "edit that suit each other ({hint}). Reply with JSON only: "
    '{{"subject": "<one of the subjects>", "edit": "<an instruction to an image editor, naming the subject '
    'by its category>"{extra}}}')
EDIT_HINTS = {"attribute": "an accessory, a colour change, a change of state; something the subject can have",
              "action": "a pose or an action an animal or person can take, a movement or new placement an object "
                        "can undergo"}
INSTRUCTION_REQUEST = (
    "This image shows: {cats}. Write one instruction that asks for this image given a reference photo of each "
    "subject. {focus} Name every subject only by its category word ({cats}); never describe its colour, "
    "material, pattern or other appearance. Reply with the instruction only.")
EDIT_FOCUS = ("The image was made by this edit: \"{edit}\". The instruction must ask for that edit in its own "
              "words.")


def template_prompts(cats, rng):
    """The no-model backend: an appearance word per subject in the scene, a new place for each."""
    looks = [rng.choice(LOOKS) for _ in cats]
    place = rng.choice(PLACES)
    scene = "A photo of " + " and ".join(f"a {lk} {c}" for lk, c in zip(looks, cats)) + f" together in {place}."
    subjects = [{"category": c, "prompt": f"A photo of a {lk} {c} alone in {rng.choice([p for p in PLACES if p != place])}."}
                for lk, c in zip(looks, cats)]
    return json.dumps({"scene": scene, "subjects": subjects})


def template_edit(task, cats, rng):
    """The no-model backend's stage-B edit: a subject, an edit, and for `complex` a new background."""
    c = rng.choice(cats)
    edit = {"subject": c, "edit": rng.choice(TEMPLATE_EDITS["action" if task == "action" else "attribute"]).format(c=c)}
    if task == "complex":
        edit["background"] = rng.choice(PLACES)
    return json.dumps(edit)


def first_json(reply):
    import re

    m = re.search(r"\{.*\}", reply or "", re.S)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_prompts(reply, cats):
    """The first JSON object in the reply, with a scene and one prompt per asked category; else None."""
    obj = first_json(reply)
    subj = obj.get("subjects") if obj else None
    if not isinstance(obj.get("scene") if obj else None, str) or not isinstance(subj, list):
        return None
    by_cat = {str(s.get("category", "")).strip().lower(): s.get("prompt") for s in subj if isinstance(s, dict)}
    if any(not isinstance(by_cat.get(c), str) for c in cats):
        return None
    return {"scene": obj["scene"], "subjects": [{"category": c, "prompt": by_cat[c]} for c in cats]}


def parse_edit(reply, task, cats):
    """{"subject", "edit"(, "background")} naming one of `cats`, or None."""
    obj = first_json(reply)
    if not obj or not isinstance(obj.get("edit"), str) or not obj["edit"].strip():
        return None
    subject = str(obj.get("subject", "")).strip().lower()
    if subject not in cats:
        return None
    edit = {"subject": subject, "edit": obj["edit"].strip()}
    if task == "complex":
        if not isinstance(obj.get("background"), str) or not obj["background"].strip():
            return None
        edit["background"] = obj["background"].strip()
    return edit


def edit_request(task, scene, cats):
    extra = ', "background": "<a new setting for the whole scene>"' if task == "complex" else ""
    kind = "action" if task == "action" else "attribute"
    return EDIT_REQUEST.format(scene=scene, kind=kind, cats=", ".join(cats), hint=EDIT_HINTS[kind], extra=extra)


def editor_instruction(edit):
    """What Kontext is told: the edit, plus the new background for `complex` (the task combines both)."""
    if "background" not in edit:
        return edit["edit"]
    return f"{edit['edit'].rstrip('.')}. Change the background to {edit['background']}, keeping every subject."


class EndpointDown(RuntimeError):
    """An endpoint still failing after its retries: the id is left for the next run, not dropped."""


class TextModel:
    """An LLM (text only) or VLM (text + one image): template, local model or endpoint. Batched:
    a local model generates a padded batch, an endpoint gets concurrent requests."""

    def __init__(self, spec, kind, model_name="", key="", device="cpu", tiny_dir="tiny-models", max_tokens=256,
                 retries=3, backoff=1.0, concurrency=16):
        self.spec, self.kind, self.model_name, self.key = spec, kind, model_name, key
        self.device, self.max_tokens, self.retries, self.backoff = device, max_tokens, retries, backoff
        self.concurrency = concurrency
        if spec == "template" or spec.startswith(("http://", "https://")):
            return
        from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

        from tiny import tiny_path

        path = spec
        if spec == "tiny":
            path = tiny_path("llm" if kind == "llm" else "judge", tiny_dir)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"  # generation appends on the right
        dtype = model_dtype(device)
        if kind == "llm":
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        else:
            from transformers import Qwen2_5_VLForConditionalGeneration

            self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
            self.ip = AutoImageProcessor.from_pretrained(path)

    def is_endpoint(self):
        return self.spec.startswith(("http://", "https://"))

    def ask(self, prompt, image=None, temperature=0.7):
        from rewards import chat_endpoint

        try:
            return chat_endpoint(self.spec, self.model_name, prompt, image, self.key, temperature, self.max_tokens,
                                 retries=self.retries, backoff=self.backoff, what=f"{self.kind} endpoint")
        except RuntimeError as e:
            raise EndpointDown(str(e)) from e

    @torch.no_grad()
    def batch(self, prompts, images=None, seed=None, batch_size=8):
        """Replies, one per prompt; an endpoint's EndpointDown comes back in place of its reply.
        seed=None: greedy (a local model's first try); else sampled at temperature 0.7 from that seed,
        so a retry can give another answer."""
        images = images or [None] * len(prompts)
        if self.is_endpoint():
            import concurrent.futures as cf

            def one(p, im):
                try:
                    return self.ask(p, im)
                except EndpointDown as e:
                    return e

            with cf.ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(one, prompts, images))
        replies = []
        for j in range(0, len(prompts), batch_size):
            ps, ims = prompts[j: j + batch_size], images[j: j + batch_size]
            if self.kind == "llm":
                texts = [self.tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                      tokenize=False) for p in ps]
                enc = self.tok(texts, return_tensors="pt", padding=True).to(self.device)
            else:
                from rewards import vl_inputs

                enc = vl_inputs(self.tok, self.ip, ims, ps, self.device)
            kw = dict(do_sample=False)
            if seed is not None:
                torch.manual_seed(seed + j)
                kw = dict(do_sample=True, temperature=0.7, top_p=0.95)
            out = self.model.generate(**enc, max_new_tokens=self.max_tokens, pad_token_id=self.tok.pad_token_id, **kw)
            replies += self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return replies

    def __call__(self, prompt, image=None):
        if self.is_endpoint():
            return self.ask(prompt, image)
        return self.batch([prompt], [image])[0]


# ----------------------------------------------------------------------------------------------
# The leak check (paper: instructions name subjects by category only, so appearance must come from
# the references). Ours, in two layers.
# Lexical layer: a small parser finds the words bound to each subject: before its noun ("the fluffy
# striped cat"), and in a describing phrase after it: "with / wearing / dressed in / made of ...",
# "is / are / looks ...", an appositive (", a golden retriever,"), a relative clause (", whose fur
# is ginger", "that has golden fur"), parentheses, dashes, a possessive ("the cat's fur is ginger",
# "its coat is golden"), and later sentences about the subjects ("Both animals are fluffy."). A
# prompt's looks are the words it binds to a subject; a subject's own (reference) prompt also
# binds its opening noun phrase, which may name the subject by a narrower word ("A golden retriever
# with a red collar running ..." for the category dog).
# The instruction leaks when (a) a look word of a subject's own prompt, or a breed, stands anywhere
# in it, or (b) a lexicon word (colour, material, pattern, size, texture, clothing) or a look word of
# the scene prompt is bound to a subject. A colour of the setting ("in a green meadow", "a room with
# pastel walls") is no leak unless a subject's own prompt gave that word to the subject. Words of the
# edit itself are allowed. Only words before a subject's noun can be cut out safely ("rewritten");
# any other leak drops the instruction ("appearance_leak").
# Second layer, for a real VLM: the VLM is asked the yes/no LEAK_QUESTION; a "yes" drops the sample
# ("vlm_says_appearance"), a reply that is neither drops it as "vlm_leak_unparseable".

COLOURS = set("red orange yellow green blue purple violet pink brown black white gray grey golden gold silver beige tan "
              "ginger cream ivory maroon navy teal turquoise crimson scarlet amber bronze copper khaki olive lavender "
              "magenta cyan rainbow multicolored multicoloured colorful colourful pastel dark light bright pale "
              "blond blonde".split())
MATERIALS = set("wooden wood metal metallic steel iron plastic glass leather ceramic porcelain stone marble brass chrome "
                "rubber paper cardboard fabric wool woolen woollen knitted cotton silk velvet denim plush wicker "
                "bamboo crystal oak pine walnut".split())
PATTERNS = set("striped stripes spotted spots dotted polka checkered checked plaid tartan floral patterned tabby "
               "speckled camouflage paisley".split())
SIZES = set("small tiny little large big huge giant miniature tall short long thin slim fat chubby".split())
TEXTURES_LOOKS = set("fluffy shaggy fuzzy furry hairy curly shiny glossy matte sparkly glittery rusty dusty muddy old "
                     "vintage antique retro worn shabby polished elegant ornate fancy cute floppy pleated carved".split())
BREEDS = set("labrador poodle beagle bulldog dachshund husky corgi terrier retriever siamese persian calico "
             "shepherd collie pug dalmatian chihuahua spaniel schnauzer maine".split())
LEXICON = COLOURS | MATERIALS | PATTERNS | SIZES | TEXTURES_LOOKS | BREEDS
CLOTHING = set("sweater coat jacket hat scarf dress shirt costume uniform collar boots raincoat hoodie vest cap "
               "bow tie sunglasses glasses".split())
DETERMINERS = set("a an the this that these those its his her their our my your some two three four one".split())
# after the noun, these open a phrase that describes the subject
HAS = set("with wearing wears wear dressed covered made having has have sporting painted clad".split())
IS = set("is are was were looks look appears appear seems seem".split())
RELATIVE = set("whose which that who".split())
# words standing for subjects in a sentence of their own ("Both animals are fluffy", "its coat is gold")
SUBJECT_WORDS = set("it they both animals pets objects items subjects things".split())
POSSESSIVE_PRONOUNS = set("its their his her".split())
# words that end a phrase bound to a subject (a relation, a clause, a preposition of place, a verb)
BOUNDARY = set("and or but next beside besides near by left right above below behind front under over on at in into "
               "onto to from between while who that which where as than like facing toward towards against "
               "together alone sits sit sitting stands stand standing lies lie lying rests resting placed "
               "put show make give place let keep".split())
STOP = DETERMINERS | BOUNDARY | set("of for very also both each other same photo picture image scene".split())
# verbs that end a describing phrase too ("the dog with a ball chases a red kite"); not stop words,
# since an action edit's verb must show up in its instruction
SPAN_END = BOUNDARY | set("across along through around beneath inside outside runs run plays play chases chase "
                          "watches watch holds hold jumps jump walks walk sleeps sleep waits wait kneels kneel rest "
                          "looking".split())
PUNCT_END = set(".,;:!?)")
DASHES = {"\u2014", "\u2013", "-"}


def tokens(text):
    """(word, start, end) for each word and each punctuation mark, lowercased; "cat's" stays one word."""
    import re

    text = text.replace("\u2019", "'")
    return [(m.group(0).lower(), m.start(), m.end()) for m in re.finditer(r"[A-Za-z]+(?:[-'][A-Za-z]+)*|[^\sA-Za-z]", text)]


def is_word(w):
    return w[0].isalpha()


def possessive(w):
    """'cat's' -> 'cat', "cats'" -> 'cats', else None."""
    return w[:-2] if w.endswith("'s") else w[:-1] if w.endswith("s'") else None


def base(w):
    return possessive(w) or w


def mentions(toks, cat):
    """Token spans (first, last) where category `cat` occurs as whole words (plural and possessive allowed)."""
    parts = cat.lower().split()
    words = [base(t[0]) for t in toks]
    out = []
    for i in range(len(words) - len(parts) + 1):
        *head, last = parts
        if words[i: i + len(head)] == head and words[i + len(head)] in (last, last + "s", last + "es"):
            out.append((i, i + len(parts) - 1))
    return out


def category_words(cats):
    return {w for c in cats for p in c.lower().split() for w in (p, p + "s", p + "es")}


def phrase(words, j, cat_words, clothing_only=False):
    """Word indices of the describing phrase starting at j (after its trigger), up to the first
    boundary, punctuation or verb; "and" goes on only into another look word ("fluffy and brown").
    A phrase that reaches another subject ("with the steel knife") was that subject's: empty.
    clothing_only (after "in"): the phrase counts only if it names clothing ("in a red sweater",
    not "in a green meadow")."""
    out = []
    while j < len(words) and is_word(words[j]):
        w, prev = words[j], words[j - 1]
        nxt = words[j + 1] if j + 1 < len(words) else ""
        if base(w) in cat_words:
            return []
        if w in DETERMINERS or w in ("of", "very") or (w == "in" and prev in ("dressed", "covered", "clad")) \
                or (w in HAS and not clothing_only):
            j += 1
            continue
        if w == "and" and nxt in LEXICON:
            j += 1
            continue
        if w in SPAN_END or (w.endswith("ing") and w not in HAS):
            break
        out.append(j)
        j += 1
    if clothing_only and not any(words[k] in CLOTHING for k in out):
        return []
    return out


def enclosed(words, j, close, cat_words):
    """Word indices from j up to the closing mark (parentheses, dashes) or the end of the sentence."""
    out = []
    while j < len(words) and words[j] not in (close, ".", "!", "?"):
        if is_word(words[j]) and base(words[j]) not in cat_words:
            out.append(j)
        j += 1
    return out


def after(words, j, cat_words):
    """The describing words after a subject word that ends at token j-1 (see the section's comment)."""
    if j >= len(words):
        return []
    w = words[j]
    nxt = words[j + 1] if j + 1 < len(words) else ""
    if w == "(":
        return enclosed(words, j + 1, ")", cat_words)
    if w in DASHES and not (nxt in cat_words):
        return enclosed(words, j + 1, w, cat_words)
    if w == ",":
        if nxt in ("a", "an"):  # an appositive, up to the next comma
            return [k for k in enclosed(words, j + 2, ",", cat_words) if words[k] not in STOP]
        if nxt in RELATIVE or nxt in HAS:
            return after(words, j + 1, cat_words)
        return []
    if w == "whose":  # ", whose fur is ginger": the noun, then its predicate
        k = j + 1
        while k < len(words) and is_word(words[k]) and words[k] not in IS:
            k += 1
        return list(range(j + 1, k)) + (phrase(words, k + 1, cat_words) if k < len(words) and words[k] in IS else [])
    if w in ("which", "that", "who"):
        return after(words, j + 1, cat_words) if nxt in IS or nxt in HAS else []
    if w in IS or w in HAS:
        return phrase(words, j + 1, cat_words)
    if w == "in":
        return phrase(words, j + 1, cat_words, clothing_only=True)
    return []


def bound_words(text, cats):
    """For each subject word: (category or the word, token indices before the noun, token indices of
    the describing words after it). Subject words are the category mentions (a possessive binds its
    possessed noun phrase: "the cat's ginger fur is soft"), and words that stand for subjects in a
    sentence of their own ("it", "both animals", "its coat is golden")."""
    toks = tokens(text)
    words = [t[0] for t in toks]
    cat_words = category_words(cats)
    found = []
    anchors = [(c, first, last) for c in cats for first, last in mentions(toks, c)]
    anchors += [(w, j, j) for j, w in enumerate(words) if w in SUBJECT_WORDS or w in POSSESSIVE_PRONOUNS]
    for c, first, last in anchors:
        pre, j = [], first - 1
        if c in cats:  # adjectives before a category noun
            while j >= 0 and len(pre) < 4 and is_word(words[j]) and words[j] not in STOP \
                    and base(words[j]) not in cat_words and not words[j].endswith("ing") and not possessive(words[j]):
                pre.append(j)
                j -= 1
        post, j = [], last + 1
        if possessive(words[last]) is not None or words[last] in POSSESSIVE_PRONOUNS:
            # the possessed noun phrase ("the cat's ginger fur"), then what is said of it
            while j < len(words) and is_word(words[j]) and words[j] not in STOP and words[j] not in IS \
                    and words[j] not in HAS and base(words[j]) not in cat_words:
                post.append(j)
                j += 1
        post += after(words, j, cat_words)
        found.append((c, pre, post))
    return toks, found


def opening_phrase(text, cats):
    """The words of a subject prompt's opening noun phrase and its describing phrase: "A golden
    retriever with a red collar running across a meadow" -> golden, retriever, red, collar."""
    toks = tokens(text)
    words = [t[0] for t in toks]
    cat_words = category_words(cats)
    j = 0
    while j < len(words) and (words[j] in DETERMINERS or words[j] in ("photo", "picture", "image", "of", "close-up")
                              or not is_word(words[j])):
        j += 1
    out = []
    while j < len(words) and is_word(words[j]) and words[j] not in STOP and words[j] not in HAS \
            and not words[j].endswith("ing") and base(words[j]) not in cat_words:
        out.append(j)
        j += 1
    if j < len(words) and base(words[j]) in cat_words:
        return set()  # the category itself: bound_words reads this prompt
    return {words[k] for k in out + after(words, j, cat_words)} - STOP - HAS - IS


def appearance_words(texts, cats):
    """Words the prompts (the scene prompt and the per-subject reference prompts) bind to subjects."""
    texts = [texts] if isinstance(texts, str) else texts
    found = set()
    for text in texts:
        toks, bound = bound_words(text, cats)
        words = {toks[j][0] for _, pre, post in bound for j in pre + post}
        found |= {w for w in words if w not in STOP and w not in IS and w not in HAS}
    return found


def own_looks(subject_prompts, cats):
    """The look words that the subjects' own (reference) prompts give them: rejected anywhere."""
    found = appearance_words(subject_prompts, cats)
    for p in subject_prompts:
        found |= {w for w in opening_phrase(p, cats) if w not in STOP}
    return found - category_words(cats)


def content_words(text, cats=()):
    cat_words = {w for c in cats for w in c.lower().split()}
    return {w for w, _, _ in tokens(text) if is_word(w) and w not in STOP and w not in cat_words and len(w) > 2}


EDIT_VERBS = set("give make turn change add paint put wrap cover move lift lay tilt let".split())


def remove_tokens(text, toks, idx):
    """The text without the tokens at `idx` (and their trailing space), fixing a/an before the next word."""
    import re

    out, pos = [], 0
    for j in sorted(idx):
        out.append(text[pos: toks[j][1]])
        pos = toks[j][2]
        while pos < len(text) and text[pos] == " ":
            pos += 1
    out.append(text[pos:])
    text = "".join(out)
    text = re.sub(r"\b([Aa])n ([^aeiouAEIOU\W])", r"\1 \2", text)
    return re.sub(r"\b([Aa]) ([aeiouAEIOU])", r"\1n \2", text)


def leaking(instruction, cats, appearance, own, allowed):
    """(token indices cut out safely: looks before a subject's noun, token indices that cannot be cut)."""
    cat_words = category_words(cats)
    everywhere = (set(own) | BREEDS) - allowed - cat_words
    bound_bad = (set(appearance) | set(own) | LEXICON | CLOTHING) - allowed - cat_words
    toks, bound = bound_words(instruction, cats)

    def parts(j):  # "grey-furred" is grey as well
        w = base(toks[j][0])
        return {w, *w.split("-")}

    pre = {j for _, p, _ in bound for j in p if parts(j) & bound_bad}
    post = {j for _, _, q in bound for j in q if parts(j) & bound_bad}
    anywhere = {j for j in range(len(toks)) if parts(j) & everywhere}
    return toks, pre, (post | anywhere) - pre


def check_instruction(instruction, cats, appearance, edit_text="", own=()):
    """(instruction or None, verdict): the lexical layer (see the section's comment). `appearance`:
    look words of the scene and reference prompts (appearance_words), rejected where the instruction
    binds them to a subject; `own`: look words of the subjects' own prompts (own_looks), rejected
    anywhere. Looks before a subject's noun are removed ("rewritten"); any other leak drops
    ("appearance_leak"). Every subject must be named as a whole word, and an edited sample's
    instruction must state its edit; words of the edit itself are allowed."""
    if not instruction or not instruction.strip():
        return None, "instruction_empty"
    instruction = instruction.strip().strip('"').strip()
    allowed = content_words(edit_text, cats) if edit_text else set()
    toks, pre, rest = leaking(instruction, cats, appearance, own, allowed)
    if rest:
        return None, "appearance_leak"
    if pre:
        instruction = remove_tokens(instruction, toks, pre)
        _, pre2, rest2 = leaking(instruction, cats, appearance, own, allowed)
        if pre2 or rest2:
            return None, "appearance_leak"
    if any(not mentions(tokens(instruction), c) for c in cats):
        return None, "instruction_missing_subject"
    if edit_text and not (content_words(edit_text, cats) - EDIT_VERBS) & content_words(instruction, cats):
        return None, "instruction_missing_edit"
    return instruction, "rewritten" if pre else "ok"


LEAK_QUESTION = (
    "Subjects: {cats}. Instruction: \"{instruction}\"\nApart from naming each subject by its category, does this "
    "instruction describe how any of these subjects looks (colour, material, pattern, size, breed, clothing, "
    "texture, or any other visual detail of the subject itself)? The setting, the light, positions and actions "
    "do not count.{edit} Answer with one word: yes or no.")
LEAK_QUESTION_EDIT = " The requested edit \"{edit}\" is allowed to be described."


def leak_question(instruction, cats, edit_text=""):
    return LEAK_QUESTION.format(cats=", ".join(cats), instruction=instruction,
                                edit=LEAK_QUESTION_EDIT.format(edit=edit_text) if edit_text else "")


def parse_yes_no(reply):
    """True for yes, False for no, None for anything else (the first word decides)."""
    import re

    m = re.match(r"\W*(yes|no)\b", (reply or "").strip().lower())
    return None if not m else m.group(1) == "yes"


def relation_of(a, b):
    """Where box a sits relative to box b, in the words of the `position` task."""
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def template_instruction(task, cats, edit, boxes, scene):
    """The no-model VLM: states the edit, the relation the boxes show, or the scene's place."""
    listed = ", ".join(f"the {c}" for c in cats[:-1]) + f" and the {cats[-1]}"
    if edit:
        text = editor_instruction(edit).replace(", keeping every subject", "")
        return f"Show {listed} together. {text}"
    if task == "background":
        place = scene.split(" together in ")[-1].rstrip(".") if " together in " in scene else "a new place"
        return f"Place {listed} together in {place}."
    if task == "position":
        return f"Put the {cats[0]} {relation_of(boxes[0], boxes[1])} the {cats[1]}."
    return f"Show {listed} together in one picture."


def focus_for(task, edit):
    if edit:
        return EDIT_FOCUS.format(edit=editor_instruction(edit))
    return {"position": "Say where each subject is relative to the others.",
            "background": "Describe the setting."}.get(task, "Show the subjects together.")


# ----------------------------------------------------------------------------------------------
# Detection filters (ours, the paper gives none): non-maximum suppression first, since Grounding
# DINO often returns one object twice; then each category exactly once, its box not tiny.

def nms(found, threshold=0.5):
    """Best-first (box, score) pairs without those overlapping a better one by more than `threshold`."""
    kept = []
    for box, score in sorted(found, key=lambda bs: -bs[1]):
        if all(iou(box, k[0]) <= threshold for k in kept):
            kept.append((box, score))
    return kept


def clip_box(box, size):
    """make_data's crop: the whole pixels covering the box, clipped to the image; None when nothing of
    it is inside. (rewards.crop_box keeps the authors' numpy slicing for the benchmark's official
    mode, where a box starting 1 px left of the image counts from the far edge and the crop falls
    back to the whole scene; that scene must never become one subject's reference.)"""
    w, h = size
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def filter_boxes(det, cats, size, exact_once, min_box_frac, nms_iou=0.5, max_pair_iou=1.0):
    """One box per category (clipped to the image), or the drop reason: "crop_empty" for a box with
    nothing inside the image, "boxes_overlap" for two categories whose boxes overlap by more than
    max_pair_iou (two names found on one object: "car" and "suv", or a detector that cannot tell)."""
    boxes = []
    for c in cats:
        found = nms(det.get(c, []), nms_iou)
        if not found:
            return None, "not_found"
        if exact_once and len(found) > 1:
            return None, "found_multiple"
        box = clip_box(found[0][0], size)
        if box is None:
            return None, "crop_empty"
        if (box[2] - box[0]) * (box[3] - box[1]) < min_box_frac * size[0] * size[1]:
            return None, "box_too_small"
        boxes.append([float(v) for v in box])
    if any(iou(a, b) > max_pair_iou for k, a in enumerate(boxes) for b in boxes[k + 1:]):
        return None, "boxes_overlap"
    return boxes, "ok"


def ref_input_size(w, h, resolution):
    """(width, height) of about resolution^2 pixels at the crop's aspect ratio (clamped to 1:4..4:1),
    sides multiples of 16: Kontext takes any such size, where a square stretch distorts the subject."""
    from common import ref_size

    height, width = ref_size(min(4.0, max(0.25, w / h)), 1.0, resolution * resolution, 16)
    return width, height


def reference_input(crop_im, resolution):
    """The crop Kontext re-renders: resized, never stretched."""
    return crop_im.resize(ref_input_size(*crop_im.size, resolution), Image.BICUBIC)


# ----------------------------------------------------------------------------------------------
# Phases (ours; the paper does not say how it ran). One model family on the GPU at a time, so the
# pipeline fits one 80 GB GPU: prompts (LLM) -> scenes (FLUX.1-dev) -> detection and crops
# (Grounding DINO) -> references (Kontext, DINO filter) -> edits (Kontext, detection again) ->
# instructions (VLM). Each phase appends one row per id to work/<phase>.rank<r>.jsonl and reads
# the previous phase's rows from every rank's file, so a rerun, with any number of ranks, resumes
# where each id stopped. Ids run in rounds: a round takes the lowest ids not yet kept or dropped,
# as many as samples are still missing, so `n_samples` counts kept samples and the dataset is "the
# first n_samples ids that survive", whatever the rank count or the interruptions.

PHASES = ("prompts", "scene", "detect", "reference", "edit", "instruction")


def work(out, *parts):
    return Path(out).joinpath("work", *parts)


def scene_path(out, i):
    return work(out, "scene", f"{i}.png")


def edit_path(out, i):
    return work(out, "edit", f"{i}.png")


def ref_path(out, i, k):
    return work(out, "ref", f"{i}_{k}.png")


def phase_rows(out, phase):
    """{index: row} that any rank, in this run or an earlier one, wrote for `phase`."""
    rows = {}
    for p in sorted(work(out).glob(f"{phase}.rank*.jsonl")):
        rows.update((r["index"], r) for r in read_jsonl(p))
    return rows


def record(out, phase, row):
    append_jsonl(work(out, f"{phase}.rank{rank():03d}.jsonl"), row)


def drop(out, i, phase, reason, stats):
    """A drop is for good (a rerun skips the id): only outcomes that a rerun would repeat drop."""
    append_jsonl(Path(out) / f"drops.rank{rank():03d}.jsonl", {"index": i, "phase": phase, "reason": reason})
    stats["drops"][reason] = stats["drops"].get(reason, 0) + 1
    clean_work(out, i)


def clean_work(out, i):
    for p in [scene_path(out, i), edit_path(out, i)] + [ref_path(out, i, k) for k in range(4)]:
        p.unlink(missing_ok=True)


def dropped_indices(out):
    return {r["index"] for p in Path(out).glob("drops.rank*.jsonl") for r in read_jsonl(p)}


def kept_indices(out, cfg):
    """Indices of finished samples, from the merged file and every rank's file (ids end in it)."""
    files = [Path(out) / "samples.jsonl"] + sorted(Path(out).glob("samples.rank*.jsonl"))
    return {int(s["id"].rsplit("-", 1)[1]) - cfg.id_offset for p in files if p.exists() for s in read_jsonl(p)}


def chunks(xs, n):
    return [xs[j: j + n] for j in range(0, len(xs), max(1, n))]


def open_rgb(path):
    with Image.open(path) as im:
        return im.convert("RGB")


def release():
    """Frees what the last phase's models left on the GPU (they go out of scope when a phase returns)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(stats, phase, n, fn, *args):
    """Runs fn(*args) when there is work (n ids) or n is None, adding its wall seconds (model loading
    included), n, and its peak GPU memory to this rank's stats for `phase`."""
    t0 = time.time()
    out = fn(*args) if n or n is None else None
    stats["seconds"][phase] = stats["seconds"].get(phase, 0.0) + time.time() - t0
    stats["items"][phase] = stats["items"].get(phase, 0) + (n or 0)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        stats["peak_gb"][phase] = max(stats["peak_gb"].get(phase, 0.0), peak)
        torch.cuda.reset_peak_memory_stats()
    release()
    return out


def text_model(cfg, kind, device):
    spec, name = (cfg.llm, cfg.llm_model) if kind == "llm" else (cfg.vlm, cfg.vlm_model)
    return TextModel(spec, kind, name, cfg.llm_key, device, cfg.tiny_dir, retries=cfg.endpoint_retries,
                     backoff=cfg.endpoint_backoff)


def ask_until_ok(cfg, model, ids, request, judge, template, purpose, stats, image=None):
    """Asks the model for every id, batched, and judges each reply: judge(i, reply) -> (value, reason),
    value None when unusable. Unusable replies are asked again, sampled from (seed, i, purpose, try)
    so a local model can answer differently. Returns {i: value or the last reason}; ids whose
    endpoint stayed down are left out (deferred to the next run)."""
    result, left = {}, list(ids)
    for attempt in range(1 if model.spec == "template" else cfg.llm_retries):
        if not left:
            break
        if model.spec == "template":
            replies = [template(i) for i in left]
        elif attempt == 0 or model.is_endpoint():
            replies = model.batch([request(i) for i in left], [image(i) for i in left] if image else None,
                                  batch_size=cfg.text_batch)
        else:
            replies = [model.batch([request(i)], [image(i)] if image else None,
                                   seed=draw_seed(cfg.seed, i + cfg.id_offset, f"{purpose}{attempt}"))[0] for i in left]
        again = []
        for i, reply in zip(left, replies):
            if isinstance(reply, EndpointDown):
                stats["deferred"].add(i)
                continue
            value, reason = judge(i, reply)
            result[i] = value if value is not None else reason
            if value is None:
                again.append(i)
        left = again
    return result


def phase_prompts(cfg, out, ids, pool, stats, device, models):
    """Stage A step 2 and stage B's choice of edit (paper: an LLM writes both)."""
    llm = models.get("llm", text_model, cfg, "llm", device)
    plans = {i: plan(cfg, i, pool) for i in ids}
    prompts = ask_until_ok(cfg, llm, ids, lambda i: PROMPT_REQUEST.format(cats=", ".join(plans[i][1])),
                           lambda i, r: (parse_prompts(r, plans[i][1]), "llm_unparseable"),
                           lambda i: template_prompts(plans[i][1], sample_rng(cfg, i, "prompts")), "llm", stats)
    need_edit = [i for i in ids if isinstance(prompts.get(i), dict) and plans[i][0] in EDIT_TASKS]
    edits = ask_until_ok(cfg, llm, need_edit, lambda i: edit_request(plans[i][0], prompts[i]["scene"], plans[i][1]),
                         lambda i, r: (parse_edit(r, plans[i][0], plans[i][1]), "llm_edit_unparseable"),
                         lambda i: template_edit(plans[i][0], plans[i][1], sample_rng(cfg, i, "edit_choice")),
                         "llm_edit", stats)
    for i in ids:
        p, e = prompts.get(i), edits.get(i)
        if i in stats["deferred"]:
            continue
        if isinstance(p, str) or isinstance(e, str):
            drop(out, i, "prompts", p if isinstance(p, str) else e, stats)
            continue
        task, cats = plans[i]
        record(out, "prompts", {"index": i, "task": task, "cats": cats, "scene": p["scene"],
                                "subject_prompts": [s["prompt"] for s in p["subjects"]], "edit": e})


def render(pipe, cfg, prompts, seeds, size, images=None, guidance=3.5):
    """One batched diffusion call; each image's noise comes from its own generator (its own seed)."""
    kw = dict(prompt=prompts, width=size[0], height=size[1], num_inference_steps=cfg.gen_steps, guidance_scale=guidance,
              max_sequence_length=cfg.max_text_len, generator=[torch.Generator().manual_seed(s) for s in seeds])
    if images is not None:  # Kontext: keep the size we give it instead of its preferred ones
        kw.update(image=images, _auto_resize=False, max_area=size[0] * size[1])
    return pipe(**kw).images


def load_t2i_pipe(cfg, device):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(resolve_model(cfg.t2i, cfg.tiny_dir), dtype=model_dtype(device)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def phase_scene(cfg, out, ids, rows, device, models):
    """Stage A step 3: FLUX.1-dev renders each scene prompt -> the target (before any edit)."""
    pipe = models.get("t2i", load_t2i_pipe, cfg, device)
    for chunk in chunks(ids, cfg.gen_batch):
        seeds = [draw_seed(cfg.seed, i + cfg.id_offset, "scene") for i in chunk]
        ims = render(pipe, cfg, [rows[i]["scene"] for i in chunk], seeds, (cfg.resolution, cfg.resolution),
                     guidance=cfg.t2i_guidance)
        for i, im in zip(chunk, ims):
            save_png(scene_path(out, i), im)
            record(out, "scene", {"index": i})


def detect_and_filter(cfg, detector, paths, cats_of):
    """(boxes or None, reason) per image, detection batched."""
    out = []
    for chunk in chunks(list(zip(paths, cats_of)), cfg.detect_batch):
        ims = [open_rgb(p) for p, _ in chunk]
        for im, (_, cats), det in zip(ims, chunk, detector(ims, [c for _, c in chunk])):
            out.append(filter_boxes(det, cats, im.size, cfg.exact_once, cfg.min_box_frac, cfg.nms_iou,
                                    cfg.max_pair_iou))
    return out


def load_detector(cfg, device):
    import rewards

    return rewards.Detector(cfg.detector, device, cfg.box_threshold, cfg.text_threshold, cfg.tiny_dir)


def phase_detect(cfg, out, ids, rows, stats, device, models):
    """Stage A step 4 and our filters: each category found once (after NMS), its box not tiny."""
    detector = models.get("detector", load_detector, cfg, device)
    for i, (boxes, why) in zip(ids, detect_and_filter(cfg, detector, [scene_path(out, i) for i in ids],
                                                      [rows[i]["cats"] for i in ids])):
        if boxes is None:
            drop(out, i, "detect", why, stats)
        else:
            record(out, "detect", {"index": i, "boxes": boxes})


def crop_of(scene, box):
    """The subject's crop (clip_box); filter_boxes dropped every box that leaves nothing."""
    b = clip_box(box, scene.size)
    if b is None:
        raise ValueError(f"box {box} lies outside the {scene.size} image")
    return scene.crop(b)


def crop_dims(box, size):
    """The size crop_of gives for `box` in an image of `size`, without the image."""
    b = clip_box(box, size)
    return b[2] - b[0], b[3] - b[1]


def load_dino(cfg, device):
    import rewards

    return rewards.DinoEmbedder(cfg.dino, device, cfg.tiny_dir)


def phase_reference(cfg, out, ids, rows, boxes, kontext, stats, device, models):
    """Stage A step 5: Kontext re-renders each crop in its own new context, at the crop's aspect
    ratio. Crops of one input size share a batch. Then our DINO filter: a reference must still
    look like its crop."""
    import rewards

    jobs = {}  # input size -> [(i, k)]
    for i in ids:
        for k, b in enumerate(boxes[i]):
            if not ref_path(out, i, k).exists():  # a killed run keeps the references it finished
                size = ref_input_size(*crop_dims(b, (cfg.resolution, cfg.resolution)), cfg.resolution)
                jobs.setdefault(size, []).append((i, k))
    for size, group in jobs.items():
        for chunk in chunks(group, cfg.gen_batch):
            crops = [reference_input(crop_of(open_rgb(scene_path(out, i)), boxes[i][k]), cfg.resolution)
                     for i, k in chunk]
            seeds = [draw_seed(cfg.seed, i + cfg.id_offset, f"ref{k}") for i, k in chunk]
            ims = render(kontext, cfg, [rows[i]["subject_prompts"][k] for i, k in chunk], seeds, size, crops,
                         cfg.edit_guidance)
            for (i, k), im in zip(chunk, ims):
                save_png(ref_path(out, i, k), im)
    embed = models.get("dino", load_dino, cfg, device)
    for i in ids:
        scene = open_rgb(scene_path(out, i))
        refs = [open_rgb(ref_path(out, i, k)) for k in range(len(boxes[i]))]
        sims = (embed(refs) * embed([crop_of(scene, b) for b in boxes[i]])).sum(-1).tolist()
        if min(sims) < cfg.min_dino:
            drop(out, i, "reference", "ref_dissimilar", stats)
        else:
            record(out, "reference", {"index": i, "dino": [round(x, 4) for x in sims]})


def phase_edit(cfg, out, ids, rows, kontext, stats, device, models):
    """Stage B step 7: Kontext applies the chosen edit to the scene (and for `complex` the new
    background); the edited image is detected again, so a subject the edit removed or doubled drops
    and the boxes describe the edited target."""
    edited = [i for i in ids if rows[i]["edit"]]
    for i in ids:
        if not rows[i]["edit"]:
            record(out, "edit", {"index": i, "edited": False})
    todo = [i for i in edited if not edit_path(out, i).exists()]
    for chunk in chunks(todo, cfg.gen_batch):
        seeds = [draw_seed(cfg.seed, i + cfg.id_offset, "edit") for i in chunk]
        ims = render(kontext, cfg, [editor_instruction(rows[i]["edit"]) for i in chunk], seeds,
                     (cfg.resolution, cfg.resolution), [open_rgb(scene_path(out, i)) for i in chunk], cfg.edit_guidance)
        for i, im in zip(chunk, ims):
            save_png(edit_path(out, i), im)
    if edited:
        redetect_edits(cfg, out, edited, rows, models.get("detector", load_detector, cfg, device), stats)


def redetect_edits(cfg, out, ids, rows, detector, stats):
    """Boxes from the edited image; a drop names what the edit broke ("edit_lost_subject", ...)."""
    results = detect_and_filter(cfg, detector, [edit_path(out, i) for i in ids], [rows[i]["cats"] for i in ids])
    for i, (boxes, why) in zip(ids, results):
        if boxes is None:
            drop(out, i, "edit", {"not_found": "edit_lost_subject"}.get(why, f"edit_{why}"), stats)
        else:
            record(out, "edit", {"index": i, "edited": True, "boxes": boxes})


def phase_instruction(cfg, out, ids, state, stats, device, models):
    """Stage B step 8: the VLM sees the final target (and is told the edit, which it must state) and
    writes the instruction; the leak check rewrites or drops it. Kept samples are written out."""
    vlm = models.get("vlm", text_model, cfg, "vlm", device)

    def target(i):
        return open_rgb(edit_path(out, i) if state[i]["edited"] else scene_path(out, i))

    def request(i):
        s = state[i]
        return INSTRUCTION_REQUEST.format(cats=", ".join(s["cats"]), focus=focus_for(s["task"], s["edit"]))

    def edit_text(i):
        return editor_instruction(state[i]["edit"]) if state[i]["edit"] else ""

    def judge(i, reply):
        s = state[i]
        looks = appearance_words([s["scene"]] + s["subject_prompts"], s["cats"])
        return check_instruction(reply, s["cats"], looks, edit_text(i), own=own_looks(s["subject_prompts"], s["cats"]))

    def template(i):
        s = state[i]
        return template_instruction(s["task"], s["cats"], s["edit"], s["boxes"], s["scene"])

    verdicts = {}

    def judged(i, reply):
        value, why = judge(i, reply)
        verdicts[i] = why
        return value, why

    result = ask_until_ok(cfg, vlm, ids, request, judged, template, "vlm", stats, image=target)
    # the second layer: the VLM itself is asked whether the instruction describes a subject's look
    # (a template VLM writes no looks; the lexical layer alone judges it)
    passed = [i for i in ids if i in result and verdicts[i] in ("ok", "rewritten")]
    answers = {}
    if cfg.leak_question and vlm.spec != "template":
        answers = ask_until_ok(cfg, vlm, passed, lambda i: leak_question(result[i], state[i]["cats"], edit_text(i)),
                               lambda i, r: (parse_yes_no(r), "vlm_leak_unparseable"), None, "vlm_leak", stats,
                               image=target)
    shard_file = Path(out) / f"samples.rank{rank():03d}.jsonl"
    for i in ids:
        if i not in result or (answers and i in passed and i not in answers):
            continue  # endpoint down: deferred
        s = state[i]
        if verdicts[i] not in ("ok", "rewritten"):
            drop(out, i, "instruction", result[i], stats)
            continue
        if isinstance(answers.get(i), str) or answers.get(i) is True:
            drop(out, i, "instruction", "vlm_says_appearance" if answers[i] is True else answers[i], stats)
            continue
        meta = {"source": "models", "scene_prompt": s["scene"], "subject_prompts": s["subject_prompts"],
                "boxes": [[round(v, 1) for v in b] for b in s["boxes"]], "dino": s["dino"], "edit": s["edit"],
                "instruction_check": verdicts[i], "vlm_leak_answer": {True: "yes", False: "no"}.get(answers.get(i))}
        refs = [open_rgb(ref_path(out, i, k)) for k in range(len(s["cats"]))]
        write_sample(out, sample_id(cfg, s["task"], i), s["task"], result[i], [{"category": c} for c in s["cats"]],
                     target(i), refs, meta, shard_file)
        clean_work(out, i)
        stats["made"] += 1
        maybe_die("make_data", stats["made"])


def load_kontext_pipe(cfg, device):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(resolve_model(cfg.model, cfg.tiny_dir), dtype=model_dtype(device))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class Resident:
    """Each phase's model, loaded once and kept across rounds (ours; a run used to load every phase's
    model again each round, about 7 loads a round of 256 ids a rank). keep_models: yes keeps them
    all; no frees a model when its phase ends, so the phases fit one GPU one at a time; auto keeps
    them until a load runs out of GPU memory, then frees each after its phase for the rest of the run."""

    def __init__(self, keep):
        self.keep, self.loaded = keep, {}

    def get(self, name, load, *args):
        if name not in self.loaded:
            try:
                model = load(*args)
            except torch.cuda.OutOfMemoryError:
                if self.keep != "auto" or not self.loaded:
                    raise
                print(f"[make_data] GPU memory ran out loading {name}: each phase's model is freed after it from now on")
                self.keep, self.loaded = "no", {}
                release()
                model = load(*args)
            self.loaded[name] = model
        return self.loaded[name]

    def done(self, *names):
        """The phase that used these models is over: freed unless models are kept."""
        if self.keep == "no":
            for name in names:
                self.loaded.pop(name, None)
            release()


def run_round(cfg, out, mine, pool, stats, device, models):
    """Every phase over this rank's ids of the round; each phase takes the ids the previous one passed.
    Models stay loaded across phases and rounds as keep_models says (Resident)."""
    dropped = dropped_indices(out)
    live = [i for i in mine if i not in dropped]

    def pending(phase, before):
        done, prev = phase_rows(out, phase), phase_rows(out, before) if before else None
        return [i for i in live if i not in done and (prev is None or i in prev) and i not in stats["deferred"]]

    ids = pending("prompts", None)
    timed(stats, "prompts", len(ids), phase_prompts, cfg, out, ids, pool, stats, device, models)
    models.done("llm")
    rows = phase_rows(out, "prompts")
    ids = pending("scene", "prompts")
    timed(stats, "scene", len(ids), phase_scene, cfg, out, ids, rows, device, models)
    models.done("t2i")
    ids = pending("detect", "scene")
    timed(stats, "detect", len(ids), phase_detect, cfg, out, ids, rows, stats, device, models)
    models.done("detector")
    ref_ids, boxes = pending("reference", "detect"), {i: r["boxes"] for i, r in phase_rows(out, "detect").items()}
    kontext = None
    if ref_ids or any(rows[i]["edit"] for i in pending("edit", "reference")):
        # loading Kontext counts to the references, the first phase that uses it
        kontext = timed(stats, "reference", None, models.get, "kontext", load_kontext_pipe, cfg, device)
    timed(stats, "reference", len(ref_ids), phase_reference, cfg, out, ref_ids, rows, boxes, kontext, stats, device,
          models)
    models.done("dino")
    ids = pending("edit", "reference")
    timed(stats, "edit", len(ids), phase_edit, cfg, out, ids, rows, kontext, stats, device, models)
    del kontext
    models.done("kontext", "detector")
    kept = kept_indices(out, cfg)
    ids = [i for i in pending("instruction", "edit") if i not in kept]
    det, ref, edit = phase_rows(out, "detect"), phase_rows(out, "reference"), phase_rows(out, "edit")
    state = {i: {**rows[i], "boxes": edit[i].get("boxes", det[i]["boxes"]), "dino": ref[i]["dino"],
                 "edited": edit[i]["edited"]} for i in ids}
    timed(stats, "instruction", len(ids), phase_instruction, cfg, out, ids, state, stats, device, models)
    models.done("vlm")


def next_block(n, kept, dropped, deferred, size, limit):
    """The lowest ids neither kept, dropped nor deferred, as many as samples are missing (at most
    `size`); ids at or past `limit` are never drawn (a pipeline that drops everything stops)."""
    need = min(n - len(kept) - len(deferred), size)
    done, block, i = kept | dropped | deferred, [], 0
    while len(block) < need and i < limit:
        if i not in done:
            block.append(i)
        i += 1
    return block


def file_barrier(out, tag, timeout=7 * 24 * 3600):
    """Waits until every rank has reached `tag`, through marker files on the shared output folder:
    ranks finish a round at different times (drops differ), and a collective's timeout (NCCL's
    default is 10 minutes) must not decide how long one may wait for another."""
    path = work(out, "sync")
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{tag}.rank{rank():03d}").touch()
    t0 = time.time()
    while len(list(path.glob(f"{tag}.rank*"))) < world():
        if time.time() - t0 > timeout:
            raise SystemExit(f"[make_data] rank {rank()} waited {timeout}s for the others at {tag}")
        time.sleep(0.2)


def run_token():
    """One token per run, the same on every rank (names this run's markers and per-rank files)."""
    token = [f"{time.time_ns()}-{os.getpid()}"]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(token, src=0)
    return token[0]


def make_models(cfg, out, device):
    """The model pipeline, round by round, until n_samples are kept (or max_draws ids were tried).
    Returns this run's stats summed over ranks: seconds and items per phase, drops, made, deferred."""
    pool = load_categories(cfg.categories)
    token = run_token()
    stats = {"seconds": {}, "items": {}, "peak_gb": {}, "drops": {}, "made": 0, "deferred": set()}
    limit = int(math.ceil(cfg.n_samples * cfg.max_draws))
    models = Resident(cfg.keep_models)
    for r in range(10 ** 9):
        deferred = set()
        for p in work(out, "deferred").glob(f"{token}.rank*.json"):
            deferred |= set(json.loads(p.read_text()))
        block = next_block(cfg.n_samples, kept_indices(out, cfg), dropped_indices(out), deferred,
                           cfg.round_size * world(), limit)
        file_barrier(out, f"{token}-plan{r}")  # every rank planned from the same files before any writes
        if not block:
            break
        run_round(cfg, out, block[rank()::world()], pool, stats, device, models)
        write_json(work(out, "deferred", f"{token}.rank{rank():03d}.json"), sorted(stats["deferred"]))
        file_barrier(out, f"{token}-round{r}")
    write_json(work(out, "stats", f"{token}.rank{rank():03d}.json"), {**stats, "deferred": sorted(stats["deferred"])})
    file_barrier(out, f"{token}-end")
    total = {"seconds": {}, "items": {}, "peak_gb": {}, "drops": {}, "made": 0, "deferred": []}
    for p in sorted(work(out, "stats").glob(f"{token}.rank*.json")):
        s = json.loads(p.read_text())
        for key in ("seconds", "items", "drops"):
            for k, v in s[key].items():
                total[key][k] = total[key].get(k, 0) + v
        for k, v in s["peak_gb"].items():
            total["peak_gb"][k] = max(total["peak_gb"].get(k, 0.0), v)
        total["made"] += s["made"]
        total["deferred"] += s["deferred"]
    return total


# ----------------------------------------------------------------------------------------------
# Every knob and path checked before any model loads or anything is written: each failure is one
# line naming the knob or the file (a missing --detector used to fail after a whole round of T2I).

MODEL_FILES = {"model": ("model_index.json",), "t2i": ("model_index.json",),
               "detector": ("config.json", "detector.json"), "dino": ("config.json",),
               "llm": ("config.json",), "vlm": ("config.json",)}


def looks_like_path(name):
    return name.startswith(("/", ".", "~")) or os.sep + os.sep in name or name.count("/") > 1


def model_problem(knob, name):
    """Why model `name` given to --knob cannot load (None when it can): a local folder must exist and
    hold its config; a hub id must have the form owner/name, and be in the local hub cache when
    HF_HUB_OFFLINE is set (else it is downloaded at load time)."""
    if name == "tiny":
        return None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"--{knob} {name}: not a folder"
        if not any((path / f).exists() for f in MODEL_FILES[knob]):
            return f"--{knob} {name}: the folder has no {' or '.join(MODEL_FILES[knob])}"
        return None
    import re

    if looks_like_path(name) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return f"--{knob} {name}: no such folder (and not a hub id owner/name)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not any(isinstance(try_to_load_from_cache(name, f), str) for f in MODEL_FILES[knob]):
            return f"--{knob} {name}: not a local folder, and not in the hub cache (HF_HUB_OFFLINE is set)"
    return None


def text_model_problem(knob, spec):
    if spec == "template" or spec.startswith(("http://", "https://")):
        from urllib.parse import urlparse

        return None if spec == "template" or urlparse(spec).netloc else f"--{knob} {spec}: a URL without a host"
    return model_problem(knob, spec)


def read_category_file(path):
    """The lines of the category pool, or (None, the one-line reason)."""
    p = Path(path) if Path(path).is_absolute() else ROOT / path
    if not p.is_file():
        return None, f"--categories {p}: no such file"
    try:
        return p.read_bytes().decode("utf-8"), None
    except UnicodeDecodeError:
        return None, f"--categories {p}: not UTF-8 text (one category name a line)"


def config_problems(cfg):
    """One line per bad knob or path; empty when all is well."""
    bad = []

    def need(ok, line):
        if not ok:
            bad.append(line)

    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
    need(cfg.n_samples >= 1, f"--n_samples {cfg.n_samples}: must be at least 1")
    need(cfg.resolution >= 16 and cfg.resolution % 16 == 0,
         f"--resolution {cfg.resolution}: must be a positive multiple of 16 (VAE 8x, then 2x2 packing)")
    mix = tuple(cfg.task_mix)
    if len(mix) != len(TASKS):
        bad.append(f"--task_mix {','.join(map(str, mix))}: {len(mix)} weights given, {len(TASKS)} needed "
                   f"(one per task: {', '.join(TASKS)})")
    else:
        need(all(finite(w) and w >= 0 for w in mix) and sum(mix) > 0,
             f"--task_mix {','.join(map(str, mix))}: weights must be finite, >= 0, not all 0")
    need(cfg.seed >= 0, f"--seed {cfg.seed}: must be >= 0")
    need(cfg.id_offset >= 0, f"--id_offset {cfg.id_offset}: must be >= 0")
    need(cfg.max_text_len >= 1, f"--max_text_len {cfg.max_text_len}: must be at least 1")
    need(cfg.preview >= 0, f"--preview {cfg.preview}: must be >= 0")
    import re

    need(re.fullmatch(r"|cpu|mps|cuda(:\d+)?", cfg.device) is not None,
         f"--device {cfg.device!r}: one of cpu, cuda, cuda:N, mps (empty: cuda when there is one)")
    if cfg.cache or cfg.source == "models":
        bad.append(model_problem("model", cfg.model))
    if cfg.source == "models":
        text, why = read_category_file(cfg.categories)
        if why:
            bad.append(why)
        else:
            names = {category_name(ln.split("#")[0].strip()) for ln in text.splitlines()
                     if ln.split("#")[0].strip() and not ln.startswith("#")}
            most = max((n for t, n in zip(TASKS, (2, 2, 2, 2, 2, 3, 4)) if len(mix) == len(TASKS)
                        and mix[TASKS.index(t)] > 0), default=2)
            need(len(names) >= most, f"--categories {cfg.categories}: {len(names)} distinct categories; "
                                     f"the task mix draws up to {most} per sample")
        bad += [text_model_problem("llm", cfg.llm), text_model_problem("vlm", cfg.vlm)]
        bad += [model_problem(k, getattr(cfg, k)) for k in ("t2i", "detector", "dino")]
        for knob in ("box_threshold", "text_threshold", "nms_iou", "max_pair_iou", "min_box_frac"):
            v = getattr(cfg, knob)
            need(finite(v) and 0 <= v <= 1, f"--{knob} {v}: must be between 0 and 1")
        need(finite(cfg.min_dino), f"--min_dino {cfg.min_dino}: must be a number")
        for knob in ("gen_steps", "gen_batch", "detect_batch", "text_batch", "round_size", "llm_retries",
                     "endpoint_retries"):
            need(getattr(cfg, knob) >= 1, f"--{knob} {getattr(cfg, knob)}: must be at least 1")
        for knob in ("t2i_guidance", "edit_guidance", "endpoint_backoff"):
            v = getattr(cfg, knob)
            need(finite(v) and v >= 0, f"--{knob} {v}: must be >= 0")
        need(finite(cfg.max_draws) and cfg.max_draws >= 1, f"--max_draws {cfg.max_draws}: must be at least 1")
        need(cfg.keep_models in ("auto", "yes", "no"), f"--keep_models {cfg.keep_models}: one of auto, yes, no")
    return [b for b in bad if b]


def check_config(cfg):
    bad = config_problems(cfg)
    if bad:
        raise SystemExit("[make_data] bad input:\n" + "\n".join(bad))


# ----------------------------------------------------------------------------------------------
# The cache's size, said before it is written (DESIGN 2.1: per sample a target latent, one latent per
# reference, the T5 sequence padded to max_text_len and the CLIP pooled vector) and measured after.

def model_config(name, sub, tiny_dir):
    """config.json of component `sub` of a local folder, the tiny model or a hub id in the hub cache; or None."""
    path = Path(resolve_model(name, tiny_dir)).expanduser() / sub / "config.json"
    if not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, f"{sub}/config.json")
        except Exception:  # not a hub id either
            found = None
        if not isinstance(found, str):
            return None
        path = Path(found)
    return json.loads(path.read_text())


def cache_shapes(cfg, device):
    """The shapes and element size of the tensors build_cache writes for one sample, from the model's
    configs (FLUX.1 Kontext's own numbers where a config is not on this machine), and the mean
    number of references the task mix gives."""
    vae = model_config(cfg.model, "vae", cfg.tiny_dir) or {"latent_channels": 16, "block_out_channels": [0] * 4}
    t5 = model_config(cfg.model, "text_encoder_2", cfg.tiny_dir) or {"d_model": 4096}
    clip = model_config(cfg.model, "text_encoder", cfg.tiny_dir) or {"hidden_size": 768}
    side = cfg.resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    counts = [{"three": 3, "four": 4}.get(t, 2) for t in TASKS]
    return {"target": (vae["latent_channels"], side, side), "ref": (vae["latent_channels"], side, side),
            "t5": (cfg.max_text_len, t5["d_model"]), "clip": (clip["hidden_size"],),
            "refs_per_sample": sum(w * n for w, n in zip(cfg.task_mix, counts)) / sum(cfg.task_mix),
            "bytes_per_element": torch.tensor([], dtype=model_dtype(device)).element_size()}


def cache_bytes(shapes):
    """{part: bytes per sample} by arithmetic from the shapes (references keep their crop's aspect
    ratio at about the target's area, so theirs is about the target's each)."""
    b = shapes["bytes_per_element"]
    parts = {"target": math.prod(shapes["target"]) * b,
             "refs": round(shapes["refs_per_sample"] * math.prod(shapes["ref"]) * b),
             "t5": math.prod(shapes["t5"]) * b, "clip": math.prod(shapes["clip"]) * b}
    return {**parts, "total": sum(parts.values())}


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def say_cache_size(cfg, device, paper_scale=350000):
    shapes = cache_shapes(cfg, device)
    per = cache_bytes(shapes)
    x = "x".join
    print(f"[make_data] cache: {per['total']} bytes a sample ({human(per['total'])}) = {shapes['bytes_per_element']} "
          f"bytes x (target {x(map(str, shapes['target']))} + {shapes['refs_per_sample']:.2f} refs of about "
          f"{x(map(str, shapes['ref']))} + t5 {x(map(str, shapes['t5']))} + clip {x(map(str, shapes['clip']))}); "
          f"{cfg.n_samples} samples: {human(per['total'] * cfg.n_samples)}, {paper_scale} (the paper's scale): "
          f"{human(per['total'] * paper_scale)}; images (PNG) not counted")
    return per


def measured_cache_bytes(out, samples):
    """{part: mean bytes per sample} over the tensors the cache shards hold for `samples`, read from
    the safetensors headers (8-byte length, then JSON with each tensor's data offsets)."""
    cache = Path(out) / "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    wanted = {s["id"] for s in samples}
    parts, n = {"target": 0, "refs": 0, "t5": 0, "clip": 0}, set()
    for shard in manifest["shards"]:
        with open(cache / shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, meta in header.items():
            sid, _, part = key.rpartition("/")
            if key == "__metadata__" or sid not in wanted:
                continue
            n.add(sid)
            parts["refs" if part.startswith("ref") else part] += meta["data_offsets"][1] - meta["data_offsets"][0]
    parts = {k: round(v / max(len(n), 1)) for k, v in parts.items()}
    return {**parts, "total": sum(parts.values()), "samples": len(n)}


# ----------------------------------------------------------------------------------------------
# A drawn source (named by the preset): no model, each sample drawn from (seed, index).

def make_drawn(cfg, out, draw):
    """The drawn source: sample i is draw(i, seed, ...), written unless an earlier run listed it."""
    shard_file = Path(out) / f"samples.rank{rank():03d}.jsonl"
    done = ids_in(Path(out) / "samples.jsonl") | ids_in(shard_file)
    mine = [i for i in range(cfg.n_samples) if i % world() == rank()]
    t0, made = time.time(), 0
    for i in tqdm(mine, desc=f"draw (rank {rank()})", disable=rank() != 0):
        sid, *rest = draw(i, cfg.seed, cfg.resolution, cfg.task_mix, cfg.id_offset)
        if sid in done:
            continue
        write_sample(out, sid, *rest, shard_file)
        made += 1
        maybe_die("make_data", made)
    return made, time.time() - t0


def drop_summary(out):
    counts = {}
    for p in Path(out).glob("drops.rank*.jsonl"):
        for r in read_jsonl(p):
            counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return counts


def preview(out, n):
    samples = load_samples(out)[:n]
    from common import open_image

    rows = [[open_image(out, s["subjects"][k]["ref"], s["id"]) for k in range(len(s["subjects"]))]
            + [open_image(out, s["target"], s["id"])] for s in samples]
    save_png(Path(out) / "preview.png", image_grid(rows))
    return Path(out) / "preview.png"


def models_manifest(stats, samples, out):
    """What the run cost, honestly: each phase's seconds summed over ranks, per id that went through
    the phase and per sample kept this run; the drop table over all runs; ids left for a rerun."""
    drops = drop_summary(out)
    sec = {k: round(v, 3) for k, v in stats["seconds"].items()}
    per_item = {k: round(v / max(stats["items"].get(k, 0), 1), 4) for k, v in stats["seconds"].items()}
    per_kept = {k: round(v / max(stats["made"], 1), 4) for k, v in stats["seconds"].items()}
    print(f"[make_data] dropped by reason (all runs): {drops}")
    print(f"[make_data] seconds per id by phase: {per_item}; per kept sample: {per_kept}; "
          f"{len(stats['deferred'])} ids left for a rerun (endpoint down)")
    return {"samples": len(samples), "dropped": drops, "made_this_run": stats["made"],
            "deferred": sorted(stats["deferred"]), "seconds_this_run": sec, "items_this_run": stats["items"],
            "seconds_per_item": per_item, "seconds_per_kept_sample": per_kept,
            "peak_gpu_gb": {k: round(v, 2) for k, v in stats["peak_gb"].items()}}


def record_cache_size(cfg, out, samples, m, predicted):
    """Prints the bytes per sample the shards hold against the prediction, and how many instructions
    T5 truncates at max_text_len; a models run adds both to manifest.json."""
    measured = measured_cache_bytes(out, samples)
    t5_len = min(cfg.max_text_len, m.t5_tok.model_max_length)
    truncated = sum(len(ids) > t5_len for ids in m.t5_tok([s["instruction"] for s in samples]).input_ids)
    print(f"[make_data] cache written: {measured['total']} bytes a sample ({human(measured['total'])}; "
          f"predicted {predicted['total']}); by part {measured}; {truncated} of {len(samples)} instructions "
          f"longer than {t5_len} T5 tokens (truncated)")
    path = Path(out) / "manifest.json"
    if cfg.source == "models" and path.exists():
        write_json(path, {**json.loads(path.read_text()), "cache_bytes_per_sample": measured,
                          "cache_bytes_predicted": predicted, "t5_truncated": truncated})


def main(cfg):
    draw = None if cfg.source == "models" else load_named(cfg.source, "--source")  # a bad name stops here
    check_config(cfg)  # before any model loads or any file is written
    device = setup_dist(cfg.device)
    out = data_dir(cfg) if not cfg.out else Path(cfg.out)
    print_config(cfg, "make_data", out)
    predicted = say_cache_size(cfg, device) if cfg.cache and rank() == 0 else None
    ensure_writable(out, "make_data")
    open_run(out, cfg, "make_data", extend=("n_samples", "max_draws"))
    t0 = time.time()
    if cfg.source != "models":
        made, secs = make_drawn(cfg, out, draw)
    else:
        stats = make_models(cfg, out, device)
        made, secs = stats["made"], time.time() - t0
    barrier()
    samples = merge_rank_files(out) if rank() == 0 else None
    if rank() == 0 and cfg.source == "models":
        write_json(Path(out) / "manifest.json", models_manifest(stats, samples, out))
    barrier()
    samples = load_samples(out) if rank() else samples  # the merged list, as rank 0 wrote it
    if not samples:
        raise SystemExit(f"[make_data] no sample survived in {out}: see the drop reasons above")
    cache_s = 0.0
    if cfg.cache:  # every rank encodes its share of the cache (common.build_cache)
        m = load_kontext(cfg.model, device, model_dtype(device), cfg.tiny_dir)
        t1 = time.time()
        build_cache(m, out, samples, cfg.resolution, cfg.max_text_len)
        cache_s = time.time() - t1
        if rank() == 0:
            record_cache_size(cfg, out, samples, m, predicted)
    if rank() == 0:
        counts = {t: sum(s["task"] == t for s in samples) for t in TASKS}
        print(f"[make_data] {len(samples)} samples in {out} ({made} made this run, "
              f"{secs / max(made, 1):.3f}s per made sample, cache {cache_s:.2f}s); by task {counts}")
        if cfg.preview:
            print(f"[make_data] preview: {preview(out, cfg.preview)}")
    barrier()
    return out


if __name__ == "__main__":
    run_stage("make_data", main, parse_config(Config, "make_data"))
