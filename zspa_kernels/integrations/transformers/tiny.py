"""Tiny randomly initialised VLMs of every supported family, built from configs (no
downloads), with matching inputs: for the tests, the examples and offline demos.

Each builder returns a :class:`TinyVLM`; its ``make_inputs(rows)`` turns a list of rows,
each a list of segments (``("text", n)``, ``("image", size)``, ``("video", size)``, ``("audio",
size)``; the size's meaning is the family's; audio is kept whole, like text), into the keyword
arguments of ``model(...)`` and ``model.generate(...)``, left-padded. Token ids are random, so prompts mean nothing.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import transformers

from ...spec import release

VOCAB = 128
PAD = 0
TEXT_IDS = (1, 90)  # ordinary text tokens are drawn from this range


def _text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(*TEXT_IDS, (n,), generator=gen).tolist()


def _generators(rows, seeds) -> list[torch.Generator]:
    """One generator per row, so a row's content depends only on its own seed: the
    same row built alone (``seeds=[r]``) equals row ``r`` of the batch."""
    seeds = range(len(rows)) if seeds is None else seeds
    return [torch.Generator().manual_seed(1000 + s) for s in seeds]


def _token_rows(rows, seeds, media: Callable[[str, object, torch.Generator, int], list[int]]) -> dict:
    """``input_ids`` and ``attention_mask`` of ``rows``, left-padded. Text segments are drawn
    from the row's generator; every other segment's ids come from ``media(kind, size, gen, r)``
    (``r``: the row), which draws that segment's pixels from the same generator and keeps them."""
    ids = []
    for r, (segments, gen) in enumerate(zip(rows, _generators(rows, seeds))):
        row = []
        for kind, size in segments:
            row += _text(size, gen) if kind == "text" else media(kind, size, gen, r)
        ids.append(row)
    return _left_pad(ids)


def _left_pad(rows: list[list[int]]) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class TinyVLM:
    model: torch.nn.Module
    make_inputs: Callable[..., dict]  # (rows, seeds=None) -> model kwargs
    single: list  # one row: text, image, text
    batch: list  # rows of different lengths and image counts/sizes
    frames_are_images: bool = False  # each video frame is its own run of tokens (Qwen3-VL)
    tiles_are_images: bool = False  # an ("image", n) segment is n separately budgeted tiles
    # The separately budgeted runs an ("image", size) segment becomes, where that is not 1 (or n above).
    image_runs: Optional[Callable[[object], int]] = None
    beam_video: bool = True  # False where the unpatched model cannot beam-search a video
    beam_multi_image: bool = True  # False where it cannot beam-search rows of several images
    beam_images: bool = True  # False where it cannot beam-search images at all
    static_generate: bool = True  # False where its generate() fails on a static cache
    # False where a prefill on a reset static cache differs from one on a fresh cache, unpatched (Inkling;
    # UnlimitedOCR's once unpickled, as the deep-copy test resets it).
    static_reset: bool = True
    # Where the unpatched model's static-cache generation of ``batch`` differs from its dynamic-cache one
    # (None: they agree), what a keep-all pruned static-cache generation is held to instead of it:
    # "dynamic" where the hooks reproduce the dynamic-cache one (Gemma 4 Unified: generate() builds a
    # static cache's masks with the model's create_masks_for_generate, which opens the image blocks on the
    # sliding-window layers only, where its base model opens them on every layer; Gemma 4 on 5.17 and
    # PaliGemma on 4.57, seen, not traced); "neither" where it reproduces neither: left out (Fuyu on 4.57,
    # whose base model passes its language model no cache_position, which then counts a static cache's
    # length from batch row 0's nonzero keys: a left-padded row 0's padding has zero keys, so every step is
    # numbered and stored too early, unpatched; the hooks' masks are wrong otherwise. A row alone agrees).
    static_differs: Optional[str] = None
    # False where its prompt-lookup decoding fails on some drafts (Molmo2: it drafts the prompt's
    # image tokens, whose ids lie past its logits).
    prompt_lookup: bool = True
    # True where the unpatched model compiles a graph per count of tokens routed to an expert (a
    # Python loop over its experts): how many graphs a compiled generation makes depends on its tokens.
    graphs_follow_routing: bool = False
    # True where a compiled static-cache decode step has one graph more than unpatched, compiled once: the
    # language model's forward breaks Dynamo's graph (Phi-4-multimodal's embedding looks for image tokens in
    # Python), so the hooks are traced as a frame of their own, and transformers 4.x's decode steps need
    # their cache_position remapped there (a tensor op: one graph).
    hook_graph: bool = False
    # False where the unpatched model's batch rows depend on each other (HunYuan-VL numbers images
    # across the batch): a row batched then differs from the row alone, pruned or not.
    rows_independent: bool = True
    # A model around ``model`` that prune() also takes, with outputs of its own (ShieldGemma 2's
    # classifier: the yes/no logits of the last position); tested apart.
    wrapper: Optional[torch.nn.Module] = None

    @property
    def beam_batch(self) -> list:
        return [r for r in self.batch
                if self.beam_images and (self.beam_video or all(s[0] != "video" for s in r))
                and (self.beam_multi_image or sum(s[0] in ("image", "video") for s in r) == 1)]

    def n_images(self, rows) -> int:
        """How many separately budgeted images (or frames) ``rows`` hold."""
        return sum(seg[1][0] if seg[0] == "video" and self.frames_are_images
                   else seg[1] if seg[0] == "image" and self.tiles_are_images
                   else self.image_runs(seg[1]) if seg[0] == "image" and self.image_runs else 1
                   for row in rows for seg in row if seg[0] in ("image", "video"))


def _finish(model: torch.nn.Module, attn: str) -> torch.nn.Module:
    model.set_attn_implementation(attn)
    # Decode until max_new_tokens: an early eos would make step-by-step comparisons ragged.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _tiny_llama(model_type: str = "llama"):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                                bos_token_id=1, eos_token_id=2)


def _clip_llama_configs(size: int = 16) -> dict:
    """The tiny CLIP tower (``size`` px images, 4 px patches) and Llama of both LLaVA families."""
    from transformers import CLIPVisionConfig

    return dict(vision_config=CLIPVisionConfig(**TOWER, image_size=size, patch_size=4),
                text_config=_tiny_llama())


def _n_features(model, **image) -> int:
    """Feature rows one image becomes (whatever the tower and feature strategy); asks the model,
    wherever it lives (the GPU tests move the tiny models to CUDA)."""
    image = {key: v.to(model.device) if isinstance(v, torch.Tensor) else v for key, v in image.items()}
    with torch.no_grad():
        out = model.model.get_image_features(**image)
    features = getattr(out, "pooler_output", out)
    if features is None:  # Granite 4 Vision: (layer, per-image features) pairs only
        features = out.deepstack_features[0][1]
    first = features[0]  # (tokens, D), or (h, w, D) in Aya Vision 4.57
    return first.numel() // first.shape[-1]


def _stack_tiles(pixels: list) -> torch.Tensor:
    """Per-image ``(tiles, 3, H, W)`` tensors as one batch, zero-padded to the most tiles."""
    most = max(p.shape[0] for p in pixels)
    return torch.stack([torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[0]))
                        for p in pixels])


