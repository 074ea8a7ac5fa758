"""``zspa demo``: prune a vision-language model on a real photo, with every available backend.

Nothing is downloaded. The photo is scikit-image's astronaut (NASA, public domain);
the model is a LLaVA-1.5 architecture built from a config with RANDOM weights, with an
image processor built from CLIP's published preprocessing values and a word-level
tokenizer built in code. ``--size 3b`` (the default) has real proportions: CLIP
ViT-L/14 at 336 px (576 visual tokens) and a Llama-3.2-3B-sized language model, whose
prefill dominates as in LLaVA, in bf16; ``--size tiny`` is a toy of the same shape for
tests. Random weights make the kept tokens meaningless for the question, but the
pipeline, the shapes, the KV-cache savings and the timings are the real ones.

``--model PATH`` runs a local checkpoint of any family ``prune()`` supports instead
(``AutoModelForImageTextToText`` and ``AutoProcessor``), prompted as ``zspa fidelity``
prompts it (:func:`prompt_template`). What the demo cannot run is refused before any
timing: a checkpoint those classes cannot load, a family ``prune()`` does not take, a
block diffusion or vision-language-action model
(:func:`zspa_kernels.models.refuse_non_autoregressive`). The picture of the kept patches is
drawn where the photo's tokens are one grid over it that the demo knows (:func:`picture_grid`).

The selection time shown is the one of the ``zspa::select_tokens`` calls that the pruning
hooks made inside a pruned prefill (caught at the dispatcher in the warm-up): the same prompt,
the same budget and the same tokens as the prefill it pruned, called again with those arguments
after each timed prefill, synchronised; the median over the rounds, as the prefill's is.
"""
from __future__ import annotations

import contextlib
import pathlib
import resource
import statistics
import sys
import time
from typing import Optional

import torch

import zspa_kernels
from zspa_kernels import benchmark as hb
from zspa_kernels import models
from zspa_kernels.fidelity.samples import SKIMAGE, Prompts, Sample, open_image
from zspa_kernels.integrations.transformers import kv_cache
from zspa_kernels.integrations.transformers.families import find_family
from zspa_kernels.spec import DEFAULT_CORE_RATIO

SIZES = ("3b", "tiny")
REPEATS = 3  # timed rounds after the warm-up, median: a CPU's prefill time swings with the machine's load
QUESTION = "What is the astronaut holding in her hands, and what is behind her?"
TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
PHOTO = SKIMAGE + "astronaut"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CORE_COLOUR, DIVERSITY_COLOUR = (255, 140, 0), (0, 200, 255)
# Tokens an image's run holds before its grid of patches, by model type: Florence-2's projector writes the
# patches' mean first.
LEADING_TOKENS = {"florence2": 1}
PICTURE_SIDE = 672  # the drawn picture's longer side (at least): LLaVA's 24 x 24 patches of 28 px, 336 px doubled


