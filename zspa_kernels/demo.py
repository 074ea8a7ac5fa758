"""``zspa demo``: prune a LLaVA-architecture VLM on a real photo, with every available backend.

Nothing is downloaded. The photo is scikit-image's astronaut (NASA, public domain);
the model is a LLaVA-1.5 architecture built from a config with RANDOM weights, with an
image processor built from CLIP's published preprocessing values and a word-level
tokenizer built in code. ``--size 3b`` (the default) has real proportions: CLIP
ViT-L/14 at 336 px (576 visual tokens) and a Llama-3.2-3B-sized language model, whose
prefill dominates as in LLaVA, in bf16; ``--size tiny`` is a toy of the same shape for
tests. Random weights make the kept tokens meaningless for the question, but the
pipeline, the shapes, the KV-cache savings and the timings are the real ones;
``--model PATH`` runs a local LLaVA-1.5-style checkpoint instead.

The selection time shown is the one of the ``zspa::select_tokens`` call that the pruning
hooks made inside a pruned prefill (caught at the dispatcher): the same prompt, the same
budget and the same tokens as the prefill it pruned. It comes from the warm-up prefill,
so it includes a backend's first-call costs (an upper bound).
"""
from __future__ import annotations

import contextlib
import pathlib
import resource
import statistics
import time

import torch

import zspa_kernels
from zspa_kernels import benchmark as hb
from zspa_kernels import models
from zspa_kernels.integrations.transformers import kv_cache
from zspa_kernels.spec import DEFAULT_CORE_RATIO

SIZES = ("3b", "tiny")
REPEATS = 3  # timed rounds after the warm-up, median: a CPU's prefill time swings with the machine's load
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
                                        eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                        model_input_names=["input_ids", "attention_mask"])  # as Llama's: no token_type_ids
    image_processor = ImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                     do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def load(model_path, device, dtype, size: str = "tiny"):
    if model_path is None:
        from transformers import LlavaForConditionalGeneration

        processor = build_processor()
        config = models.llava_config(size, vocab_size=len(processor.tokenizer),
                                     image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"))
        model = models.build_from_config(LlavaForConditionalGeneration, config, dtype, device, fast_init=size != "tiny")
        return model, processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).to(device)
    return model.eval(), processor


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