def _pixtral_tokens(h: int, w: int, step: int, image: int, row_break: int, end: int) -> list[int]:
    """Pixtral's layout: a row of ``w // step`` image tokens per ``step`` pixels of height,
    a row-break token after each row but the last, which ends with an end-of-image token."""
    rows = [[image] * (w // step) + [row_break] for _ in range(h // step)]
    rows[-1][-1] = end
    return sum(rows, [])


def _pixtral_inputs(rows, seeds, image_token: int, step: int, size: int, breaks: bool = True) -> dict:
    """Inputs of a Pixtral-tower model: images of (h, w) pixels, zero-padded to size x size; without
    ``breaks``, an image is its ``(h // step) * (w // step)`` image tokens alone (LightOnOCR)."""
    pixels, sizes = [], []

    def image(kind, hw, gen, r):
        pixels.append(torch.zeros(3, size, size))
        pixels[-1][:, : hw[0], : hw[1]] = torch.randn(3, *hw, generator=gen)
        sizes.append(hw)
        if not breaks:
            return [image_token] * (hw[0] // step) * (hw[1] // step)
        return _pixtral_tokens(*hw, step, image_token, PIXTRAL_BREAK, PIXTRAL_END)

    ids = _token_rows(rows, seeds, image)
    return dict(ids, pixel_values=torch.stack(pixels), image_sizes=torch.tensor(sizes))


PIXTRAL_BREAK, PIXTRAL_END = 125, 126
PIXTRAL_ROWS = dict(
    # Before 5.24 generate() expands image_sizes image by image, not row by row, for beam
    # search: a row of several images gets other beams' sizes (the model itself misplaces
    # their features; prune refuses).
    beam_multi_image=hasattr(transformers.GenerationMixin, "_expand_multimodal_outputs"),
    single=[[("text", 5), ("image", (16, 12)), ("text", 7)]],
    batch=[[("text", 5), ("image", (16, 16)), ("text", 7)],
           [("text", 3), ("image", (8, 16)), ("image", (12, 8)), ("text", 4)],
           [("image", (16, 8)), ("text", 9)]])
# Text between every two images.
SPACED_ROWS = dict(single=[[("text", 5), ("image", 0), ("text", 7)]],
                   batch=[[("text", 5), ("image", 0), ("text", 7)],
                          [("text", 3), ("image", 0), ("text", 1), ("image", 0), ("text", 4)],
                          [("image", 0), ("text", 9)]])
# Two images back to back (no text between them) in the middle row: only the per-image
# counts can tell where one ends.
ADJACENT_ROWS = dict(single=[[("text", 5), ("image", 0), ("text", 7)]],
                     batch=[[("text", 5), ("image", 0), ("text", 7)],
                            [("text", 3), ("image", 0), ("image", 0), ("text", 4)],
                            [("image", 0), ("text", 9)]])


def llava(attn: str = "sdpa", seed: int = 0, tower: str = "clip",
          strategy: str = "default", size: int = 16) -> TinyVLM:
    """LLaVA with a CLIP (class token), SigLIP (none) or Pixtral (any size, row breaks)
    vision tower: the layouts of llava-1.5, of SigLIP-tower LLaVAs and of Pixtral-12B.
    ``size``: the CLIP and SigLIP towers' image side in pixels, (size / 4)^2 tokens an image."""
    from transformers import (AutoConfig, LlavaConfig, LlavaForConditionalGeneration)

    torch.manual_seed(seed)
    image_token = 127
    if tower == "clip":
        configs = _clip_llama_configs(size)
    else:
        vision = AutoConfig.for_model(
            "siglip_vision_model" if tower == "siglip" else "pixtral", **TOWER,
            image_size=16 if tower == "pixtral" else size, patch_size=4)
        configs = dict(vision_config=vision, text_config=_tiny_llama())
    config = LlavaConfig(**configs, image_token_id=image_token, image_seq_length=(size // 4) ** 2,
                         vision_feature_select_strategy=strategy, pad_token_id=PAD)
    model = _finish(LlavaForConditionalGeneration(config), attn)
    if tower == "pixtral":
        return TinyVLM(model, lambda rows, seeds=None: _pixtral_inputs(rows, seeds, image_token, 4, 16),
                       **PIXTRAL_ROWS)
    make_inputs = _same_size_images(model, image_token, size)
    if tower == "clip":
        return TinyVLM(model, make_inputs, **SPACED_ROWS)
    return TinyVLM(model, make_inputs, **ADJACENT_ROWS)


def _same_size_images(model, image_token: int, size: int) -> Callable[..., dict]:
    """``make_inputs`` of a fixed-size tower: every image ``size`` x ``size`` pixels, as many
    image tokens as the model makes of one."""
    tokens = _n_features(model, pixel_values=torch.zeros(1, 3, size, size))

    def make_inputs(rows, seeds=None) -> dict:
        pixels = []

        def image(kind, _, gen, r):
            pixels.append(torch.randn(3, size, size, generator=gen))
            return [image_token] * tokens

        ids = _token_rows(rows, seeds, image)
        return dict(ids, pixel_values=torch.stack(pixels))

    return make_inputs


def vipllava(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """VipLLaVA: LLaVA-1.5's layout (a CLIP tower; 16 tokens an image, the class token dropped)
    with the features of two tower layers concatenated; images back to back too."""
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    torch.manual_seed(seed)
    image_token = 127
    config = VipLlavaConfig(**_clip_llama_configs(), image_token_index=image_token,
                            vision_feature_layers=[-2, -1], image_seq_length=16, pad_token_id=PAD)
    model = _finish(VipLlavaForConditionalGeneration(config), attn)
    return TinyVLM(model, _same_size_images(model, image_token, 16), **ADJACENT_ROWS)


def fast_vlm(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """FastVLM (transformers 5.x): LLaVA's layout with a convolutional tower whose last feature map
    (B, C, h, w) gives ``h*w`` tokens; a two-stage ConvNeXt (32 px images, 8 px a token: 16 tokens)
    stands in for FastViTHD, a timm model (timm is no dependency of this project)."""
    from transformers import AutoConfig, FastVlmConfig, FastVlmForConditionalGeneration

    torch.manual_seed(seed)
    image_token = 127
    # hidden_size: the projector's input width, the last stage's channels (as FastViTHD's config says).
    vision = AutoConfig.for_model("convnext", patch_size=4, hidden_sizes=[16, 32], depths=[1, 1],
                                  num_stages=2, hidden_size=32, image_size=32)
    config = FastVlmConfig(vision_config=vision, text_config=_tiny_llama("qwen2"), image_token_index=image_token,
                           image_seq_length=16, pad_token_id=PAD)
    # The convolutional tower has no attention to choose.
    model = _finish(FastVlmForConditionalGeneration(config), {"text_config": attn, "vision_config": "eager"})
    return TinyVLM(model, _same_size_images(model, image_token, 32), **ADJACENT_ROWS)


# Mistral Small 4's text model (transformers 5.x): multi-head latent attention (queries and keys/values
# through low-rank projections, a rotary part of 4 dims a head) and MoE layers (4 routed experts, 2 a
# token, and a shared one).
MISTRAL4_TEXT = dict(model_type="mistral4", hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                     num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16,
                     qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, vocab_size=VOCAB,
                     max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                     # YaRN as in the checkpoints, its factor the context's ratio; queries scaled by
                     # 1 + beta * log(1 + position // 16) (Llama 4's scaling), so from position 16 on.
                     rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=32.0,
                                          original_max_position_embeddings=16, llama_4_scaling_beta=0.1))


def mistral3(attn: str = "sdpa", seed: int = 0, text: Optional[dict] = None) -> TinyVLM:
    """Mistral3 (Mistral-Small-3.1): a Pixtral tower (2 px patches) whose 2x2 patch merger
    makes a token per 4x4 pixels, row-break tokens between rows of them; ``text``: another text
    model's config (Mistral Small 4's: :data:`MISTRAL4_TEXT`)."""
    from transformers import AutoConfig, Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    image_token = 127
    config = Mistral3Config(
        vision_config=AutoConfig.for_model("pixtral", **TOWER, image_size=16, patch_size=2),
        text_config=_tiny_llama("mistral") if text is None else text, image_token_index=image_token,
        spatial_merge_size=2, pad_token_id=PAD)
    model = _finish(Mistral3ForConditionalGeneration(config), attn)
    return TinyVLM(model, lambda rows, seeds=None: _pixtral_inputs(rows, seeds, image_token, 4, 16),
                   **PIXTRAL_ROWS)


def ovis2(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Ovis2: an image of (r, c) tiles of 32 px (4 px patches, merged 2x2: 16 tokens a tile) is
    ``<IMG_START>``, its global view's tokens, ``<IMG_GRID>``, then (for more than one tile) the
    tiles row by row, ``<IMG_COL>`` between the tiles of a row and ``<IMG_ROW>`` between rows, then
    ``<IMG_END>``: each tile and the global view a run of its own. The five markers are the
    config's visual indicator tokens, embedded from the visual table."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration

    torch.manual_seed(seed)
    image_token, (start, grid_mark, col, row_mark, end) = 127, (120, 121, 122, 123, 124)
    config = Ovis2Config(
        vision_config=dict(**TOWER, image_size=32, patch_size=4, hidden_stride=2, vocab_size=64),
        text_config=_tiny_llama("qwen2"), image_token_id=image_token,
        visual_indicator_token_ids=[start, grid_mark, col, row_mark, end], vocab_size=VOCAB, hidden_size=32,
        pad_token_id=PAD)
    model = _finish(Ovis2ForConditionalGeneration(config), attn)
    tokens = [image_token] * 16

    def make_inputs(rows, seeds=None) -> dict:
        pixels = []

        def image(kind, grid, gen, r):
            h, w = grid
            ids = [start] + tokens + [grid_mark]
            if h * w > 1:
                ids += sum((sum(([*tokens, col] for _ in range(w)), [])[:-1] + [row_mark] for _ in range(h)), [])[:-1]
            pixels.append(torch.randn(1 + h * w * (h * w > 1), 3, 32, 32, generator=gen))
            return ids + [end]

        ids = _token_rows(rows, seeds, image)
        return dict(ids, pixel_values=torch.cat(pixels))

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (1, 1)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (2, 2)), ("text", 7)],
                          [("text", 3), ("image", (1, 1)), ("image", (1, 2)), ("text", 4)],
                          [("image", (1, 1)), ("text", 9)]],
                   image_runs=lambda grid: 1 + grid[0] * grid[1] * (grid[0] * grid[1] > 1))


def lighton_ocr(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """LightOnOCR (transformers 5.x): Mistral3's Pixtral tower and 2x2 patch merger (a token per 4x4
    pixels) around a Qwen3 text model; an image is its image tokens alone, no row breaks or end
    token between them, so images in a row may stand back to back."""
    from transformers import AutoConfig, LightOnOcrConfig, LightOnOcrForConditionalGeneration

    torch.manual_seed(seed)
    image_token = 127
    text = _tiny_llama("qwen3")
    text.head_dim = 8
    config = LightOnOcrConfig(
        vision_config=AutoConfig.for_model("pixtral", **TOWER, image_size=16, patch_size=2),
        text_config=text, image_token_id=image_token, spatial_merge_size=2, pad_token_id=PAD)
    model = _finish(LightOnOcrForConditionalGeneration(config), attn)
    return TinyVLM(model, lambda rows, seeds=None: _pixtral_inputs(rows, seeds, image_token, 4, 16, breaks=False),
                   **PIXTRAL_ROWS)


def aria(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Aria: an image of ``n`` crops (32 px, 4 px patches: 64 patches, which the cross-attention
    projector turns into 16 queries) is one run of ``16n`` image tokens between ``<fim_prefix>`` and
    ``<fim_suffix>`` (its chat template's ``<fim_prefix><|img|><fim_suffix>``; no config names them);
    a MoE text model (4 experts, 2 a token, and a shared one)."""
    from transformers import AriaConfig, AriaForConditionalGeneration, AriaTextConfig, AutoConfig

    torch.manual_seed(seed)
    image_token, fim_prefix, fim_suffix = 127, 120, 121
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, moe_num_experts=4,
                moe_topk=2, moe_num_shared_experts=1, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config = AriaConfig(vision_config=AutoConfig.for_model("idefics3_vision", **TOWER, image_size=32, patch_size=4),
                        text_config=AriaTextConfig(**text), projector_patch_to_query_dict={64: 16}, image_token_index=image_token,
                        pad_token_id=PAD)
    model = AriaForConditionalGeneration(config)
    # The projector's learned queries start at zero, and its attention is near uniform at init: every
    # token of a crop would be the patches' mean. Distinct queries, and keys that tell the patches apart.
    projector = model.model.multi_modal_projector
    for weight in (projector.query, projector.cross_attn.q_proj.weight, projector.cross_attn.k_proj.weight):
        torch.nn.init.normal_(weight, std=1.0)
    model = _finish(model, attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels = []

        def image(kind, crops, gen, r):
            pixels.append(torch.randn(crops, 3, 32, 32, generator=gen))
            return [fim_prefix] + [image_token] * 16 * crops + [fim_suffix]

        ids = _token_rows(rows, seeds, image)
        pixels = torch.cat(pixels)
        return dict(ids, pixel_values=pixels, pixel_mask=torch.ones(pixels.shape[0], 32, 32, dtype=torch.bool))

    # Before transformers 5.24 its experts run one by one on the token counts routed to them, read
    # back to the host: a compiled generation makes a graph per count.
    from transformers.models.aria import modeling_aria

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", 1), ("text", 7)]],
                   batch=[[("text", 5), ("image", 2), ("text", 7)],
                          [("text", 3), ("image", 1), ("image", 2), ("text", 4)],
                          [("image", 1), ("text", 9)]],
                   tiles_are_images=True, graphs_follow_routing=hasattr(modeling_aria, "sequential_experts_gemm"))


# A tiny SAM-style tower (GOT-OCR2's, DeepSeek-VL-Hybrid's high-resolution one): 64 px images of 4 px
# patches, windowed attention in its first layer, global in its second.
# Its config initialises weights at 1e-10 (for checkpoints to overwrite): every feature would be alike.
SAM_TOWER = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                 patch_size=4, window_size=4, global_attn_indexes=[1], mlp_dim=64, initializer_range=0.02)


def _tiles_between(start: int, end: int, image_token: int, tokens: int, size: int):
    """``make_inputs`` for images given as a number of ``size``-px tiles (crops), ``tokens`` image
    tokens each, all of an image's tiles one run between ``start`` and ``end`` (InternVL, GOT-OCR2)."""
    def make_inputs(rows, seeds=None) -> dict:
        pixels = []

        def image(kind, tiles, gen, r):
            pixels.append(torch.randn(tiles, 3, size, size, generator=gen))
            return [start] + [image_token] * tokens * tiles + [end]

        ids = _token_rows(rows, seeds, image)
        return dict(ids, pixel_values=torch.cat(pixels))

    return make_inputs


def got_ocr2(attn: str = "sdpa", seed: int = 0, chart2table: bool = False) -> TinyVLM:
    """GOT-OCR2: each crop of an image (64 px; the SAM tower's 16x16 patches, two stride-2
    convolutions: 16 tokens) is a fixed count of image tokens, the image's crops one run between
    ``<img>`` and ``</img>``, which are in no config. ``chart2table``: PP-Chart2Table (transformers 5.17+),
    the same model under a ``pp_chart2table`` config (its checkpoints' ``model_type``)."""
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration

    torch.manual_seed(seed)
    image_token, start, end = 127, 125, 126
    config_cls = GotOcr2Config
    if chart2table:
        from transformers import PPChart2TableConfig as config_cls
    config = config_cls(vision_config=SAM_TOWER, text_config=_tiny_llama("qwen2"), image_token_index=image_token,
                        image_seq_length=16, pad_token_id=PAD)
    model = _finish(GotOcr2ForConditionalGeneration(config), attn)

    return TinyVLM(model, _tiles_between(start, end, image_token, tokens=16, size=64),
                   single=[[("text", 5), ("image", 1), ("text", 7)]],
                   batch=[[("text", 5), ("image", 2), ("text", 7)],
                          [("text", 3), ("image", 1), ("image", 2), ("text", 4)],
                          [("image", 1), ("text", 9)]],
                   tiles_are_images=True)


def deepseek_vl(attn: str = "sdpa", seed: int = 0, hybrid: bool = False) -> TinyVLM:
    """DeepSeek-VL: a SigLIP tower (16 px, 4 px patches: 16 tokens an image) around a Llama text
    model, an image its image tokens alone (images may stand back to back). ``hybrid``: DeepSeek-VL
    Hybrid, whose tokens also take a SAM tower's features of a 64 px copy of the image."""
    from transformers import AutoConfig

    torch.manual_seed(seed)
    image_token = 127
    name = "DeepseekVLHybrid" if hybrid else "DeepseekVL"
    configs = dict(vision_config=AutoConfig.for_model("siglip_vision_model", **TOWER, image_size=16, patch_size=4),
                   text_config=_tiny_llama())
    if hybrid:
        configs["high_res_vision_config"] = AutoConfig.for_model("sam_vision_model", **SAM_TOWER)
    config = getattr(transformers, f"{name}Config")(**configs, image_token_id=image_token, pad_token_id=PAD)
    model = _finish(getattr(transformers, f"{name}ForConditionalGeneration")(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels, high = [], []

        def image(kind, _, gen, r):
            pixels.append(torch.randn(3, 16, 16, generator=gen))
            high.append(torch.randn(3, 64, 64, generator=gen))
            return [image_token] * 16

        out = dict(_token_rows(rows, seeds, image), pixel_values=torch.stack(pixels))
        if hybrid:
            out["high_res_pixel_values"] = torch.stack(high)
        return out

    return TinyVLM(model, make_inputs, **ADJACENT_ROWS)


def janus(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Janus, its understanding path: a SigLIP-like tower (16 px, 4 px patches: 16 tokens) whose
    aligner feeds a Llama text model, an image between begin/end-of-image markers; the image
    generation path's VQ model (built, never run here) is as small as its config allows."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    torch.manual_seed(seed)
    image_token, boi, eoi = 127, 125, 126
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
                  projection_dim=32, num_image_tokens=16)
    vq = dict(base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1, latent_channels=32, embed_dim=8,
              num_embeddings=64, projection_dim=32, image_token_embed_dim=32, num_patches=4, num_hidden_layers=1)
    config = JanusConfig(text_config=_tiny_llama(), vision_config=vision, vq_config=vq, image_token_id=image_token,
                         pad_token_id=PAD)
    model = _finish(JanusForConditionalGeneration(config), attn)
    return TinyVLM(model, _soft_token_images(image_token, boi, eoi, types=False), **SPACED_ROWS)


def granite_docling(attn: str = "sdpa", seed: int = 0, fine: bool = False) -> TinyVLM:
    """Granite-Docling (transformers 5.24): Idefics3's page layout (an image of (r, c) tiles of 32 px,
    each after ``<fake_token_around_image>`` and its ``<row_i_col_j>`` marker, then, for more than one
    tile, the thumbnail after ``<global-img>``), each tile 16 tokens (4 px patches pixel-shuffled 2x2;
    ``fine``: the fine connector path, shuffled 1x1, 64 tokens a tile), around a Granite text model to
    which the connector also adds a feature map of each of two tower layers (Qwen3-VL's deepstack)."""
    from transformers import GraniteDoclingConfig, GraniteDoclingForConditionalGeneration

    torch.manual_seed(seed)
    image_token, around, global_img = 127, 126, 125
    vision = dict(TOWER, image_size=32, patch_size=4, scale_factor=2, out_hidden_size=32,
                  deepstack_visual_indexes=[0, 1])
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config = GraniteDoclingConfig(vision_config=vision, text_config=text, image_token_id=image_token, pad_token_id=PAD)
    model = _finish(GraniteDoclingForConditionalGeneration(config), attn)
    tokens = 64 if fine else 16

    def make_inputs(rows, seeds=None) -> dict:
        pixels = [[] for _ in rows]  # per row

        def image(kind, grid, gen, r):
            h, w = grid
            ids = []
            for i in range(h):
                for j in range(w):  # the <row_i_col_j> markers: ids 91 to 106
                    ids += [around, 91 + 4 * i + j] + [image_token] * tokens
            if h * w > 1:
                ids += [around, global_img] + [image_token] * tokens + [around]
            pixels[r].append(torch.randn(h * w + (h * w > 1), 3, 32, 32, generator=gen))
            return ids

        ids = _token_rows(rows, seeds, image)
        tiles = [torch.cat(p) if p else torch.zeros(0, 3, 32, 32) for p in pixels]
        most = max(t.shape[0] for t in tiles)
        stacked, real = torch.zeros(len(rows), most, 3, 32, 32), torch.zeros(len(rows), most, dtype=torch.bool)
        for r, t in enumerate(tiles):
            stacked[r, : len(t)], real[r, : len(t)] = t, True
        inputs = dict(ids, pixel_values=stacked, pixel_attention_mask=real)
        if fine:
            inputs["tile_fine_mask"] = torch.ones(len(rows), dtype=torch.bool)
        return inputs

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (1, 1)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (1, 2)), ("text", 7)],
                          [("text", 3), ("image", (1, 1)), ("image", (2, 1)), ("text", 4)],
                          [("image", (1, 1)), ("text", 9)]],
                   image_runs=lambda grid: grid[0] * grid[1] + (grid[0] * grid[1] > 1))


def mistral_large4(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Mistral Large 4 (transformers 5.24): Mistral3's Pixtral tower, patch merger and layout around a
    text model of latent attention whose keys an indexer narrows to its top ``index_topk`` (DeepSeek
    sparse attention: the indexer of every other layer, the others reuse its choice), MoE layers after
    a dense one, a NoPE layer, layer 1 reading layer 0's latent cache, and queries scaled by their
    position's log. That scale and LeRoPE's learned frequencies start as no-ops (checkpoints set them):
    drawn here. ``index_topk`` is past every test prompt's length: the indexer's top-k breaks ties among
    its scores (ReLU zeros) by the sequence's length, so below it the unpatched model's cached decoding
    differs from a forward over the whole sequence, which the tests compare it with."""
    from transformers import AutoConfig, MistralLarge4Config, MistralLarge4ForConditionalGeneration

    torch.manual_seed(seed)
    image_token = 127
    text = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                n_shared_experts=1, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                index_topk=512, index_head_dim=8, index_n_heads=2, indexer_types=["full", "shared"] * 2,
                kv_source_layers=[0, 0, 2, 3], vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2)
    config = MistralLarge4Config(
        vision_config=AutoConfig.for_model("pixtral", **TOWER, image_size=16, patch_size=2), text_config=text,
        image_token_index=image_token, spatial_merge_size=2, pad_token_id=PAD)
    model = MistralLarge4ForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("softmax_scaling.scale", "rotary_emb.alpha")):
                p.normal_(0, 0.3)
    return TinyVLM(_finish(model, attn), lambda rows, seeds=None: _pixtral_inputs(rows, seeds, image_token, 4, 16),
                   **PIXTRAL_ROWS)


def _view_and_crops(crop_px: int, view_px: int, tokens: Callable[[int], list[int]]) -> Callable[..., dict]:
    """``make_inputs`` of Step3p7 and DeepSeek-OCR-2: an ``("image", n)`` segment is a global view
    (``pixel_values``) and ``n`` local crops (``pixel_values_local``, ``num_local_patches``), whose
    ids are ``tokens(n)``."""
    def make_inputs(rows, seeds=None) -> dict:
        views, crops, counts = [], [], []

        def image(kind, n, gen, r):
            crops.append(torch.randn(n, 3, crop_px, crop_px, generator=gen))
            views.append(torch.randn(3, view_px, view_px, generator=gen))
            counts.append(n)
            return tokens(n)

        ids = _token_rows(rows, seeds, image)
        return dict(ids, pixel_values=torch.stack(views), pixel_values_local=torch.cat(crops) if sum(counts) else None,
                    num_local_patches=torch.tensor(counts))

    return make_inputs


def step3p7(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Step3p7 (transformers 5.x): an image of ``n`` local crops (16 px) and its global view (32 px);
    2 px patches, two stride-2 convolutions: 4 tokens a crop, 16 the view, each between markers of its
    own (``<patch_start>``/``<patch_end>``, ``<im_start>``/``<im_end>``, in no config). Step3.5's text
    model: sliding-window layers (8 tokens, 2 heads) between full-attention ones (4 heads), gated
    attention, MoE layers after a dense one."""
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration

    torch.manual_seed(seed)
    image_token, patch_start, patch_end, im_start, im_end = 127, 123, 124, 125, 126
    vision = dict(TOWER, image_size=32, patch_size=2, mlp_ratio=2.0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, num_sliding_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2, num_experts_per_tok=2, n_routed_experts=4, moe_intermediate_size=32,
                share_expert_dim=32, layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8,
                mlp_layer_types=["dense", "sparse", "sparse", "sparse"])
    config = Step3p7Config(vision_config=vision, text_config=text, image_token_id=image_token)
    model = _finish(Step3p7ForConditionalGeneration(config), attn)

    make_inputs = _view_and_crops(
        16, 32, lambda n: ([patch_start] + [image_token] * 4 + [patch_end]) * n + [im_start] + [image_token] * 16 + [im_end])
    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", 0), ("text", 7)]],
                   batch=[[("text", 5), ("image", 2), ("text", 7)],
                          [("text", 3), ("image", 0), ("image", 1), ("text", 4)],
                          [("image", 1), ("text", 9)]],
                   image_runs=lambda n: n + 1,
                   # Its experts run one by one on the tokens routed to them: a compiled generation makes a
                   # graph per count.
                   graphs_follow_routing=True)


def qianfan_ocr(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Qianfan-OCR (transformers 5.x): InternVL's model classes and layout (:func:`internvl`), a tower
    of its own (stochastic depth, idle in eval) and a Qwen3 text model."""
    return internvl(attn, seed, classes="QianfanOCR", text="qwen3")


def deepseek_ocr2(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """DeepSeek-OCR-2 (transformers 5.x): an image of ``n`` local crops and its global view (64 px each;
    a SAM tower whose 4x4 output patches a Qwen2-style encoder reads with its 144 learned queries: 144
    tokens a view) is one run of image tokens, the view separator's feature last (``144 (n + 1) + 1``),
    no markers; a DeepSeek-V2 MoE text model after a dense layer."""
    from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration

    torch.manual_seed(seed)
    image_token = 127
    sam = dict(SAM_TOWER, downsample_channels=[16, 32])
    encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                mlp_layer_types=["dense", "sparse"])
    config = DeepseekOcr2Config(vision_config=dict(sam_config=sam, encoder_config=encoder), text_config=text,
                                image_token_id=image_token, pad_token_id=PAD)
    model = _finish(DeepseekOcr2ForConditionalGeneration(config), attn)
    make_inputs = _view_and_crops(64, 64, lambda n: [image_token] * (144 * (n + 1) + 1))
    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", 0), ("text", 7)]],
                   batch=[[("text", 5), ("image", 1), ("text", 7)],
                          [("text", 3), ("image", 0), ("text", 2), ("image", 0), ("text", 4)],
                          [("image", 0), ("text", 9)]])


def hy_v4_vl(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """HY-V4-VL (transformers 5.24): 2 px patches merged 2x2 and a newline feature after each merged row,
    so an image of ``(h, w)`` patches takes ``h/2 * (w/2 + 1)`` tokens and a video of ``t`` frames ``t``
    times that (one run), each between markers (in no config); 3-D M-RoPE positions from the token
    types. The text model: latent attention narrowed by an indexer (its top-k past every test prompt,
    as in :func:`mistral_large4`), hyper-connections (2 residual streams), a dense then a MoE layer."""
    from transformers import HYV4VLConfig, HYV4VLForConditionalGeneration

    torch.manual_seed(seed)
    image_token, video_token, start, end = 127, 124, 125, 126
    vision = dict(TOWER, out_hidden_size=32, patch_size=2, spatial_merge_size=2, max_image_size=16)
    text = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, head_dim=8, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2, n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16,
                qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=8, index_topk=512, index_head_dim=8, index_n_heads=2,
                hc_mult=2, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 1]))
    config = HYV4VLConfig(vision_config=vision, text_config=text, image_token_id=image_token, video_token_id=video_token)
    # transformers runs its attention eagerly only (it refuses SDPA): eager wherever SDPA is asked for.
    model = _finish(HYV4VLForConditionalGeneration(config), "eager" if attn == "sdpa" else attn)

    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], []), "video": ([], [])}

        def segment(kind, grid, gen, r):
            t, h, w = grid if kind == "video" else (1, *grid)
            pixels, grids = media[kind]
            pixels.append(torch.randn(t * h * w, 3 * 2 * 2, generator=gen))
            grids.append([t, h, w])
            token = video_token if kind == "video" else image_token
            return [start] + [token] * (t * h // 2 * (w // 2 + 1)) + [end]

        out = _token_rows(rows, seeds, segment)
        out.update(_patch_inputs(media))
        out["mm_token_type_ids"] = (out["input_ids"] == image_token).int() + 2 * (out["input_ids"] == video_token).int()
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 4), ("image", (8, 8)), ("text", 6)]],
                   batch=[[("text", 4), ("image", (8, 8)), ("text", 6)],
                          [("text", 2), ("image", (4, 8)), ("text", 1), ("image", (6, 8)), ("text", 3)],
                          [("video", (2, 4, 8)), ("text", 5)]])


def _any_resolution(model, config, image_token: int) -> TinyVLM:
    """LLaVA-NeXT's any-resolution images (16 px tiles on the config's grid pinpoints, one run of
    image tokens each, as many as the model makes of it): LLaVA-NeXT and Granite 4 Vision."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    def make_inputs(rows, seeds=None) -> dict:
        pixels, sizes = [], []

        def image(kind, size, gen, r):
            tiles = image_size_to_num_patches(size, config.image_grid_pinpoints, 16)
            pixels.append(torch.randn(tiles, 3, 16, 16, generator=gen))
            sizes.append(size)
            return [image_token] * _n_features(model, pixel_values=pixels[-1][None], image_sizes=torch.tensor([size]))

        ids = _token_rows(rows, seeds, image)
        return dict(ids, pixel_values=_stack_tiles(pixels), image_sizes=torch.tensor(sizes))

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (16, 32)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (32, 32)), ("text", 7)],
                          [("text", 3), ("image", (16, 32)), ("text", 1), ("image", (32, 16)),
                           ("text", 4)],
                          [("image", (16, 16)), ("text", 9)]])


def llava_next(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Any-resolution LLaVA: an image of size (H, W) takes a base 4x4 view plus the
    unpadded tiles of its best grid, with a newline feature per row: counts differ."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    image_token = 127
    config = LlavaNextConfig(
        **_clip_llama_configs(),
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]], image_token_id=image_token,
        pad_token_id=PAD,
    )
    model = _finish(LlavaNextForConditionalGeneration(config), attn)

    return _any_resolution(model, config, image_token)


def granite4_vision(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Granite 4 Vision (transformers 5.x): LLaVA-NeXT's any-resolution layout over a CLIP tower
    (16 px tiles of 2 px patches), each tile's 8x8 patches downsampled to 4x4 tokens by window
    Q-Formers; the image tokens' embeddings are zero, their features added inside a Granite text
    model at the layers of the deepstack map (one tower layer's projection at layer 0, four spatial
    samplings at layers 1 to 4). Its logits are scaled by 1/4 (``logits_scaling``)."""
    from transformers import Granite4VisionConfig, Granite4VisionForConditionalGeneration

    torch.manual_seed(seed)
    image_token = 127
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2, embedding_multiplier=2.0, logits_scaling=4.0)
    config = Granite4VisionConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=2),
        text_config=text, qformer_config=dict(model_type="blip_2_qformer", hidden_size=64, num_attention_heads=1,
                                               encoder_hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                               use_qformer_text_input=False),
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]], image_token_id=image_token,
        downsample_rate="2/4", deepstack_layer_map=[[-1, 0]], spatial_vision_layer=-1,
        spatial_target_layers=[1, 2, 3, 4], projector_dropout=0.0, pad_token_id=PAD)
    model = _finish(Granite4VisionForConditionalGeneration(config), attn)

    return _any_resolution(model, config, image_token)


def llava_onevision(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """LLaVA-OneVision: a SigLIP tower (16 px, 4 px patches); a row's only image takes the
    any-resolution layout of LLaVA-NeXT, each image of a multi-image row its base view;
    a video of ``t`` frames takes 2x2-pooled frames (4 tokens each) plus one newline."""
    from transformers import AutoConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    torch.manual_seed(seed)
    image_token, video_token = 127, 126
    config = LlavaOnevisionConfig(
        vision_config=AutoConfig.for_model("siglip_vision_model", **TOWER, image_size=16,
                                           patch_size=4),
        text_config=_tiny_llama("qwen2"), image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        image_token_index=image_token, video_token_index=video_token, pad_token_id=PAD)
    model = _finish(LlavaOnevisionForConditionalGeneration(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels, sizes, videos = [], [], []
        per_row = [sum(kind == "image" for kind, _ in segments) for segments in rows]

        def media(kind, size, gen, r):
            if kind == "video":
                videos.append(torch.randn(size, 3, 16, 16, generator=gen))
                return [video_token] * (4 * size + 1)
            tiles = image_size_to_num_patches(size, config.image_grid_pinpoints, 16)
            pixels.append(torch.randn(tiles, 3, 16, 16, generator=gen))
            sizes.append(size)
            return [image_token] * _n_features(
                model, pixel_values=pixels[-1][None], image_sizes=torch.tensor([size]),
                batch_num_images=torch.tensor([per_row[r]]) if per_row[r] > 1 else None)

        out = _token_rows(rows, seeds, media)
        if pixels:
            out.update(pixel_values=_stack_tiles(pixels), image_sizes=torch.tensor(sizes),
                       batch_num_images=torch.tensor(per_row))
        if videos:
            out["pixel_values_videos"] = torch.stack(videos)
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (16, 32)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (32, 32)), ("text", 7)],
                          [("text", 3), ("image", (16, 32)), ("text", 1), ("image", (32, 16)),
                           ("text", 4)],
                          [("video", 3), ("text", 9)]])


def llava_next_video(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """LLaVA-NeXT-Video: LLaVA-NeXT's any-resolution images; a video of ``t`` frames takes each
    frame's 4x4 patches average-pooled 2x2 (4 tokens a frame), one run of ``4t`` video tokens. The
    videos of one call have the same number of frames."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    torch.manual_seed(seed)
    image_token, video_token = 127, 126
    config = LlavaNextVideoConfig(
        **_clip_llama_configs(), image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        image_token_index=image_token, video_token_index=video_token, pad_token_id=PAD)
    model = _finish(LlavaNextVideoForConditionalGeneration(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels, sizes, videos = [], [], []

        def media(kind, size, gen, r):
            if kind == "video":
                videos.append(torch.randn(size, 3, 16, 16, generator=gen))
                return [video_token] * 4 * size
            tiles = image_size_to_num_patches(size, config.image_grid_pinpoints, 16)
            pixels.append(torch.randn(tiles, 3, 16, 16, generator=gen))
            sizes.append(size)
            return [image_token] * _n_features(model, pixel_values=pixels[-1][None], image_sizes=torch.tensor([size]))

        out = _token_rows(rows, seeds, media)
        if pixels:
            out.update(pixel_values=_stack_tiles(pixels), image_sizes=torch.tensor(sizes))
        if videos:
            out["pixel_values_videos"] = torch.stack(videos)
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (16, 32)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (32, 32)), ("text", 7)],
                          [("text", 3), ("image", (16, 32)), ("text", 1), ("video", 3), ("text", 4)],
                          [("video", 3), ("text", 9)]])