def _step(text: str):
    """Progress for one step: its label now, its duration when it ends."""
    @contextlib.contextmanager
    def timed():
        print(f"  {text} ...", end="", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            print(" failed", flush=True)  # the line ends before the error's message
            raise
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
                                        eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                        model_input_names=["input_ids", "attention_mask"])  # as Llama's: no token_type_ids
    image_processor = ImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                     do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def load(model_path, device, dtype, size: str = "tiny"):
    """``(model, processor)``: the demo's LLaVA-1.5 architecture with random weights (``model_path`` None), or
    the local checkpoint ``model_path`` (``AutoModelForImageTextToText``, ``AutoProcessor``). A checkpoint
    that they cannot load, or whose model ``prune()`` does not take, raises ``ValueError("model: ...")``;
    the model is refused before its processor loads."""
    if model_path is None:
        from transformers import LlavaForConditionalGeneration

        processor = build_processor()
        config = models.llava_config(size, vocab_size=len(processor.tokenizer),
                                     image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"))
        model = models.build_from_config(LlavaForConditionalGeneration, config, dtype, device, fast_init=size != "tiny")
        return model, processor
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, ProcessorMixin
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        model_type = AutoConfig.from_pretrained(model_path).model_type
        if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:  # its error would list a hundred classes
            raise ValueError(f"a {model_type!r} checkpoint, which AutoModelForImageTextToText does not load "
                             "(expected a vision-language model)")
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - whatever stops the load (config, weights, a missing package)
        raise ValueError(f"model: cannot load {str(model_path)!r}: {_one_line(exc)}") from exc
    find_family(model)  # raises ValueError("model: ...") for what prune() does not take, before it moves
    model = model.to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(model_path)
    except Exception as exc:  # noqa: BLE001 - as above
        raise ValueError(f"model: AutoProcessor cannot load {str(model_path)!r}: {_one_line(exc)}") from exc
    if not isinstance(processor, ProcessorMixin):  # a checkpoint saved without its processor: a bare tokenizer
        raise ValueError(f"model: {str(model_path)!r} holds no image-and-text processor (AutoProcessor gave a "
                         f"{type(processor).__name__}); save the model's processor beside it")
    return model, processor


def _one_line(exc: BaseException) -> str:
    """``exc`` as one line of a refusal: its type (a KeyError's message is a bare key) and its words."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


# Processors that write each prompt's image tokens themselves, in front of its text: they take the question
# alone (Florence-2's writes the image's tokens, bos, the text and eos; an image token in the text would be a
# second image).
WRITES_IMAGE_TOKENS = ("Florence2Processor",)


def prompt_template(processor) -> Optional[str]:
    """How the demo and ``zspa fidelity`` prompt a model: None where its processor has a chat template
    (:class:`~zspa_kernels.fidelity.samples.Prompts` applies it), the question alone where the processor
    writes the image tokens itself (:data:`WRITES_IMAGE_TOKENS`), else :data:`TEMPLATE`, LLaVA-1.5's, with
    the processor's image token."""
    if getattr(processor, "chat_template", None):
        return None
    if type(processor).__name__ in WRITES_IMAGE_TOKENS:
        return "{question}"
    return TEMPLATE.replace("<image>", getattr(processor, "image_token", "<image>"))


class _PrefillClock:
    """Times whole prefills and, inside them, the language model's share (from its pre-hook,
    installed before any pruning hook so that the pruned share includes the selection)."""

    def __init__(self, model, device):
        from zspa_kernels.integrations.transformers.families import find_family, split_model

        _, lm = split_model(model, find_family(model))
        self.model, self.device, self.lm_start = model, device, 0.0
        self._hook = lm.register_forward_pre_hook(self._mark)

    def _mark(self, *_):
        hb.synchronize(self.device)
        self.lm_start = time.perf_counter()

    def __call__(self, inputs) -> tuple[float, float]:
        """``(prefill ms, language-model ms)`` of one prefill."""
        hb.synchronize(self.device)
        t0 = time.perf_counter()
        models.prefill(self.model, inputs)
        hb.synchronize(self.device)
        end = time.perf_counter()
        return 1e3 * (end - t0), 1e3 * (end - self.lm_start)

    def remove(self):
        self._hook.remove()


def _recorded_selection_prefill(model, inputs) -> tuple[int, list]:
    """One prefill: ``(KV-cache bytes, the zspa::select_tokens calls the hooks made)``, each call ``(its arguments,
    its output)``, caught at the dispatcher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SelectionRecorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.zspa.select_tokens.default:
                self.calls.append((args, out))
            return out

    with SelectionRecorder() as recorder:
        kv = models.cache_bytes(kv_cache(models.prefill(model, inputs)))
    return kv, recorder.calls


def _replayed_selection_ms(calls: list, device) -> float:
    """Milliseconds of the ``zspa::select_tokens`` ``calls`` (:func:`_recorded_selection_prefill`'s) made again with
    their arguments, each synchronised: the selection's time alone, without a dispatch mode over the prefill."""
    total = 0.0
    for args, _ in calls:
        hb.synchronize(device)
        t0 = time.perf_counter()
        torch.ops.zspa.select_tokens(*args)
        hb.synchronize(device)
        total += 1e3 * (time.perf_counter() - t0)
    return total


def agreement(names: tuple[str, str], calls: tuple[list, list]) -> str:
    """How the differing picks of two backends (``names``) on the same prompt compare, from their
    ``zspa::select_tokens`` calls (:func:`_recorded_selection_prefill`): the largest fp64 score gap at a
    step where an image's picks part (reference.parting_gap). Within the two backends' rounding
    there (in the core spec.CORE_TOLERANCE each, after it spec.PICK_TOLERANCE, summed) that is a
    near-tie, which either may break."""
    from zspa_kernels.reference import parting_gap
    from zspa_kernels.spec import CORE_TOLERANCE, PICK_TOLERANCE, row_budgets

    parts = []  # (gap, the two backends' bound at that step)
    for (args, first), (_, other) in zip(*calls):
        visual, prompt, k, core_ratio, lengths, prompt_mask, relevance = args[:7]
        for b in range(visual.shape[0]):
            n = visual.shape[1] if lengths is None else int(lengths[b])
            parted = parting_gap(visual[b, :n], prompt[b], None if prompt_mask is None else prompt_mask[b],
                                 relevance, k, core_ratio, first[b].cpu(), other[b].cpu())
            if parted is not None:
                in_core = parted[0] < row_budgets(k, core_ratio, n)[1]
                parts.append((parted[1], len(names) * CORE_TOLERANCE if in_core
                              else sum(PICK_TOLERANCE[name] for name in names)))
    if not parts and len(calls[0]) == len(calls[1]):
        return f"same picks as {names[0]}"
    gap, bound = max(parts, key=lambda part: part[0] / part[1], default=(float("inf"), 1.0))
    if gap <= bound:
        return f"near-tie: picks part from {names[0]}'s where fp64 scores differ by {gap:.0e}"
    return f"DIFFERENT tokens from {names[0]}'s (fp64 scores {gap:.1e} apart where the picks part)"


def leading_tokens(model) -> int:
    """How many of an image's tokens come before its grid of patches (:data:`LEADING_TOKENS`)."""
    return LEADING_TOKENS.get(getattr(getattr(model, "config", None), "model_type", None), 0)


def picture_grid(model, processor, inputs: dict, photo, n_tokens: int):
    """``(picture, (rows, cols), None)``: the photo as the model saw it and the grid its ``n_tokens`` tokens
    (after the model's :func:`leading_tokens`) form over it, row-major; or ``(None, None, why)`` where they are
    not one grid the demo knows."""
    from PIL import Image

    pixels, thw = inputs.get("pixel_values"), inputs.get("image_grid_thw")
    image_processor = getattr(processor, "image_processor", None)
    if thw is not None:  # Qwen2-VL and its kin: patches of the resized photo, merged m x m into tokens
        # The merge in the config (Qwen2-VL's), else in the image processor (VideoLLaMA3's, Muse Glimmer's).
        merge = (getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", None)
                 or getattr(image_processor, "merge_size", None))
        if thw.shape[0] != 1 or int(thw[0, 0]) != 1:
            return None, None, f"the photo is not one image of one frame (image_grid_thw {thw.tolist()})"
        h, w = int(thw[0, 1]), int(thw[0, 2])
        if merge is None:
            return None, None, (f"neither its config nor its image processor names a merge size: how its {n_tokens} "
                                f"tokens cover its {h} x {w} patches is not known here")
        if h % merge or w % merge or (h // merge) * (w // merge) != n_tokens:
            return None, None, f"its {n_tokens} tokens form no grid of {merge} x {merge} patches over its {h} x {w}"
        patch = getattr(image_processor, "patch_size", None) or getattr(model.config.vision_config, "patch_size", 1)
        # As the processor resizes the photo: h x w patches of `patch` pixels.
        return photo.resize((w * patch, h * patch), Image.BICUBIC), (h // merge, w // merge), None
    sizes = next((inputs[k] for k in ("tgt_sizes", "target_sizes") if inputs.get(k) is not None), None)
    if sizes is not None:  # MiniCPM-V: the patches of its slices packed side by side, not a picture
        return None, None, f"the processor packs the patches of {len(sizes)} slice(s) of the photo into one row"
    if isinstance(pixels, torch.Tensor) and pixels.dim() == 4 and tuple(pixels.shape[:2]) == (1, 3):
        height, width = pixels.shape[2:]
        cells = n_tokens - leading_tokens(model)
        rows = max(1, round((cells * height / width) ** 0.5))
        cols = cells // rows
        if rows * cols == cells and rows * width == cols * height:  # square cells over the whole picture
            mean = torch.as_tensor(getattr(image_processor, "image_mean", CLIP_MEAN), dtype=torch.float32)
            std = torch.as_tensor(getattr(image_processor, "image_std", CLIP_STD), dtype=torch.float32)
            image = pixels[0].float().cpu() * std.reshape(-1, 1, 1) + mean.reshape(-1, 1, 1)
            picture = Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8"))
            return picture, (rows, cols), None
        return None, None, f"its {n_tokens} tokens form no grid over the {height} x {width} picture"
    if isinstance(pixels, torch.Tensor) and pixels.dim() >= 4:
        shape = list(pixels.shape)
        if pixels.dim() > 4 and shape[1] > 1 or pixels.dim() == 4 and shape[0] > 1:
            return None, None, f"the processor splits the photo into tiles or crops (pixel_values {shape})"
        if pixels.dim() > 4:  # one crop, whose tokens may be a resampler's latents (Idefics2's), not patches
            return None, None, f"the processor passes the photo as a stack of one crop (pixel_values {shape})"
    return None, None, "its inputs hold no picture whose grid the demo knows"


def draw(picture, grid: tuple[int, int], selection, path: pathlib.Path, title: str, lead: int = 0) -> None:
    """``picture`` (the image as the model saw it) beside the same image with only the kept patches lit;
    ``selection`` indexes ``lead`` tokens that are no patch (Florence-2's mean of the patches: whether it
    was kept ends the title), then the ``rows x cols`` cells of ``grid`` row-major."""
    from PIL import Image, ImageDraw

    rows, cols = grid
    cell = max(6, -(-PICTURE_SIDE // max(rows, cols)))  # patches large enough to outline
    rgb = picture.convert("RGB").resize((cols * cell, rows * cell), Image.NEAREST)
    pruned = Image.blend(rgb, Image.new("RGB", rgb.size), 0.75)  # dropped patches: dimmed
    lit = ImageDraw.Draw(pruned)
    for rank, index in enumerate(selection.order.tolist()):
        if index < lead:
            continue
        r, c = divmod(index - lead, cols)
        box = (c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)
        pruned.paste(rgb.crop(box), box[:2])
        lit.rectangle((box[0], box[1], box[2] - 1, box[3] - 1),
                      outline=CORE_COLOUR if rank < selection.n_core else DIVERSITY_COLOUR, width=2)
    canvas = Image.new("RGB", (max(2 * rgb.width + 12, 620), rgb.height + 40), "white")  # room for the legend
    canvas.paste(rgb, (0, 40))
    canvas.paste(pruned, (rgb.width + 12, 40))
    text = ImageDraw.Draw(canvas)
    if lead:
        kept = int((selection.order < lead).sum())
        title += f" (the patches' mean token: {'kept' if kept else 'dropped'})"
    text.text((4, 4), title, fill="black")
    text.text((4, 20), f"kept {len(selection.order)} of {selection.n_tokens} {'tokens' if lead else 'patches'}:",
              fill="black")
    text.text((190, 20), f"core (prompt relevance): {selection.n_core}", fill=CORE_COLOUR)
    text.text((400, 20), f"diversity (max-min): {len(selection.order) - selection.n_core}", fill=DIVERSITY_COLOUR)
    canvas.save(path, optimize=True)


def _ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1e4 else f"{ms:.1f} ms"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _prepare(model_path, device, dtype, size: str):
    """Load the model and encode the photo and the question as the prompt; refuse (``ValueError("model:
    ...")``) what the demo cannot run. ``(model, processor, template, inputs, visual tokens of the prompt)``."""
    model, processor = load(model_path, device, dtype, size)
    # models.prefill times a causal language model's prefill, or an encoder-decoder's encoder and first step.
    models.refuse_non_autoregressive(model, "zspa demo", "no prefill to time as the others'")
    template = prompt_template(processor)
    try:
        inputs = Prompts(processor, model, template)([Sample("astronaut", PHOTO, QUESTION)])
    except Exception as exc:  # noqa: BLE001 - whatever the processor or its chat template refuses
        raise ValueError(f"model: its processor cannot encode the photo and the question: {_one_line(exc)}") from exc
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    ids = find_family(model).visual_token_ids(model.config)
    n_visual = int(torch.isin(inputs["input_ids"][0], torch.tensor(ids, dtype=torch.long, device=device)).sum())
    if n_visual == 0:
        raise ValueError(f"model: its processor wrote none of the visual tokens that its config names (ids {ids}) "
                         "for the photo")
    return model, processor, template, inputs, n_visual


def run(out: str, model_path=None, keep: int = 64, core_ratio: float = DEFAULT_CORE_RATIO, size: str = "3b") -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 for the 3b model (half the memory; native on CPUs with AVX-512 BF16 or AMX), fp32 for the toy.
    dtype = torch.bfloat16 if device.type == "cuda" or (model_path is None and size != "tiny") else torch.float32
    out_dir = pathlib.Path(out)
    backends = hb.backends_here(device)
    print(f"zspa demo on {hb.environment(device)['device']}, {str(dtype).replace('torch.', '')}")
    if model_path is None:
        what = ("LLaVA-1.5 architecture: CLIP ViT-L/14-336 + a Llama-3.2-3B-sized language model" if size == "3b"
                else "toy LLaVA-1.5 architecture")
        print(f"  model: a {what}, built from a config with RANDOM weights (no download):")
        print("  the pipeline, shapes, memory and timings are real; which patches win is not meaningful.")
    else:
        print(f"  model: {model_path}")

    steps = 5 if "cpu" in backends else 4
    step = iter(range(1, steps + 1))
    if "cpu" in backends:
        with _step(f"[{next(step)}/{steps}] the cpu backend's kernels (compiled once per machine)"):
            from zspa_kernels.cpu import kernels_available

            kernels_available()
    try:
        with _step(f"[{next(step)}/{steps}] loading the photo (scikit-image astronaut) and "
                   f"{'building' if model_path is None else 'loading'} the model"):
            model, processor, template, inputs, n_visual = _prepare(model_path, device, dtype, size)
    except ValueError as exc:  # before any timing, as zspa fidelity refuses before its first pass
        print(f"zspa demo: --{exc}", file=sys.stderr)
        return 2
    if model_path is not None:
        prompt = "the processor's chat template" if template is None else repr(template)
        print(f"  family: {find_family(model).name} ({type(model).__name__}); prompt: {prompt}")
    picture, grid, no_picture = picture_grid(model, processor, inputs, open_image(PHOTO), n_visual)
    print(f'  question: "{QUESTION}"  ({inputs["input_ids"].shape[1]} prompt tokens, {n_visual} of them visual)')

    clock = _PrefillClock(model, device)
    pruning = {backend: lambda backend=backend: zspa_kernels.prune(model, keep=keep, core_ratio=core_ratio,
                                                                    backend=backend, tokenizer=processor)
               for backend in backends}
    selections, kv_bytes, calls, refusal = {}, {}, {}, None
    with _step(f"[{next(step)}/{steps}] warm-up: one prefill unpruned, two per backend ({', '.join(backends)})"):
        try:
            kv_bytes["unpruned"] = models.cache_bytes(kv_cache(models.prefill(model, inputs)))
        except Exception as exc:  # noqa: BLE001 - the checkpoint's own model fails on the prompt, unpruned
            if model_path is None:
                raise
            refusal = f"the unpruned model fails on its prompt: {_one_line(exc)}"
        for backend in backends if refusal is None else ():
            try:
                with pruning[backend]() as handle:
                    _recorded_selection_prefill(model, inputs)  # cold: Triton's JIT, the extension's load
                    kv_bytes[backend], calls[backend] = _recorded_selection_prefill(model, inputs)
                    selections[backend] = handle.last_selection
            except ValueError as exc:  # what the hooks refuse only once they see the prompt: still before any timing
                refusal = f"prune() cannot prune its prompt: {exc}"
                break
    if refusal is not None:
        clock.remove()
        print(f"zspa demo: {'' if model_path is None else '--model: '}{refusal}", file=sys.stderr)
        return 2
    # Interleaved rounds: a change in the machine's load hits every configuration alike.
    runs = {name: [] for name in ["unpruned", *backends]}
    selecting = {backend: [] for backend in backends}
    n_step = next(step)
    for r in range(1, REPEATS + 1):
        with _step(f"[{n_step}/{steps}] timed round {r}/{REPEATS}: unpruned, then each backend"):
            runs["unpruned"].append(clock(inputs))
            for backend in backends:
                with pruning[backend]():
                    runs[backend].append(clock(inputs))
                selecting[backend].append(_replayed_selection_ms(calls[backend], device))
    clock.remove()
    median = {name: (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))
              for name, times in runs.items()}
    sel_ms = {backend: statistics.median(times) for backend, times in selecting.items()}
    full_ms, full_lm_ms = median["unpruned"]
    first = selections[backends[0]]  # one per image the model budgets the photo as
    # The tokens the selection saw: the prompt's visual tokens, or what a cross-attention family's single
    # image token stands for (Llama 3.2 Vision's tiles).
    n_tokens = sum(s.n_tokens for s in first)
    rows = [("unpruned", n_tokens, full_ms, full_lm_ms, kv_bytes["unpruned"], None, "")]
    for i, backend in enumerate(backends):
        same = all(torch.equal(a.kept.cpu(), b.kept.cpu()) for a, b in zip(selections[backend], first))
        note = ("" if i == 0 else f"same tokens as {backends[0]}" if same
                else agreement((backends[0], backend), (calls[backends[0]], calls[backend])))
        rows.append((backend, sum(len(s.order) for s in selections[backend]), *median[backend], kv_bytes[backend],
                     sel_ms[backend], note))

    print()
    print(f"{'backend':<11}{'visual tokens':>15}{'prefill':>12}{'of it LM':>12}{'KV cache':>12}{'selection':>12}")
    for name, n, ms, lm_ms, kv, sel, note in rows:
        sel_text = "—" if sel is None else f"{sel:.2f} ms"
        print(f"{name:<11}{f'{n_tokens} -> {n}':>15}{_ms(ms):>12}{_ms(lm_ms):>12}{_bytes(kv):>12}{sel_text:>12}  {note}")
    main = rows[1]
    speedup, lm_speedup = full_ms / main[2], full_lm_ms / main[3]
    prefill = f"prefill {speedup:.1f}x faster" if speedup >= 1 else f"prefill {1 / speedup:.1f}x slower"
    print(f"\nKV cache {kv_bytes['unpruned'] / main[4]:.1f}x smaller, {prefill} (language model {lm_speedup:.1f}x; the vision "
          f"tower runs either way), selection {100 * main[5] / main[2]:.2f}% of the pruned prefill "
          f"(backend {main[0]}, keep {keep} per image: {main[1]} of {n_tokens} kept, core ratio {core_ratio}).")
    if speedup < 1 and size == "tiny" and model_path is None:
        print("At this toy size the selection outweighs the language-model work it saves: run without --size tiny.")
    elif speedup < 1:
        print("The pruned prefill is no faster here. On a GPU at batch 1 an eager language model is bound by the "
              "host launching its kernels, which does not shrink with the tokens; bench/e2e.py measures batch 8.")

    n_step = next(step)
    lead = leading_tokens(model)
    if grid is not None and (len(first) != 1 or first[0].n_tokens != lead + grid[0] * grid[1]):
        grid = None
        no_picture = f"the model budgets the photo as {len(first)} images of {[s.n_tokens for s in first]} tokens"
    path = out_dir / "kept_patches.png"
    if grid is None:
        path.unlink(missing_ok=True)  # an earlier run's picture would pass for this model's
        print(f"  [{n_step}/{steps}] no picture of the kept patches: {no_picture}")
    else:
        with _step(f"[{n_step}/{steps}] drawing the kept patches"):
            out_dir.mkdir(parents=True, exist_ok=True)
            label = "random-weight LLaVA-1.5 architecture" if model_path is None else str(model_path)
            draw(picture, grid, first[0], path, f"ZSPAPrune, {label}, backend {backends[0]}: \"{QUESTION}\"", lead)
    peak = f"peak host memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"  # Linux: KiB
    print(peak if grid is None else f"wrote {path}  ({peak})")
    return 0
