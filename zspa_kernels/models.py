"""Vision-language models built from configs with random weights, and inputs that fit them.

Weights do not change speed, and none can be downloaded here, so the end-to-end
benchmarks and the demo build the published architectures from their configs:

* ``llava-1.5-7b``: CLIP ViT-L/14 at 336 px (576 visual tokens) + Llama-2-7B
  (values of ``llava-hf/llava-1.5-7b-hf``);
* ``qwen2.5-vl-7b``: the Qwen2.5-VL vision tower (window attention, 2x2 patch
  merge) + the 7B Qwen2 language model (values of ``Qwen/Qwen2.5-VL-7B-Instruct``);
* ``gemma3-4b``: SigLIP-so400m at 896 px, its 4096 patches pooled into 256 soft tokens between
  begin/end-of-image markers, each image block attending to itself bidirectionally + the
  Gemma 3 4B language model, five sliding-window layers to one global (values of
  ``google/gemma-3-4b-it``);
* ``llava-3b``: the LLaVA-1.5 vision side (CLIP ViT-L/14 at 336 px) with a language model
  of Llama-3.2-3B's size, the proportions of a real VLM on a budget a CPU can run: the
  language model is most of the unpruned prefill, as in LLaVA (``zspa demo``);
* ``*-tiny``: the same architectures a few hundred times smaller, for CPU smoke tests.

:func:`build` can skip transformers' initialisation (:func:`fill_random_`): drawing
billions of normal samples takes a CPU longer than the rest of the demo.
"""
from __future__ import annotations

import inspect

import torch

LLAVA_IMAGE_TOKEN = 32000
QWEN_IMAGE_TOKEN, QWEN_VISION_START, QWEN_VISION_END = 151655, 151652, 151653
GEMMA3_IMAGE_TOKEN, GEMMA3_BOI, GEMMA3_EOI = 262144, 255999, 256000

_LLAVA_SIZES = {
    "7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
               text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32)),
    "3b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
               text=dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8)),  # values of meta-llama/Llama-3.2-3B
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
                 text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4)),
}
_QWEN_SIZES = {
    "7b": dict(vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31]),
               text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4)),
    "tiny": dict(vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                             fullatt_block_indexes=[1]),
                 text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2)),
}
_GEMMA3_SIZES = {
    "4b": dict(vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=896),
               text=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256)),
    # 448 px: 32 x 32 patches pooled 2 x 2 into the same 256 tokens; two layers, one of each kind.
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             image_size=448),
                 text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                           layer_types=["sliding_attention", "full_attention"])),
}
# Visual tokens of one image: 24 x 24 CLIP patches of a 336 x 336 image for LLaVA, 48 x 48 patches
# merged 2 x 2 for Qwen2.5-VL; Gemma 3's image (896 x 896) is 256 soft tokens whatever its size.
VISUAL_TOKENS = 576
MODELS = ("llava-1.5-7b", "qwen2.5-vl-7b", "gemma3-4b", "llava-1.5-tiny", "qwen2.5-vl-tiny", "gemma3-tiny")
RANDOM_BLOCK = 1_000_003  # a prime: windows of it never line up with a weight's rows


def llava_config(size: str = "7b", vocab_size: int = 32064, image_token_index: int = LLAVA_IMAGE_TOKEN):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    sizes = _LLAVA_SIZES[size]
    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **sizes["vision"])
    text = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-5, **sizes["text"])
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", pad_token_id=32001)


def qwen25_vl_config(size: str = "7b"):
    from transformers import Qwen2_5_VLConfig

    sizes = _QWEN_SIZES[size]
    vision = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  tokens_per_second=2, **sizes["vision"])
    # The M-RoPE sections under the 4.57 name (rope_scaling, rope_theta beside it), which 5.x
    # also reads (as rope_parameters); 4.57 ignores rope_parameters and then has no sections.
    text = dict(vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1e6,
                rope_scaling={"rope_type": "default", "mrope_section": [16, 24, 24]}, **sizes["text"])
    if size == "tiny":  # head_dim 32: the three M-RoPE sections must add up to head_dim / 2
        text["rope_scaling"]["mrope_section"] = [4, 6, 6]
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=QWEN_IMAGE_TOKEN,
                            vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END)