def video_llava(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Video-LLaVA: one CLIP tower's layout for images (16 tokens, the class token dropped) and,
    in a tower of its own, for video frames (17 tokens each, the class token kept); a video of
    ``t`` frames is one run of ``17t`` video tokens. Images may stand back to back."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    torch.manual_seed(seed)
    image_token, video_token = 127, 126
    config = VideoLlavaConfig(**_clip_llama_configs(), image_token_index=image_token,
                              video_token_index=video_token, image_seq_length=16, video_seq_length=34,
                              pad_token_id=PAD)
    model = _finish(VideoLlavaForConditionalGeneration(config), attn)
    # transformers before 5.23 names the images' pixels pixel_values_images.
    params = inspect.signature(model.forward).parameters
    image_key = "pixel_values" if "pixel_values" in params else "pixel_values_images"

    def make_inputs(rows, seeds=None) -> dict:
        pixels = {"image": [], "video": []}

        def media(kind, size, gen, r):
            frames = size[0] if kind == "video" else 1
            pixels[kind].append(torch.randn(frames, 3, 16, 16, generator=gen))
            return [video_token] * 17 * frames if kind == "video" else [image_token] * 16

        out = _token_rows(rows, seeds, media)
        if pixels["image"]:
            out[image_key] = torch.cat(pixels["image"])
        if pixels["video"]:
            out["pixel_values_videos"] = torch.stack(pixels["video"])
        return out

    # A video segment is ("video", (frames,)); the videos of one call have the same frame count.
    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", 0), ("text", 7)]],
                   batch=[[("text", 5), ("image", 0), ("image", 0), ("text", 7)],
                          [("text", 3), ("video", (2,)), ("image", 0), ("text", 4)],
                          [("video", (2,)), ("text", 9)]],
                   frames_are_images=True)


def perception_lm(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """PerceptionLM: a 32x32 crop gives (32/4)^2 patches, projected and average-pooled 2x2 into
    16 tokens; an image of ``n`` crops (thumbnail and tiles) is one run of ``16n`` image tokens, a
    video of ``t`` frames one of ``16t`` video tokens. A CLIP tower (its class token dropped, as the
    checkpoints' is) stands in for the Perception Encoder, a timm model (timm is no dependency of
    this project). The images of one call have the same number of crops, the videos of frames."""
    from transformers import AutoConfig, PerceptionLMConfig, PerceptionLMForConditionalGeneration

    torch.manual_seed(seed)
    image_token, video_token = 127, 126
    # model_args: the projector's input width, where a timm tower's config says it.
    vision = AutoConfig.for_model("clip_vision_model", **TOWER, image_size=32, patch_size=4,
                                  model_args={"embed_dim": TOWER["hidden_size"]})
    config = PerceptionLMConfig(vision_config=vision, text_config=_tiny_llama(), image_token_id=image_token,
                                video_token_id=video_token, projector_pooling_ratio=2, pad_token_id=PAD)
    model = _finish(PerceptionLMForConditionalGeneration(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels = {"image": [], "video": []}

        def media(kind, size, gen, r):
            crops = size[0] if kind == "video" else size
            pixels[kind].append(torch.randn(crops, 3, 32, 32, generator=gen))
            return [video_token if kind == "video" else image_token] * 16 * crops

        out = _token_rows(rows, seeds, media)
        for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            if pixels[kind]:
                out[key] = torch.stack(pixels[kind])
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", 1), ("text", 7)]],
                   batch=[[("text", 5), ("image", 2), ("text", 7)],
                          [("text", 3), ("image", 2), ("image", 2), ("video", (2,)), ("text", 4)],
                          [("video", (2,)), ("text", 9)]],
                   frames_are_images=True, tiles_are_images=True)


def _cohere_tiles(config_cls, model_cls, attn: str, seed: int, **extra) -> TinyVLM:
    """Aya Vision / Cohere2 Vision: a SigLIP tower (32 px tiles, 4 px patches), pixel-shuffled
    2x2 into 16 tokens per tile; an image of ``n`` tiles is a start marker, then for each
    tile a tile marker and its 16 tokens, then an end marker."""
    torch.manual_seed(seed)
    image_token, start, end, tile = 127, 124, 125, 126
    config = config_cls(
        vision_config=dict(model_type="siglip_vision_model", **TOWER, image_size=32, patch_size=4),
        text_config=_tiny_llama("cohere2"), downsample_factor=2, image_token_id=image_token,
        pad_token_id=PAD, **extra)
    model = _finish(model_cls(config), attn)
    tokens = _n_features(model, pixel_values=torch.zeros(1, 3, 32, 32))

    def make_inputs(rows, seeds=None) -> dict:
        pixels = []

        def image(kind, tiles, gen, r):
            pixels.append(torch.randn(tiles, 3, 32, 32, generator=gen))
            return [start] + ([tile] + [image_token] * tokens) * tiles + [end]

        ids = _token_rows(rows, seeds, image)
        return dict(ids, pixel_values=torch.cat(pixels))

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", 1), ("text", 7)]],
                   batch=[[("text", 5), ("image", 2), ("text", 7)],
                          [("text", 3), ("image", 1), ("image", 1), ("text", 4)],
                          [("image", 1), ("text", 9)]],
                   tiles_are_images=True)


def aya_vision(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration

    return _cohere_tiles(AyaVisionConfig, AyaVisionForConditionalGeneration, attn, seed)


def cohere2_vision(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    from transformers import Cohere2VisionConfig, Cohere2VisionForConditionalGeneration

    return _cohere_tiles(Cohere2VisionConfig, Cohere2VisionForConditionalGeneration, attn, seed,
                         alignment_intermediate_size=64)


def lfm2_vl(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """LFM2-VL: a SigLIP2 NaFlex tower (4 px patches, images of any size up to 32x32 px) whose
    2x2 pixel-unshuffle gives ``(h/8)·(w/8)`` tokens between image start/end markers; the
    language model mixes short gated convolutions with attention (a hybrid cache)."""
    from transformers import AutoConfig, Lfm2VlConfig, Lfm2VlForConditionalGeneration

    torch.manual_seed(seed)
    image_token, start, end, patch, most = 127, 125, 126, 4, 64
    text = AutoConfig.for_model("lfm2", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                max_position_embeddings=512, layer_types=["conv", "full_attention", "conv"],
                                block_auto_adjust_ff_dim=False, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config = Lfm2VlConfig(vision_config=dict(model_type="siglip2_vision_model", **TOWER, patch_size=patch,
                                             num_patches=most),
                          text_config=text, image_token_id=image_token, projector_hidden_size=64,
                          downsample_factor=2)
    model = _finish(Lfm2VlForConditionalGeneration(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels, masks, shapes = [], [], []

        def image(kind, size, gen, r):
            h, w = size[0] // patch, size[1] // patch
            patches = torch.zeros(most, 3 * patch * patch)
            patches[:h * w] = torch.randn(h * w, 3 * patch * patch, generator=gen)
            pixels.append(patches)
            masks.append(torch.arange(most) < h * w)
            shapes.append([h, w])
            return [start] + [image_token] * (h // 2) * (w // 2) + [end]

        ids = _token_rows(rows, seeds, image)
        return dict(ids, pixel_values=torch.stack(pixels), pixel_attention_mask=torch.stack(masks),
                    spatial_shapes=torch.tensor(shapes))

    # Before 5.24 generate() expands the crops' spatial_shapes crop by crop for beam search, as Pixtral's
    # image_sizes (PIXTRAL_ROWS): a row of several crops gets other beams' shapes; prune refuses.
    return TinyVLM(model, make_inputs,
                   beam_multi_image=hasattr(transformers.GenerationMixin, "_expand_multimodal_outputs"),
                   single=[[("text", 5), ("image", (32, 32)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (32, 32)), ("text", 7)],
                          [("text", 3), ("image", (16, 32)), ("text", 1), ("image", (32, 24)), ("text", 4)],
                          [("image", (24, 24)), ("text", 9)]])


MINICPM_IMAGE, MINICPM_VIDEO = 127, 120
# Their markers (MiniCPM-V 4.7's config names them: its canvas M-RoPE places them).
MINICPM_MARKERS = dict(image_start_id=125, image_end_id=126, slice_start_id=123, slice_end_id=124, newline_id=121)
# The markers of each image's number (<image_id>0</image_id>): in no config.
MINICPM_IMAGE_ID = (116, 117)
MINICPM_NUMBER = 40  # the text token of a row's image 0 ("0"), 41 of its image 1, ...


def _minicpm(name: str, attn: str, seed: int) -> TinyVLM:
    """MiniCPM-V 4.6/4.7 and MiniCPM-OCR (``name``: the transformers class prefix): a NaViT SigLIP
    tower (2 px patches, every crop's patches packed in one sequence) whose window merger (after its
    first layer) and merger each merge 2x2 patches: a crop of 4x4 tokens is 16x16 patches ("16x";
    MiniCPM-OCR's default "4x" skips the window merger: 8x8). An image of a ``(rows, cols)`` slice
    grid is its number in its row between image-id markers (a text token), its thumbnail between image
    markers, then ``rows*cols`` slices between slice markers, a newline after each row of them but the
    last; ``(0, 0)`` is the thumbnail alone. A video of
    ``(frames,)`` is each frame's thumbnail between image markers, of video tokens. Every crop has the
    same size: transformers 5.17's window merger reads the first crop's size for all of them. Qwen3.5's
    text model (gated-DeltaNet and attention layers)."""
    torch.manual_seed(seed)
    config_cls = getattr(transformers, f"{name}Config")
    markers = {k: v for k, v in MINICPM_MARKERS.items() if k in config_cls.__dataclass_fields__}
    config = config_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=2),
        text_config=dict(QWEN3_5_TEXT, model_type="qwen3_5_text"), insert_layer_id=0,
        image_token_id=MINICPM_IMAGE, video_token_id=MINICPM_VIDEO, pad_token_id=PAD, **markers)
    model = _finish(getattr(transformers, f"{name}ForConditionalGeneration")(config), attn)
    side = 2 if config.downsample_mode == "4x" else 4  # patches a token, each way
    takes_types = "mm_token_type_ids" in inspect.signature(model.model.forward).parameters
    start, end, slice_start, slice_end, newline = MINICPM_MARKERS.values()

    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], []), "video": ([], [])}

        def crop(kind, gen):
            pixels, sizes = media[kind]
            pixels.append(torch.randn(3, 2, (4 * side) ** 2 * 2, generator=gen))
            sizes.append([4 * side, 4 * side])
            return [MINICPM_IMAGE if kind == "image" else MINICPM_VIDEO] * 16

        numbers = {}  # each row's images so far

        def segment(kind, size, gen, r):
            if kind == "video":
                return sum(([start] + crop(kind, gen) + [end] for _ in range(size[0])), [])
            numbers[r] = numbers.get(r, -1) + 1
            ids = [MINICPM_IMAGE_ID[0], MINICPM_NUMBER + numbers[r], MINICPM_IMAGE_ID[1], start] + crop(kind, gen) + [end]
            grid_rows, grid_cols = size
            for row in range(grid_rows):
                ids += sum(([slice_start] + crop(kind, gen) + [slice_end] for _ in range(grid_cols)), [])
                ids += [newline] if row < grid_rows - 1 else []
            return ids

        out = _token_rows(rows, seeds, segment)
        for kind, (pixels, sizes) in media.items():
            if pixels:
                suffix = "" if kind == "image" else "_videos"
                out[f"pixel_values{suffix}"] = torch.cat(pixels, -1)[None]
                out[f"target_sizes{suffix}"] = torch.tensor(sizes)
        if takes_types:  # MiniCPM-V 4.7: its canvas M-RoPE reads the modality of every token
            out["mm_token_type_ids"] = ((out["input_ids"] == MINICPM_IMAGE).int()
                                        + 2 * (out["input_ids"] == MINICPM_VIDEO).int())
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (0, 0)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (2, 2)), ("text", 7)],
                          [("text", 3), ("image", (0, 0)), ("text", 1), ("image", (1, 2)), ("text", 4)],
                          [("video", (2,)), ("image", (0, 0)), ("text", 9)]],
                   frames_are_images=True, image_runs=lambda grid: 1 + grid[0] * grid[1])


def minicpmv4_6(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    return _minicpm("MiniCPMV4_6", attn, seed)


def minicpmv4_7(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """MiniCPM-V 4.7: MiniCPM-V 4.6 with canvas M-RoPE positions (3-D, from the token types)."""
    return _minicpm("MiniCPMV4_7", attn, seed)


def minicpm_ocr(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """MiniCPM-OCR: MiniCPM-V 4.6's model, "4x" by default (4 times the tokens of a crop)."""
    return _minicpm("MiniCPMOcr", attn, seed)


def molmo2(attn: str = "sdpa", seed: int = 0, videos: bool = False) -> TinyVLM:
    """Molmo2 (transformers 5.24): an image of ``(h, w, H, W)`` is its low-res view, ``h`` rows of
    ``w`` patch tokens each ended by a column token between low-res start and end markers, then its
    high-res view (``H`` rows of ``W``) between start and end markers; a video of ``(frames, h, w)``
    is each frame's ``h*w`` patch tokens between frame markers, after a timestamp. Each token pools
    4 patches of the tower's 16-patch crops (16 px, 4 px patches). An image's view takes as many
    crops as its tokens need; a frame takes one crop, as the video processor gives it (its tokens'
    windows overlap past 4 tokens, each window its own). Its markers and patch token are in the extra vocabulary, past the LM
    head's (as in the checkpoints): never generated. The base model builds one bidirectional block
    over every image token of a row (``mm_token_type_ids``). The model takes no images and videos in
    one call, nor two videos in a row: ``videos=True`` gives rows of one video each."""
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration

    torch.manual_seed(seed)
    start, end, patch, column, low_start, frame_start, frame_end = range(VOCAB, VOCAB + 7)
    config = Molmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, image_size=[16, 16], patch_size=4),
        adapter_config=dict(vision_feature_layer=[-1], hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                            head_dim=16, intermediate_size=64, text_hidden_size=32),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, additional_vocab_size=8,
                         max_position_embeddings=512),
        image_start_token_id=start, low_res_image_start_token_id=low_start, image_end_token_id=end,
        image_patch_id=patch, frame_start_token_id=frame_start, frame_end_token_id=frame_end)
    model = _finish(Molmo2ForConditionalGeneration(config), attn)
    image_ids = torch.tensor([start, end, patch, column, low_start, frame_start, frame_end])
    # Since transformers 5.25 the pooling indexes each image's (each video's) own crops, and the
    # model offsets them by ``image_num_crops`` (a video: one crop a frame); before, the whole batch's.
    per_item = "image_num_crops" in inspect.signature(model.model.get_image_features).parameters

    def make_inputs(rows, seeds=None) -> dict:
        crops, pooling, grids, item_crops = [], [], [], []

        def view(n, gen, first):  # the 4 patches each of n tokens pools, from crops of their own
            count = 1 if videos else (n + 3) // 4  # a frame is one crop, as the video processor makes it
            stride = min(4, count * 16 // n)  # 4: apart; a frame of more than 4 tokens: overlapping windows
            windows = (stride * torch.arange(n)[:, None] + torch.arange(4)) % (count * 16)
            pooling.extend((len(crops) - first) * 16 + windows)
            crops.extend(torch.randn(count, 16, 48, generator=gen).unbind())

        def media(kind, grid, gen, r):
            grids.append(grid)
            before = len(crops)
            first = before if per_item else 0
            if kind == "video":
                frames, h, w = grid
                ids = []
                for _ in range(frames):
                    view(h * w, gen, first)
                    ids += _text(1, gen) + [frame_start] + [patch] * (h * w) + [frame_end]
                return ids
            h, w, H, W = grid
            view(h * w, gen, first), view(H * W, gen, first)
            item_crops.append(len(crops) - before)
            return [low_start] + ([patch] * w + [column]) * h + [end, start] + ([patch] * W + [column]) * H + [end]

        out = _token_rows(rows, seeds, media)
        out["mm_token_type_ids"] = torch.isin(out["input_ids"], image_ids).long()
        if videos:
            keys = ("pixel_values_videos", "video_token_pooling", "video_grids")
        else:
            keys = ("pixel_values", "image_token_pooling", "image_grids")
            out["image_num_crops"] = torch.tensor(item_crops)  # as the image processor gives it (5.24 ignores it)
        return dict(out, **dict(zip(keys, (torch.stack(crops), torch.stack(pooling), torch.tensor(grids)))))

    if videos:
        return TinyVLM(model, make_inputs,
                       single=[[("text", 5), ("video", (2, 2, 3)), ("text", 7)]],
                       batch=[[("text", 5), ("video", (2, 3, 3)), ("text", 7)],
                              [("text", 3), ("video", (3, 2, 2)), ("text", 4)],
                              [("video", (2, 2, 4)), ("text", 9)]],
                       prompt_lookup=False)
    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (2, 3, 3, 4)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (2, 2, 4, 4)), ("text", 7)],
                          [("text", 3), ("image", (2, 3, 3, 4)), ("image", (2, 2, 2, 3)), ("text", 4)],
                          [("image", (2, 2, 3, 3)), ("text", 9)]],
                   prompt_lookup=False)


def lfm3_vl(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """LFM3-VL (transformers 5.24): Qwen3-VL's layout (each image, each video frame after a timestamp,
    wrapped in vision markers; 2x2 merge) on 1-D positions, a tower mixing short convolutions with
    attention, and LFM3's text model: gated short convolutions, sliding-window (8 tokens, so that
    windows end inside the prompts) and full attention layers."""
    from transformers import Lfm3VlConfig, Lfm3VlForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, layer_types=["conv", "full_attention"])
    text = dict(model_type="lfm3", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=512, sliding_window=8,
                layer_types=["conv", "sliding_attention", "full_attention"], pad_token_id=PAD, bos_token_id=1,
                eos_token_id=2)
    return _qwen(Lfm3VlConfig, Lfm3VlForConditionalGeneration, vision, attn, seed, text=text, per_frame=True)


def minimax_m3_vl(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """MiniMax-M3-VL (transformers 5.x): Qwen3-VL's layout (each image, each video frame after a
    timestamp, wrapped in vision markers its config does not name; 2x2 merge) on 1-D positions, and
    MiniMax-M3's MoE text model, whose sparse attention layers keep per query the key blocks its
    lightning indexer ranks highest: blocks of 4 slots, 2 of them and the query's own, so that every
    prompt's attention is sparse (the checkpoint's 16 of 128 slots cover 2,048 tokens)."""
    from transformers import MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLConfig

    text = dict(hidden_size=32, intermediate_size=32, dense_intermediate_size=64, shared_intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
                num_local_experts=4, num_experts_per_tok=2, index_n_heads=2, index_head_dim=8,
                index_block_size=4, index_topk_blocks=2, index_local_blocks=1, initializer_range=0.3,
                layer_types=["minimax_m3_sparse", "full_attention"], mlp_layer_types=["dense", "sparse"],
                vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16)
    tiny = _qwen(MiniMaxM3VLConfig, MiniMaxM3SparseForConditionalGeneration, vision, attn, seed, text=text,
                 per_frame=True, named_markers=False, projector_hidden_size=32)
    # Its indexer cuts the keys into blocks of cache slots: a left-padded row's blocks are not the row's
    # alone, unpatched (transformers' own note on MiniMaxM3VLIndexer).
    tiny.rows_independent = False
    return tiny


def kimi_k25(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Kimi-K2.5 (transformers 5.x): a MoonViT tower (2 px patches, 2x2 merge) whose ``(t, h, w)``
    grid gives ``h*w/4`` tokens, its ``t`` frames merged; each image, and each chunk of (two) video
    frames (after a timestamp), is wrapped in media markers, its word (``image``, ``video``: text) and
    ``<|media_content|>`` (in no config) between the begin marker and its tokens. DeepSeek-V3's text
    model: latent attention, the first layer dense, then MoE (4 routed experts, 2 a token, and a shared one)."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(model_type="deepseek_v3", hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
                vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config = Kimi_K25Config(
        vision_config=dict(patch_size=2, pos_emb_height=8, pos_emb_width=8, pos_emb_time=4, num_attention_heads=2,
                           num_hidden_layers=1, hidden_size=32, intermediate_size=64),
        text_config=text, projection_hidden_size=32, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END, tie_word_embeddings=False)
    model = _finish(Kimi_K25ForConditionalGeneration(config), attn)
    # transformers 5.17 splits a chunk's features as t*h*w/4 (its tower gives h*w/4): a chunk of
    # several frames fails there unpatched, so its chunks are of one frame.
    from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25Model

    frames = 2 if "image_grid_thw[:, 1:]" in inspect.getsource(Kimi_K25Model.get_image_features) else 1
    word, media_content = {"image": 30, "video": 31}, 118

    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], []), "video": ([], [])}

        def segment(kind, grid, gen, r):
            chunks, h, w = grid if kind == "video" else (1, *grid)
            t = frames if kind == "video" else 1
            token = QWEN_VIDEO if kind == "video" else QWEN_IMAGE
            pixels, grids = media[kind]
            ids = []
            for _ in range(chunks):
                pixels.append(torch.randn(t * h * w, 3, 2, 2, generator=gen))
                grids.append([t, h, w])
                ids += ((_text(1, gen) if kind == "video" else []) + [QWEN_START, word[kind], media_content]
                        + [token] * (h * w // 4) + [QWEN_END])
            return ids

        out = _token_rows(rows, seeds, segment)
        out.update(_patch_inputs(media))
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 4), ("image", (8, 8)), ("text", 6)]],
                   batch=[[("text", 4), ("image", (8, 8)), ("text", 6)],
                          [("text", 2), ("image", (4, 8)), ("text", 1), ("image", (6, 8)), ("text", 3)],
                          [("video", (2, 4, 8)), ("image", (4, 6)), ("text", 5)]],
                   frames_are_images=True)


