"""``zspa demo``: prune a LLaVA-architecture VLM on a real photo, with every available backend.

Nothing is downloaded. The photo is scikit-image's astronaut (NASA, public domain);
the model is a small LLaVA-1.5 architecture (CLIP ViT at 336 px: 576 visual tokens,
Llama language model) built from a config with RANDOM weights, with an image
processor built from CLIP's published preprocessing values and a word-level
tokenizer built in code. Random weights make the kept tokens meaningless for the
question, but the pipeline, the shapes, the KV-cache savings and the timings are
the real ones; ``--model PATH`` runs a local LLaVA-1.5-style checkpoint instead.
"""
from __future__ import annotations

import contextlib
import pathlib
import time

import torch

import zspa_kernels
from zspa_kernels import benchmark as hb
from zspa_kernels import models
from zspa_kernels.integrations.transformers import kv_cache

QUESTION = "What is the astronaut holding in her hands, and what is behind her?"
TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CORE_COLOUR, DIVERSITY_COLOUR = (255, 140, 0), (0, 200, 255)


def _step(text: str):
    """Progress for one step: its label now, its duration when it ends."""
    @contextlib.contextmanager
    def timed():
        print(f"  {text} ...", end="", flush=True)
        t0 = time.perf_counter()
        yield
        print(f" {time.perf_counter() - t0:.1f} s", flush=True)

    return timed()


def build_processor():
    """A LLaVA processor without downloads: CLIP preprocessing at 336 px and a word-level tokenizer."""
    from tokenizers import Tokenizer, models as tok_models, normalizers, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    try:  # transformers >= 5 without torchvision: the PIL image processor, named explicitly
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    words = sorted(set(TEMPLATE.format(question=QUESTION).replace("<image>", " ").lower()
                       .replace("?", " ? ").replace(",", " , ").replace(":", " : ").split()))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "<image>"] + words)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    image_processor = ImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                     do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def load(model_path, device, dtype):
    if model_path is None:
        processor = build_processor()
        config = models.llava_config("tiny", vocab_size=len(processor.tokenizer),
                                     image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"))
        from transformers import LlavaForConditionalGeneration

        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        return model.eval(), processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).to(device)
    return model.eval(), processor


def _prefill(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=True, logits_to_keep=1)