def _timed_selection_prefill(model, inputs, device) -> tuple[int, float]:
    """One prefill: ``(KV-cache bytes, ms spent in the zspa::select_tokens calls the hooks made)``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SelectionClock(TorchDispatchMode):
        ms = 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is not torch.ops.zspa.select_tokens.default:
                return func(*args, **(kwargs or {}))
            hb.synchronize(device)
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            hb.synchronize(device)
            self.ms += 1e3 * (time.perf_counter() - t0)
            return out

    with SelectionClock() as clock:
        kv = models.cache_bytes(kv_cache(models.prefill(model, inputs)))
    return kv, clock.ms


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


def _ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1e4 else f"{ms:.1f} ms"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def run(out: str, model_path=None, keep: int = 64, core_ratio: float = DEFAULT_CORE_RATIO, size: str = "3b") -> int:
    from skimage import data

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 for the 3b model (half the memory; native on CPUs with AVX-512 BF16 or AMX), fp32 for the toy.
    dtype = torch.bfloat16 if device.type == "cuda" or (model_path is None and size != "tiny") else torch.float32
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    with _step(f"[{next(step)}/{steps}] loading the photo (scikit-image astronaut) and "
               f"{'building' if model_path is None else 'loading'} the model"):
        from PIL import Image

        photo = Image.fromarray(data.astronaut())
        model, processor = load(model_path, device, dtype, size)
        image_token = model.config.image_token_index
        prompt = TEMPLATE.format(question=QUESTION)
        inputs = processor(images=photo, text=prompt, return_tensors="pt")
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    n_visual = int((inputs["input_ids"][0] == image_token).sum())
    print(f'  question: "{QUESTION}"  ({inputs["input_ids"].shape[1]} prompt tokens, {n_visual} of them visual)')

    clock = _PrefillClock(model, device)
    pruning = {backend: lambda backend=backend: zspa_kernels.prune(model, keep=keep, core_ratio=core_ratio,
                                                                    backend=backend, tokenizer=processor)
               for backend in backends}
    selections, kv_bytes, sel_ms = {}, {}, {}
    with _step(f"[{next(step)}/{steps}] warm-up: one prefill unpruned, two per backend ({', '.join(backends)})"):
        kv_bytes["unpruned"] = models.cache_bytes(kv_cache(models.prefill(model, inputs)))
        for backend in backends:
            with pruning[backend]() as handle:
                _timed_selection_prefill(model, inputs, device)  # cold: Triton's JIT, the extension's load
                kv_bytes[backend], sel_ms[backend] = _timed_selection_prefill(model, inputs, device)
                selections[backend] = handle.last_selection[0]
    # Interleaved rounds: a change in the machine's load hits every configuration alike.
    runs = {name: [] for name in ["unpruned", *backends]}
    n_step = next(step)
    for r in range(1, REPEATS + 1):
        with _step(f"[{n_step}/{steps}] timed round {r}/{REPEATS}: unpruned, then each backend"):
            runs["unpruned"].append(clock(inputs))
            for backend in backends:
                with pruning[backend]():
                    runs[backend].append(clock(inputs))
    clock.remove()
    median = {name: (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))
              for name, times in runs.items()}
    full_ms, full_lm_ms = median["unpruned"]
    rows = [("unpruned", n_visual, full_ms, full_lm_ms, kv_bytes["unpruned"], None, "")]
    for i, backend in enumerate(backends):
        same = torch.equal(selections[backend].kept.cpu(), selections[backends[0]].kept.cpu())
        rows.append((backend, len(selections[backend].order), *median[backend], kv_bytes[backend], sel_ms[backend],
                     "" if i == 0 else ("same tokens as " + backends[0] if same else "DIFFERENT tokens")))

    print()
    print(f"{'backend':<11}{'visual tokens':>15}{'prefill':>12}{'of it LM':>12}{'KV cache':>12}{'selection':>12}")
    for name, n, ms, lm_ms, kv, sel, note in rows:
        sel_text = "—" if sel is None else f"{sel:.2f} ms"
        print(f"{name:<11}{f'{n_visual} -> {n}':>15}{_ms(ms):>12}{_ms(lm_ms):>12}{_bytes(kv):>12}{sel_text:>12}  {note}")
    main = rows[1]
    speedup, lm_speedup = full_ms / main[2], full_lm_ms / main[3]
    prefill = f"prefill {speedup:.1f}x faster" if speedup >= 1 else f"prefill {1 / speedup:.1f}x slower"
    print(f"\nKV cache {kv_bytes['unpruned'] / main[4]:.1f}x smaller, {prefill} (language model {lm_speedup:.1f}x; the vision "
          f"tower runs either way), selection {100 * main[5] / main[2]:.2f}% of the pruned prefill "
          f"(backend {main[0]}, keep {keep} of {n_visual}, core ratio {core_ratio}).")
    if speedup < 1 and size == "tiny" and model_path is None:
        print("At this toy size the selection outweighs the language-model work it saves: run without --size tiny.")
    elif speedup < 1:
        print("The pruned prefill is no faster here. On a GPU at batch 1 an eager language model is bound by the "
              "host launching its kernels, which does not shrink with the tokens; bench/e2e.py measures batch 8.")

    n_step = next(step)
    with _step(f"[{n_step}/{steps}] drawing the kept patches"):
        path = out_dir / "kept_patches.png"
        label = "random-weight LLaVA-1.5 architecture" if model_path is None else str(model_path)
        mean = getattr(processor.image_processor, "image_mean", CLIP_MEAN)
        std = getattr(processor.image_processor, "image_std", CLIP_STD)
        draw(inputs["pixel_values"], selections[backends[0]], path,
             f"ZSPAPrune, {label}, backend {backends[0]}: \"{QUESTION}\"", mean, std)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print(f"wrote {path}  (peak host memory {peak:.1f} GiB)")
    return 0