def cosmos3_omni(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Cosmos3-Omni (its reasoner; transformers 5.x): Qwen3-VL's model classes under a config of its own."""
    return _qwen3("Cosmos3Omni", QWEN3_VISION, QWEN3_TEXT, attn, seed)


def cosmos3_edge(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Cosmos3-Edge (transformers 5.x): Qwen2-VL's model classes around a packed SigLIP2 tower (one
    frame a patch, no temporal patches) and a Llama text model on M-RoPE; every video frame is wrapped
    in its own markers, after a timestamp (as Qwen3-VL's)."""
    vision = dict(TOWER, num_patches=16, temporal_patch_size=None)
    text = dict(_tiny_llama().to_dict(), head_dim=8, hidden_act="relu2",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    return _qwen(transformers.Cosmos3EdgeConfig, transformers.Cosmos3EdgeForConditionalGeneration, vision, attn,
                 seed, text=text, per_frame=True, patch_dim=3 * 2 * 2, projector_hidden_size=64)


def qwen4_exp(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Qwen4-Exp (transformers 5.x): Qwen3.5-MoE's model classes and layout around its own text model:
    each layer's input and output mixed over 2 hyper-connection streams; per-layer n-gram embeddings
    (PLE) on the first (DeltaNet) layer, bigrams and trigrams of 2 hashed heads each (prime-sized tables
    from 64 rows); the full-attention layer indexed (QSA): each query attends to its best 2 blocks of 2
    keys and the incomplete block after them."""
    text = dict(QWEN3_5_TEXT, **QWEN3_MOE, shared_expert_intermediate_size=32, hc_count=2, hc_lowrank=8,
                ple_layer_ids=[1], ngram_vocab_size_base=64, heads_per_ngram=2, ple_embed_dim=32, indexer_n_heads=2,
                indexer_kv_heads=1, indexer_head_dim=32, indexer_budget=4, indexer_compress_ratio=2)
    tiny = _qwen3("Qwen4Exp", QWEN3_5_VISION, text, attn, seed)
    # Its indexer loops over the rows and queries in Python, each taking the visible keys' indices
    # (nonzero): a compiled generation makes graphs by their counts, which pruning changes.
    tiny.graphs_follow_routing = True
    return tiny


def cohere_compass(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Cohere Compass (transformers 5.x): Qwen3-VL's model classes and layout (deepstack included) around
    a Cohere2 text model: a sliding-window layer with M-RoPE (8-token windows, so that they fall inside the
    prompts), then a full-attention layer without positions; its wrapper scales the logits."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=512,
                layer_types=["sliding_attention", "full_attention"], sliding_window=8, logit_scale=0.5,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": [2, 1, 1]},
                                 "full_attention": None},
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    return _qwen3("CohereCompass", QWEN3_VISION, text, attn, seed)


def glm5_next(attn: str = "sdpa", seed: int = 0, videos: bool = False) -> TinyVLM:
    """GLM-5-Next (transformers 5.x): GLM-4.6V's token layout around a text model without positions
    (NoPE): a gated linear-attention layer, then an indexed (DSA) latent-attention layer whose indexer
    picks the best 2 pools of 2 keys for each query (16 heads: a pool's score, a sum of the heads'
    rectified scores, is then rarely an exact 0, a tie that ``topk`` breaks by the sequence's shape, so
    that a pruned prefill and its no-cache reference would pick different pools); each layer's input and output mixed over 2
    hyper-connection streams; the first MLP dense, the second MoE (4 routed experts, 2 a token, a shared one)."""
    text = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8,
                # the config renames full attention to its indexed kind (named otherwise before 5.24)
                layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                index_topk=4, index_kpool=2, index_head_dim=16, index_n_heads=16, linear_head_dim=8,
                linear_num_heads=4, hc_mult=2, vocab_size=VOCAB, max_position_embeddings=512,
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    tiny = _glm("Glm5Next", text, attn, seed, videos, vision=dict(projection_intermediate_size=64))
    # Its indexer keeps the key pools valid in some row (a boolean index): a compiled generation
    # makes graphs by their count, which pruning changes with the rows' padding.
    tiny.graphs_follow_routing = True
    return tiny


def hyperclovax_vision_v2(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """HyperCLOVAX-SEED vision v2 (transformers 5.24+): EXAONE 4.5's token layout (Qwen2.5-VL's, a video
    one run) and 1-D positions, a Qwen2.5-VL tower and a linear projector around a HyperCLOVAX text model
    (muP multipliers on the embeddings, residuals, attention and logits; the wrapper multiplies its
    logits by ``logits_scaling``)."""
    text = dict(model_type="hyperclovax", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=0.5,
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    vision = dict(model_type="qwen2_5_vl_vision", depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=32, window_size=8, fullatt_block_indexes=[1])
    return _qwen(transformers.HyperCLOVAXVisionV2Config, transformers.HyperCLOVAXVisionV2ForConditionalGeneration,
                 vision, attn, seed, text=text)


def _idefics(config_cls, model_cls, attn: str, seed: int, **reduce) -> TinyVLM:
    """Idefics2/3, SmolVLM: a 32x32 image gives (32/4)^2 patches, reduced to 16 tokens
    (``reduce``: pixel-shuffled 2x2, or a perceiver of 16 latents), wrapped in
    <fake_token_around_image> markers."""
    torch.manual_seed(seed)
    image_token, around = 127, 126
    config = config_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=4),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                         bos_token_id=1, eos_token_id=2),
        image_token_id=image_token, pad_token_id=PAD, **reduce,
    )
    model = _finish(model_cls(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels = [[] for _ in rows]  # per row

        def image(kind, _, gen, r):
            pixels[r].append(torch.randn(3, 32, 32, generator=gen))
            return [around] + [image_token] * 16 + [around]

        ids = _token_rows(rows, seeds, image)
        most = max(len(p) for p in pixels)  # all-zero images are padding to the model
        stacked = torch.zeros(len(rows), most, 3, 32, 32)
        for r, images in enumerate(pixels):
            if images:
                stacked[r, : len(images)] = torch.stack(images)
        return dict(ids, pixel_values=stacked)

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", 0), ("text", 7)]],
                   batch=[[("text", 5), ("image", 0), ("text", 7)],
                          [("text", 3), ("image", 0), ("image", 0), ("text", 4)],
                          [("image", 0), ("text", 9)]])


def idefics3(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    return _idefics(Idefics3Config, Idefics3ForConditionalGeneration, attn, seed, scale_factor=2)


def idefics2(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    perceiver = dict(resampler_n_latents=16, resampler_depth=1, resampler_n_heads=2,
                     resampler_head_dim=16, num_key_value_heads=1, hidden_size=32)
    tiny = _idefics(Idefics2Config, Idefics2ForConditionalGeneration, attn, seed,
                    perceiver_config=perceiver)
    # The perceiver's latents start as ones (checkpoints overwrite them): every query would
    # be the same and so would every output token.
    with torch.no_grad():
        tiny.model.model.connector.perceiver_resampler.latents.normal_()
    return tiny


def smolvlm(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    return _idefics(SmolVLMConfig, SmolVLMForConditionalGeneration, attn, seed, scale_factor=2)


SHIELD_YES, SHIELD_NO = 3, 4  # the tiny ShieldGemma 2's "Yes" and "No" tokens


def _soft_token_images(image_token: int, boi: int, eoi: int, types: bool) -> Callable[..., dict]:
    """``make_inputs`` for Gemma3's (and Janus's) layout: a 16x16 image, 16 tokens between begin/end-of-image
    markers; ``types``: with the ``token_type_ids`` (1 on the soft tokens) that Gemma3's processor returns."""
    def make_inputs(rows, seeds=None) -> dict:
        pixels = []

        def image(kind, _, gen, r):
            pixels.append(torch.randn(3, 16, 16, generator=gen))
            return [boi] + [image_token] * 16 + [eoi]

        out = _token_rows(rows, seeds, image)
        if types:
            out["token_type_ids"] = (out["input_ids"] == image_token).long()
        return dict(out, pixel_values=torch.stack(pixels))

    return make_inputs


def gemma3(attn: str = "sdpa", seed: int = 0, shield: bool = False) -> TinyVLM:
    """Gemma3: 16 soft tokens per 16x16 image between begin/end-of-image markers; image
    blocks attend bidirectionally; one sliding-window layer (window 16). ``shield``: ShieldGemma 2,
    the same model under a ``shieldgemma2`` config: the ``Gemma3ForConditionalGeneration`` that
    ``ShieldGemma2ForImageClassification`` holds as ``.model`` (which generates; ``wrapper`` is the
    classifier, which reads the yes/no logits of the last position)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    image_token, boi, eoi = 127, 125, 126
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                query_pre_attn_scalar=8, vocab_size=VOCAB, max_position_embeddings=512,
                sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    if shield:
        from transformers import ShieldGemma2Config, ShieldGemma2ForImageClassification

        text["model_type"] = "gemma3_text"
        config = ShieldGemma2Config(vision_config=vision, text_config=text, mm_tokens_per_image=16,
                                    image_token_index=image_token, boi_token_index=boi, eoi_token_index=eoi,
                                    pad_token_id=PAD, yes_token_index=SHIELD_YES, no_token_index=SHIELD_NO)
        classifier = ShieldGemma2ForImageClassification(config).eval()
        model = _finish(classifier.model, attn)
    else:
        config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16,
                              image_token_id=image_token, boi_token_id=boi, eoi_token_id=eoi, pad_token_id=PAD)
        model = _finish(Gemma3ForConditionalGeneration(config), attn)
    # The projector's weight starts at zero (checkpoints overwrite it): every image token
    # would be the same zero vector and there would be nothing to select between.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=32 ** -0.5)

    tiny = TinyVLM(model, _soft_token_images(image_token, boi, eoi, types=True),
                   single=[[("text", 5), ("image", 0), ("text", 7)]],
                   batch=[[("text", 5), ("image", 0), ("text", 7)],
                          [("text", 3), ("image", 0), ("text", 1), ("image", 0), ("text", 4)],
                          [("image", 0), ("text", 9)]])
    if shield:
        tiny.wrapper = classifier
    return tiny


def paligemma(attn: str = "sdpa", seed: int = 0, version: int = 1) -> TinyVLM:
    """PaliGemma (``version=1``, a Gemma text model) and PaliGemma 2 (a Gemma2 one: a sliding-window
    layer, window 16, and logit soft-capping): 16 tokens per 16x16 image, every image ahead of the
    text, back to back, then bos, the prompt and a newline, as the processor lays them out. ``token_type_ids``
    is 0 on the whole prompt (the processor's, without a suffix): the prefix attends bidirectionally."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    image_token, bos, newline = 127, 1, 100
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=512,
                pad_token_id=PAD, bos_token_id=bos, eos_token_id=2)
    if version == 2:
        text.update(model_type="gemma2", query_pre_attn_scalar=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
                    attn_logit_softcapping=50.0)
    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4),
        text_config=text, image_token_index=image_token, projection_dim=32, hidden_size=32,
        vocab_size=VOCAB, pad_token_id=PAD)
    if version == 2:  # SDPA drops Gemma2's soft-cap on attention logits (transformers 5.24 refuses it)
        attn = "eager"
    model = _finish(PaliGemmaForConditionalGeneration(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels = []

        def media(kind, _, gen, r):
            if kind != "image":
                return [bos] if kind == "bos" else [newline]
            pixels.append(torch.randn(3, 16, 16, generator=gen))
            return [image_token] * 16

        def row(segments):  # the processor's order: the images, bos, the prompt, a newline
            n = sum(size for kind, size in segments if kind == "text")
            return [s for s in segments if s[0] != "text"] + [("bos", 0), ("text", n), ("newline", 0)]

        out = _token_rows([row(r) for r in rows], seeds, media)
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return dict(out, pixel_values=torch.stack(pixels)) if pixels else out

    return TinyVLM(model, make_inputs,
                   single=[[("image", 0), ("text", 7)]],
                   batch=[[("image", 0), ("text", 7)],
                          [("image", 0), ("image", 0), ("text", 4)],
                          [("image", 0), ("text", 9)]],
                   # transformers' own generate() fails on a static cache for PaliGemma 2: 5.x hands its
                   # base model the dict of prebuilt masks, 4.57 a mask longer than the sliding layers.
                   static_generate=version == 1, static_differs="dynamic" if release("transformers") < (5, 0) else None)


def gemma4(attn: str = "sdpa", seed: int = 0, unified: bool = False) -> TinyVLM:
    """Gemma 4: an image of (h, w) patches (4 px, at most 64, padded to 64 with position -1)
    pools 2x2 into ``h*w/4`` soft tokens between begin/end-of-image markers; a video of ``t``
    frames is ``t`` such frames of the video token, each after a timestamp; per-layer inputs
    (PLE) computed from the token ids; image and frame blocks attend bidirectionally on the
    sliding-window layers (window 16) only; the last two layers reuse earlier layers' KV.
    ``unified``: Gemma 4 Unified (transformers 5.x), encoder-free: each 4 px patch (2 px patches
    merged 2x2) is projected into one soft token (``h*w`` an image), no per-layer inputs, and its
    base model's image and frame blocks attend bidirectionally on every layer."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    image_token, video_token, boi, eoi = 127, 124, 125, 126
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2,
                  position_embedding_size=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, global_head_dim=8, vocab_size=VOCAB,
                vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
                max_position_embeddings=512, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                use_bidirectional_attention="vision", final_logit_softcapping=30.0,
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config_cls, model_cls, pooled = Gemma4Config, Gemma4ForConditionalGeneration, 4
    if unified:
        from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

        vision = dict(patch_size=2, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=16, output_proj_dims=32)
        del text["vocab_size_per_layer_input"], text["hidden_size_per_layer_input"]
        config_cls, model_cls, pooled = Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration, 1
    config = config_cls(
        vision_config=vision, text_config=text,
        # Every id inside the tiny vocabulary (the defaults are Gemma's 262k ones).
        image_token_id=image_token, boi_token_id=boi, eoi_token_id=eoi, video_token_id=video_token,
        audio_token_id=123, boa_token_id=122, eoa_token_index=121, pad_token_id=PAD,
    )
    model = _finish(model_cls(config), attn)
    # Videos' frames: concatenated, with their counts (5.24), or one (frames, ...) tensor a video (5.17).
    flat_frames = "num_frames_per_video" in inspect.signature(model.model.forward).parameters

    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], []), "video": ([], [])}  # (pixels, positions) of each image / frame
        frames = []

        def segment(kind, size, gen, r):
            t, h, w = size if kind == "video" else (1, *size)
            ids = []
            for _ in range(t):
                pixels, positions = media[kind]
                pixels.append(torch.zeros(64, 3 * 4 * 4))
                pixels[-1][: h * w] = torch.rand(h * w, 3 * 4 * 4, generator=gen)
                ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                positions.append(torch.full((64, 2), -1))
                positions[-1][: h * w] = torch.stack([xs.flatten(), ys.flatten()], -1)
                token = video_token if kind == "video" else image_token
                ids += (_text(1, gen) if kind == "video" else []) + [boi] + [token] * (h * w // pooled) + [eoi]
            if kind == "video":
                frames.append(t)
            return ids

        out = _token_rows(rows, seeds, segment)
        ids = out["input_ids"]
        out["mm_token_type_ids"] = (ids == image_token).long() + 2 * (ids == video_token).long()
        for kind, (pixels, positions) in media.items():
            if not pixels:
                continue
            pixels, positions = torch.stack(pixels), torch.stack(positions)
            if kind == "video" and flat_frames:
                out["num_frames_per_video"] = torch.tensor(frames)
            elif kind == "video":
                pixels, positions = pixels.unflatten(0, (len(frames), -1)), positions.unflatten(0, (len(frames), -1))
            out["pixel_values" + ("_videos" if kind == "video" else "")] = pixels
            out[f"{kind}_position_ids"] = positions
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (8, 8)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (8, 8)), ("text", 7)],
                          [("text", 3), ("image", (4, 8)), ("text", 1), ("image", (6, 8)), ("text", 4)],
                          [("video", (2, 8, 4)), ("text", 9)]],
                   frames_are_images=True,
                   # 5.17 seen differing, 5.24 and 5.25 agreeing (Gemma 4); every 5.x (Gemma 4 Unified)
                   static_differs="dynamic" if unified or release("transformers") < (5, 24) else None)


def diffusion_gemma(attn: str = "sdpa", seed: int = 0, sliding_window: int = 512) -> TinyVLM:
    """DiffusionGemma (transformers 5.24+), a block diffusion model: Gemma 4's image layout (an image of
    (h, w) patches of 4 px, at most 64, pooled 2x2 into ``h*w/4`` soft tokens between begin/end-of-image
    markers) read by an encoder that prefills the cache, image blocks attending to themselves on every
    layer; a decoder denoises canvases of 4 tokens over the cache. Its sliding-window layers count cache
    slots, which pruning shortens: the default window covers every prompt here, so that a pruned model
    equals the unpatched one with the dropped tokens masked out."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    image_token, boi, eoi = 127, 125, 126
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, global_head_dim=8, vocab_size=VOCAB, num_experts=2,
                top_k_experts=1, moe_intermediate_size=32, max_position_embeddings=512, sliding_window=sliding_window,
                layer_types=["sliding_attention", "full_attention"], use_bidirectional_attention="vision",
                final_logit_softcapping=30.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config = DiffusionGemmaConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                                  boi_token_id=boi, eoi_token_id=eoi, pad_token_id=PAD, canvas_length=4)
    model = _finish(DiffusionGemmaForBlockDiffusion(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels, positions = [], []

        def segment(kind, size, gen, r):
            h, w = size
            pixels.append(torch.zeros(64, 3 * 4 * 4))
            pixels[-1][: h * w] = torch.rand(h * w, 3 * 4 * 4, generator=gen)
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            positions.append(torch.full((64, 2), -1))
            positions[-1][: h * w] = torch.stack([xs.flatten(), ys.flatten()], -1)
            return [boi] + [image_token] * (h * w // 4) + [eoi]

        out = _token_rows(rows, seeds, segment)
        out["mm_token_type_ids"] = (out["input_ids"] == image_token).long()
        out["pixel_values"], out["image_position_ids"] = torch.stack(pixels), torch.stack(positions)
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (8, 8)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (8, 8)), ("text", 7)],
                          [("text", 3), ("image", (4, 8)), ("text", 1), ("image", (6, 8)), ("text", 4)]])


def t5gemma2(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """T5Gemma 2 (transformers 5.17+), an encoder-decoder: Gemma3's images (16 soft tokens per 16x16 image
    between begin/end-of-image markers) in the prompt, which the encoder reads bidirectionally (a
    sliding-window layer whose window covers every prompt here: pruned, it counts kept tokens); the decoder
    cross-attends to the encoder's output."""
    from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration

    torch.manual_seed(seed)
    image_token, boi, eoi = 127, 125, 126
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, vocab_size=VOCAB,
                max_position_embeddings=512, sliding_window=512, layer_types=["sliding_attention", "full_attention"],
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config = T5Gemma2Config(encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                                         boi_token_index=boi, eoi_token_index=eoi, image_token_index=image_token),
                            decoder=text, image_token_index=image_token, eoi_token_index=eoi)
    model = _finish(T5Gemma2ForConditionalGeneration(config), attn)
    with torch.no_grad():  # zero at initialisation, as Gemma3's (checkpoints overwrite it)
        model.model.encoder.multi_modal_projector.mm_input_projection_weight.normal_(std=32 ** -0.5)

    return TinyVLM(model, _soft_token_images(image_token, boi, eoi, types=False),
                   single=[[("text", 5), ("image", 0), ("text", 7)]],
                   batch=[[("text", 5), ("image", 0), ("text", 7)],
                          [("text", 3), ("image", 0), ("text", 1), ("image", 0), ("text", 4)],
                          [("image", 0), ("text", 9)]])