def _capture_lm_inputs(model):
    """The language model's ``inputs_embeds`` of the next call (to time the selection alone)."""
    from zspa_kernels.integrations.transformers.families import find_family, split_model

    _, lm = split_model(model, find_family(model))
    seen = {}

    def hook(_module, _args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"].detach())

    return lm.register_forward_pre_hook(hook, with_kwargs=True), seen


def selection_ms(embeds, input_ids, image_token, k, backend, device) -> float:
    """``select_tokens`` alone on this prompt's visual tokens and the text after the image."""
    is_image = input_ids[0] == image_token
    after = torch.arange(len(is_image), device=is_image.device) > is_image.nonzero().max()
    visual, prompt = embeds[:, is_image], embeds[:, after]
    return hb.median_us(lambda: zspa_kernels.select_tokens(visual, prompt, k, backend=backend), device) / 1e3


def draw(pixel_values, selection, path: pathlib.Path, title: str, mean=CLIP_MEAN, std=CLIP_STD) -> None:
    """The image as the model saw it, beside the same image with only the kept patches lit."""
    from PIL import Image, ImageDraw

    image = pixel_values[0].float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    rgb = Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8"))
    rgb = rgb.resize((2 * rgb.width, 2 * rgb.height), Image.NEAREST)  # patches large enough to outline
    side = int(round(selection.n_tokens ** 0.5))
    patch = rgb.width // side
    pruned = Image.blend(rgb, Image.new("RGB", rgb.size), 0.75)  # dropped patches: dimmed
    lit = ImageDraw.Draw(pruned)
    for rank, index in enumerate(selection.order.tolist()):
        r, c = divmod(index, side)
        box = (c * patch, r * patch, (c + 1) * patch, (r + 1) * patch)
        pruned.paste(rgb.crop(box), box[:2])
        lit.rectangle((box[0], box[1], box[2] - 1, box[3] - 1),
                      outline=CORE_COLOUR if rank < selection.n_core else DIVERSITY_COLOUR, width=2)
    canvas = Image.new("RGB", (2 * rgb.width + 12, rgb.height + 40), "white")
    canvas.paste(rgb, (0, 40))
    canvas.paste(pruned, (rgb.width + 12, 40))
    text = ImageDraw.Draw(canvas)
    text.text((4, 4), title, fill="black")
    text.text((4, 20), f"kept {len(selection.order)} of {selection.n_tokens} patches:", fill="black")
    text.text((190, 20), f"core (prompt relevance): {selection.n_core}", fill=CORE_COLOUR)
    text.text((400, 20), f"diversity (max-min): {len(selection.order) - selection.n_core}", fill=DIVERSITY_COLOUR)
    canvas.save(path, optimize=True)


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def run(out: str, model_path=None, keep: int = 64, core_ratio: float = 0.5) -> int:
    from skimage import data

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    backends = hb.backends_here(device)
    print(f"zspa demo on {hb.environment(device)['device']}, {str(dtype).replace('torch.', '')}")
    if model_path is None:
        print("  model: a small LLaVA-1.5 architecture built from a config with RANDOM weights (no download):")
        print("  the pipeline, shapes, memory and timings are real; which patches win is not meaningful.")
    else:
        print(f"  model: {model_path}")

    with _step(f"[1/4] loading the photo (scikit-image astronaut) and {'building' if model_path is None else 'loading'} "
               "the model"):
        from PIL import Image

        photo = Image.fromarray(data.astronaut())
        model, processor = load(model_path, device, dtype)
        image_token = model.config.image_token_index
        prompt = TEMPLATE.format(question=QUESTION)
        inputs = processor(images=photo, text=prompt, return_tensors="pt")
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    n_visual = int((inputs["input_ids"][0] == image_token).sum())
    print(f'  question: "{QUESTION}"  ({inputs["input_ids"].shape[1]} prompt tokens, {n_visual} of them visual)')

    with _step("[2/4] unpruned prefill"):
        handle, seen = _capture_lm_inputs(model)
        kv_full = models.cache_bytes(kv_cache(_prefill(model, inputs)))
        handle.remove()
        full_ms = hb.wall_median_ms(lambda: _prefill(model, inputs), device)
    rows = [("unpruned", n_visual, full_ms, kv_full, None, "")]
    selections = {}
    for i, backend in enumerate(backends, 1):
        with _step(f"[3/4] pruned prefill, backend {backend} ({i}/{len(backends)})"):
            with zspa_kernels.prune(model, keep=keep, core_ratio=core_ratio, backend=backend) as pruning:
                kv = models.cache_bytes(kv_cache(_prefill(model, inputs)))
                selections[backend] = pruning.last_selection[0]
                ms = hb.wall_median_ms(lambda: _prefill(model, inputs), device)
            sel_ms = selection_ms(seen["embeds"], inputs["input_ids"], image_token, keep, backend, device)
        same = torch.equal(selections[backend].kept.cpu(), selections[backends[0]].kept.cpu())
        rows.append((backend, len(selections[backend].order), ms, kv, sel_ms,
                     "" if i == 1 else ("same tokens as " + backends[0] if same else "DIFFERENT tokens")))

    print()
    print(f"{'backend':<11}{'visual tokens':>15}{'prefill':>12}{'KV cache':>12}{'selection':>12}")
    for name, n, ms, kv, sel, note in rows:
        sel_text = "—" if sel is None else f"{sel:.2f} ms"
        print(f"{name:<11}{f'{n_visual} -> {n}':>15}{ms:>9.1f} ms{_bytes(kv):>12}{sel_text:>12}  {note}")
    speedup = full_ms / rows[1][2]
    prefill = (f"prefill {speedup:.1f}x faster" if speedup >= 1 else
               f"prefill {1 / speedup:.1f}x slower: at this small model size the selection outweighs the "
               "language-model work it saves (real-size models: bench/e2e.py)")
    print(f"\nKV cache {kv_full / rows[1][3]:.1f}x smaller, {prefill} (keep {keep} of {n_visual}, "
          f"core ratio {core_ratio}).")

    with _step("[4/4] drawing the kept patches"):
        path = out_dir / "kept_patches.png"
        label = "random-weight LLaVA-1.5 architecture" if model_path is None else str(model_path)
        mean = getattr(processor.image_processor, "image_mean", CLIP_MEAN)
        std = getattr(processor.image_processor, "image_std", CLIP_STD)
        draw(inputs["pixel_values"], selections[backends[0]], path,
             f"ZSPAPrune, {label}, backend {backends[0]}: \"{QUESTION}\"", mean, std)
    print(f"wrote {path}")
    return 0