def gemma3_config(size: str = "4b"):
    from transformers import Gemma3Config

    sizes = _GEMMA3_SIZES[size]
    vision = dict(model_type="siglip_vision_model", patch_size=14, vision_use_head=False, **sizes["vision"])
    text = dict(vocab_size=262208, max_position_embeddings=131072, rms_norm_eps=1e-6, sliding_window=1024,
                rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                **sizes["text"])
    return Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=256,
                        image_token_id=GEMMA3_IMAGE_TOKEN, boi_token_id=GEMMA3_BOI, eoi_token_id=GEMMA3_EOI)


def visual_tokens(name: str) -> int:
    """Visual tokens of the one image of :func:`dummy_inputs` for model ``name``."""
    return 256 if name.startswith("gemma3") else VISUAL_TOKENS


# Each architecture of MODELS (a name less its size): its config and the transformers class built from it.
_ARCHITECTURES = {"llava-1.5": (llava_config, "LlavaForConditionalGeneration"),
                  "qwen2.5-vl": (qwen25_vl_config, "Qwen2_5_VLForConditionalGeneration"),
                  "gemma3": (gemma3_config, "Gemma3ForConditionalGeneration")}


def config_for(name: str):
    family, size = name.rsplit("-", 1)
    return _ARCHITECTURES[family][0](size)


def build(name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0):
    """The model ``name`` (one of ``MODELS``) with random weights, in eval mode."""
    import transformers

    cls = getattr(transformers, _ARCHITECTURES[name.rsplit("-", 1)[0]][1])
    model = build_from_config(cls, config_for(name), dtype, device, seed, fast_init=False)
    projector = getattr(getattr(model.model, "multi_modal_projector", None), "mm_input_projection_weight", None)
    if projector is not None:
        # Gemma 3's projector starts at zero (checkpoints overwrite it): every soft token would be the same
        # zero vector, and the selection would choose between ties.
        with torch.no_grad():
            projector.normal_(std=projector.shape[0] ** -0.5)
    return model


def build_from_config(cls, config, dtype: torch.dtype, device, seed: int = 0, fast_init: bool = False):
    """``cls`` built from ``config`` with random weights on ``device``, in eval mode. ``fast_init``
    skips transformers' initialisation and fills the weights with :func:`fill_random_` instead."""
    torch.manual_seed(seed)
    if not fast_init:
        with torch.device(device):  # initialise on the device: a 7B model never touches host memory
            return cls._from_config(config, dtype=dtype).eval()
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights(), torch.device(device):  # parameters allocated, not drawn; buffers computed
        model = cls._from_config(config, dtype=dtype)
    return fill_random_(model, seed).eval()


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights at the cost of a copy: every matrix (and 1-D embedding) is a window of one
    block of ``RANDOM_BLOCK`` normal samples at a random offset, scaled by ``1/sqrt(fan_in)`` so
    activations keep their size through the layers; norm weights are 1 and biases 0. Different
    inputs give different, non-degenerate outputs, which is all a timing or a demo needs."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(RANDOM_BLOCK, generator=g)
    blocks = {}  # the block in each parameter dtype, converted once
    for name, p in model.named_parameters():
        if p.dim() == 1 and "embed" not in name:
            p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            continue
        block = blocks.setdefault(p.dtype, normal.to(p.dtype))
        n = p.numel()
        offset = int(torch.randint(0, RANDOM_BLOCK, (), generator=g))
        p.copy_(block.repeat(-(-(n + offset) // RANDOM_BLOCK))[offset: offset + n].view(p.shape))
        if p.dim() > 1:
            p.mul_(p[0].numel() ** -0.5)
    return model


def dummy_inputs(name: str, batch: int, text_tokens: int = 32, device="cpu", dtype=torch.bfloat16, seed: int = 0):
    """Model inputs for ``batch`` prompts of one image (336 x 336; Gemma 3's at its tower's size) followed by
    ``text_tokens`` question tokens."""
    g = torch.Generator().manual_seed(seed)
    n = visual_tokens(name)
    question = torch.randint(100, 30000, (batch, text_tokens), generator=g)
    if name.startswith("gemma3"):
        image = torch.cat([torch.full((batch, 1), GEMMA3_BOI), torch.full((batch, n), GEMMA3_IMAGE_TOKEN),
                           torch.full((batch, 1), GEMMA3_EOI)], 1)
        input_ids = torch.cat([torch.full((batch, 1), 2), image, question], 1)  # bos first
        size = _GEMMA3_SIZES[name.rsplit("-", 1)[1]]["vision"]["image_size"]
        # The processor marks the image's soft tokens as type 1: their block attends to itself both ways.
        extra = {"pixel_values": torch.randn(batch, 3, size, size, generator=g),
                 "token_type_ids": (input_ids == GEMMA3_IMAGE_TOKEN).long()}
    elif name.startswith("llava"):
        image = torch.full((batch, n), LLAVA_IMAGE_TOKEN)
        input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, question], 1)
        extra = {"pixel_values": torch.randn(batch, 3, 336, 336, generator=g)}
    else:
        image = torch.cat([torch.full((batch, 1), QWEN_VISION_START), torch.full((batch, n), QWEN_IMAGE_TOKEN),
                           torch.full((batch, 1), QWEN_VISION_END)], 1)
        input_ids = torch.cat([image, question], 1)
        # 48 x 48 patches of 14 px (x2 frames, x3 channels) per image, merged 2 x 2 into 576 tokens.
        extra = {"pixel_values": torch.randn(batch * 48 * 48, 3 * 2 * 14 * 14, generator=g),
                 "image_grid_thw": torch.tensor([[1, 48, 48]] * batch)}
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}
    return {key: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for key, v in inputs.items()}