def florence2(attn: str = "sdpa", seed: int = 0, vocab: int = VOCAB, image_token: int = 127, bos: int = 1,
              eos: int = 2, pad: int = PAD) -> TinyVLM:
    """Florence-2, an encoder-decoder: a 32x32 image read by a two-stage DaViT tower (4x4 patch tokens and
    their mean, 17 tokens) in front of the prompt, as its processor writes it (image tokens, bos, text, eos;
    right-padded, as its BART tokenizer pads); a BART encoder (learned absolute positions) reads the prompt
    bidirectionally, the decoder cross-attends to its output. The ids: a tokenizer's, where given."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4],
                  window_size=2, drop_path_rate=0.0, projection_dim=32, max_position_embeddings=8)
    text = dict(model_type="bart", vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                max_position_embeddings=64, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                decoder_start_token_id=eos, forced_eos_token_id=None, init_std=0.3)
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=image_token)
    model = _finish(Florence2ForConditionalGeneration(config), attn)
    model.generation_config.pad_token_id = pad

    def make_inputs(rows, seeds=None) -> dict:
        pixels, ids = [], []
        for segments, gen in zip(rows, _generators(rows, seeds)):
            row = []
            for kind, size in segments:
                if kind == "image":
                    pixels.append(torch.randn(3, 32, 32, generator=gen))
                    row += [image_token] * 17 + [bos]
                else:
                    row += _text(size, gen)
            ids.append(row + [eos])
        width = max(len(r) for r in ids)  # right-padded
        return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
                "pixel_values": torch.stack(pixels)}

    return TinyVLM(model, make_inputs, single=[[("image", 0), ("text", 7)]],
                   batch=[[("image", 0), ("text", 7)], [("image", 0), ("text", 3)], [("image", 0), ("text", 11)]])


class _FeatureMapTower(torch.nn.Module):
    """Stands in for Gemma 3n's MobileNetV5, a timm model (timm is no dependency of this project):
    two strided convolutions from 32x32 pixels to the ``(B, hidden_size, 4, 4)`` map its tower
    gives (``do_pooling=False``), which the base model reads as 16 soft tokens."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.stem = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.down = torch.nn.Conv2d(16, config.hidden_size, 2, stride=2)

    def forward(self, pixel_values, do_pooling=False, return_dict=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        features = self.down(torch.nn.functional.gelu(self.stem(pixel_values)))
        return BaseModelOutputWithPooling(last_hidden_state=features)


def gemma3n(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Gemma 3n: 16 soft tokens per 32x32 image between begin/end-of-image markers, an audio clip
    of 32 mel frames 8 audio tokens (audio is kept whole) between begin/end-of-audio markers, all
    ids inside the tiny vocabulary (vision ids from 112, audio from 120, which the base model embeds
    with their own tables); causal masks (a sliding-window layer, window 16); per-layer inputs (PLE)
    computed from the token ids; AltUp and Laurel blocks; the last two layers reuse earlier
    layers' KV. :class:`_FeatureMapTower` stands in for the vision tower."""
    from unittest import mock

    from transformers import AutoModel, Gemma3nConfig, Gemma3nForConditionalGeneration
    from transformers.models.gemma3n import modeling_gemma3n

    torch.manual_seed(seed)
    boi, boa, eoi, image_token, eoa, audio_token = 110, 111, 112, 113, 120, 121
    config = Gemma3nConfig(
        vision_config=dict(hidden_size=32, vocab_size=8, vocab_offset=112),
        audio_config=dict(vocab_size=8, vocab_offset=120, input_feat_size=8, hidden_size=16,
                          conf_num_attention_heads=2, conf_num_hidden_layers=1, conf_reduction_factor=1,
                          sscp_conv_channel_size=(4, 4), conf_attention_chunk_size=4,
                          conf_attention_context_left=5),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, vocab_size_per_layer_input=112,
                         hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2,
                         max_position_embeddings=512, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2),
        vision_soft_tokens_per_image=16, audio_soft_tokens_per_image=8, boi_token_id=boi, eoi_token_id=eoi,
        image_token_id=image_token, boa_token_id=boa, eoa_token_id=eoa, audio_token_id=audio_token,
        pad_token_id=PAD,
    )

    class Auto:  # the base model builds its towers with AutoModel: the stand-in for the timm one
        @staticmethod
        def from_config(config, **kwargs):
            if config.model_type == "gemma3n_vision":
                return _FeatureMapTower(config)
            return AutoModel.from_config(config, **kwargs)

    with mock.patch.object(modeling_gemma3n, "AutoModel", Auto):
        model = Gemma3nForConditionalGeneration(config)
    model = _finish(model, {"text_config": attn, "vision_config": "eager", "audio_config": "eager"})

    def make_inputs(rows, seeds=None) -> dict:
        pixels, clips = [], []

        def segment(kind, _, gen, r):
            if kind == "audio":
                clips.append(torch.randn(32, 8, generator=gen))
                return [boa] + [audio_token] * 8 + [eoa]
            pixels.append(torch.randn(3, 32, 32, generator=gen))
            return [boi] + [image_token] * 16 + [eoi]

        out = _token_rows(rows, seeds, segment)
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        if clips:
            out["input_features"] = torch.stack(clips)
            out["input_features_mask"] = torch.ones(len(clips), 32, dtype=torch.bool)
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", 0), ("text", 7)]],
                   batch=[[("text", 5), ("image", 0), ("audio", 0), ("text", 7)],
                          [("text", 3), ("image", 0), ("text", 1), ("image", 0), ("text", 4)],
                          [("audio", 0), ("image", 0), ("text", 9)]])


QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 120, 121, 122, 123
QWEN_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                 pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
QWEN_PATCH = dict(patch_size=2, spatial_merge_size=2, temporal_patch_size=2)


def _patch_inputs(media: dict) -> dict:
    """Qwen-style pixel inputs: every image's (video's) patches in one tensor, plus grids."""
    out = {}
    for kind, (pixels, grids) in media.items():
        if pixels:
            prefix = "" if kind == "image" else "_videos"
            out[f"pixel_values{prefix}"] = torch.cat(pixels)
            out[f"{kind}_grid_thw"] = torch.tensor(grids)
    return out


def _qwen(config_cls, model_cls, vision: dict, attn: str, seed: int, text=QWEN_TEXT,
          per_frame: bool = False, patch_dim: int = 3 * 2 * 2 * 2,
          video_markers: tuple[int, int] = (QWEN_START, QWEN_END), named_markers: bool = True,
          **extra) -> TinyVLM:
    """Qwen2/2.5/3-VL: each image or video is wrapped in vision start/end markers and
    takes ``t*h*w / 4`` tokens for a ``(t, h, w)`` patch grid (2x2 merge). ``patch_dim``: the
    pixels of a patch (a tower without temporal patches: 3 * 2 * 2); ``video_markers``: a video's,
    where they are not an image's; ``named_markers``: the config names the start/end markers
    (MiniMax-M3-VL's does not); ``extra``: more of the config."""
    torch.manual_seed(seed)
    markers = dict(vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END) if named_markers else {}
    config = config_cls(text_config=text, vision_config=dict(QWEN_PATCH, **vision),
                        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, **markers, **extra)
    model = _finish(model_cls(config), attn)
    takes_types = "mm_token_type_ids" in inspect.signature(model.model.forward).parameters

    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], []), "video": ([], [])}

        def segment(kind, grid, gen, r):
            t, h, w = grid if kind == "video" else (1, *grid)
            token = QWEN_VIDEO if kind == "video" else QWEN_IMAGE
            start, end = video_markers if kind == "video" else (QWEN_START, QWEN_END)
            ids = []
            # Qwen3-VL wraps every video frame in its own markers, after its timestamp ("<0.5 seconds>").
            for _ in range(t if kind == "video" and per_frame else 1):
                n = h * w // 4 * (1 if kind == "image" or per_frame else t)
                ids += ((_text(1, gen) if kind == "video" and per_frame else [])
                        + [start] + [token] * n + [end])
            pixels, grids = media[kind]
            pixels.append(torch.randn(t * h * w, patch_dim, generator=gen))
            grids.append([t if kind == "video" else 1, h, w])
            return ids

        out = _token_rows(rows, seeds, segment)
        out.update(_patch_inputs(media))
        if takes_types:  # transformers 5.x: M-RoPE reads the modality of every token
            out["mm_token_type_ids"] = ((out["input_ids"] == QWEN_IMAGE).int()
                                        + 2 * (out["input_ids"] == QWEN_VIDEO).int())
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 4), ("image", (8, 8)), ("text", 6)]],
                   batch=[[("text", 4), ("image", (8, 8)), ("text", 6)],
                          [("text", 2), ("image", (4, 8)), ("text", 1), ("image", (6, 8)), ("text", 3)],
                          [("video", (2, 4, 8)), ("text", 5)]],
                   frames_are_images=per_frame,
                   # transformers 4.57's Qwen3-VL counts frames as videos when it expands
                   # the inputs for beam search, and fails before any hook runs.
                   beam_video=not (per_frame and transformers.__version__.startswith("4.")))


def qwen2_vl(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2)
    return _qwen(Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision, attn, seed)


def qwen2_5_vl(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  window_size=8, fullatt_block_indexes=[1])
    return _qwen(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision, attn, seed)


# A Qwen3 text model on 1-D positions (QWEN_TEXT without M-RoPE), fed Qwen2-VL's layout by other towers.
QWEN3_TEXT = dict({k: v for k, v in QWEN_TEXT.items() if k != "rope_scaling"}, model_type="qwen3", head_dim=8)


def llava_onevision1_5(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """LLaVA-OneVision-1.5 (transformers 5.25): Qwen2-VL's layout (each image or video one run between
    vision markers, 2x2 merge) from a RiceViT tower (2-D RoPE, a class token a frame, no temporal
    patches) into a Qwen3 text model on 1-D positions."""
    from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration

    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32)
    return _qwen(LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration, vision, attn, seed,
                 text=QWEN3_TEXT, patch_dim=3 * 2 * 2)


def ovis2_5(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Ovis2.5 (transformers 5.25): Qwen2-VL's layout (each image or video one run, 2x2 merge) from a
    SigLIP NaViT tower (2-D RoPE, windowed attention) through a visual vocabulary into a Qwen3 text
    model on 1-D positions. Images and videos have their own start and end markers, whose embeddings
    are the visual vocabulary's indicator rows."""
    from transformers import Ovis2_5Config, Ovis2_5ForConditionalGeneration

    video_start, video_end = 118, 119
    vision = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  temporal_patch_size=1, image_size=16, window_size=8, vocab_size=64)
    return _qwen(Ovis2_5Config, Ovis2_5ForConditionalGeneration, vision, attn, seed,
                 text=QWEN3_TEXT, patch_dim=3 * 2 * 2,
                 video_markers=(video_start, video_end), image_start_token_id=QWEN_START,
                 image_end_token_id=QWEN_END, video_start_token_id=video_start, video_end_token_id=video_end)


GLM_TEXT = dict(QWEN_TEXT, num_attention_heads=2, num_key_value_heads=2,
                rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2]})
# GLM-4.5V and GLM-4.6V text models (GLM-4.5-Air's): the first layer dense, the others MoE (2 layers
# give both kinds); 4 routed experts, 2 a token, and a shared one. Rotary embedding covers half of each
# 16-dim head (as in the checkpoints): 8 dims, 4 frequencies, which M-RoPE's [2, 1, 1] sections share out.
GLM_MOE_TEXT = dict(GLM_TEXT, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    n_shared_experts=1, first_k_dense_replace=1,
                    rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]})


def _glm(name: str, text: dict, attn: str, seed: int, videos: bool, config_name: Optional[str] = None,
         vision: Optional[dict] = None) -> TinyVLM:
    """GLM-4.1V/4.5V/4.6V (``name``: the transformers class prefix): Qwen-like patches (2x2 merge);
    an image is begin/end-of-image markers around ``h*w/4`` image tokens; a video is
    begin/end-of-video markers around its frames, each an image of the same image token (the
    modality is in ``mm_token_type_ids``, 5.x) and a timestamp. The model cannot take images and
    videos in one call (it places both by the image token), so ``videos=True`` gives rows of videos
    only. ``config_name``: the config's class prefix, where it is not ``name`` (GLM-4.6V's model
    classes serve other configs); ``vision``: more of the vision config."""
    torch.manual_seed(seed)
    video_start, video_end = 118, 119
    config = getattr(transformers, f"{config_name or name}Config")(
        text_config=text,
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=32, image_size=16, **QWEN_PATCH, **(vision or {})),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, image_start_token_id=QWEN_START,
        image_end_token_id=QWEN_END, video_start_token_id=video_start, video_end_token_id=video_end)
    model = _finish(getattr(transformers, f"{name}ForConditionalGeneration")(config), attn)
    takes_types = "mm_token_type_ids" in inspect.signature(model.model.forward).parameters
    # transformers 4.57's GLM-4.5V runs its experts one by one, each on the tokens routed to it.
    routed = isinstance(getattr(model.model.language_model.layers[-1].mlp, "experts", None), torch.nn.ModuleList)

    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], []), "video": ([], [])}

        def segment(kind, grid, gen, r):
            t, h, w = grid if kind == "video" else (1, *grid)
            frame = [QWEN_START] + [QWEN_IMAGE] * (h * w // 4) + [QWEN_END]
            ids = frame if kind == "image" else (
                [video_start] + sum((frame + _text(1, gen) for _ in range(t)), []) + [video_end])
            pixels, grids = media[kind]
            pixels.append(torch.randn(t * h * w, 24, generator=gen))
            grids.append([t, h, w])
            return ids

        out = _token_rows(rows, seeds, segment)
        out.update(_patch_inputs(media))
        if takes_types:
            image = out["input_ids"] == QWEN_IMAGE
            in_video = ((out["input_ids"] == video_start).long().cumsum(1)
                        > (out["input_ids"] == video_end).long().cumsum(1))
            out["mm_token_type_ids"] = (image & ~in_video).int() + 2 * (image & in_video).int()
        return out

    if videos:
        return TinyVLM(model, make_inputs,
                       single=[[("text", 4), ("video", (1, 4, 8)), ("text", 6)]],  # one frame: one budget
                       batch=[[("text", 4), ("video", (2, 8, 8)), ("text", 6)],
                              [("text", 2), ("video", (1, 4, 8)), ("text", 1), ("video", (2, 6, 8)),
                               ("text", 3)],
                              [("video", (2, 4, 8)), ("text", 5)]],
                       frames_are_images=True, graphs_follow_routing=routed,
                       # 5.24's generate() fails to beam-search a GLM-4V video before any hook runs.
                       beam_video=not hasattr(transformers.GenerationMixin, "_expand_multimodal_outputs"))
    return TinyVLM(model, make_inputs,
                   single=[[("text", 4), ("image", (8, 8)), ("text", 6)]],
                   batch=[[("text", 4), ("image", (8, 8)), ("text", 6)],
                          [("text", 2), ("image", (4, 8)), ("text", 1), ("image", (6, 8)), ("text", 3)],
                          [("image", (4, 4)), ("text", 5)]],
                   graphs_follow_routing=routed)


def glm4v(attn: str = "sdpa", seed: int = 0, videos: bool = False) -> TinyVLM:
    """GLM-4.1V (dense)."""
    return _glm("Glm4v", GLM_TEXT, attn, seed, videos)


def glm4v_moe(attn: str = "sdpa", seed: int = 0, videos: bool = False) -> TinyVLM:
    """GLM-4.5V: GLM-4.1V's vision tower and layout, a MoE text model."""
    return _glm("Glm4vMoe", GLM_MOE_TEXT, attn, seed, videos)


def glm46v(attn: str = "sdpa", seed: int = 0, videos: bool = False) -> TinyVLM:
    """GLM-4.6V (transformers 5.x): GLM-4.1V's model classes around the text model its
    ``text_config`` names (GLM-4.1V's dense one by default); GLM-4.5V's MoE one here, which the
    ``glm4v`` builder does not cover."""
    return _glm("Glm46V", dict(GLM_MOE_TEXT, model_type="glm4v_moe_text"), attn, seed, videos)


def glmga(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """A ``glmga`` config (transformers 5.17+): GLM-4.6V's model classes (the auto mappings give
    them), its dense text model by default."""
    return _glm("Glm46V", GLM_TEXT, attn, seed, videos=False, config_name="Glmga")


def glm_ocr(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """GLM-OCR (transformers 5.x): GLM-4.1V's model classes, a tower of its own; images only (its
    processor takes no videos)."""
    return _glm("GlmOcr", GLM_TEXT, attn, seed, videos=False)


# Text models that take their M-RoPE sections in ``rope_parameters`` (2 heads of 16 dims).
ROPE_TEXT = {k: v for k, v in dict(QWEN_TEXT, num_attention_heads=2, num_key_value_heads=2).items()
             if k != "rope_scaling"}


def ernie4_5_vl_moe(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """ERNIE-4.5-VL (transformers 5.x): 2x2-merged patches, an image ``h*w/4`` tokens and a video of
    ``t`` frames (in pairs) ``t*h*w/8``, each between its start/end markers; M-RoPE reads
    ``mm_token_type_ids``, and each MoE layer sends the tokens that ``moe_mm_token_type_ids`` marks
    (visual tokens and their markers) to its vision experts, the others to its text experts."""
    torch.manual_seed(seed)
    video_start, video_end = 118, 119
    text = dict(ROPE_TEXT, moe_intermediate_size=[32, 16], moe_k=2, moe_num_experts=4, moe_num_shared_experts=1,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]})
    config = transformers.Ernie4_5_VLMoeConfig(
        text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                             patch_size=2, spatial_merge_size=2, temporal_merge_size=2),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, image_start_token_id=QWEN_START,
        image_end_token_id=QWEN_END, video_start_token_id=video_start, video_end_token_id=video_end)
    model = _finish(transformers.Ernie4_5_VLMoeForConditionalGeneration(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], []), "video": ([], [])}

        def segment(kind, grid, gen, r):
            t, h, w = grid if kind == "video" else (1, *grid)
            ids = ([QWEN_START] + [QWEN_IMAGE] * (h * w // 4) + [QWEN_END] if kind == "image"
                   else [video_start] + [QWEN_VIDEO] * (t * h * w // 8) + [video_end])
            pixels, grids = media[kind]
            pixels.append(torch.randn(t * h * w, 12, generator=gen))
            grids.append([t, h, w])
            return ids

        out = _token_rows(rows, seeds, segment)
        out.update(_patch_inputs(media))
        ids = out["input_ids"]
        image = torch.isin(ids, torch.tensor([QWEN_START, QWEN_IMAGE, QWEN_END]))
        video = torch.isin(ids, torch.tensor([video_start, QWEN_VIDEO, video_end]))
        out["mm_token_type_ids"] = (ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int()
        out["moe_mm_token_type_ids"] = image.int() + 2 * video.int()
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 4), ("image", (8, 8)), ("text", 6)]],
                   batch=[[("text", 4), ("image", (8, 8)), ("text", 6)],
                          [("text", 2), ("image", (4, 8)), ("text", 1), ("image", (6, 8)), ("text", 3)],
                          [("video", (2, 8, 8)), ("text", 5)]])


def _images_between_markers(model, pixels: Callable[[int, int, torch.Generator], torch.Tensor],
                            tokens: Callable[[int, int], int], **flags) -> TinyVLM:
    """Qwen2-VL's image layout, images only (PaddleOCR-VL, HunYuan-VL): an image of ``(h, w)``
    patches (``pixels(h, w, gen)``, its grid ``[1, h, w]``) is ``tokens(h, w)`` image tokens between
    vision start/end markers, marked in ``mm_token_type_ids``."""
    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], [])}

        def image(kind, grid, gen, r):
            h, w = grid
            media["image"][0].append(pixels(h, w, gen))
            media["image"][1].append([1, h, w])
            return [QWEN_START] + [QWEN_IMAGE] * tokens(h, w) + [QWEN_END]

        out = _token_rows(rows, seeds, image)
        out.update(_patch_inputs(media))
        out["mm_token_type_ids"] = (out["input_ids"] == QWEN_IMAGE).int()
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 4), ("image", (8, 8)), ("text", 6)]],
                   batch=[[("text", 4), ("image", (8, 8)), ("text", 6)],
                          [("text", 2), ("image", (4, 8)), ("text", 1), ("image", (6, 8)), ("text", 3)],
                          [("image", (4, 4)), ("text", 5)]],
                   **flags)


def paddleocr_vl(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """PaddleOCR-VL (transformers 5.x; images only): a NaViT-style SigLIP tower over 2 px patches,
    merged 2x2: an image of ``(h, w)`` patches is ``h*w/4`` image tokens between vision start/end
    markers, placed by M-RoPE (``mm_token_type_ids``) as in Qwen2-VL."""
    torch.manual_seed(seed)
    text = dict(ROPE_TEXT, head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [2, 3, 3]})
    config = transformers.PaddleOCRVLConfig(
        text_config=text, vision_config=dict(TOWER, num_hidden_layers=1, image_size=16, patch_size=2,
                                             spatial_merge_size=2),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END)
    model = _finish(transformers.PaddleOCRVLForConditionalGeneration(config), attn)

    return _images_between_markers(model, lambda h, w, gen: torch.randn(h * w, 3, 2, 2, generator=gen),
                                   lambda h, w: h * w // 4)


def hunyuan_vl(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """HunYuan-VL (transformers 5.x; images only): 2 px patches merged 2x2, an image of ``(h, w)``
    patches is ``h/2`` rows of ``w/2`` features and a newline feature, after a begin and before an
    end feature, all on image tokens (``h/2 * (w/2 + 1) + 2``), between start/end markers. Its
    M-RoPE has 4 axes: the sequence, and the width, height and image index of image tokens. The
    image index counts images across the batch (and before transformers 5.24 across the beams of
    beam search), so a row's logits depend on the rows before it."""
    torch.manual_seed(seed)
    text = dict(ROPE_TEXT, head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2, 2]})
    config = transformers.HunYuanVLConfig(
        text_config=text, vision_config=dict(TOWER, num_hidden_layers=1, patch_size=2, spatial_merge_size=2,
                                             max_image_size=16, out_hidden_size=32),
        image_token_id=QWEN_IMAGE, im_start_id=QWEN_START, im_end_id=QWEN_END, im_newline_id=124)
    model = _finish(transformers.HunYuanVLForConditionalGeneration(config), attn)

    return _images_between_markers(model, lambda h, w, gen: torch.randn(h * w, 12, generator=gen),
                                   lambda h, w: h // 2 * (w // 2 + 1) + 2,
                                   rows_independent=False,
                                   # Before 5.24 generate() numbers the images of each beam apart (the
                                   # beams of a row get different image indices): its beams disagree.
                                   beam_images=hasattr(transformers.GenerationMixin, "_expand_multimodal_outputs"))


def video_llama_3(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """VideoLLaMA3 (transformers 5.x): a SigLIP-style tower over 2 px patches whose features are
    pooled ``merge`` x ``merge`` (1 for images, 2 for videos, as its processors do), a Qwen2 text
    model with 1-D positions. An image of ``(h, w)`` patches is ``h*w`` image tokens, with nothing
    between two images; a video's frame is a timestamp then ``h*w/4`` video tokens."""
    torch.manual_seed(seed)
    config = transformers.VideoLlama3Config(
        text_config=dict(_tiny_llama("qwen2").to_dict()),
        vision_config=dict(TOWER, num_hidden_layers=1, patch_size=2),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO)
    model = _finish(transformers.VideoLlama3ForConditionalGeneration(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], [], []), "video": ([], [], [])}

        def segment(kind, grid, gen, r):
            t, h, w = grid if kind == "video" else (1, *grid)
            merge = 2 if kind == "video" else 1
            pixels, grids, merges = media[kind]
            pixels.append(torch.randn(t * h * w, 12, generator=gen))
            grids.append([t, h, w])
            merges.append(merge)
            if kind == "image":
                return [QWEN_IMAGE] * (h * w)
            return sum((_text(1, gen) + [QWEN_VIDEO] * (h * w // 4) for _ in range(t)), [])

        out = _token_rows(rows, seeds, segment)
        for kind, (pixels, grids, merges) in media.items():
            if pixels:
                suffix = "" if kind == "image" else "_videos"
                out[f"pixel_values{suffix}"] = torch.cat(pixels)
                out[f"{kind}_grid_thw"] = torch.tensor(grids)
                out[f"{kind}_merge_sizes"] = torch.tensor(merges)
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 4), ("image", (4, 4)), ("text", 6)]],
                   batch=[[("text", 4), ("image", (4, 4)), ("text", 6)],
                          [("text", 2), ("image", (2, 4)), ("image", (4, 2)), ("text", 3)],
                          [("video", (2, 4, 8)), ("text", 5)]],
                   frames_are_images=True)


def exaone4_5(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """EXAONE 4.5 (transformers 5.x): Qwen2.5-VL's tower and token layout (grouped-query vision
    attention) around an EXAONE 4 text model with 1-D positions: sliding-window layers with RoPE
    (8-token windows, so that they fall inside the prompts) alternate with full-attention layers
    without positions."""
    from transformers import Exaone4_5_Config, Exaone4_5_ForConditionalGeneration

    text = dict(model_type="exaone4", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                sliding_window=8, sliding_window_pattern=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_key_value_heads=1,
                  out_hidden_size=32, window_size=8, fullatt_block_indexes=[1])
    tiny = _qwen(Exaone4_5_Config, Exaone4_5_ForConditionalGeneration, vision, attn, seed, text=text)
    # Before 5.24 its generate() counts image tokens as images when it expands the inputs for beam
    # search, and fails before any hook runs.
    tiny.beam_images = hasattr(transformers.GenerationMixin, "_expand_multimodal_outputs")
    return tiny


def dots3_note(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Dots3-Note (transformers 5.24): Qwen2-VL's grids and token counts (2x2 merged 2 px patches, no temporal
    patches; a video one run) around a text model of latent attention: two layers narrowed by a DeepSeek
    indexer (its top-k past every test prompt, as in :func:`hy_v4_vl`), one with an 8-token sliding window, a
    dense MLP then grouped MoE ones; its vision tower has a MoE block, and an audio tower stands by unused."""
    from transformers import Dots3NoteConfig, Dots3NoteForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, head_dim=8,
                qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                n_group=1, topk_group=1, n_shared_experts=1, shared_experts_intermediate_size=32, index_topk=512,
                index_head_dim=8, index_n_heads=2, sliding_window=8, max_position_embeddings=512,
                swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=16, swa_kv_lora_rank=16,
                swa_head_dim=8, swa_qk_nope_head_dim=4, swa_v_head_dim=8, pad_token_id=PAD, bos_token_id=1,
                eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  mlp_layer_types=["dense", "sparse"], num_local_experts=4, num_experts_per_tok=2,
                  router_scaling_factor=1.0, moe_intermediate_size=32, adapter_in_dim=32, adapter_out_dim=32,
                  adapter_merge_size=2)
    audio = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 downsample_hidden_size=16, adapter_input_size=32, adapter_out_dim=32)

    def config(vision_start_token_id, vision_end_token_id, **kwargs):  # its processor puts no markers in a config
        return Dots3NoteConfig(audio_config=audio, audio_token_id=QWEN_END + 1, **kwargs)

    return _qwen(config, Dots3NoteForConditionalGeneration, vision, attn, seed, text=text, patch_dim=3 * 2 * 2)


QWEN3_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                    num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
QWEN3_TEXT = dict(QWEN_TEXT, head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                       "mrope_interleaved": True})


# Qwen3-VL and Qwen3.5 MoE text models: 4 experts, 2 a token.
QWEN3_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# Qwen3.5: three gated-DeltaNet (linear attention) layers to each full-attention one; 4 layers
# give both kinds. Rotary embedding covers a quarter of each head (as in the checkpoints): 32
# dims give the 8 that M-RoPE's [2, 1, 1] sections need, so the height and width positions of
# image tokens reach the logits. Its vision tower is Qwen3-VL's without the deepstack.
QWEN3_5_TEXT = dict(QWEN3_TEXT, num_hidden_layers=4, head_dim=32, linear_conv_kernel_dim=4,
                    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                    linear_num_value_heads=4)
QWEN3_5_VISION = {k: v for k, v in QWEN3_VISION.items() if k != "deepstack_visual_indexes"}


def _qwen3(name: str, vision: dict, text: dict, attn: str, seed: int) -> TinyVLM:
    """Qwen3-VL and Qwen3.5 (``name``: the transformers class prefix): every video frame is
    wrapped in its own markers, after a timestamp."""
    return _qwen(getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForConditionalGeneration"),
                 vision, attn, seed, text=text, per_frame=True)


def qwen3_vl(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    return _qwen3("Qwen3VL", QWEN3_VISION, QWEN3_TEXT, attn, seed)


def qwen3_vl_moe(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    return _qwen3("Qwen3VLMoe", QWEN3_VISION, dict(QWEN3_TEXT, **QWEN3_MOE, decoder_sparse_step=1), attn, seed)


def qwen3_5(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    return _qwen3("Qwen3_5", QWEN3_5_VISION, QWEN3_5_TEXT, attn, seed)


def qwen3_5_moe(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    return _qwen3("Qwen3_5Moe", QWEN3_5_VISION, dict(QWEN3_5_TEXT, **QWEN3_MOE, shared_expert_intermediate_size=32),
                  attn, seed)


OMNI_AUDIO, OMNI_AUDIO_START, OMNI_AUDIO_END = 117, 118, 119


def _omni(name: str, audio: dict, vision: dict, text: dict, attn: str, seed: int, ids: str,
          audio_tokens: Callable[[int], int], media: str = "both", clips: tuple[int, int] = (48, 64)) -> TinyVLM:
    """Qwen2.5-Omni / Qwen3-Omni-MoE thinkers (``name``: the transformers class prefix; ``ids``: how
    its config names the placeholder ids): each image or video between vision start/end markers,
    ``t*h*w / 4`` tokens for a ``(t, h, w)`` patch grid (2x2 merge), a video one run of them (TMRoPE
    numbers its frames by their time, ``video_second_per_grid``); an audio clip of ``n`` mel frames
    is ``audio_tokens(n)`` audio tokens between audio start/end markers. ``media``: rows of images and
    videos ("both"), or of ``"images"`` or ``"videos"`` only; ``clips``: the batch's two clips' frames."""
    torch.manual_seed(seed)
    config = getattr(transformers, f"{name}ThinkerConfig")(
        audio_config=audio, vision_config=dict(vision, **QWEN_PATCH), text_config=text,
        **{f"image_token_{ids}": QWEN_IMAGE, f"video_token_{ids}": QWEN_VIDEO, f"audio_token_{ids}": OMNI_AUDIO},
        vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END, audio_start_token_id=OMNI_AUDIO_START,
        audio_end_token_id=OMNI_AUDIO_END, position_id_per_seconds=4, pad_token_id=PAD)
    model = _finish(getattr(transformers, f"{name}ThinkerForConditionalGeneration")(config), attn)
    mels, patch_dim = audio["num_mel_bins"], 3 * 2 * 2 * 2

    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], []), "video": ([], [])}
        clips = []

        def segment(kind, size, gen, r):
            if kind == "audio":
                clips.append(torch.randn(mels, size, generator=gen))
                return [OMNI_AUDIO_START] + [OMNI_AUDIO] * audio_tokens(size) + [OMNI_AUDIO_END]
            t, h, w = size if kind == "video" else (1, *size)
            pixels, grids = media[kind]
            pixels.append(torch.randn(t * h * w, patch_dim, generator=gen))
            grids.append([t, h, w])
            return [QWEN_START] + [QWEN_VIDEO if kind == "video" else QWEN_IMAGE] * (t * h * w // 4) + [QWEN_END]

        out = _token_rows(rows, seeds, segment)
        out.update(_patch_inputs(media))
        if media["video"][0]:
            out["video_second_per_grid"] = torch.ones(len(media["video"][0]))
        if clips:
            longest = max(c.shape[1] for c in clips)
            out["input_features"] = torch.stack([torch.nn.functional.pad(c, (0, longest - c.shape[1])) for c in clips])
            out["feature_attention_mask"] = torch.stack([torch.arange(longest) < c.shape[1] for c in clips]).long()
        return out

    small, other, video = ("image", (4, 8)), ("image", (6, 8)), ("video", (2, 4, 8))
    if media == "videos":
        small, other = video, ("video", (2, 6, 8))
    elif media == "images":
        video = ("image", (4, 4))
    return TinyVLM(model, make_inputs,
                   single=[[("text", 4), small, ("text", 6)]],
                   batch=[[("text", 4), small, ("audio", clips[0]), ("text", 6)],
                          [("text", 2), small, ("text", 1), other, ("text", 3)],
                          [("audio", clips[1]), video, ("text", 5)]],
                   # transformers 4.57's thinkers expand the image grids for beam search image by image,
                   # not row by row (rows of several images get other beams' grids), and build no mask
                   # for a static cache (they take no config in their mask builder): their generate()
                   # fails there before any hook runs.
                   beam_multi_image=not transformers.__version__.startswith("4."),
                   static_generate=not transformers.__version__.startswith("4."))


QWEN2_5_OMNI_AUDIO = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          d_model=32, output_dim=32, max_source_positions=64, n_window=8)


def qwen2_5_omni(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Qwen2.5-Omni's thinker: Qwen2.5-VL's vision tower, a Qwen2 text model."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  window_size=8, fullatt_block_indexes=[1])
    text = dict(QWEN_TEXT, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]})
    return _omni("Qwen2_5Omni", QWEN2_5_OMNI_AUDIO, vision, text, attn, seed, "index",
                 lambda n: ((n - 1) // 2 + 1 - 2) // 2 + 1)


def qwen3_omni_moe(attn: str = "sdpa", seed: int = 0, media: str = "both") -> TinyVLM:
    """Qwen3-Omni-MoE's thinker: Qwen3-VL's vision tower (deepstack), Qwen3-VL-MoE's text model; its
    audio tower downsamples by 8 in three stride-2 convolutions (clips under 100 frames)."""
    audio = dict(QWEN2_5_OMNI_AUDIO, n_window=50, downsample_hidden_size=8)
    text = dict(QWEN3_TEXT, **QWEN3_MOE, decoder_sparse_step=1)
    old = transformers.__version__.startswith("4.")
    # transformers 4.57's audio tower pads the clips of a call to the longest and convolves each with
    # its padding (a clip's features depend on the others in its call, unpatched): one length there.
    tiny = _omni("Qwen3OmniMoe", audio, QWEN3_VISION, text, attn, seed, "id",
                 lambda n: (((n - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1, media, (64, 64) if old else (48, 64))
    if old:  # its thinker's loss with router logits reads this, which only 5.x's thinker sets
        tiny.model.router_aux_loss_coef = tiny.model.config.text_config.router_aux_loss_coef
    return tiny


def internvl(attn: str = "sdpa", seed: int = 0, classes: str = "InternVL", text: str = "qwen2") -> TinyVLM:
    """InternVL3: a 32x32 tile gives (32/4)^2 patches, pixel-shuffled 2x2 into 16 tokens;
    an image of ``n`` tiles is ``<img>`` + 16n image tokens + ``</img>``. ``classes``: the model
    classes' prefix (``"QianfanOCR"``: the same layout), ``text``: the text model's type."""
    torch.manual_seed(seed)
    image_token, start, end = 127, 125, 126
    config = getattr(transformers, f"{classes}Config")(
        vision_config=dict(**TOWER, image_size=32, patch_size=4), text_config=_tiny_llama(text),
        image_token_id=image_token, image_seq_length=16, downsample_ratio=0.5, pad_token_id=PAD)
    model = _finish(getattr(transformers, f"{classes}ForConditionalGeneration")(config), attn)

    return TinyVLM(model, _tiles_between(start, end, image_token, tokens=16, size=32),
                   single=[[("text", 5), ("image", 2), ("text", 7)]],
                   batch=[[("text", 5), ("image", 1), ("text", 7)],
                          [("text", 3), ("image", 2), ("image", 1), ("text", 4)],
                          [("image", 1), ("text", 9)]])


def llama4(attn: str = "sdpa", seed: int = 0, floor_scale: int = 8192) -> TinyVLM:
    """Llama 4: an image of (h, w) tiles of 32 px (4 px patches, pixel-shuffled 2x2 into 16
    tokens a tile) is begin-of-image, the tiles row by row (x separators between the tiles of a
    row, a y separator after each row), then an image marker and its global view's 16 tokens,
    then end-of-image; a 1x1 image is its global view alone. The text model alternates RoPE
    layers, whose attention is chunked (8-token chunks, so that chunk boundaries fall inside the
    prompts), with a NoPE full-attention layer (temperature tuning: ``floor_scale``), and
    alternates dense and MoE feed-forward layers (4 experts, 2 a token)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    patch, boi, eoi, marker, x_sep, y_sep = 127, 124, 125, 126, 123, 122
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=4, pixel_shuffle_ratio=0.5, projector_input_dim=32,
                  projector_output_dim=32, vision_output_dim=32)
    text = dict(hidden_size=32, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB,
                max_position_embeddings=512, num_local_experts=4, num_experts_per_tok=2,
                interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0], attention_chunk_size=8,
                floor_scale=floor_scale, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config = Llama4Config(vision_config=vision, text_config=text, boi_token_index=boi,
                          eoi_token_index=eoi, image_token_index=patch, pad_token_id=PAD)
    model = _finish(Llama4ForConditionalGeneration(config), attn)
    tokens = 16
    # transformers 5.17's generate() passes block_sequence_ids to every mask builder, and its
    # chunked one takes none: the unpatched model cannot generate on a static cache there.
    from transformers import masking_utils as masks

    static_generate = ("block_sequence_ids" in inspect.signature(masks.create_chunked_causal_mask).parameters
                       or "block_sequence_ids" not in inspect.signature(masks.create_masks_for_generate).parameters)

    def make_inputs(rows, seeds=None) -> dict:
        pixels = []

        def image(kind, grid, gen, r):
            h, w = grid
            ids = [boi]
            if h * w > 1:
                for _ in range(h):
                    ids += sum(([patch] * tokens + [x_sep] for _ in range(w)), [])[:-1] + [y_sep]
            pixels.append(torch.randn(h * w + (h * w > 1), 3, 32, 32, generator=gen))
            return ids + [marker] + [patch] * tokens + [eoi]

        ids = _token_rows(rows, seeds, image)
        return dict(ids, pixel_values=torch.cat(pixels))

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (1, 1)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (2, 2)), ("text", 7)],
                          [("text", 3), ("image", (1, 1)), ("image", (1, 2)), ("text", 4)],
                          [("image", (1, 1)), ("text", 9)]],
                   image_runs=lambda grid: grid[0] * grid[1] + (grid[0] * grid[1] > 1),
                   static_generate=static_generate)


PHI4_IMAGE, PHI4_AUDIO = 120, 121


def _action_expert_model(cls_name: str, attn: str, seed: int, **config) -> TinyVLM:
    """PI0 or PI0.5 (transformers 5.17+ and 5.25+), vision-language-action models: PaliGemma's prefix (each
    camera's 16x16 image, 16 tokens, ahead of bos, the task and a newline, right-padded as the processor pads
    it, pad id 0) prefilled by the VLM; a flow-matching action expert (a Gemma of its own, layer for layer
    beside the VLM's) denoises a chunk of 4 actions over its cache. A row is ``[("image", 0)] * cameras +
    [("text", n)]``; the inputs hold the cameras' pixels (absent cameras zero, ``pixel_attention_mask``
    False), the starting noise and, for PI0, the robot's state."""
    import transformers as tf

    torch.manual_seed(seed)
    image_token, bos, newline = 127, 1, 100
    text = dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=8, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=bos, eos_token_id=2)
    vlm = dict(model_type="paligemma", text_config=text, projection_dim=32, image_token_id=image_token,
               vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
                                  vision_use_head=False))
    dit = dict(model_type="gemma", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=8)
    config = getattr(tf, cls_name + "Config")(vlm_config=vlm, dit_config=dit, chunk_size=4, max_action_dim=6,
                                              num_inference_steps=3, **config)
    model = getattr(tf, cls_name + "ForConditionalGeneration")(config)
    with torch.no_grad():  # PI0.5's adaptive norms start at zero (their gates too: no attention would count)
        for module in model.modules():
            if type(module).__name__.endswith("AdaptiveRMSNorm"):
                module.dense.weight.normal_(std=0.3)
                module.dense.bias.normal_(std=0.3)
    model.set_attn_implementation(attn)
    model.eval()
    states = "max_state_dim" in config.to_dict() and "state" in inspect.signature(model.forward).parameters

    def make_inputs(rows, seeds=None) -> dict:
        ids, pixels = [], []
        for segments, gen in zip(rows, _generators(rows, seeds)):
            cameras = sum(kind == "image" for kind, _ in segments)
            task = sum(size for kind, size in segments if kind == "text")
            pixels.append([torch.randn(3, 16, 16, generator=gen) for _ in range(cameras)])
            ids.append([image_token] * 16 * cameras + [bos] + _text(task, gen) + [newline])
        width, most = max(len(r) for r in ids), max(len(p) for p in pixels)
        out = {"input_ids": torch.full((len(rows), width), PAD, dtype=torch.long),
               "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
               "pixel_values": torch.zeros(len(rows), most, 3, 16, 16),
               "pixel_attention_mask": torch.zeros(len(rows), most, dtype=torch.bool)}
        for r, (row, cams) in enumerate(zip(ids, pixels)):  # right-padded, as the processor pads
            out["input_ids"][r, :len(row)], out["attention_mask"][r, :len(row)] = torch.tensor(row), 1
            out["pixel_values"][r, :len(cams)], out["pixel_attention_mask"][r, :len(cams)] = torch.stack(cams), True
        gens = _generators(rows, seeds)
        out["noise"] = torch.stack([torch.randn(4, 6, generator=g) for g in gens])
        if states:
            out["state"] = torch.stack([torch.randn(6, generator=g) for g in gens])
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("image", 0), ("image", 0), ("text", 5)]],
                   batch=[[("image", 0), ("image", 0), ("text", 5)],
                          [("image", 0), ("text", 3)],
                          [("image", 0), ("image", 0), ("image", 0), ("text", 7)]])