@torch.no_grad()
def prefill(model, inputs: dict):
    """The prefill that ``generate()`` runs: the prompt into a fresh KV cache, which the caller gives
    as ``generate()`` does (some language models make none of their own: Granite 4 Vision's), logits
    for its last position only (an encoder-decoder's: of its decoder's first step). The demo,
    ``zspa fidelity`` and the e2e benchmark all time this call."""
    from transformers import DynamicCache, EncoderDecoderCache

    # transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache``.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if not getattr(model.config, "is_encoder_decoder", False):
        cache = DynamicCache(config=model.config.get_text_config())
        return model(**inputs, **{name: cache}, use_cache=True, logits_to_keep=1)
    # An encoder-decoder (T5Gemma 2): the encoder over the prompt, then the decoder's first step from its start
    # token, as generate() begins; the cache holds the decoder's keys and its cross-attention's (the encoder's).
    config = model.generation_config
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
    decoder = torch.full((inputs["input_ids"].shape[0], 1), start, device=inputs["input_ids"].device)
    text = model.config.get_text_config(decoder=True)
    cache = EncoderDecoderCache(DynamicCache(config=text), DynamicCache(config=text))
    return model(**inputs, decoder_input_ids=decoder, **{name: cache}, use_cache=True)


def refuse_non_autoregressive(model, tool: str, why: str) -> None:
    """Raise ``ValueError("model: ...")`` for a model that ``prune()`` takes but whose output is no token-by-token
    generation, which ``tool`` cannot measure, for the reason ``why``: a block diffusion model's (DiffusionGemma: a
    decoder denoises canvases of tokens over the prompt's cache) or a vision-language-action model's (PI0: an
    action expert denoises a chunk of actions over it)."""
    from .integrations.transformers.families import find_family

    family = find_family(model)
    if family.block_diffusion:
        raise ValueError(f"model: {family.name} generates by block diffusion (canvases of tokens denoised at once "
                         f"over the prompt's cache): {why}; prune() takes it, {tool} cannot measure it")
    if family.action_expert:
        raise ValueError(f"model: {family.name} generates actions, not text (an action expert denoises them over the "
                         f"prompt's cache): {why}; prune() takes it, {tool} cannot measure it")


def cache_bytes(past_key_values) -> int:
    """Bytes held by a transformers KV cache (keys and values of every layer; a reference sliding-window
    layer's prompt states too, UnlimitedOCR's, which it holds apart from its window's, or in disjoint
    views of one buffer on a static cache; an encoder-decoder's self- and cross-attention caches)."""
    parts = [getattr(past_key_values, name, None) for name in ("self_attention_cache", "cross_attention_cache")]
    if any(part is not None for part in parts):  # an encoder-decoder's: the decoder's and its cross-attention's
        return sum(cache_bytes(part) for part in parts if part is not None)
    total = 0
    for layer in getattr(past_key_values, "layers", []):
        for tensor in (getattr(layer, name, None) for name in ("keys", "values", "prefill_keys", "prefill_values")):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