def pi0(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """PI0: the robot's state is a token of the action expert's, ahead of the action chunk (see
    :func:`_action_expert_model`)."""
    return _action_expert_model("PI0", attn, seed, max_state_dim=6)


def pi05(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """PI0.5: the state is text of the prompt (the processor's), the action expert's norms are modulated by the
    denoising time (see :func:`_action_expert_model`)."""
    return _action_expert_model("PI05", attn, seed)


def phi4_multimodal(attn: str = "sdpa", seed: int = 0, capture_hooks: bool = True) -> TinyVLM:
    """Phi-4-multimodal: an ("image", (h, w)) segment is an image of h x w pixels on a grid of 16 px crops
    (its useful patches marked in ``image_attention_mask``, as the processor marks them), each crop 2x2
    tokens after pooling: its useful rows of crop tokens (each row ended by a separator), a separator, then
    its global view's 2x2 (rows ended likewise); an ("audio", n) clip of n mel frames is n // 2 audio
    tokens (audio is kept whole). Back-to-back images, and audio beside them, in one batch; clips of one
    length (its audio tower's output for a clip depends on the padding to the longest in the call).
    ``capture_hooks``: install the base model's output-capturing hooks ahead (transformers 5.24's
    unpatched model fails once hidden states are asked for after a plain forward: its vision tower's
    hooks, installed by the tower's own first call, are installed again with the base model's)."""
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    torch.manual_seed(seed)
    config = Phi4MultimodalConfig(
        vision_config=dict(TOWER, image_size=16, patch_size=4, crop_size=16, image_token_id=PHI4_IMAGE),
        audio_config=dict(hidden_size=16, intermediate_size=32, num_blocks=1, num_attention_heads=2,
                          ext_pw_out_channel=16, depthwise_separable_out_channel=16, input_size=8,
                          time_reduction=2, nemo_conv_channels=8, audio_token_id=PHI4_AUDIO),
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=PHI4_IMAGE, max_position_embeddings=512, original_max_position_embeddings=512,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    model = Phi4MultimodalForCausalLM(config)
    # The LM head's ids stop below the image and audio ids, which only the token table holds: a generated
    # image id makes the unpatched model encode the images again at a decode step, without their
    # image_sizes (generate() passes those to the prefill only), and fail.
    model.model.embed_tokens = torch.nn.Embedding(VOCAB, config.hidden_size, PAD)
    model = _finish(model, {"": attn, "vision_config": "eager", "audio_config": "eager"})
    # Zero-initialised: every separator feature would be the zero vector.
    embedding = model.model.embed_tokens_extend.image_embed
    for extensor in (embedding.global_img_feature_extensor, embedding.sub_img_feature_extensor):
        extensor.data.normal_()
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers 4.x
        maybe_install_capturing_hooks = None
    if capture_hooks and maybe_install_capturing_hooks is not None:
        maybe_install_capturing_hooks(model.model)
    crop, patch = 16, 4

    def make_inputs(rows, seeds=None) -> dict:
        images, masks, sizes, clips = [], [], [], []

        def segment(kind, size, gen, r):
            if kind == "audio":
                clips.append(torch.randn(size, 8, generator=gen))
                return [PHI4_AUDIO] * (size // 2)
            h, w = size
            grid = (-(-h // crop), -(-w // crop))
            canvas = torch.zeros(3, grid[0] * crop, grid[1] * crop)
            canvas[:, :h, :w] = torch.randn(3, h, w, generator=gen)
            crops = canvas.unfold(1, crop, crop).unfold(2, crop, crop).permute(1, 2, 0, 3, 4).reshape(-1, 3, crop, crop)
            glob = torch.nn.functional.interpolate(canvas[None], size=(crop, crop), mode="bilinear")[0]
            images.append(torch.cat([glob[None], crops]))
            useful = torch.zeros(grid[0] * crop // patch, grid[1] * crop // patch)
            useful[: -(-h // patch), : -(-w // patch)] = 1
            per_crop = useful.unfold(0, crop // patch, crop // patch).unfold(1, crop // patch, crop // patch)
            masks.append(torch.cat([torch.ones(1, crop // patch, crop // patch), per_crop.reshape(-1, crop // patch, crop // patch)]))
            sizes.append([grid[0] * crop, grid[1] * crop])
            kept = useful[0::2, 0::2]
            tokens = int(kept[:, 0].sum()) * (int(kept[0].sum()) + 1) + 1 + 2 * 3
            return [PHI4_IMAGE] * tokens

        out = _token_rows(rows, seeds, segment)
        if images:
            most = max(i.shape[0] for i in images)
            out["image_pixel_values"] = _stack_tiles(images)
            out["image_attention_mask"] = torch.stack([torch.cat([m, torch.ones(most - m.shape[0], *m.shape[1:])])
                                                       for m in masks])
            out["image_sizes"] = torch.tensor(sizes)
        if clips:
            longest = max(c.shape[0] for c in clips)
            out["audio_input_features"] = torch.stack([torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[0]))
                                                       for c in clips])
            out["audio_embed_sizes"] = torch.tensor([c.shape[0] // 2 for c in clips])
            out["audio_attention_mask"] = torch.arange(longest)[None] < torch.tensor([c.shape[0] for c in clips])[:, None]
        return out

    # generate() repeats each image's inputs for its row's beams image by image, not row by row: a row of
    # several images gets other beams' images (the model itself misplaces their features).
    return TinyVLM(model, make_inputs, beam_multi_image=False, hook_graph=transformers.__version__.startswith("4."),
                   single=[[("text", 5), ("image", (16, 16)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (32, 24)), ("audio", 16), ("text", 7)],
                          [("text", 3), ("image", (16, 32)), ("image", (12, 16)), ("text", 4)],
                          [("audio", 16), ("image", (16, 16)), ("text", 9)]])


def nemotron_h_omni(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Nemotron-H Omni (images): an ("image", (h, w)) segment is a grid of h x w 4 px patches of a RADIO
    tower, pixel-shuffled 2x2 into h * w // 4 image tokens between <img> markers; a NemotronH text model
    of Mamba-2, attention and MoE layers."""
    from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import NemotronH_Omni_Reasoning_V3_Config
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import NemotronH_Omni_Reasoning_V3

    torch.manual_seed(seed)
    start, end = 124, 125
    text = dict(model_type="nemotron_h", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB,
                max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                layers_block_type=["mamba", "attention", "moe", "mamba"], mamba_num_heads=4, mamba_head_dim=8,
                ssm_state_size=8, n_groups=1, mamba_chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, n_group=1, topk_group=1)
    config = NemotronH_Omni_Reasoning_V3_Config(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16,
                           max_img_size=64, num_cls_tokens=1, num_registers=1, video_temporal_patch_size=2),
        text_config=text, vision_hidden_size=32, projector_hidden_size=32, downsample_ratio=0.5,
        image_token_id=120, video_token_id=121)
    model = _finish(NemotronH_Omni_Reasoning_V3(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels, grids = [], []

        def image(kind, size, gen, r):
            pixels.append(torch.randn(size[0] * size[1], 48, generator=gen))
            grids.append(size)
            return [start] + [120] * (size[0] * size[1] // 4) + [end]

        out = _token_rows(rows, seeds, image)
        out["pixel_values"], out["image_grid_hw"] = torch.cat(pixels), torch.tensor(grids)
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (8, 8)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (8, 12)), ("text", 7)],
                          [("text", 3), ("image", (8, 8)), ("image", (12, 8)), ("text", 4)],
                          [("image", (8, 8)), ("text", 9)]])
APERTUS_IMAGE, APERTUS_AUDIO, APERTUS_BOI, APERTUS_EOL, APERTUS_EOI = 91, 92, 93, 94, 95


def apertus1p5(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Apertus 1.5 (transformers 5.24+): a VQ image tokenizer (2 px cells, a codebook of 1024, so that an
    image's codes seldom repeat) whose codes are ids of the text vocabulary (96 up), embedded by its
    table; an image of (h, w) pixels is its
    ``(h // 2) * (w // 2)`` image tokens, a row of them per 2 px of height, rows joined by end-of-line
    tokens, between begin/end-of-image markers (no config names them). An Apertus text model (xIELU,
    Llama 3 RoPE scaling) whose LM head is cut to the first 96 ids (no image or audio codes)."""
    from transformers import Apertus1p5Config, Apertus1p5ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=96 + 1024 + 8, output_vocab_size=96, max_position_embeddings=512,
                rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    vision = dict(codebook_size=1024, embed_dim=8, latent_channels=8, base_channels=32, channel_multiplier=[1, 1],
                  num_res_blocks=1, attn_resolutions=[4], resolution=8)
    audio = dict(model_type="wavtokenizer_encoder", num_filters=4, upsampling_ratios=[2, 2], hidden_size=8,
                 codebook_size=8, codebook_dim=8, num_lstm_layers=1)
    config = Apertus1p5Config(text_config=text, vision_config=vision, audio_config=audio,
                              image_token_id=APERTUS_IMAGE, audio_token_id=APERTUS_AUDIO, image_token_offset=96,
                              audio_token_offset=96 + 1024)
    # its image tokenizer has one attention implementation (eager)
    model = _finish(Apertus1p5ForConditionalGeneration(config),
                    {"": attn, "text_config": attn, "vision_config": "eager"})

    def make_inputs(rows, seeds=None) -> dict:
        pixels, sizes = [], []

        def image(kind, hw, gen, r):
            pixels.append(torch.zeros(3, 8, 8))
            pixels[-1][:, : hw[0], : hw[1]] = torch.randn(3, *hw, generator=gen)
            sizes.append(list(hw))
            lines = [[APERTUS_IMAGE] * (hw[1] // 2)] * (hw[0] // 2)
            return [APERTUS_BOI] + sum(([APERTUS_EOL] * (i > 0) + line for i, line in enumerate(lines)), []) \
                + [APERTUS_EOI]

        ids = _token_rows(rows, seeds, image)
        return dict(ids, pixel_values=torch.stack(pixels), image_sizes=torch.tensor(sizes))

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (8, 6)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (8, 8)), ("text", 7)],
                          [("text", 3), ("image", (4, 8)), ("image", (6, 4)), ("text", 4)],
                          [("image", (8, 4)), ("text", 9)]])


VQ_IMAGE, VQ_BOI, VQ_EOI, VQ_EOL = 91, 92, 93, 94  # Chameleon's and Emu3's placeholder, markers, end of line
VQ_CODES = 1024  # codebook entries, ids 96 up: enough that an image's codes seldom repeat


def _vq_text(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=96 + VQ_CODES, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1,
                eos_token_id=2, **extra)


def chameleon(attn: str = "sdpa", seed: int = 0, swin: bool = False) -> TinyVLM:
    """Chameleon: a VQ-VAE that turns an 8 px image into a 4x4 grid of codes (a codebook of 1024), which
    are ids of the text vocabulary (96 up, named as Chameleon's tokenizer names them), embedded by its
    table; each image is 16 placeholders between begin/end-of-image markers (no config names the
    markers), whatever its segment's size (its processor resizes every image to one size). Its decoder
    has query/key norms, and with ``swin`` normalises after attention and MLP."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    digits = lambda i: "".join(chr(ord("A") + int(d)) for d in str(i))
    vocabulary = {"<image>": VQ_IMAGE, **{f"IMGIMG{digits(i)}Z": 96 + i for i in range(VQ_CODES)}}
    vq = dict(embed_dim=8, num_embeddings=VQ_CODES, latent_channels=8, resolution=8, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[4])
    config = ChameleonConfig(**_vq_text(), vq_config=vq, vocabulary_map=vocabulary, swin_norm=swin)
    model = _finish(ChameleonForConditionalGeneration(config), attn)
    # A codebook of its encoder's scale (the default initialiser's is twice it, and codes would repeat more)
    torch.nn.init.normal_(model.model.vqmodel.quantize.embedding.weight, std=0.01)

    def make_inputs(rows, seeds=None) -> dict:
        pixels = []

        def image(kind, size, gen, r):
            pixels.append(torch.randn(3, 8, 8, generator=gen))
            return [VQ_BOI] + [VQ_IMAGE] * 16 + [VQ_EOI]

        return dict(_token_rows(rows, seeds, image), pixel_values=torch.stack(pixels))

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", 8), ("text", 7)]],
                   batch=[[("text", 5), ("image", 8), ("text", 7)],
                          [("text", 3), ("image", 8), ("image", 8), ("text", 4)],
                          [("image", 8), ("text", 9)]])


def emu3(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Emu3: a VQ-VAE (2 px cells, 2 frames an image, a codebook of 1024) whose codes are ids of the text
    vocabulary (96 up, named as Emu3's tokenizer names them), embedded by its table. An image of (h, w)
    pixels, drawn on an 8 px canvas (its codes then do not depend on the batch's other images), is
    ``(h // 2) * (w // 2 + 1)`` placeholders between begin/end-of-image markers (no config names them):
    a line of codes per 2 px of height, each ended by an end-of-line token."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    torch.manual_seed(seed)
    vocabulary = {"<image>": VQ_IMAGE, "<|extra_200|>": VQ_EOL,
                  **{f"<|visual token {i:06d}|>": 96 + i for i in range(VQ_CODES)}}
    vq = dict(codebook_size=VQ_CODES, embed_dim=8, latent_channels=8, temporal_downsample_factor=2, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32, num_attention_heads=1)
    config = Emu3Config(text_config=_vq_text(), vq_config=vq, vocabulary_map=vocabulary)
    model = _finish(Emu3ForConditionalGeneration(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels, sizes = [], []

        def image(kind, hw, gen, r):
            pixels.append(torch.zeros(3, 8, 8))
            pixels[-1][:, : hw[0], : hw[1]] = torch.randn(3, *hw, generator=gen)
            sizes.append(list(hw))
            return [VQ_BOI] + [VQ_IMAGE] * ((hw[0] // 2) * (hw[1] // 2 + 1)) + [VQ_EOI]

        ids = _token_rows(rows, seeds, image)
        return dict(ids, pixel_values=torch.stack(pixels), image_sizes=torch.tensor(sizes))

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (8, 6)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (8, 8)), ("text", 7)],
                          [("text", 3), ("image", (4, 8)), ("image", (6, 4)), ("text", 4)],
                          [("image", (8, 4)), ("text", 9)]])


MUSE_IMAGE, MUSE_VIDEO, MUSE_START, MUSE_END, MUSE_VID_START, MUSE_VID_SEP, MUSE_VID_END, MUSE_AUDIO = range(120, 128)
MUSE_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=512, sliding_window=8,
                 final_logit_softcapping=2.0, output_multiplier=0.5, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def _muse(name: str, text: dict, attn: str, seed: int, **extra) -> TinyVLM:
    """Muse Glimmer (transformers 5.x) and Muse Spark (5.24+): a windowed ViT over 2 px patches of 2
    frames (an image's frame repeated), 2x2 pixel-shuffled: a ``(t, h, w)`` patch grid gives
    ``t*h*w/4`` tokens. An image is its tokens between image markers; a video, between video markers,
    is one run of ``h*w/4`` tokens per temporal group, each after its timestamp, separated by frame
    separators (no config names the markers); Muse Spark's audio clips, ``("audio", n)``, are ``n``
    audio tokens. Their text model: a sliding-window layer (8-token windows, so that they end inside
    the prompts) with RoPE, then a full-attention NoPE layer; normed embeddings, gated attention, and
    logits multiplied by ``output_multiplier`` before the final soft-cap."""
    torch.manual_seed(seed)
    vision = dict(patch_size=2, pos_emb_height=4, pos_emb_width=4, max_position_embeddings=16, num_attention_heads=2,
                  num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                  layer_types=["window_attention", "full_attention"])
    config = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision, image_token_id=MUSE_IMAGE,
                                                   video_token_id=MUSE_VIDEO, out_hidden_size=4 * 32,
                                                   projector_hidden_size=64, **extra)
    model = _finish(getattr(transformers, f"{name}ForConditionalGeneration")(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], []), "video": ([], [])}
        clips = []

        def segment(kind, grid, gen, r):
            if kind == "audio":  # Muse Spark: 4 samples a token
                clips.append(torch.randn(4 * grid, generator=gen))
                return [MUSE_AUDIO] * grid
            t, h, w = grid if kind == "video" else (1, *grid)
            pixels, grids = media[kind]
            pixels.append(torch.randn(t * h * w, 2 * 3 * 2 * 2, generator=gen))
            grids.append([t, h, w])
            if kind == "image":
                return [MUSE_START] + [MUSE_IMAGE] * (h * w // 4) + [MUSE_END]
            ids = [MUSE_VID_START]
            for g in range(t):
                ids += _text(1, gen) + [MUSE_VIDEO] * (h * w // 4) + [MUSE_VID_SEP if g < t - 1 else MUSE_VID_END]
            return ids

        out = _token_rows(rows, seeds, segment)
        out.update(_patch_inputs(media))
        if clips:
            longest = max(c.numel() for c in clips)
            out["input_values"] = torch.stack([torch.nn.functional.pad(c, (0, longest - c.numel())) for c in clips])
            out["input_values_mask"] = torch.stack([torch.arange(longest) < c.numel() for c in clips]).long()
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 4), ("image", (8, 8)), ("text", 6)]],
                   batch=[[("text", 4), ("image", (8, 8)), ("text", 6)],
                          [("text", 2), ("image", (4, 8)), ("text", 1), ("image", (6, 8)), ("text", 3)],
                          [("video", (2, 4, 8)), ("text", 5)]],
                   frames_are_images=True)


def muse_glimmer(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Muse Glimmer (transformers 5.x): :func:`_muse`'s model, a dense text model."""
    return _muse("MuseGlimmer", MUSE_TEXT, attn, seed)


def muse_spark(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Muse Spark (transformers 5.24+): :func:`_muse`'s model around a MoE text model (4 experts, 2 a
    token; gated residuals), with an audio encoder of causal convolutions: an ``("audio", n)`` segment is
    ``n`` audio tokens, of 4 waveform samples each (clips right-padded, masked by ``input_values_mask``)."""
    text = dict(MUSE_TEXT, moe_intermediate_size=32, moe_hidden_size=32, num_local_experts=4, num_experts_per_tok=2)
    audio = dict(patch_sizes=[2, 2], hidden_sizes=[8, 16], depths=[1, 1], num_hidden_layers=2, out_hidden_size=32)
    tiny = _muse("MuseSpark", text, attn, seed, audio_config=audio, audio_token_id=MUSE_AUDIO)
    tiny.batch = [*tiny.batch[:2], [("text", 2), ("audio", 3), ("video", (2, 4, 8)), ("text", 5)]]
    return tiny


INKLING_IMAGE, INKLING_AUDIO, INKLING_IMAGE_BOS, INKLING_AUDIO_BOS = 91, 92, 93, 94


def inkling(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Inkling (transformers 5.17+): an MLP tower that folds each patch (2 frames of 2x2 px; an image's
    frame repeated) into one token; an image of (h, w) patches is its ``h*w`` image tokens after an
    image-begin marker. Its text model: a sliding-window layer (8 tokens) then a full one, both with
    short convolutions over keys and values and relative-position logits over cache slots, MoE (4
    experts, 2 a token, a shared one); the wrapper divides the hidden states by
    ``logits_mup_width_multiplier`` and cuts the logits to ``unpadded_vocab_size``."""
    from transformers import InklingConfig, InklingForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=8, d_rel=4,
                # No log-scaled queries (as by default): they scale by the cache slot, padding included,
                # so a row's logits would depend on its batch's padding, unpatched as well.
                rel_extent=16, log_scaling_n_floor=None, local_layer_ids=[0], intermediate_size=64,
                moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                logits_mup_width_multiplier=2.0, vocab_size=VOCAB, unpadded_vocab_size=120, max_position_embeddings=512,
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    vision = dict(text_hidden_size=32, patch_size=2, temporal_patch_size=2, num_hidden_layers=2)
    config = InklingConfig(text_config=text, vision_config=vision,
                           audio_config=dict(text_hidden_size=32, n_mel_bins=4, mel_vocab_size=8),
                           image_token_id=INKLING_IMAGE, audio_token_id=INKLING_AUDIO,
                           image_bos_token_id=INKLING_IMAGE_BOS, audio_bos_token_id=INKLING_AUDIO_BOS)
    model = _finish(InklingForConditionalGeneration(config), attn)

    def make_inputs(rows, seeds=None) -> dict:
        pixels = []

        def image(kind, grid, gen, r):
            frame = torch.randn(grid[0] * grid[1], 1, 2, 2, 3, generator=gen)
            pixels.append(frame.expand(-1, 2, -1, -1, -1))
            return [INKLING_IMAGE_BOS] + [INKLING_IMAGE] * (grid[0] * grid[1])

        ids = _token_rows(rows, seeds, image)
        return dict(ids, pixel_values=torch.cat(pixels))

    return TinyVLM(model, make_inputs,
                   single=[[("text", 4), ("image", (3, 4)), ("text", 6)]],
                   batch=[[("text", 4), ("image", (4, 4)), ("text", 6)],
                          [("text", 2), ("image", (2, 4)), ("text", 1), ("image", (3, 3)), ("text", 3)],
                          [("image", (2, 3)), ("text", 5)]],
                   # Its attention sizes the relative-position logits by the cache's mask sizes and the
                   # keys it returns otherwise: its generate() fails on a static cache, unpatched; and a
                   # prefill on a reset static cache differs from one on a fresh cache (by ~1e-6).
                   static_generate=False, static_reset=False,
                   # transformers 5.17's generate() expands its patches (one row a patch) for beam search
                   # as if each were a prompt row's: it fails there, unpatched.
                   beam_images=hasattr(transformers.GenerationMixin, "_expand_multimodal_outputs"))


def inkling2(attn: str = "sdpa", seed: int = 0, loop: bool = False) -> TinyVLM:
    """Inkling2 (transformers 5.24+): a ViT over 2 px patches (a class token an image), 2x2 merged: an
    image of ``(h, w)`` tokens is ``h*w`` image tokens, no markers, so images may stand back to back
    (``image_grid_thw`` tells them apart). Its text model: a sliding-window layer (8 tokens) then a full
    one, short convolutions and relative-position logits over cache slots, queries log-scaled by their
    position from 4 on, attention residuals over blocks of layers, MoE (4 experts, 2 a token); the wrapper
    soft-caps the logits. With ``loop``, Inkling2-Loop: a middle sliding-window layer between them runs
    twice, the second pass from the first's input, gated by the first's messages, on cache layers of its
    own (the language model appends them to the cache)."""
    name = "Inkling2Loop" if loop else "Inkling2"
    torch.manual_seed(seed)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=8, d_rel=4,
                rel_extent=16, log_scaling_n_floor=4, layer_types=["hybrid_sliding", "hybrid"],
                moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_layers_per_attn_res_block=1,
                final_logit_softcapping=2.0, vocab_size=VOCAB, unpadded_vocab_size=120, max_position_embeddings=512,
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    if loop:
        text.update(num_hidden_layers=3, layer_types=["hybrid_sliding", "hybrid_sliding", "hybrid"],
                    loop_layer_index_start=1, loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=8)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=2, spatial_merge_size=2,
                  posemb_grid_size=4, projection_hidden_dim=64, text_hidden_size=32)
    config = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision,
                                                   image_token_id=INKLING_IMAGE)
    # Its text model adds relative-position logits to the scores: eager attention only (its tower: attn).
    model = _finish(getattr(transformers, f"{name}ForConditionalGeneration")(config),
                    {"": "eager", "text_config": "eager", "vision_config": attn})

    def make_inputs(rows, seeds=None) -> dict:
        media = {"image": ([], [])}

        def image(kind, grid, gen, r):
            media["image"][0].append(torch.rand(grid[0] * grid[1], 4, 4, 3, generator=gen) * 2 - 1)
            media["image"][1].append([1, *grid])
            return [INKLING_IMAGE] * (grid[0] * grid[1])

        out = _token_rows(rows, seeds, image)
        out.update(_patch_inputs(media))
        return out

    return TinyVLM(model, make_inputs,
                   single=[[("text", 4), ("image", (3, 4)), ("text", 6)]],
                   batch=[[("text", 4), ("image", (4, 4)), ("text", 6)],
                          [("text", 2), ("image", (2, 4)), ("image", (3, 3)), ("text", 3)],
                          [("image", (2, 3)), ("text", 5)]],
                   # As Inkling's, its generate() fails on a static cache, unpatched.
                   static_generate=False)


FUYU_IMAGE, FUYU_NEWLINE = 127, 126


def fuyu(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Fuyu: no vision tower; each 2x2 px patch of an image is embedded by one linear layer. An
    ("image", (h, w)) segment is a grid of h x w patches (12 of them, as every image of a call has its
    patch count: the patches come as one tensor), a row of w image tokens per patch row, each row ended
    by a newline token (text, in no config); a Persimmon text model (partial rotary, qk layernorm).
    transformers 4.57 and 5.17 take the patches as ``image_patches``, 5.24 as ``pixel_values``."""
    from transformers import FuyuConfig, FuyuForCausalLM

    torch.manual_seed(seed)
    text = dict(model_type="persimmon", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=512, qk_layernorm=True,
                partial_rotary_factor=0.5, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    # hidden_size at the top: transformers 4.57 sizes the patch embedding by it.
    config = FuyuConfig(text_config=text, hidden_size=32, patch_size=2, num_channels=3, image_token_id=FUYU_IMAGE,
                        pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    model = _finish(FuyuForCausalLM(config), attn)
    key = "pixel_values" if "pixel_values" in inspect.signature(model.model.forward).parameters else "image_patches"

    def make_inputs(rows, seeds=None) -> dict:
        patches = []

        def image(kind, hw, gen, r):
            patches.append(torch.randn(hw[0] * hw[1], 2 * 2 * 3, generator=gen))
            return ([FUYU_IMAGE] * hw[1] + [FUYU_NEWLINE]) * hw[0]

        ids = _token_rows(rows, seeds, image)
        return dict(ids, **{key: torch.stack(patches)})

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", (3, 4)), ("text", 7)]],
                   batch=[[("text", 5), ("image", (4, 3)), ("text", 7)],
                          [("text", 3), ("image", (2, 6)), ("image", (3, 4)), ("text", 4)],
                          [("image", (6, 2)), ("text", 9)]],
                   # transformers 5.24's own beam search fails on its images (the beams' image tokens
                   # outnumber the patch embeddings it encodes ahead), unpatched.
                   beam_images=not hasattr(transformers.GenerationMixin, "_expand_multimodal_outputs"),
                   static_differs="neither" if release("transformers") < (5, 0) else None)


def unlimited_ocr(attn: str = "sdpa", seed: int = 0, sliding_window: int = 128) -> TinyVLM:
    """UnlimitedOCR (transformers 5.24+): DeepSeek-OCR-2's tower (a SAM tower whose 4x4 output patches
    a CLIP-style encoder reads: 16 features a 64 px view), each row of a view's features ended by a
    newline feature: an image of ``n`` local crops side by side (one row of them) and its global view is
    one run of ``4 (4n + 1)`` crop tokens (none without crops), ``4 * 5`` view tokens and the view
    separator's, no markers. A DeepSeek-V2 MoE text model after a dense layer, whose reference sliding
    window attention keeps every prompt token and the last ``sliding_window`` generated ones (by default
    more than the tests generate: the no-cache reference attends to them all, as a prompt's tokens)."""
    from transformers import UnlimitedOcrConfig, UnlimitedOcrForConditionalGeneration

    torch.manual_seed(seed)
    image_token = 127
    sam = dict(SAM_TOWER, downsample_channels=[16, 32])
    encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                mlp_layer_types=["dense", "sparse"], sliding_window=sliding_window)
    config = UnlimitedOcrConfig(vision_config=dict(sam_config=sam, encoder_config=encoder), text_config=text,
                                image_token_id=image_token, pad_token_id=PAD)
    model = _finish(UnlimitedOcrForConditionalGeneration(config), attn)
    crops_and_view = _view_and_crops(64, 64, lambda n: [image_token] * (4 * (4 * n + 1) * (n > 0) + 4 * 5 + 1))

    def make_inputs(rows, seeds=None) -> dict:
        inputs = crops_and_view(rows, seeds)
        # Lists, as its model splits the crops by them (and its processor gives them so).
        inputs["num_local_patches"] = counts = inputs["num_local_patches"].tolist()
        inputs["patches_grid"] = [[n, 1] for n in counts]
        return inputs

    return TinyVLM(model, make_inputs,
                   single=[[("text", 5), ("image", 0), ("text", 7)]],
                   batch=[[("text", 5), ("image", 2), ("text", 7)],
                          [("text", 3), ("image", 0), ("text", 2), ("image", 1), ("text", 4)],
                          [("image", 0), ("text", 9)]],
                   # Pickled, its static cache layers' buffers lose their views (the states a prefill writes
                   # and those it reads part): a reset unpickled cache gives other logits, unpatched.
                   static_reset=False)


MLLAMA_IMAGE = 127


def mllama(attn: str = "sdpa", seed: int = 0) -> TinyVLM:
    """Llama 3.2 Vision: an image is one ``<|image|>`` token in the text; its tiles' patch features
    (and a class token each) reach the language model's cross-attention layers only, as
    ``cross_attention_states``, and ``cross_attention_mask`` ``(B, L, images, tiles)`` says which text
    positions see which image's tiles (from its token to the end of the row, as the processor builds
    it). An ``("image", n)`` segment is an image of ``n`` tiles (1-4); rows with fewer images are
    padded as the processor pads them (a zero image of one tile, seen by no position)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=2, image_size=16, patch_size=4, max_num_tiles=4,
                  intermediate_layers_indices=[0, 1], vision_output_dim=96)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, cross_attention_layers=[1],
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    if transformers.__version__.startswith("4."):  # its rotary embedding reads the type from rope_scaling
        text["rope_scaling"] = {"rope_type": "default"}
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=MLLAMA_IMAGE)
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # its tanh gates start at 0: the images would not reach the text at all
        for name, param in model.named_parameters():
            if param.numel() == 1 and "gate" in name.rsplit(".", 1)[-1]:
                param.fill_(1.0)
    model = _finish(model, attn)
    tiles_max, size = 4, 16

    def make_inputs(rows, seeds=None) -> dict:
        images = [[] for _ in rows]  # per row: (tiles, pixels)

        def image(kind, n_tiles, gen, r):
            if not 1 <= n_tiles <= tiles_max:
                raise ValueError(f"an mllama image has 1-{tiles_max} tiles, got {n_tiles}")
            images[r].append((n_tiles, torch.randn(n_tiles, 3, size, size, generator=gen)))
            return [MLLAMA_IMAGE]

        out = _token_rows(rows, seeds, image)
        B, L = out["input_ids"].shape
        n_images = max(1, max(len(i) for i in images))
        pixels = torch.zeros(B, n_images, tiles_max, 3, size, size)
        ratio_ids = torch.zeros(B, n_images, dtype=torch.long)
        ratio_mask = torch.zeros(B, n_images, tiles_max, dtype=torch.long)
        ratio_mask[:, :, 0] = 1  # the processor's padding images: one tile
        cross = torch.zeros(B, L, n_images, tiles_max, dtype=torch.long)
        for r, row in enumerate(images):
            spots = (out["input_ids"][r] == MLLAMA_IMAGE).nonzero()[:, 0].tolist()
            for j, ((n_tiles, tiles), at) in enumerate(zip(row, spots)):
                pixels[r, j, :n_tiles] = tiles
                # 1-based into MllamaVisionConfig's default supported_aspect_ratios, whose first four are
                # 1 to 4 tiles in a row ([1, 1], [1, 2], [1, 3], [1, 4]): the id is the tile count.
                ratio_ids[r, j] = n_tiles
                ratio_mask[r, j, :n_tiles] = 1
                cross[r, at:, j, :n_tiles] = 1
        return dict(out, pixel_values=pixels, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask,
                    cross_attention_mask=cross)

    # Before 5.24 its generate() sizes a static cache's cross-attention layers for the text and fails.
    static = release("transformers") >= (5, 24)
    return TinyVLM(model, make_inputs, single=[[("text", 3), ("image", 2), ("text", 6)]],
                   batch=[[("text", 3), ("image", 2), ("text", 6)],
                          [("image", 4), ("text", 2), ("image", 1), ("text", 5)],
                          [("text", 9), ("image", 3), ("text", 1)]],
                   static_generate=static)


def _accepted(model_type: str) -> bool:
    """Whether prune() accepts ``model_type`` on this transformers (families.py)."""
    from .families import FAMILIES

    return next(f for f in FAMILIES if model_type in f.model_types).refusal() is None


BUILDERS = {
    "llava": llava,
    "llava_siglip": lambda **kw: llava(tower="siglip", **kw),  # images back to back
    "llava_pixtral": lambda **kw: llava(tower="pixtral", strategy="full", **kw),  # Pixtral-12B
    "vipllava": vipllava,
    "mistral3": mistral3,
    # Mistral Small 4: Mistral3 around a Mistral4 text model (not in transformers 4.57)
    **({"mistral3_mistral4": lambda **kw: mistral3(text=MISTRAL4_TEXT, **kw)}
       if hasattr(transformers, "Mistral4Model") else {}),
    "ovis2": ovis2,
    # LightOnOCR: not in transformers 4.57
    **({"lighton_ocr": lighton_ocr} if hasattr(transformers, "LightOnOcrForConditionalGeneration") else {}),
    "aria": aria,
    "got_ocr2": got_ocr2,
    # PP-Chart2Table: from transformers 5.17
    **({"pp_chart2table": lambda **kw: got_ocr2(chart2table=True, **kw)}
       if hasattr(transformers, "PPChart2TableConfig") else {}),
    "deepseek_vl": deepseek_vl,
    "deepseek_vl_hybrid": lambda **kw: deepseek_vl(hybrid=True, **kw),
    "janus": janus,
    # Granite-Docling: from transformers 5.24
    **({"granite_docling": granite_docling, "granite_docling_fine": lambda **kw: granite_docling(fine=True, **kw)}
       if hasattr(transformers, "GraniteDoclingForConditionalGeneration") else {}),
    # Mistral Large 4: from transformers 5.24
    **({"mistral_large4": mistral_large4} if hasattr(transformers, "MistralLarge4ForConditionalGeneration") else {}),
    # Step3p7: not in transformers 4.57
    **({"step3p7": step3p7} if hasattr(transformers, "Step3p7ForConditionalGeneration") else {}),
    # Qianfan-OCR: not in transformers 4.57
    **({"qianfan_ocr": qianfan_ocr} if hasattr(transformers, "QianfanOCRForConditionalGeneration") else {}),
    # DeepSeek-OCR-2: not in transformers 4.57
    **({"deepseek_ocr2": deepseek_ocr2} if hasattr(transformers, "DeepseekOcr2ForConditionalGeneration") else {}),
    # HY-V4-VL: from transformers 5.24
    **({"hy_v4_vl": hy_v4_vl} if hasattr(transformers, "HYV4VLForConditionalGeneration") else {}),
    # FastVLM: not in transformers 4.57
    **({"fast_vlm": fast_vlm} if hasattr(transformers, "FastVlmForConditionalGeneration") else {}),
    "llava_next": llava_next,
    # Granite 4 Vision: not in transformers 4.57
    **({"granite4_vision": granite4_vision}
       if hasattr(transformers, "Granite4VisionForConditionalGeneration") else {}),
    "llava_onevision": llava_onevision,
    "llava_next_video": llava_next_video,
    "video_llava": video_llava,
    "perception_lm": perception_lm,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "qwen3_vl_moe": qwen3_vl_moe,
    # Qwen3.5: not in transformers 4.57
    **({"qwen3_5": qwen3_5, "qwen3_5_moe": qwen3_5_moe}
       if hasattr(transformers, "Qwen3_5ForConditionalGeneration") else {}),
    "qwen2_5_omni": qwen2_5_omni,
    # transformers 4.57's Qwen3-Omni thinker fails on images and videos in one call (it merges their
    # deepstack features by a mask expanded over the hidden size): tested apart there.
    **({"qwen3_omni_moe": lambda **kw: qwen3_omni_moe(media="images", **kw),
        "qwen3_omni_moe_video": lambda **kw: qwen3_omni_moe(media="videos", **kw)}
       if transformers.__version__.startswith("4.") else {"qwen3_omni_moe": qwen3_omni_moe}),
    "glm4v": glm4v,
    "glm4v_video": lambda **kw: glm4v(videos=True, **kw),
    "glm4v_moe": glm4v_moe,
    "glm4v_moe_video": lambda **kw: glm4v_moe(videos=True, **kw),
    # GLM-4.6V: not in transformers 4.57
    **({"glm46v": glm46v, "glm46v_video": lambda **kw: glm46v(videos=True, **kw)}
       if hasattr(transformers, "Glm46VForConditionalGeneration") else {}),
    # glmga (GLM-4.6V's classes), GLM-OCR: not in transformers 4.57
    **({"glmga": glmga} if hasattr(transformers, "GlmgaConfig") else {}),
    **({"glm_ocr": glm_ocr} if hasattr(transformers, "GlmOcrForConditionalGeneration") else {}),
    # ERNIE-4.5-VL: not in transformers 4.57
    **({"ernie4_5_vl_moe": ernie4_5_vl_moe} if hasattr(transformers, "Ernie4_5_VLMoeForConditionalGeneration") else {}),
    # PaddleOCR-VL: not in transformers 4.57
    **({"paddleocr_vl": paddleocr_vl} if hasattr(transformers, "PaddleOCRVLForConditionalGeneration") else {}),
    # HunYuan-VL: not in transformers 4.57
    **({"hunyuan_vl": hunyuan_vl} if hasattr(transformers, "HunYuanVLForConditionalGeneration") else {}),
    # VideoLLaMA3: not in transformers 4.57
    **({"video_llama_3": video_llama_3} if hasattr(transformers, "VideoLlama3ForConditionalGeneration") else {}),
    # EXAONE 4.5: not in transformers 4.57
    **({"exaone4_5": exaone4_5} if hasattr(transformers, "Exaone4_5_ForConditionalGeneration") else {}),
    "internvl": internvl,
    "idefics2": idefics2,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
    "gemma3": gemma3,
    "paligemma": paligemma,
    # PaliGemma 2: pruned from transformers 5.0 (families.py)
    **({"paligemma2": lambda **kw: paligemma(version=2, **kw)} if not transformers.__version__.startswith("4.") else {}),
    "aya_vision": aya_vision,
    "cohere2_vision": cohere2_vision,
    # LFM2-VL: pruned from transformers 5.0 (families.py)
    **({"lfm2_vl": lfm2_vl} if not transformers.__version__.startswith("4.") else {}),
    # MiniCPM-V 4.6: not in transformers 4.57; MiniCPM-V 4.7 and MiniCPM-OCR: from 5.24
    **({"minicpmv4_6": minicpmv4_6} if hasattr(transformers, "MiniCPMV4_6ForConditionalGeneration") else {}),
    **({"minicpmv4_7": minicpmv4_7} if hasattr(transformers, "MiniCPMV4_7ForConditionalGeneration") else {}),
    **({"minicpm_ocr": minicpm_ocr} if hasattr(transformers, "MiniCPMOcrForConditionalGeneration") else {}),
    # Molmo2: from transformers 5.24
    **({"molmo2": molmo2, "molmo2_video": lambda **kw: molmo2(videos=True, **kw)}
       if hasattr(transformers, "Molmo2ForConditionalGeneration") else {}),
    # LFM3-VL: from transformers 5.24
    **({"lfm3_vl": lfm3_vl} if hasattr(transformers, "Lfm3VlForConditionalGeneration") else {}),
    # Kimi-K2.5: not in transformers 4.57
    **({"kimi_k25": kimi_k25} if hasattr(transformers, "Kimi_K25ForConditionalGeneration") else {}),
    # MiniMax-M3-VL: not in transformers 4.57
    **({"minimax_m3_vl": minimax_m3_vl}
       if hasattr(transformers, "MiniMaxM3SparseForConditionalGeneration") else {}),
    # Cosmos3-Omni: not in transformers 4.57
    **({"cosmos3_omni": cosmos3_omni} if hasattr(transformers, "Cosmos3OmniForConditionalGeneration") else {}),
    # Qwen4-Exp, Cosmos3-Edge: not in transformers 4.57
    **({"qwen4_exp": qwen4_exp} if hasattr(transformers, "Qwen4ExpForConditionalGeneration") else {}),
    **({"cosmos3_edge": cosmos3_edge} if hasattr(transformers, "Cosmos3EdgeForConditionalGeneration") else {}),
    # HyperCLOVAX-SEED vision v2: from transformers 5.24
    **({"hyperclovax_vision_v2": hyperclovax_vision_v2}
       if hasattr(transformers, "HyperCLOVAXVisionV2ForConditionalGeneration") else {}),
    # Cohere Compass: not in transformers 4.57
    **({"cohere_compass": cohere_compass} if hasattr(transformers, "CohereCompassForConditionalGeneration") else {}),
    # LLaVA-OneVision-1.5: from transformers 5.25
    **({"llava_onevision1_5": llava_onevision1_5}
       if hasattr(transformers, "LlavaOnevision15ForConditionalGeneration") else {}),
    # Ovis2.5: from transformers 5.25
    **({"ovis2_5": ovis2_5} if hasattr(transformers, "Ovis2_5ForConditionalGeneration") else {}),
    # GLM-5-Next: not in transformers 4.57
    **({"glm5_next": glm5_next, "glm5_next_video": lambda **kw: glm5_next(videos=True, **kw)}
       if hasattr(transformers, "Glm5NextForConditionalGeneration") else {}),
    # Llama 4: refused on transformers 5.24 (families.py)
    **({"llama4": llama4} if _accepted("llama4") else {}),
    # Gemma 4: not in transformers 4.57
    **({"gemma4": gemma4} if hasattr(transformers, "Gemma4ForConditionalGeneration") else {}),
    "gemma3n": gemma3n,
    "shieldgemma2": lambda **kw: gemma3(shield=True, **kw),
    # Gemma 4 Unified: not in transformers 4.57
    **({"gemma4_unified": lambda **kw: gemma4(unified=True, **kw)}
       if hasattr(transformers, "Gemma4UnifiedForConditionalGeneration") else {}),
    "phi4_multimodal": phi4_multimodal,
    # Nemotron-H Omni: from transformers 5.24
    **({"nemotron_h_omni": nemotron_h_omni} if hasattr(transformers, "NemotronH_Omni_Reasoning_V3") else {}),
    # Apertus 1.5: from transformers 5.24
    **({"apertus1p5": apertus1p5} if hasattr(transformers, "Apertus1p5ForConditionalGeneration") else {}),
    "chameleon": chameleon,
    "chameleon_swin": lambda **kw: chameleon(swin=True, **kw),
    # Emu3: pruned from transformers 5.0 (families.py)
    **({"emu3": emu3} if _accepted("emu3") else {}),
    # Muse Glimmer: not in transformers 4.57
    **({"muse_glimmer": muse_glimmer} if hasattr(transformers, "MuseGlimmerForConditionalGeneration") else {}),
    # Muse Spark: from transformers 5.24
    **({"muse_spark": muse_spark} if hasattr(transformers, "MuseSparkForConditionalGeneration") else {}),
    # Inkling: not in transformers 4.57
    **({"inkling": inkling} if hasattr(transformers, "InklingForConditionalGeneration") else {}),
    # Inkling2: from transformers 5.24
    **({"inkling2": inkling2} if hasattr(transformers, "Inkling2ForConditionalGeneration") else {}),
    # Inkling2-Loop: from transformers 5.24
    **({"inkling2_loop": lambda **kw: inkling2(loop=True, **kw)}
       if hasattr(transformers, "Inkling2LoopForConditionalGeneration") else {}),
    "fuyu": fuyu,
    # Dots3-Note: from transformers 5.24
    **({"dots3_note": dots3_note} if hasattr(transformers, "Dots3NoteForConditionalGeneration") else {}),
    # UnlimitedOCR: from transformers 5.24
    **({"unlimited_ocr": unlimited_ocr} if hasattr(transformers, "UnlimitedOcrForConditionalGeneration") else {}),
}

# Models whose language model reads the image features through cross-attention layers, not as tokens of
# its sequence (zspa_kernels.integrations.transformers.cross_attention): a suite of their own.
CROSS_ATTENTION_BUILDERS = {"mllama": mllama}

# Block diffusion models, whose generate() denoises canvases over the prompt's cache
# (zspa_kernels.integrations.transformers.block_diffusion): a suite of their own. From transformers 5.24.
BLOCK_DIFFUSION_BUILDERS = ({"diffusion_gemma": diffusion_gemma}
                            if hasattr(transformers, "DiffusionGemmaForBlockDiffusion") else {})

# Vision-language-action models whose action expert denoises over the prefix's cache
# (zspa_kernels.integrations.transformers.action_expert): a suite of their own. PI0 from transformers 5.17,
# PI0.5 from 5.25.
ACTION_EXPERT_BUILDERS = {name: build for name, build, cls in (
    ("pi0", pi0, "PI0ForConditionalGeneration"),
    ("pi05", pi05, "PI05ForConditionalGeneration")) if hasattr(transformers, cls)}

# Encoder-decoder models whose encoder reads the images (zspa_kernels.integrations.transformers.encoder_decoder):
# a suite of their own.
ENCODER_DECODER_BUILDERS = {name: build for name, build, cls in (
    ("t5gemma2", t5gemma2, "T5Gemma2ForConditionalGeneration"),  # from transformers 5.17
    ("florence2", florence2, "Florence2ForConditionalGeneration")) if hasattr(transformers, cls)}
