"""The supported model families: what differs between them, as one table.

A family says where the language model sits, which token ids hold visual
features, how a run of visual tokens splits into images, what extra per-position
inputs its language model takes (``on_prefill`` gathers them) and whether it takes
prebuilt masks (``build_mask``). Adding a family is one :class:`Family` entry; the
two callbacks only when its language model reads more than embeddings, a 2-D mask
and positions.
"""
from __future__ import annotations

import inspect
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import torch

from ...spec import release


# The keys of image_token_counts' inputs under which the hooks give each run's batch row and token id
# (host ints, in the runs' order).
RUN_ROWS = "run_rows"
RUN_IDS = "run_ids"


def _grid_merge(config) -> Optional[int]:
    """The patches a Qwen-style vision tower merges into one token: ``vision_config.spatial_merge_size``
    squared (Qwen2-VL's layout, EXAONE 4.5, HyperCLOVAX, LFM3-VL), or the product of its
    ``merge_kernel_size`` (Kimi-K2.5's MoonViT); None where the config names neither."""
    vision = getattr(config, "vision_config", None)
    size = getattr(vision, "spatial_merge_size", None)
    if isinstance(size, int) and size > 0:
        return size * size
    kernel = getattr(vision, "merge_kernel_size", None)
    if isinstance(kernel, (list, tuple)) and kernel and all(isinstance(k, int) and k > 0 for k in kernel):
        return int(torch.tensor(kernel).prod())
    return None


def cut_run(run: int, counts: Iterator[int]) -> Optional[list[int]]:
    """The next of ``counts`` that fill a run of ``run`` tokens exactly, None where they overshoot it or end
    before it is full."""
    taken, left = [], run
    while left > 0 and (n := next(counts, None)) is not None:
        taken.append(n)
        left -= n
    return taken if left == 0 else None


def _runs_are_images(config, inputs: dict, runs: list[int]) -> list[int]:
    """Each run is one image: for families whose chat templates write text or markers between images.
    Where the inputs give one grid an image (``image_grid_thw``) and the runs of image tokens are fewer,
    images were written back to back by hand: each grid's tokens (``t*h*w`` over the patches merged into a
    token, :func:`_grid_merge`) cut the runs into images, in order, where they add up to every run exactly;
    otherwise they are refused, never ranked as one image with one budget."""
    grids, image, ids = inputs.get("image_grid_thw"), getattr(config, "image_token_id", None), inputs.get(RUN_IDS)
    if grids is None or image is None or ids is None:
        return runs
    found = sum(i == image for i in ids)
    if found >= len(grids):
        return runs
    merge = _grid_merge(config)
    images = iter([] if merge is None else (torch.as_tensor(grids).prod(-1) // merge).tolist())
    counts = []
    for run, i in zip(runs, ids):
        cut = cut_run(run, images) if i == image else [run]  # a video's run: as it is
        if cut is None:
            break
        counts += cut
    else:
        if next(images, None) is None:
            return counts
    raise ValueError(f"model: {len(grids)} images given (image_grid_thw) but {found} runs of their tokens, "
                     f"which their grids do not cut into images; images back to back (no text or marker between "
                     "them) cannot be told apart: write them as the chat template does")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # From the base model; dotted where it sits in a causal LM (Llama 4); a tuple: the first the model
    # has, where transformers releases place it differently (the Qwen Omni thinkers); empty: the base
    # model is its own language model (Phi-4-multimodal embeds the features and runs the decoder).
    lm_attr: Union[str, tuple[str, ...]] = "language_model"
    # Config attributes, dotted where a sub-config holds the id (Phi-4-multimodal's vision_config).
    visual_token_attrs: tuple[str, ...] = ("image_token_id",)
    # (config, the base model's keyword arguments, the lengths of the runs of visual tokens
    # in row-major order) -> the token count of each image in order. Default: each run is
    # one image (families that always put text or markers between images). The integer inputs
    # whose values it reads are named in COUNT_INPUTS: the hooks bring them to the host with
    # their one sync (any other value read back is a sync of its own); the hooks add each run's batch
    # row under ``RUN_ROWS`` and its token id under ``RUN_IDS``.
    image_token_counts: Callable[[Any, dict, list[int]], list[int]] = _runs_are_images
    # Where videos split otherwise than images (the same arguments): the runs of the config's
    # ``video_token_id`` go here, the others to ``image_token_counts``. None: every run goes there.
    video_token_counts: Optional[Callable[[Any, dict, list[int]], list[int]]] = None
    # Called after the prefill gather with the Prefill record (see handle.py).
    on_prefill: Optional[Callable[..., None]] = None
    # (the language model's keyword arguments, inputs_embeds) -> the (B, L, D) embeddings the visual
    # tokens are selected by and the prompt is read from, for families whose inputs_embeds hold no
    # image features (Granite 4 Vision adds them inside the language model). None: inputs_embeds.
    select_on: Optional[Callable[[dict, torch.Tensor], torch.Tensor]] = None
    # For language models that take prebuilt masks: (config, embeds, 2-D mask, cache,
    # position_ids, the kept tokens' types or None, cache slots, whether the caller gave labels)
    # -> the mask argument.
    build_mask: Optional[Callable[..., Any]] = None
    # True where the base model hands a dict ``attention_mask`` to its language model as it is, building
    # no masks of its own (Gemma3, Gemma4 on every supported transformers): a prompt's base model is then
    # given an empty dict to carry (handle.py's ``_DeferredMasks``), and ``build_mask`` builds the masks
    # once, for the layout the language model runs on; so does generate() on a static cache, in place of
    # the masks it builds ahead of each step (handle.py's ``_GenerateMasks``). Otherwise the base model
    # (or generate()) builds them for the whole prompt and the hooks build them again for the pruned one:
    # twice the host time, which transformers' builder makes milliseconds where image blocks attend
    # bidirectionally (``torch.vmap``).
    passes_mask_dicts: bool = False
    # The base model's argument that marks the visual tokens for ``build_mask`` (the caller's,
    # gathered like the embeddings: without it the base model builds causal masks).
    token_types_arg: str = "token_type_ids"
    # The oldest transformers (major, minor) whose model the hooks prune exactly; older ones are
    # refused by find_family.
    min_transformers: tuple[int, int] = (0, 0)
    # The transformers releases whose unpatched model itself fails, and how: (the first (major,
    # minor) that fails, the first that runs again or None, how it fails); find_family refuses the
    # family there (nothing to prune exactly, or to test the hooks against).
    broken_in: Optional[tuple[tuple[int, int], Optional[tuple[int, int]], str]] = None
    # (the model's config) -> why the installed transformers cannot prune it exactly, or None: for
    # refusals that depend on more than the model type (PaliGemma 2 on 4.x).
    refuse_config: Optional[Callable[[Any], Optional[str]]] = None
    # The first transformers (major, minor) whose wrapper computes a load-balancing loss from its
    # router logits when asked for them (``output_router_logits``), weighed by its own attention
    # mask: the unpruned length, where the kept tokens' logits are shorter, so a pruned forward that
    # asks for them is refused there (:meth:`weighs_router_logits`). None: no version does (Llama 4
    # just returns the kept tokens' router logits).
    router_loss: Optional[tuple[int, int]] = None
    # For a language model that embeds its ``input_ids`` itself, visual features included (Phi-4-
    # multimodal): (the language model, its positional and keyword arguments) -> the same call with
    # ``inputs_embeds`` computed as its forward computes them, and no ``input_ids``. Its hook then
    # runs on the embeddings as on any other family's. None: the caller passes ``inputs_embeds``.
    embed: Optional[Callable[[torch.nn.Module, tuple, dict], tuple[tuple, dict]]] = None
    # True where the language model reads the image features through cross-attention layers
    # (``cross_attention_states``), not as tokens of its sequence (Llama 3.2 Vision): pruned by
    # cross_attention.py's handle, which keeps the sequence and prunes those layers' keys and values.
    cross_attention: bool = False
    # True where generate() denoises canvases of several tokens over the prompt's cache with a decoder of its
    # own (DiffusionGemma): pruned by block_diffusion.py's handle, which also masks the decoder's reads of the
    # pruned cache and appends each finished canvas to it.
    block_diffusion: bool = False
    # True where the model is an encoder-decoder whose encoder reads the images (T5Gemma 2): the encoder is
    # the language model pruned (``lm_attr``), and encoder_decoder.py's handle masks what the decoder reads of
    # its output.
    encoder_decoder: bool = False
    # True where a flow-matching action expert denoises a chunk of actions over the cache that the VLM
    # prefilled from the cameras' images and the task (PI0, PI0.5): pruned by action_expert.py's handle, which
    # prunes the prefix and masks the expert's reads of the pruned cache.
    action_expert: bool = False
    # (config, the base model's keyword arguments, host input_ids, (row, positions, the end of the
    # image or frame before it in its row or 0) of each video frame in order (of each image where the
    # config names no video token, InternVL's frames are images, or frame_token_attr is None), the
    # tokenizer or None)
    # -> the (row, first, last) positions of each video, the text its processor writes between its
    # frames included (Qwen3-VL's, Gemma 4's timestamps): inside a video, so no question text, as a
    # row break inside an image is not; or of a label the processor writes before each image or frame
    # (InternVL's ``FrameN:``, MiniCPM-V's image numbers), or of an image between the begin/end markers its
    # config names (Llama 4's tile separators). None: no text stands between a video's frames.
    video_spans: Optional[Callable[..., list[tuple[int, int, int]]]] = None
    # The config attribute naming the token of video frames, whose runs ``video_spans`` is given. None:
    # the processor writes a video's frames with the image token (Nemotron-H Omni's tubelets, whatever its
    # config's video_token_id says), or where ``video_spans`` reads what stands before images too (MiniCPM-V's
    # numbers, Kimi-K2.5's media wrapper): every run is given, as where the config names no video token.
    frame_token_attr: Optional[str] = "video_token_id"
    # True where the caller's token types (``token_types_arg``, nonzero) mark every token the processor
    # writes for an image or video, its markers and separators too (Molmo2's column tokens, which no
    # config names): none of them is question text, with or without a tokenizer.
    typed_markers: bool = False
    # True where the caller's token types (nonzero) mark an answer written after the prompt (PaliGemma's
    # ``suffix=``, type 1): no question, also where no labels come with it (a candidate answer scored by
    # its log-likelihood), as generation from the prompt has none yet.
    typed_answers: bool = False
    # True where the family's processors write image markers that its config does not name (tile, row,
    # begin/end markers), or a function of the model's config saying so (LLaVA: Pixtral-tower checkpoints'
    # [IMG_BREAK]/[IMG_END]): only ``tokenizer=`` tells them from question text, so ``prune()`` warns
    # when ``prompt="question"`` is asked without one (:meth:`writes_unnamed_markers`).
    unnamed_markers: Union[bool, Callable[[Any], bool]] = False
    # Config attributes (as ``visual_token_attrs``) of tokens the processor writes inside one video's run
    # of visual tokens without ending it: the Qwen Omni thinkers' audio tokens, which their processors
    # interleave in chunks with a video's (``use_audio_in_video``/``load_audio_from_video``). Visual tokens
    # of one id with only such tokens between them are one run (one video, one budget); the tokens
    # themselves are not visual, kept whole like text.
    run_joiners: tuple[str, ...] = ()
    # (the language model) -> its modules that read ``position_ids`` as cache slots, where the rest of it
    # reads them as positions (MiniMax-M3's sparse attention layers: their lightning indexer cuts the keys
    # into blocks of slots, picks the query's own block by its id, and masks the keys past it). Where a run
    # drops tokens, the hooks hand these modules the slots the kept tokens fill (RoPE reads their original
    # positions, as every family's); keep-all leaves them the caller's ids, as unpatched. None: none does.
    slot_position_modules: Optional[Callable[[torch.nn.Module], list[torch.nn.Module]]] = None

    def __post_init__(self):
        # Its decode steps reach the hooks as ids, not embeddings: a mask builder would be handed ids.
        if self.embed is not None and self.build_mask is not None:
            raise ValueError(f"Family {self.name!r}: a family that embeds its input_ids itself (embed) "
                             "cannot build its masks (build_mask); its decode steps carry no embeddings")

    def writes_unnamed_markers(self, config) -> bool:
        """Whether this model's processor writes image markers its config does not name (``unnamed_markers``)."""
        return bool(self.unnamed_markers(config) if callable(self.unnamed_markers) else self.unnamed_markers)

    def weighs_router_logits(self) -> bool:
        """Whether the installed transformers' wrapper turns router logits into a loss (router_loss)."""
        return self.router_loss is not None and release("transformers") >= self.router_loss

    def refusal(self, config=None) -> Optional[str]:
        """Why find_family refuses this family (this model, given its config) on the installed
        transformers, or None."""
        here = release("transformers")
        version = ".".join(map(str, here))
        if here < self.min_transformers:
            return (f"model: zspa_kernels.prune supports {self.name} from transformers "
                    f"{'.'.join(map(str, self.min_transformers))}; this is {version}")
        if self.broken_in is not None:
            first, fixed, how = self.broken_in
            if first <= here and (fixed is None or here < fixed):
                return f"model: zspa_kernels.prune cannot prune {self.name} on transformers {version}: {how}"
        if config is not None and self.refuse_config is not None:
            return self.refuse_config(config)
        return None

    def visual_token_ids(self, config) -> list[int]:
        return self._config_ids(config, self.visual_token_attrs)

    def run_joiner_ids(self, config) -> list[int]:
        """The ids of ``run_joiners`` that this config names."""
        return self._config_ids(config, self.run_joiners)

    @staticmethod
    def _config_ids(config, attrs) -> list[int]:
        ids = []
        for path in attrs:
            found = config
            for attr in path.split("."):
                found = getattr(found, attr, None)
            ids.append(found)
        return [i for i in ids if i is not None]


def _indexed_attention(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """MiniMax-M3's attention layers with a lightning indexer (its sparse ones), whose ``position_ids`` the
    indexer reads as the query's cache slot: where a key's slot lies past it (masked), and which block of
    slots is its own (always attended)."""
    return [layer.self_attn for layer in lm.layers if getattr(layer.self_attn, "indexer", None) is not None]


def _split_evenly(n_visual: int, n_images: int, why: str) -> list[int]:
    if n_images < 1 or n_visual % n_images:
        raise ValueError(f"model: {n_visual} image tokens do not split evenly into {why}; "
                         "cannot tell where each image's tokens are")
    return [n_visual // n_images] * n_images


# The base model's integer inputs whose values image_token_counts read (image sizes, grids, crop
# masks): the prefill hook copies them to the host asynchronously, ahead of its one sync, so the
# counts read host tensors (handle.py's docstring, Host syncs). Shapes are read freely.
COUNT_INPUTS = ("image_sizes", "image_attention_mask", "image_grids", "video_grids", "image_grid_thw", "video_grid_thw",
                "spatial_shapes", "batch_num_images",
                "image_merge_sizes", "video_merge_sizes", "video_compression_mask", "num_frames_per_video")


def _counts_from_image_sizes(inputs: dict, step: int) -> list[int]:
    """Pixtral towers: ``(h // step) * (w // step)`` tokens per image, rows of them
    separated by row-break tokens."""
    sizes = inputs.get("image_sizes")
    if sizes is None:
        raise ValueError("image_sizes: required to tell where each image's tokens are "
                         "(Pixtral vision tower), got None")
    return (torch.as_tensor(sizes) // step).prod(-1).tolist()


def _encoded_counts(inputs: dict, modality: str = "image") -> Optional[list[int]]:
    """Token count of each image (video) already encoded by ``generate()`` (transformers 5.24+
    runs the vision tower ahead of the prefill and passes ``mm_encoder_outputs``)."""
    encoded = (inputs.get("mm_encoder_outputs") or {}).get(modality)
    features = getattr(encoded, "pooler_output", None)
    if isinstance(features, (list, tuple)):
        return [f.shape[0] for f in features]
    if isinstance(features, torch.Tensor) and features.dim() == 3:  # (images, tokens, D)
        return [features.shape[1]] * features.shape[0]
    return None


def _tower_counts(config, inputs: dict, runs: list[int]) -> list[int]:
    """The encoded images' feature counts when generate() passes them; else one image per
    ``pixel_values`` entry: fixed-size towers (CLIP with a class token, SigLIP without;
    the "default" strategy drops the first token either way) give every image the same
    count, the tokens present shared out; Pixtral towers: from the image sizes (Mistral3
    merges ``spatial_merge_size``^2 patches into a token)."""
    encoded = _encoded_counts(inputs)
    if encoded is not None:
        return encoded
    if config.vision_config.model_type == "pixtral":
        step = config.vision_config.patch_size * getattr(config, "spatial_merge_size", 1)
        return _counts_from_image_sizes(inputs, step)
    pixels = inputs.get("pixel_values")
    if pixels is None:
        raise ValueError("pixel_values: required to tell where each LLaVA image's tokens are, got None")
    return _split_evenly(sum(runs), pixels.shape[0], f"{pixels.shape[0]} images (pixel_values)")


def _cell_counts(family: str, what: str, sizes_arg: str, cell: Callable[[Any], int]):
    """Counts of the images (crops) generate() encoded (5.24+), else one token per ``cell(config)``
    square cell of each image's ``(h, w)`` in the input ``sizes_arg``: LFM2-VL's crops (their patch
    grids in ``spatial_shapes``, the cell its downsample factor), Apertus 1.5's images (their true
    sizes, the cell its ``spatial_scale_factor``)."""
    def counts(config, inputs: dict, runs: list[int]) -> list[int]:
        encoded = _encoded_counts(inputs)
        if encoded is not None:
            return encoded
        sizes = inputs.get(sizes_arg)
        if sizes is None:
            raise ValueError(f"{sizes_arg}: required to tell where each {family} {what}'s tokens are, got None")
        return (torch.as_tensor(sizes) // cell(config)).prod(-1).tolist()

    return counts


def _fixed_counts(per_image: Callable[[Any], int]):
    def counts(config, inputs: dict, runs: list[int]) -> list[int]:
        n, total = per_image(config), sum(runs)
        return _split_evenly(total, total // n if total % n == 0 else 0, f"images of {n} tokens")
    return counts


def _clip_tokens(config) -> int:
    """A CLIP tower's output tokens: its patches and the class token."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def _per_tile(key: str, modality: str):
    """PerceptionLM: every tile of an image (the thumbnail too) and every video frame is one
    tower crop of a fixed size, its tokens one budget; the crops of a call all have the same
    count: the tokens present shared out over the crops given, ``(items, crops, ...)`` pixels or
    the crops ``generate()`` encoded (5.24+, without the items' boundaries)."""
    def counts(config, inputs: dict, runs: list[int]) -> list[int]:
        encoded = getattr((inputs.get("mm_encoder_outputs") or {}).get(modality), "pooler_output", None)
        pixels = inputs.get(key)
        if encoded is not None:
            crops = len(encoded)
        elif pixels is not None:
            crops = pixels.shape[0] * pixels.shape[1]
        else:
            raise ValueError(f"{key}: required to tell where each PerceptionLM tile's tokens are, got None")
        return _split_evenly(sum(runs), crops, f"{crops} {modality} crops ({key})")
    return counts


def _frames_per_video(inputs: dict, frame_sizes: list[int], tokens: Optional[list[int]] = None) -> list[int]:
    """How many of the frames (runs of video tokens, in order, of ``frame_sizes`` tokens) each video
    has: as many as its ``tokens`` take where given (VideoLLaMA3, whose encoded videos in generate()
    count the tokens its compression drops), else its grid's temporal patches (Qwen3-VL, Muse Glimmer),
    Gemma 4's ``num_frames_per_video`` (5.24+; a ``(videos, frames, ...)`` ``pixel_values_videos`` on
    5.17), or as many as its features' count takes (generate() on 5.24+, which passes the encoded videos)."""
    grids, counts = inputs.get("video_grid_thw"), inputs.get("num_frames_per_video")
    videos = inputs.get("pixel_values_videos")
    if tokens is not None:
        per_video = None
    elif grids is not None:
        per_video = torch.as_tensor(grids)[:, 0].tolist()
    elif counts is not None:
        per_video = torch.as_tensor(counts).tolist()
    elif isinstance(videos, torch.Tensor) and videos.dim() == 4:  # Gemma 4 on 5.17: (videos, frames, patches, pixels)
        per_video = [videos.shape[1]] * videos.shape[0]
    else:
        per_video, tokens = None, _encoded_counts(inputs, "video")
        if tokens is None:
            raise ValueError("video_grid_thw: required to tell the frames of each video apart, got None")
    if per_video is None:
        per_video, sizes = [], iter(frame_sizes)
        for left in tokens:
            n = 0
            while left > 0 and (size := next(sizes, None)) is not None:
                left, n = left - size, n + 1
            per_video.append(n if left == 0 else -1)
    if min(per_video, default=0) < 1 or sum(per_video) != len(frame_sizes):
        raise ValueError(f"video_grid_thw: the videos given have {per_video} frames, but the inputs hold "
                         f"{len(frame_sizes)} runs of video tokens ({frame_sizes}); cannot tell the frames of each "
                         "video apart")
    return per_video


def _video_llama3_tokens(inputs: dict) -> list[int]:
    """Each VideoLLaMA3 video's token count: its features' (the encoded ones generate() passes on 5.24+,
    else ``t*h*w / merge**2`` of its grid), less those its ``video_compression_mask`` drops."""
    tokens = _encoded_counts(inputs, "video")
    if tokens is None:
        grids, merges = inputs.get("video_grid_thw"), inputs.get("video_merge_sizes")
        if grids is None or merges is None:
            raise ValueError("video_grid_thw, video_merge_sizes: required to tell the frames of each video apart, "
                             "got None")
        tokens = (torch.as_tensor(grids).prod(-1) // torch.as_tensor(merges) ** 2).tolist()
    mask = inputs.get("video_compression_mask")
    if mask is not None:
        tokens = [int(m.sum()) for m in torch.as_tensor(mask).split(tokens)]
    return tokens


def _videos(inputs: dict, frames: list, tokens: Optional[list[int]] = None) -> list[tuple[int, int, int, int]]:
    """(row, first, last, bound) of each video: its first frame's first position, its last frame's
    last, and the end of what stands before it in its row (``frames``: see ``Family.video_spans``;
    ``tokens``: see :func:`_frames_per_video`)."""
    per_video = _frames_per_video(inputs, [c.numel() for _, c, _ in frames], tokens)
    videos, at = [], 0
    for n in per_video:
        (row, first, bound), (last_row, last, _) = frames[at], frames[at + n - 1]
        at += n
        if row != last_row:
            raise ValueError("video_grid_thw: a video's frames span two batch rows; cannot tell its frames apart")
        videos.append((row, int(first[0]), int(last[-1]), bound))
    return videos


# The timestamps processors write before each frame of a video: Qwen3-VL's "<0.5 seconds>", Gemma 4's
# "01:05", Muse Glimmer's video processor's frame_timestamp_format (by default "Time: 0.5s"), VideoLLaMA3's.
TIMESTAMP = re.compile(r"<\s*\d+(\.\d+)?\s*seconds\s*>")
MINUTES_SECONDS = re.compile(r"\d{2,}:\d{2}")
TIME_SECONDS = re.compile(r"Time:\s*\d+(\.\d+)?s")
TIME_SECONDS_COLON = re.compile(r"Time\s*\d+(\.\d+)?s:")  # VideoLLaMA3's
FRAME_LABEL = re.compile(r"Frame\d+:")  # InternVL's, no timestamp: "Frame1:"
CHUNK_LABEL = re.compile(r"\d{2}:\d{2}:\d{2}\.\d{3}\s*video")  # Kimi-K2.5's, markers skipped: "00:00:01.000video"
# SmolVLM's, "Frame from 00:01:" (minutes past 99 in more digits), then its image markers (special or, where a
# tokenizer keeps them as text, not).
FRAME_FROM = re.compile(r"Frame from \d{2,}:\d{2}:(\s*<[^<>\s]+>)*")
# Gemma3's pan-and-scan (do_pan_and_scan): "Here is the original image <image> and here are some crops to help
# you see better <crop> <crop>": before the whole view, and before its first crop.
PAN_AND_SCAN = re.compile(r"Here is the original image|and here are some crops to help you see better")
# Emu3's and Apertus 1.5's grid size after an image's begin marker, "<|image start|>32*32<|image token|>".
GRID_SIZE = re.compile(r"\d+\*\d+")
# Aya Vision's before each tile, "TILE_1" ... and "TILE_GLOBAL" before the whole view (its "TILE" as text, or
# special and skipped: "_1").
TILE_LABEL = re.compile(r"(?:TILE)?_(?:\d+|GLOBAL)")
# Nemotron-H Omni's, one a tubelet (frames packed as one image), naming its frames and, where the video's
# metadata has an fps, their times: "Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.50 seconds: <img>"
# (some 20 tokens of a BPE vocabulary for two frames: decoded from a window of TUBELET_WINDOW).
TUBELET_LABEL = re.compile(r"Frame \d+( sampled at \d+\.\d+ seconds)?( and frame \d+( sampled at \d+\.\d+ seconds)?)*:"
                           r"(\s*<[^<>\s]+>)*")
TUBELET_WINDOW = 64
# MiniMax-M3-VL's before each frame of a video, its markers special: "]<]0.5 seconds[>[".
BRACKET_SECONDS = re.compile(r"\]<\]\d+(\.\d+)? seconds\[>\[")
FRAME_TIME = re.compile(r"\d+\.\d")  # Molmo2's, "0.5 " before each frame's <frame_start>
# ERNIE-4.5-VL's chat template's label before each image's and each video's start marker: "Picture 2:", "Video 1:".
MEDIA_LABEL = re.compile(r"(?:Picture|Video) \d+:")


@torch.compiler.disable  # host-side tokenizer calls: nothing for Dynamo to trace
def _timestamp_before(tokenizer, ids: list[int], stamp: re.Pattern = TIMESTAMP, window: int = 16) -> int:
    """How many of the last tokens of ``ids`` (at most ``window``) decode to a timestamp or label (``stamp``);
    0: none. Special tokens (markers) decode to nothing: those between the timestamp and the frame are
    counted in. One decode where the last ``window`` tokens do not end with one (an image without a label,
    the usual case); else the fewest tokens that decode to the whole of it (from the first character of the
    match the window's text ends with: Molmo2's ``14.5``, not ``4.5``), found by bisection on the decoded
    length (a longer suffix decodes no shorter: some 2 + log2(window) decodes, not one per token of a long
    label), checked, and searched token by token where the check fails (a token holding the label's first
    character and text before it, or a tokenizer that decodes a suffix otherwise)."""
    tail = ids[-window:]

    def decoded(n: int) -> str:
        return tokenizer.decode(tail[-n:], skip_special_tokens=True)

    try:
        text = decoded(len(tail))
        found = re.search(f"(?:{stamp.pattern})\\s*$", text)
        if found is None:
            return 0
        need, low, high = len(text) - found.start(), 1, len(tail)
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if len(decoded(mid)) >= need else (mid + 1, high)
        if stamp.fullmatch(decoded(low).strip()):
            return low
        for n in range(1, len(tail) + 1):
            if stamp.fullmatch(decoded(n).strip()):
                return n
    except Exception:  # ids this tokenizer cannot decode are no timestamp it wrote
        pass
    return 0


def _timed_video_spans(config, inputs: dict, ids: torch.Tensor, frames: list, tokenizer=None) -> list[tuple[int, int, int]]:
    """Qwen3-VL's processor (and LFM3-VL's, Cohere Compass's, Cosmos3-Edge's, written alike) writes
    each frame of a video (a temporal patch of ``video_grid_thw``) as ``<t seconds><|vision_start|>``
    its tokens ``<|vision_end|>``, where the prompt had the video's marker (Qwen3-VL on 5.x before 5.25,
    LFM3-VL, Cohere Compass: inside the template's ``<|vision_start|>``...``<|vision_end|>``; Qwen3-VL on
    4.57 and 5.25, Cosmos3-Edge: in its place). A video spans from that outer start marker, or else from
    its first timestamp (known with a tokenizer only), to its last frame."""
    if not frames:
        return []
    spans = []
    for row, start, last, bound in _videos(inputs, frames):
        if start - 1 <= bound or int(ids[row, start - 1]) != config.vision_start_token_id:
            spans.append((row, start, last))  # not the layout above: its frames alone
            continue
        before = ids[row, bound:start - 1]
        marks = (before == config.vision_start_token_id).nonzero()
        if marks.numel():
            start = bound + int(marks[-1])
        elif tokenizer is not None:
            start -= 1 + _timestamp_before(tokenizer, before.tolist())
        spans.append((row, start, last))
    return spans


def _stamped_video_spans(stamp: re.Pattern, tokens: Optional[Callable[[dict], list[int]]] = None
                         ) -> Callable[..., list[tuple[int, int, int]]]:
    """For processors that write a timestamp (``stamp``) before each frame of a video and no start
    marker a config names ahead of the first: a video spans from its first timestamp (known with a
    tokenizer only; without one, from its first frame) to its last frame. Gemma 4's processor writes
    ``MM:SS <boi>`` each frame ``<eoi>``, joined by spaces; Muse Glimmer's (Spark's)
    ``<|vid_start|>Time: 0.0s`` the first frame, then ``<|vid_frame_separator|>Time: 0.5s`` each next;
    VideoLLaMA3's ``Time 0.0s:`` a frame, then ``,Time 1.0s:`` each next (``tokens``: each video's token
    count from the inputs, where its frames are told apart by it)."""
    def spans(config, inputs: dict, ids: torch.Tensor, frames: list, tokenizer=None) -> list[tuple[int, int, int]]:
        if not frames:
            return []
        found = []
        for row, start, last, bound in _videos(inputs, frames, None if tokens is None else tokens(inputs)):
            if tokenizer is not None:
                start -= _timestamp_before(tokenizer, ids[row, bound:start].tolist(), stamp)
            found.append((row, start, last))
        return found
    return spans


def _labelled_frame_spans(label: re.Pattern, window: int = 16) -> Callable[..., list[tuple[int, int, int]]]:
    """For processors that write a label (``label``) before each frame of a video where nothing in the
    inputs groups the frames into videos: each frame spans from its label, known by a tokenizer only
    (decoded), to its last token. InternVL's processor writes a video as its frames, each an image
    (``<img>`` its tokens ``</img>``) after ``FrameN:``, one a line (``frames``: every image, the config
    naming no video token; SmolVLM's alike, after ``Frame from 00:01:``); Kimi-K2.5's, each chunk of frames
    as ``00:00:01.000<|media_begin|>video<|media_content|>`` its tokens ``<|media_end|>`` (its chunks' count
    per video is no model input); Nemotron-H Omni's, each tubelet as an image after its label, one a line
    (``window``: the most tokens a label takes). Labels before images alike (``frames``: every image where
    the config names no video token): Gemma3's pan-and-scan sentences, Emu3's and Apertus 1.5's grid size,
    Aya Vision's tile labels."""
    def spans(config, inputs: dict, ids: torch.Tensor, frames: list, tokenizer=None) -> list[tuple[int, int, int]]:
        if tokenizer is None:
            return []
        found = []
        for row, cols, bound in frames:
            start = int(cols[0])
            if n := _timestamp_before(tokenizer, ids[row, bound:start].tolist(), label, window):
                found.append((row, start - n, int(cols[-1])))
        return found
    return spans


_kimi_chunk_labels = _labelled_frame_spans(CHUNK_LABEL)

# PI0.5's processor writes a row's task after its cameras and bos as ``Task: {task}, State: {bins};\nAction: ``
# (the robot's state, discretized into 256 bins, where it is given).
PI05_TASK = re.compile(r"Task:")
PI05_STATE_ACTION = re.compile(r"(?:,\s*State:[\s\d]*)?;\s*Action:")


def _pi05_template_spans(config, inputs: dict, ids: torch.Tensor, frames: list, tokenizer=None
                         ) -> list[tuple[int, int, int]]:
    """PI0.5's processor's words around a row's task (:data:`PI05_TASK`, :data:`PI05_STATE_ACTION`), known by a
    tokenizer only (decoded): no question, and neither are the state's numbers, which would otherwise outnumber
    the task's words in its mean (8 to 32 of them). ``frames``: every camera's run; the text follows a row's
    last. PI0's task stands alone after bos: nothing matches there."""
    if tokenizer is None:
        return []
    last = {row: int(cols[-1]) for row, cols, _ in frames}  # row-major: each row's last camera
    spans = []
    for row, image_end in last.items():
        tail = ids[row, image_end + 1:].tolist()  # bos, the text, the right padding (specials decode to nothing)
        if n := _timestamp_before(tokenizer, tail, PI05_STATE_ACTION, window=len(tail)):
            spans.append((row, ids.shape[1] - n, ids.shape[1] - 1))
        for m in range(1, min(len(tail), 8) + 1):  # the label's few tokens, bos before them
            text = tokenizer.decode(tail[:m], skip_special_tokens=True).strip()
            if PI05_TASK.fullmatch(text):
                spans.append((row, image_end + 1, image_end + m))
            if len(text) >= len("Task:"):
                break
    return spans


def _kimi_k25_spans(config, inputs: dict, ids: torch.Tensor, frames: list, tokenizer=None) -> list[tuple[int, int, int]]:
    """Kimi-K2.5 writes each image as ``<|media_begin|>image<|media_content|>`` its tokens ``<|media_end|>``
    (its chat template) and each chunk of video frames as ``00:00:01.000<|media_begin|>video<|media_content|>``
    its tokens ``<|media_end|>`` (its processor): what stands between the begin marker (the config's
    ``vision_start_token_id``) and the tokens, ``<|media_content|>`` (in no config) and the word, is the
    image's or chunk's, with or without a tokenizer; a chunk's timestamp before the marker with a tokenizer
    only (decoded: :func:`_labelled_frame_spans`). ``frames``: every run, images and chunks."""
    spans = []
    for row, cols, bound in frames:
        first = int(cols[0])
        before = ids[row, bound:first].tolist()
        if config.vision_start_token_id in before[:-1]:  # something between the marker and the tokens
            spans.append((row, first - 1 - before[::-1].index(config.vision_start_token_id), first - 1))
    chunks = [f for f in frames if int(ids[f[0], f[1][0]]) == config.video_token_id]
    return spans + _kimi_chunk_labels(config, inputs, ids, chunks, tokenizer)


def _molmo2_video_spans(config, inputs: dict, ids: torch.Tensor, frames: list, tokenizer=None
                        ) -> list[tuple[int, int, int]]:
    """Molmo2's processor writes a video as each frame's time, ``0.5 ``, then ``<frame_start>`` its patch
    tokens ``<frame_end>``, joined by spaces: a video is one budget (``frames``: every image and video, its
    frames' times inside it), and with a tokenizer it spans from its first time (decoded) too. Images
    start with other markers; a processor that writes frames between image markers
    (``use_frame_special_tokens=False``) keeps the first time."""
    if tokenizer is None:
        return []
    found = []
    for row, cols, bound in frames:
        start = int(cols[0])
        if start - 1 > bound and int(ids[row, start - 1]) == config.frame_start_token_id:
            start -= _timestamp_before(tokenizer, ids[row, bound:start].tolist(), FRAME_TIME)
            found.append((row, start, int(cols[-1])))
    return found


def _image_id_spans(config, inputs: dict, ids: torch.Tensor, frames: list, tokenizer=None) -> list[tuple[int, int, int]]:
    """MiniCPM-V's processors (4.6, 4.7, MiniCPM-OCR; ``use_image_id``, the default) write each image's
    number in its row before it, ``<image_id>0</image_id><image>`` then its thumbnail's tokens: the label
    is the image's, no question text. Its markers are named by the tokenizer alone (its
    ``image_id_start_token``/``image_id_end_token``), so with one the number goes too (a ``(row, first,
    last)`` span over the label); without one the number stays (README). ``frames``: every run (its
    slices' runs and video frames too, which no label precedes)."""
    if tokenizer is None:
        return []
    tokens = [getattr(tokenizer, attr, None) or default
              for attr, default in (("image_id_start_token", "<image_id>"), ("image_id_end_token", "</image_id>"))]
    marks = tokenizer.convert_tokens_to_ids(tokens)
    if None in marks or tokenizer.convert_ids_to_tokens(marks) != tokens:  # not its tokens: it writes no such label
        return []
    (opening, closing), spans = marks, []
    for row, cols, bound in frames:
        before = ids[row, bound:int(cols[0])].tolist()  # ..., <image_id>, number, </image_id>, <image>
        if len(before) >= 3 and before[-2] == closing and opening in before[:-2]:
            first = bound + len(before) - 3 - before[-3::-1].index(opening)
            spans.append((row, first, bound + len(before) - 2))
    return spans


def _marked_spans(start_attr: str, end_attr: str) -> Callable[..., list[tuple[int, int, int]]]:
    """For processors that write everything of an image or video between a begin and an end marker the
    config names (``start_attr``, ``end_attr``): it spans from each begin marker to the next end marker.
    GLM-4.1V's (4.5V's, 4.6V's, 5-Next's) writes each frame of a video as an image followed by its
    timestamp, all between the begin/end-of-video markers its template writes; Llama 4's writes an
    image's tiles with separators between them, then an image marker and its global view, between its
    begin/end-of-image markers."""

    def spans(config, inputs: dict, ids: torch.Tensor, frames: list, tokenizer=None) -> list[tuple[int, int, int]]:
        found = []
        for row in range(ids.shape[0]):
            starts = (ids[row] == getattr(config, start_attr)).nonzero()[:, 0].tolist()
            ends = (ids[row] == getattr(config, end_attr)).nonzero()[:, 0].tolist()
            for start in starts:
                end = next((e for e in ends if e > start), None)
                if end is not None:
                    found.append((row, start, end))
        return found

    return spans


_marked_video_spans = _marked_spans("video_start_token_id", "video_end_token_id")


def _one_run_per_image(config, inputs: dict, runs: list[int], modalities=("image", "video")) -> list[int]:
    """Any-resolution images differ in count; text usually stands between them. Refuse
    when the runs are fewer than the images and videos given (some stand back to back).
    ``modalities``: those whose runs are given (all of them by default)."""
    encoded = inputs.get("mm_encoder_outputs") or {}
    given = 0
    for modality, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if modality not in modalities:
            continue
        features = getattr(encoded.get(modality), "pooler_output", None)
        deepstack = getattr(encoded.get(modality), "deepstack_features", None)
        if features is None and deepstack:  # Granite 4 Vision: (layer, per-image features) pairs only
            features = deepstack[0][1]
        pixels = inputs.get(key)
        given += len(features if features is not None else [] if pixels is None else pixels)
    if given != len(runs):
        raise ValueError(f"model: {given} images/videos given but {len(runs)} runs of their tokens; "
                         "images or videos back to back (no text between them) cannot be told apart")
    return runs


def _onevision_image_counts(config, inputs: dict, runs: list[int]) -> list[int]:
    """LLaVA-OneVision's images, as its model encodes them: an image alone in its sample
    (``batch_num_images``, which the processor returns) in any resolution, one run of tokens;
    each image of a sample of several as its base view alone and the newline feature, the same
    count for every such image, so they are told apart back to back (the checkpoints' chat
    template writes a message's images with nothing between them). Without ``batch_num_images``
    the model encodes every image in any resolution: one run each (:func:`_one_run_per_image`)."""
    encoded = _encoded_counts(inputs)
    if encoded is not None:
        return encoded
    numbers = inputs.get("batch_num_images")
    if numbers is None:
        return _one_run_per_image(config, inputs, runs, modalities=("image",))
    alone = iter(n == 1 for n in torch.as_tensor(numbers).tolist() for _ in range(n))
    base = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    counts = []
    for run in runs:
        left = run
        while left > 0 and (whole := next(alone, None)) is not None:
            counts.append(left if whole else base)  # an image alone in its sample is its own run
            left -= counts[-1]
        if left != 0:
            raise ValueError(f"model: a run of {run} LLaVA-OneVision image tokens is not the images that "
                             f"batch_num_images gives ({base} tokens each in a sample of several images, "
                             "one run for an image alone); cannot tell where each image's tokens are")
    if next(alone, None) is not None:
        raise ValueError("batch_num_images: gives more images than the inputs hold runs of image tokens for")
    return counts


def _kept_feature_rows(positions: torch.Tensor, prefill) -> tuple[torch.Tensor, torch.Tensor]:
    """For features given one row per visual token (row-major, at the ``(B, L)`` bool
    ``positions``): the kept tokens' positions in the pruned layout, and the rows of their
    features in its row-major order."""
    rank = (positions.flatten().long().cumsum(0) - 1).view_as(positions)  # row of each token
    kept = positions.gather(1, prefill.index) & prefill.valid
    # Row-major order of the kept visual slots, without a sync: their count is known.
    flat = torch.arange(kept.numel(), device=kept.device).view_as(kept)
    order = torch.where(kept, flat, flat + kept.numel()).flatten().argsort()[: prefill.n_visual_kept]
    return kept, rank.gather(1, prefill.index).flatten()[order]


def _gather_deepstack(prefill) -> None:
    """Qwen3-VL adds ``deepstack_visual_embeds[l]`` (one row per visual token, row-major)
    to the hidden states at ``visual_pos_masks`` in its first layers: keep the rows and
    mask entries of the kept visual tokens, in the new layout's row-major order. transformers
    4.57's Qwen3-Omni thinker passes the mask expanded over the hidden size, ``(B, L, D)``, and its
    language model reads ``[..., 0]`` of it: it gets the kept mask expanded alike."""
    kwargs = prefill.kwargs
    positions = kwargs.get("visual_pos_masks")
    if positions is None:
        return
    expanded = positions.shape[2:]
    kept, rows = _kept_feature_rows(positions[..., 0] if expanded else positions, prefill)
    kwargs["visual_pos_masks"] = kept[..., None].expand(*kept.shape, *expanded) if expanded else kept
    kwargs["deepstack_visual_embeds"] = [e[rows] for e in kwargs["deepstack_visual_embeds"]]


def _granite_features(kwargs: dict, embeds: torch.Tensor) -> torch.Tensor:
    """Granite 4 Vision zeroes the image tokens' embeddings and adds their features inside the
    language model, each layer of its ``deepstack_features`` map its own projection: the tokens
    are selected by the features the earliest of those layers receives."""
    features, mask = kwargs.get("deepstack_features"), kwargs.get("vision_mask")
    if not features or mask is None:
        return embeds
    return embeds.masked_scatter(mask, features[min(features)].to(embeds.dtype))


def _gather_granite(prefill) -> None:
    """Granite 4 Vision's ``vision_mask`` ``(B, L, 1)`` and ``deepstack_features`` (per layer, one
    row per image token, row-major): those of the kept tokens, as Qwen3-VL's deepstack."""
    kwargs = prefill.kwargs
    mask = kwargs.get("vision_mask")
    if mask is None or not kwargs.get("deepstack_features"):
        return
    kept, rows = _kept_feature_rows(mask[..., 0], prefill)
    kwargs["vision_mask"] = kept[..., None]
    kwargs["deepstack_features"] = {layer: f[rows] for layer, f in kwargs["deepstack_features"].items()}


def _fuyu_counts(config, inputs: dict, runs: list[int]) -> list[int]:
    """Fuyu: an image is as many tokens as it has patches (rows of them ended by newline tokens): one
    entry of its patches an image (``pixel_values``, ``image_patches`` before transformers 5.24), or of
    the patch embeddings generate() encoded ahead (5.24+). transformers 5.x's processor concatenates
    every image's patches into one ``(patches, features)`` tensor (its embeddings likewise); it writes
    one image a batch row (first, before the row's text): then each row's runs are one image."""
    encoded = getattr((inputs.get("mm_encoder_outputs") or {}).get("image"), "last_hidden_state", None)
    patches = next((p for p in (encoded, inputs.get("pixel_values"), inputs.get("image_patches")) if p is not None),
                   None)
    if patches is None:
        raise ValueError("pixel_values: required to tell where each Fuyu image's tokens are, got None")
    if isinstance(patches, torch.Tensor) and patches.dim() == 2:
        rows = inputs[RUN_ROWS]
        return [sum(n for n, r in zip(runs, rows) if r == row) for row in dict.fromkeys(rows)]
    return [p.shape[-2] for p in patches]


def _fuyu_newline_spans(config, inputs: dict, ids: torch.Tensor, frames: list, tokenizer=None
                        ) -> list[tuple[int, int, int]]:
    """Fuyu's processor ends each row of an image's patch tokens with ``|NEWLINE|``, an ordinary token of
    its tokenizer (a piece of its vocabulary, not special) that no config names: those between its rows
    are inside the image; with a tokenizer, which names it, the one after its last row is the image's
    too (a ``(row, first, last)`` span over it), no question text; without one it stays (README)."""
    if tokenizer is None:
        return []
    newline = tokenizer.convert_tokens_to_ids("|NEWLINE|")
    if newline is None or tokenizer.convert_ids_to_tokens(newline) != "|NEWLINE|":  # not its tokenizer
        return []
    after = [(row, int(cols[-1]) + 1) for row, cols, _ in frames]
    return [(row, c, c) for row, c in after if c < ids.shape[1] and int(ids[row, c]) == newline]


def _reference_prefill(prefill) -> None:
    """UnlimitedOCR's reference sliding-window cache layers keep a prompt's states whole and slide over the
    generated tokens' ones; its generate() declares the prompt's length to them ahead of the forward: the
    unpruned one, which would keep the first generated tokens whole too, as if they were prompt. Declared
    again, as the kept length, while nothing is cached: the kept tokens are the reference, and every
    generated token slides, as after an unpruned prompt (keep-all: the length generate() declared)."""
    cache = next((prefill.kwargs[k] for k in ("cache", "past_key_values") if prefill.kwargs.get(k) is not None), None)
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "_layer_type", None) == "reference_sliding_attention" and not layer.prefill_cumulative_length:
            layer.prefill_length = None
            layer.set_prefill_length(prefill.index.shape[1])


def _idefics3_tile_tokens(config) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor ** 2


def _gemma_masks(model_class: str, types_arg: str, config, embeds, mask, cache, positions, token_types,
                 slots, labelled):
    """The dict of 4-D masks a Gemma base model hands its language model, built for the pruned
    layout by the model's own builder from the token types (its signature differs between
    transformers 4.x and 5.x, and between Gemma3 and Gemma4)."""
    import transformers

    build = getattr(transformers, model_class).create_masks_for_generate
    params = inspect.signature(build).parameters
    kwargs = dict(config=config, attention_mask=mask, position_ids=positions)
    kwargs[types_arg] = token_types
    kwargs["cache" if "cache" in params else "past_key_values"] = cache
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
    if "cache_position" in params:
        kwargs["cache_position"] = slots
    return build(**kwargs)


def _gemma3_masks(*args):
    """Gemma3: each image block attends to itself bidirectionally, on every layer."""
    return _gemma_masks("Gemma3ForConditionalGeneration", "token_type_ids", *args)


def _gemma4_masks(*args):
    """Gemma4: with ``use_bidirectional_attention="vision"`` (the builder reads the config),
    each image or video block attends to itself bidirectionally on the sliding-window layers
    only; causal masks otherwise."""
    return _gemma_masks("Gemma4ForConditionalGeneration", "mm_token_type_ids", *args)


def _diffusion_gemma_masks(*args):
    """DiffusionGemma's encoder: with ``use_bidirectional_attention="vision"``, each image block attends to
    itself bidirectionally on every layer (its encoder's own builder, which generate() calls)."""
    return _gemma_masks("DiffusionGemmaEncoderModel", "mm_token_type_ids", *args)


def _gemma4_unified_masks(config, embeds, mask, cache, positions, token_types, slots, labelled):
    """Gemma 4 Unified's masks as its base model builds them: with ``use_bidirectional_attention=
    "vision"``, each image or video block attends to itself bidirectionally on every layer (the
    model's own ``create_masks_for_generate``, which ``generate()`` calls on a static cache, makes
    the sliding-window layers' blocks only: its forward is what the hooks reproduce)."""
    from transformers import masking_utils
    from transformers.models.gemma4_unified.modeling_gemma4_unified import get_block_sequence_ids_for_mask

    text = config.get_text_config()
    params = inspect.signature(masking_utils.create_masks_for_generate).parameters
    kwargs = dict(config=text, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    kwargs["cache" if "cache" in params else "past_key_values"] = cache
    # Tokens without types are text (-1: no block), as the forward reads them. On a static cache such an overlay,
    # a no-op, is left out, as generate()'s own masks leave it: flex_attention reads it when the attention runs,
    # at the query's offset, which the layer has grown by then (handle.py's _decode_step): one past its ids at the
    # cache's last slot.
    if text.use_bidirectional_attention == "vision" and (
            token_types is not None or not getattr(cache, "is_compileable", False)):
        kwargs["block_sequence_ids"] = (torch.full(embeds.shape[:-1], -1, device=embeds.device) if token_types is None
                                        else get_block_sequence_ids_for_mask(token_types, device=embeds.device))
    return masking_utils.create_masks_for_generate(**kwargs)


def _paligemma_masks(config, embeds, mask, cache, positions, token_types, slots, labelled):
    """PaliGemma's prefix-LM mask, built as its base model builds it, for the pruned layout.

    transformers 5.x: causal, plus one bidirectional block over the tokens of type 0 (the images
    and the prompt; a suffix is type 1) when the caller gives ``token_type_ids``; a Gemma2 text
    model (PaliGemma 2) also takes a sliding-window mask. 4.57: every prompt token attends to the
    whole prompt (the token types are read only with labels, when only type 0 columns are
    unmasked for every row); its builder reads nothing of its model but the config and dtype, and a
    decode step's mask is the causal one the language model builds from the 2-D mask (PaliGemma 2
    is refused there: :func:`_paligemma_refusal`)."""
    from transformers.models.paligemma.modeling_paligemma import PaliGemmaModel

    text = config.get_text_config()
    if hasattr(PaliGemmaModel, "_update_causal_mask"):  # 4.57
        from types import SimpleNamespace

        if embeds.shape[1] == 1:
            return mask

        owner = SimpleNamespace(config=config, text_config_dtype=text.dtype or embeds.dtype)
        return PaliGemmaModel._update_causal_mask(owner, mask, token_types, cache, slots, embeds,
                                                  labelled and token_types is not None)
    from transformers import masking_utils

    params = inspect.signature(masking_utils.create_causal_mask).parameters
    kwargs = dict(config=text, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if token_types is not None:
        kwargs["block_sequence_ids"] = torch.where(token_types == 0, 0, -1)
    full = masking_utils.create_causal_mask(**kwargs)
    if getattr(text, "sliding_window", None) is None:
        return full
    return {"full_attention": full, "sliding_attention": masking_utils.create_sliding_window_causal_mask(**kwargs)}


def _pi0_masks(config, *args):
    """PI0's and PI0.5's prefix, as PaliGemma's (their VLM's config), every token of type 0: one bidirectional block."""
    return _paligemma_masks(config.vlm_config, *args)


def _paligemma_refusal(config) -> Optional[str]:
    """PaliGemma 2 (a Gemma2 text model, sliding-window layers) on transformers 4.x: its base model
    hands those layers the full-length mask, which they cut to the keys they keep (the first ones,
    not the last) once a sequence outgrows the window, so its unpatched model is wrong there."""
    text = config.get_text_config()
    if release("transformers") < (5, 0) and getattr(text, "sliding_window", None) is not None:
        return (f"model: zspa_kernels.prune supports PaliGemma 2 (a {text.model_type} text model) from "
                f"transformers 5.0; this is {'.'.join(map(str, release('transformers')))}")
    return None


def _gather_positions(name: str) -> Callable[[Any], None]:
    """An ``on_prefill`` that keeps the kept positions' entries of the language model's argument
    ``name``, a tensor indexed ``(B, L, ...)`` by prompt position, as the embeddings are kept.

    Gemma4's and Gemma 3n's per-layer embeddings (PLE, ``per_layer_inputs``): the base model looks
    up a ``(num_layers, dim)`` input for every token by its id (visual placeholders as padding).
    Qwen4-Exp's (``ple_input_ids``): the prompt's ids, which its language model hashes into n-grams;
    re-padding slots are masked, and it reads them as its end-of-sequence id. Without them Gemma4's
    and Qwen4-Exp's language models would recover the ids by matching the embeddings to their
    table, which visual features never match; Gemma 3n's would leave them out."""
    def gather(prefill) -> None:
        value = prefill.kwargs.get(name)
        if value is not None:
            index = prefill.index.reshape(*prefill.index.shape, *[1] * (value.dim() - 2))
            value = value.to(prefill.index.device)
            prefill.kwargs[name] = value.gather(1, index.expand(-1, -1, *value.shape[2:]))

    return gather


def _molmo2_counts(config, inputs: dict, runs: list[int]) -> list[int]:
    """Molmo2: each image's patch tokens (both views; column tokens break them into runs), from the
    features generate() encoded (transformers 5.24+: one entry an image, or a video), else from
    ``image_grids`` (low-res then high-res rows and columns); a video (its frames, as generate()
    encodes them) is one budget."""
    for modality in ("image", "video"):
        encoded = _encoded_counts(inputs, modality)
        if encoded is not None:
            return encoded
    grids = inputs.get("image_grids")
    if inputs.get("pixel_values") is not None and grids is not None:
        return (grids[:, 0] * grids[:, 1] + grids[:, 2] * grids[:, 3]).tolist()
    grids = inputs.get("video_grids")
    if inputs.get("pixel_values_videos") is not None and grids is not None:
        return grids.prod(-1).tolist()
    raise ValueError("image_grids: required to tell where each Molmo2 image's tokens are, got None")


def _molmo2_masks(config, embeds, mask, cache, positions, token_types, slots, labelled):
    """Molmo2's mask, built as its base model builds it for the pruned layout: causal, plus one
    bidirectional block over the tokens of type 1 (every image token of a row) when the caller gives
    ``mm_token_type_ids`` at a prefill."""
    from transformers import masking_utils

    kwargs = dict(config=config.get_text_config(), inputs_embeds=embeds, attention_mask=mask, cache=cache,
                  position_ids=positions)
    if token_types is not None:
        kwargs["block_sequence_ids"] = torch.where(token_types == 1, 0, -1)
    return masking_utils.create_causal_mask(**kwargs)


def _grid_counts(config, inputs: dict, runs: list[int]) -> list[int]:
    """VideoLLaMA3: each image's token count, ``t*h*w`` patches pooled ``merge`` x ``merge``
    (its own merge size), from the features generate() encoded (5.24+) or from the grids."""
    encoded = _encoded_counts(inputs)
    if encoded is not None:
        return encoded
    grids, merges = inputs.get("image_grid_thw"), inputs.get("image_merge_sizes")
    if grids is None or merges is None:
        raise ValueError("image_grid_thw, image_merge_sizes: required to tell where each VideoLLaMA3 "
                         "image's tokens are, got None")
    return (torch.as_tensor(grids).prod(-1) // torch.as_tensor(merges) ** 2).tolist()


def _gather_moe_token_types(prefill) -> None:
    """ERNIE-4.5-VL routes each token to its text or its vision experts by ``moe_mm_token_type_ids``
    (the visual tokens and their start/end markers are vision): keep the types of the kept
    positions, as the embeddings are kept (re-padding slots are text)."""
    types = prefill.kwargs.get("moe_mm_token_type_ids")
    if types is not None:
        types = types.to(prefill.index.device).gather(1, prefill.index)
        prefill.kwargs["moe_mm_token_type_ids"] = types * prefill.valid


def _phi4_counts(config, inputs: dict, runs: list[int]) -> list[int]:
    """Phi-4-multimodal: an image is its HD crops' features (useful rows of them, each row ended by a
    separator feature), a separator, then its global view's (each row ended likewise): one run of image
    tokens and one budget, images possibly back to back. Each image's count as its image embedding
    computes it, from ``image_sizes`` (the crop grid) and the crops' ``image_attention_mask`` (the
    useful rows and columns of patches, every second one), in row-major order."""
    limit, ids = getattr(config, "original_max_position_embeddings", None), inputs.get("input_ids")
    if limit is not None and ids is not None and ids.shape[1] > limit:
        # Past it, its generate() drops a cache shorter than that and runs the whole sequence again as a
        # new prompt (its long-RoPE switch): a pruned cache stays shorter, so it would do so step after
        # step, pruning again each time by the prompt it has then.
        raise ValueError(f"input_ids: zspa_kernels.prune supports Phi-4-multimodal prompts of up to {limit} "
                         f"tokens (original_max_position_embeddings), got {ids.shape[1]}: past it, its generate() "
                         "runs the whole sequence again while its cache is shorter, which a pruned cache stays")
    sizes, masks = inputs.get("image_sizes"), inputs.get("image_attention_mask")
    if sizes is None or inputs.get("image_pixel_values") is None:
        raise ValueError("image_sizes, image_pixel_values: required to tell where each Phi-4-multimodal "
                         "image's tokens are, got None")
    vision = config.vision_config
    side = -(-(vision.image_size // vision.patch_size) // 2)  # patches per side, padded even, pooled 2x2
    masks = None if masks is None else masks.cpu()
    counts = []
    for i, (height, width) in enumerate(torch.as_tensor(sizes).view(-1, 2).tolist()):
        rows, cols = height // vision.crop_size, width // vision.crop_size
        if masks is None:
            useful_h, useful_w = rows * side, cols * side
        else:
            grid = (masks[i, 1: rows * cols + 1, 0::2, 0::2].reshape(rows, cols, side, side)
                    .transpose(1, 2).reshape(rows * side, cols * side))
            useful_h, useful_w = int(grid[:, 0].sum()), int(grid[0, :].sum())
        counts.append(useful_h * (useful_w + 1) + 1 + side * (side + 1))
    return counts


def _ids_to_embed(args: tuple, kwargs: dict) -> tuple[tuple, dict, Optional[torch.Tensor]]:
    """For a Family.embed: the call with ``input_ids`` passed by keyword, and the ids to embed; None
    where there are none, or where the call brings its embeddings (then left as it is)."""
    if args:  # input_ids given by position
        kwargs = dict(kwargs, input_ids=args[0])
        args = args[1:]
    return args, kwargs, None if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")


def _phi4_embed(model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Phi-4-multimodal's base model is its decoder: it embeds ``input_ids``, image and audio features
    merged in by its embedding extension, inside its forward. The same embedding, computed here, goes
    in as ``inputs_embeds`` (the forward then skips its own); a call that brings embeddings is left
    as it is."""
    args, kwargs, ids = _ids_to_embed(args, kwargs)
    if ids is None:
        return args, kwargs
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers 4.x
        maybe_install_capturing_hooks = None
    if maybe_install_capturing_hooks is not None and any(
            kwargs.get(f"output_{k}", getattr(model.config, f"output_{k}", False)) for k in ("hidden_states", "attentions")):
        # As its forward does before it embeds anything: its output-capturing hooks, the vision tower's with
        # them (installed after the tower's own, transformers 5.24 installs those twice).
        maybe_install_capturing_hooks(model)
    embeds = model.embed_tokens_extend(
        ids, model.embed_tokens(ids), image_pixel_values=kwargs.get("image_pixel_values"),
        audio_input_features=kwargs.get("audio_input_features"), image_sizes=kwargs.get("image_sizes"),
        image_attention_mask=kwargs.get("image_attention_mask"), audio_embed_sizes=kwargs.get("audio_embed_sizes"),
        audio_attention_mask=kwargs.get("audio_attention_mask"))
    kwargs["input_ids"], kwargs["inputs_embeds"] = None, embeds
    return args, kwargs


def _grid_token_counts(family: str, merge: Callable[[Any], int] = lambda config: 1, modality: str = "image"):
    """Each image's (``modality="video"``: each video's) tokens: ``t*h*w`` of its grid, divided by
    ``merge(config)`` squared (the patches merged into a token), from the features generate() encoded
    (5.24+, one entry an image or video) or from ``image_grid_thw`` (``video_grid_thw``). Inkling2 counts
    its grids in language model tokens; Dots3-Note in patches."""
    def counts(config, inputs: dict, runs: list[int]) -> list[int]:
        encoded = _encoded_counts(inputs, modality)
        if encoded is not None:
            return encoded
        grids = inputs.get(f"{modality}_grid_thw")
        if grids is None:
            raise ValueError(f"{modality}_grid_thw: required to tell where each {family} {modality}'s tokens are, "
                             "got None")
        return (torch.as_tensor(grids).prod(-1) // merge(config) ** 2).tolist()

    return counts


def _chameleon_embed(model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Chameleon's base model is its decoder: inside its forward it embeds ``input_ids`` and writes
    each image's VQ codes, embedded by the same table, over the image placeholders. The same
    embedding, computed here, goes in as ``inputs_embeds``, the image inputs taken out (the forward
    would merge them again); a call that brings embeddings is left as it is."""
    args, kwargs, ids = _ids_to_embed(args, kwargs)
    if ids is None:
        return args, kwargs
    embeds = model.embed_tokens(ids)
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")  # generate() encoded them (5.24+)
    if encoded is not None:
        features = encoded.pooler_output
    elif kwargs.get("pixel_values") is not None:
        features = model.get_image_features(kwargs["pixel_values"])
        features = getattr(features, "pooler_output", features)  # transformers 4.x: the tensor itself
    else:
        features = None
    if features is not None:
        mask = model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
        embeds = embeds.masked_scatter(mask, features.to(embeds.device, embeds.dtype))
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "mm_encoder_outputs")}
    kwargs["input_ids"], kwargs["inputs_embeds"] = None, embeds
    return args, kwargs


def _unnamed_vision_markers(config) -> bool:
    """EXAONE 4.5 and HyperCLOVAX vision v2: their chat templates write ``<|vision_start|>``/``<|vision_end|>``
    around every image's and video's pads, which their config classes do not name (they hold the pads' ids
    alone). Checkpoints whose configs give the markers' ids beside them (``vision_start_token_id`` and
    ``vision_end_token_id``, or ``image_start_token_id`` and ``image_end_token_id``) name them."""
    return not any(getattr(config, f"{kind}_start_token_id", None) is not None
                   and getattr(config, f"{kind}_end_token_id", None) is not None for kind in ("vision", "image"))


def _pixtral_tower(config) -> bool:
    """LLaVA checkpoints on a Pixtral tower (Pixtral-12B): their processor ends each row of image tokens
    with ``[IMG_BREAK]`` and the image with ``[IMG_END]``, which the config does not name."""
    return getattr(getattr(config, "vision_config", None), "model_type", None) == "pixtral"


FAMILIES: tuple[Family, ...] = (
    Family("LLaVA-1.5", ("llava",), image_token_counts=_tower_counts, unnamed_markers=_pixtral_tower),
    # LLaVA-1.5's layout; its projector reads several tower layers.
    Family("VipLLaVA", ("vipllava",), image_token_counts=_tower_counts),
    # LLaVA's layout; a convolutional tower (FastViTHD) of a fixed token count an image.
    Family("FastVLM", ("fast_vlm",), image_token_counts=_tower_counts),
    Family("Mistral3", ("mistral3",), unnamed_markers=True, image_token_counts=_tower_counts),
    # Ovis2: each tile of an image (and its global view) is a run between the visual indicator
    # markers, and its own budget (like Idefics3); the markers are embedded from the visual table.
    Family("Ovis2", ("ovis2",)),
    # LightOnOCR: Mistral3's Pixtral tower and patch merger, no row breaks between an image's tokens.
    Family("LightOnOCR", ("lighton_ocr",), image_token_counts=_tower_counts),
    # Aria: an image's crops are one run of image tokens, a fixed count each (its projector's queries):
    # each crop its own budget. Its MoE text model's routers need nothing of the hooks. Its chat template
    # writes <fim_prefix><|img|><fim_suffix>, markers no config names.
    Family("Aria", ("aria",), unnamed_markers=True, image_token_counts=_tower_counts),
    # GOT-OCR2 (and PP-Chart2Table, its model under a config of its own): an image's crops (a multi-page
    # prompt's pages) are one run between <img> markers, a fixed count each: each crop its own budget.
    Family("GOT-OCR2", ("got_ocr2", "pp_chart2table"), unnamed_markers=True, image_token_counts=_tower_counts),
    # DeepSeek-VL (Hybrid: a second, high-resolution tower's features in the same tokens): a fixed count
    # an image, no markers of its own around it.
    Family("DeepSeek-VL", ("deepseek_vl", "deepseek_vl_hybrid"), image_token_counts=_tower_counts),
    # Janus (understanding: text out): each image between begin/end-of-image markers, one run.
    Family("Janus", ("janus",), unnamed_markers=True),
    # Granite-Docling: Idefics3's page layout (each tile, the thumbnail too, a run after its markers: its
    # own budget, of either connector path's count) around a Granite text model that adds a feature map
    # of some tower layers to the image tokens after its first layers (Qwen3-VL's deepstack, gathered).
    Family("Granite-Docling", ("granite_docling",), unnamed_markers=True,
           lm_attr="text_model", on_prefill=_gather_deepstack),
    # Mistral Large 4: Mistral3's layout around a text model whose sparse attention picks each query's
    # keys among the cached ones (the kept tokens) and whose queries are scaled by their positions (kept
    # original); its wrapper returns the router logits without a loss.
    Family("Mistral Large 4", ("mistral_large4",), unnamed_markers=True, image_token_counts=_tower_counts),
    # Step3p7: an image's local crops, then its global view, each a run between markers of its own, and its
    # own budget; Step3.5's text model (sliding windows that count cache slots, MoE without a loss).
    Family("Step3p7", ("step3p7",), unnamed_markers=True),
    # Qianfan-OCR: InternVL's model classes and layout (all of an image's tiles one run between <img>
    # markers: one budget), a Qwen3 text model.
    Family("Qianfan-OCR", ("qianfan_ocr",), unnamed_markers=True),
    # DeepSeek-OCR-2: an image's local crops, global view and view separator are one run of image tokens
    # without markers, of a count per image: each run one image, text between images.
    Family("DeepSeek-OCR-2", ("deepseek_ocr2",), image_token_counts=_one_run_per_image),
    # HY-V4-VL: Qwen2-VL's layout (each image, each video, one run between markers; a newline feature
    # ends each merged row) and 3-D positions; its sparse attention picks each query's keys among the
    # cached (kept) ones.
    Family("HY-V4-VL", ("hy_v4_vl",), unnamed_markers=True, visual_token_attrs=("image_token_id", "video_token_id")),
    # Any-resolution: counts differ per image; each run of image tokens is one image.
    Family("LLaVA-NeXT", ("llava_next",), image_token_counts=_one_run_per_image),
    # LLaVA-NeXT's any-resolution layout (a window Q-Former downsamples each tile); the image
    # tokens' embeddings are zero, their features added inside the language model at the layers
    # of its deepstack map (gathered for the kept tokens; selected by the earliest layer's).
    Family("Granite 4 Vision", ("granite4_vision",), image_token_counts=_one_run_per_image,
           on_prefill=_gather_granite, select_on=_granite_features),
    Family("LLaVA-OneVision", ("llava_onevision",), visual_token_attrs=("image_token_id", "video_token_id"),
           image_token_counts=_onevision_image_counts,
           video_token_counts=lambda config, inputs, runs: _one_run_per_image(config, inputs, runs, ("video",))),
    # LLaVA-NeXT's images; a video's frames, pooled, form one run of video tokens with no marker
    # between frames (as in LLaVA-OneVision): one budget per video.
    Family("LLaVA-NeXT-Video", ("llava_next_video",), visual_token_attrs=("image_token_id", "video_token_id"),
           image_token_counts=_one_run_per_image),
    # Video-LLaVA: an image drops the class token ("default" strategy); each video frame is a whole
    # CLIP output (class token kept) and its own budget: the frames are encoded as images and the
    # fixed counts tell them apart, where a video's frame count is not known to the hooks
    # (transformers 5.24's generate() passes the frames encoded and flattened).
    Family("Video-LLaVA", ("video_llava",), visual_token_attrs=("image_token_id", "video_token_id"),
           image_token_counts=_fixed_counts(
               lambda config: _clip_tokens(config) - (config.vision_feature_select_strategy == "default")),
           video_token_counts=_fixed_counts(_clip_tokens)),
    # PerceptionLM: an image's thumbnail and tiles, a video's frames, all one run without markers;
    # each crop its own budget, as only the crops' count is known to the hooks wherever the inputs
    # come from (5.24's generate() passes them encoded, without the images' boundaries).
    Family("PerceptionLM", ("perception_lm",), visual_token_attrs=("image_token_id", "video_token_id"),
           image_token_counts=_per_tile("pixel_values", "image"),
           video_token_counts=_per_tile("pixel_values_videos", "video")),
    # Qwen's rope_deltas stay as computed: decode positions come from generate() (original
    # numbering), or from the hooks when a caller passes none, never from cache slots.
    Family("Qwen2-VL", ("qwen2_vl",), visual_token_attrs=("image_token_id", "video_token_id")),
    Family("Qwen2.5-VL", ("qwen2_5_vl",), visual_token_attrs=("image_token_id", "video_token_id")),
    # LLaVA-OneVision-1.5: Qwen2-VL's layout (a run an image or video) into a Qwen3 text model on 1-D
    # positions, numbered by the hooks as LLaVA's are.
    Family("LLaVA-OneVision-1.5", ("llava_onevision1_5",), visual_token_attrs=("image_token_id", "video_token_id")),
    # Ovis2.5: the same layout with image and video markers of their own, embedded from the visual
    # vocabulary's indicator rows (kept as text).
    Family("Ovis2.5", ("ovis2_5",), visual_token_attrs=("image_token_id", "video_token_id")),
    Family("Qwen3-VL", ("qwen3_vl",), visual_token_attrs=("image_token_id", "video_token_id"),
           on_prefill=_gather_deepstack, video_spans=_timed_video_spans),
    Family("Qwen3-VL-MoE", ("qwen3_vl_moe",), visual_token_attrs=("image_token_id", "video_token_id"),
           on_prefill=_gather_deepstack, router_loss=(0, 0), video_spans=_timed_video_spans),
    # Qwen3.5: Qwen3-VL's layout without the deepstack; three in four text layers are gated
    # DeltaNet, whose recurrent state simply runs over the kept tokens.
    Family("Qwen3.5", ("qwen3_5",), visual_token_attrs=("image_token_id", "video_token_id"),
           video_spans=_timed_video_spans),
    Family("Qwen3.5-MoE", ("qwen3_5_moe",), visual_token_attrs=("image_token_id", "video_token_id"),
           router_loss=(0, 0), video_spans=_timed_video_spans),
    # The Qwen Omni thinkers (the text generators; a full model's text generate() is its thinker's):
    # Qwen2.5-VL's (Qwen3-VL's, deepstack included) images and videos; audio tokens are kept whole,
    # like text. TMRoPE's positions (a video's frames numbered by time, interleaved with its audio
    # track's chunks under use_audio_in_video) are gathered as computed. The thinker merges the
    # features itself and runs its decoder (.model) before transformers 5.24, whose thinker has a base
    # model (.model.language_model).
    Family("Qwen2.5-Omni", ("qwen2_5_omni_thinker",), lm_attr=("language_model", "model"),
           visual_token_attrs=("image_token_id", "video_token_id"), run_joiners=("audio_token_id",)),
    Family("Qwen3-Omni-MoE", ("qwen3_omni_moe_thinker",), lm_attr=("language_model", "model"),
           visual_token_attrs=("image_token_id", "video_token_id"), on_prefill=_gather_deepstack,
           router_loss=(0, 0), run_joiners=("audio_token_id",)),
    # Video frames are images (image token id, own markers): one budget per frame.
    Family("GLM-4V", ("glm4v",), video_spans=_marked_video_spans),
    # GLM-4.1V's vision tower, token layout and 3-D positions around a MoE text model (GLM-4.5-Air's),
    # whose routers need nothing of the hooks. GLM-4.6V: GLM-4.1V's model classes around the text
    # model its config names (dense or MoE); a ``glmga`` config is served by the same classes.
    # transformers 4.57's GLM-4.5V takes output_router_logits, and neither returns them nor computes a loss.
    Family("GLM-4.5V", ("glm4v_moe",), router_loss=(5, 0), video_spans=_marked_video_spans),
    Family("GLM-4.6V", ("glm46v", "glmga"), video_spans=_marked_video_spans),
    # GLM-OCR: GLM-4.1V's model classes and layout (images only), a tower of its own.
    Family("GLM-OCR", ("glm_ocr",)),
    # ERNIE-4.5-VL: Qwen2-VL's layout (markers around each image or video, a video's frames merged in
    # pairs: one run, one budget) and 3-D positions; its MoE layers route by token type (gathered).
    # Its chat template writes "Picture N:" before each image and "Video N:" before each video: the image's
    # or video's label, no question text (with a tokenizer, decoded).
    Family("ERNIE-4.5-VL", ("ernie4_5_vl_moe",), visual_token_attrs=("image_token_id", "video_token_id"),
           on_prefill=_gather_moe_token_types, router_loss=(0, 0), video_spans=_labelled_frame_spans(MEDIA_LABEL),
           frame_token_attr=None),
    # PaddleOCR-VL: Qwen2-VL's image layout and 3-D positions (images only).
    Family("PaddleOCR-VL", ("paddleocr_vl",)),
    # HunYuan-VL (images only): each image one run of image tokens (its begin, end and row-newline
    # features included) between markers; 4-D M-RoPE positions (sequence, width, height, image index).
    Family("HunYuan-VL", ("hunyuan_vl",)),
    # VideoLLaMA3: 1-D positions; images may stand back to back (counts from their grids), each video
    # frame is a run after its timestamp and its own budget.
    Family("VideoLLaMA3", ("video_llama_3",), visual_token_attrs=("image_token_id", "video_token_id"),
           image_token_counts=_grid_counts, video_token_counts=lambda config, inputs, runs: runs,
           video_spans=_stamped_video_spans(TIME_SECONDS_COLON, _video_llama3_tokens)),
    # EXAONE 4.5: Qwen2.5-VL's layout around an EXAONE 4 text model with 1-D positions, whose
    # sliding windows count cache slots (a pruned prompt's windows are of kept tokens). Its template's vision
    # markers are named where a checkpoint's config gives their ids (its config class holds the pads' alone).
    Family("EXAONE 4.5", ("exaone4_5",), unnamed_markers=_unnamed_vision_markers,
           visual_token_attrs=("image_token_id", "video_token_id")),
    # Each tile is a run between tile markers, and its own budget (like Idefics3). Aya Vision's processor
    # labels each tile in text ("TILE_2"): the tile's, with a tokenizer (decoded); a question written before
    # its image was replaced by the labels after its first tile.
    Family("Aya Vision", ("aya_vision",), unnamed_markers=True, image_token_counts=_tower_counts,
           video_spans=_labelled_frame_spans(TILE_LABEL)),
    Family("Cohere2 Vision", ("cohere2_vision",), unnamed_markers=True, image_token_counts=_tower_counts),
    # <img> ... </img> around each image (all its tiles: one budget); video frames are images, each
    # after its "FrameN:" label.
    Family("InternVL", ("internvl",), unnamed_markers=True, video_spans=_labelled_frame_spans(FRAME_LABEL)),
    # Each crop of a split image (and its global view) is its own run and budget; SmolVLM's video frames
    # are images, each after its "Frame from MM:SS:" label.
    Family("Idefics2", ("idefics2",), unnamed_markers=True, lm_attr="text_model",
           image_token_counts=_fixed_counts(lambda config: config.perceiver_config.resampler_n_latents)),
    Family("Idefics3/SmolVLM", ("idefics3", "smolvlm"), unnamed_markers=True, lm_attr="text_model",
           image_token_counts=_fixed_counts(_idefics3_tile_tokens), video_spans=_labelled_frame_spans(FRAME_FROM)),
    # Each tile of a split image (and its thumbnail) is a run between markers: its own budget; without
    # the markers (use_image_special_tokens=False) the crops' spatial_shapes tell them apart.
    # transformers 4.57 names it "lfm2-vl" (and so do checkpoints saved with it), and keeps the
    # convolution states in a cache class of its own that is no transformers Cache; from 5.0 the
    # DynamicCache of its config holds them.
    Family("LFM2-VL", ("lfm2_vl", "lfm2-vl"), unnamed_markers=True,
           image_token_counts=_cell_counts("LFM2-VL", "crop", "spatial_shapes", lambda c: c.downsample_factor),
           min_transformers=(5, 0)),
    # An image is its thumbnail between image markers, then its slices (tiles) between slice markers;
    # a video frame is a thumbnail (and slices) of video tokens: each crop a run, and its own budget
    # (as Idefics3's tiles). Qwen3.5's text model, on 1-D positions (MiniCPM-OCR: 4.6's model, "4x"
    # by default); MiniCPM-V 4.7's canvas M-RoPE positions are Qwen's: computed before the hooks, kept.
    # Each image's number before it (<image_id>0</image_id>) is named by the tokenizer alone: 4.7 too
    # writes markers no config names.
    Family("MiniCPM-V 4.6", ("minicpmv4_6", "minicpm_ocr"), unnamed_markers=True,
           visual_token_attrs=("image_token_id", "video_token_id"), video_spans=_image_id_spans, frame_token_attr=None),
    Family("MiniCPM-V 4.7", ("minicpmv4_7",), unnamed_markers=True, visual_token_attrs=("image_token_id", "video_token_id"),
           video_spans=_image_id_spans, frame_token_attr=None),
    # An image is its low-res view then its high-res one, each row of patch tokens ended by a column
    # token: one budget an image (both views), as generate() passes the images encoded, one entry an
    # image. A video (its frames with the image patch token, each after its time) is one budget. Every
    # image token of a row is in one bidirectional block (mm_token_type_ids).
    Family("Molmo2", ("molmo2",), image_token_counts=_molmo2_counts, build_mask=_molmo2_masks,
           token_types_arg="mm_token_type_ids", typed_markers=True, video_spans=_molmo2_video_spans,
           frame_token_attr=None),
    # LFM3-VL: Qwen3-VL's token layout (each video frame in its own markers) on 1-D positions; its
    # text model's short convolutions run over the kept tokens, its sliding windows count cache slots.
    Family("LFM3-VL", ("lfm3_vl",), visual_token_attrs=("image_token_id", "video_token_id"),
           video_spans=_timed_video_spans),
    # Kimi-K2.5: each image, and each chunk of video frames (after its timestamp), between media
    # markers: one run and budget each; DeepSeek-V3's text model on 1-D positions.
    Family("Kimi-K2.5", ("kimi_k25",), visual_token_attrs=("image_token_id", "video_token_id"),
           video_spans=_kimi_k25_spans, frame_token_attr=None),
    # MiniMax-M3-VL: Qwen3-VL's token layout (each image, each video frame after its timestamp, between
    # start/end markers its config does not name) on 1-D positions; its sparse attention layers count
    # cache slots (slot_position_modules).
    Family("MiniMax-M3-VL", ("minimax_m3_vl",), visual_token_attrs=("image_token_id", "video_token_id"),
           video_spans=_stamped_video_spans(BRACKET_SECONDS), unnamed_markers=True,
           slot_position_modules=_indexed_attention, router_loss=(5, 24)),
    # Cosmos3-Omni's reasoner: Qwen3-VL's model classes (deepstack features included) and processor (timed frames).
    Family("Cosmos3-Omni", ("cosmos3_omni",), visual_token_attrs=("image_token_id", "video_token_id"),
           on_prefill=_gather_deepstack, video_spans=_timed_video_spans),
    # Qwen4-Exp: Qwen3.5-MoE's layout around a text model whose per-layer embeddings (PLE) hash each
    # token's id with those of the tokens before it: the base model passes the ids beside the embeddings
    # (ple_input_ids, gathered: the kept tokens' n-grams are of the kept tokens before them). Its
    # indexed-attention layers pick key blocks among the kept tokens and number them by the original positions.
    Family("Qwen4-Exp", ("qwen4_exp",), visual_token_attrs=("image_token_id", "video_token_id"),
           on_prefill=_gather_positions("ple_input_ids"), router_loss=(0, 0), video_spans=_timed_video_spans),
    # Cosmos3-Edge: Qwen2-VL's model classes around a packed SigLIP2 tower and a Llama text model on
    # M-RoPE; each video frame between its own markers (after a timestamp), one run and budget each.
    Family("Cosmos3-Edge", ("cosmos3_edge",), visual_token_attrs=("image_token_id", "video_token_id"),
           video_spans=_timed_video_spans),
    # HyperCLOVAX-SEED vision v2: EXAONE 4.5's layout (Qwen2.5-VL's tokens, 1-D positions) around a
    # HyperCLOVAX text model, and EXAONE 4.5's vision markers (unnamed by its config class).
    Family("HyperCLOVAX vision v2", ("hyperclovax_vision_v2",), unnamed_markers=_unnamed_vision_markers,
           visual_token_attrs=("image_token_id", "video_token_id")),
    # Cohere Compass: Qwen3-VL's model classes (deepstack features included) around a Cohere2 text model,
    # whose sliding windows count cache slots (a pruned prompt's windows are of kept tokens).
    Family("Cohere Compass", ("cohere_compass",), visual_token_attrs=("image_token_id", "video_token_id"),
           on_prefill=_gather_deepstack, video_spans=_timed_video_spans),
    # GLM-5-Next: GLM-4.6V's layout (video frames are images between begin/end-of-video markers: one
    # budget a frame) around a text model without positions, whose linear-attention state and indexer run
    # over the kept tokens; its MoE routers need nothing of the hooks.
    Family("GLM-5-Next", ("glm5_next",), router_loss=(0, 0), video_spans=_marked_video_spans),
    # ShieldGemma 2 is a Gemma3 model under a config of its own, inside an image classifier (which
    # reads the last position's yes/no logits): there the hooks' base model is the Gemma3 wrapper.
    # With pan-and-scan, its processor writes a sentence before the whole view and one before the crops:
    # the image's, with a tokenizer (decoded); a question written before the image was replaced by the second.
    Family("Gemma3", ("gemma3", "shieldgemma2"), lm_attr=("language_model", "model.language_model"),
           image_token_counts=_fixed_counts(lambda config: config.mm_tokens_per_image),
           build_mask=_gemma3_masks, passes_mask_dicts=True, video_spans=_labelled_frame_spans(PAN_AND_SCAN)),
    # PaliGemma and PaliGemma 2: every image ahead of the prompt, back to back, a fixed count each.
    Family("PaliGemma", ("paligemma",), typed_answers=True,
           image_token_counts=_fixed_counts(lambda config: config.text_config.num_image_tokens),
           build_mask=_paligemma_masks, refuse_config=_paligemma_refusal),
    # Each image (each video frame, after its "MM:SS" timestamp) between its own begin/end-of-image
    # markers: one run each.
    Family("Gemma4", ("gemma4",), visual_token_attrs=("image_token_id", "video_token_id"),
           on_prefill=_gather_positions("per_layer_inputs"), build_mask=_gemma4_masks, passes_mask_dicts=True,
           token_types_arg="mm_token_type_ids",
           video_spans=_stamped_video_spans(MINUTES_SECONDS)),
    # Each image between begin/end-of-image markers, a fixed count; audio (a tower of its own) is kept
    # whole. Per-layer inputs gathered as Gemma4's; causal masks, the language model's own.
    Family("Gemma 3n", ("gemma3n",),
           image_token_counts=_fixed_counts(lambda config: config.vision_soft_tokens_per_image),
           on_prefill=_gather_positions("per_layer_inputs")),
    # Gemma 4's token layout, encoder-free (a soft token a merged patch), without per-layer inputs.
    Family("Gemma 4 Unified", ("gemma4_unified",), visual_token_attrs=("image_token_id", "video_token_id"),
           build_mask=_gemma4_unified_masks, passes_mask_dicts=True, token_types_arg="mm_token_type_ids",
           video_spans=_stamped_video_spans(MINUTES_SECONDS)),
    # DiffusionGemma: Gemma 4's images between begin/end-of-image markers, one run each, read by an encoder
    # that prefills the cache; its decoder denoises each canvas over it (Family.block_diffusion).
    Family("DiffusionGemma", ("diffusion_gemma",), lm_attr="encoder.language_model", block_diffusion=True,
           build_mask=_diffusion_gemma_masks, token_types_arg="mm_token_type_ids"),
    # T5Gemma 2: Gemma3's images (each between begin/end-of-image markers: one run) in the prompt that its
    # encoder reads bidirectionally; the decoder cross-attends to the encoder's output (Family.encoder_decoder).
    Family("T5Gemma 2", ("t5gemma2",), lm_attr="encoder.text_model", encoder_decoder=True),
    # Florence-2: an image's run of tokens (its patches and their mean) before the prompt, merged by the
    # model into the embeddings its BART encoder reads bidirectionally; the decoder cross-attends to the
    # encoder's output (Family.encoder_decoder).
    Family("Florence-2", ("florence2",), lm_attr="language_model.encoder", encoder_decoder=True,
           refuse_config=lambda config: None if getattr(config, "image_token_id", None) is not None else (
               "model: zspa_kernels.prune supports transformers' own Florence-2 (Florence2ForConditionalGeneration, "
               "transformers 4.56+; checkpoints such as florence-community/Florence-2-large); this config names no "
               "image_token_id, as the remote code of microsoft/Florence-2-* (trust_remote_code=True) does not: it "
               "puts the image features in front of the text, with no image tokens in input_ids to find them by")),
    # PI0 and PI0.5 (Physical Intelligence's vision-language-action models): PaliGemma's prefix (each camera's image, a fixed
    # count, back to back; then the task) prefilled once by the VLM, whose cache a flow-matching action expert
    # reads at every denoising step (Family.action_expert). A camera is an image: one budget each. PI0.5's
    # processor writes template words and the robot's state around the task: no question (with a tokenizer).
    Family("PI0/PI0.5", ("pi0", "pi05"), lm_attr="vlm.language_model", visual_token_attrs=("vlm_config.image_token_id",),
           image_token_counts=_fixed_counts(lambda config: config.vlm_config.text_config.num_image_tokens),
           build_mask=_pi0_masks, action_expert=True, video_spans=_pi05_template_spans),
    # Phi-4-multimodal: its base model is its decoder, which embeds the image and audio features itself
    # (computed ahead by the hooks: Family.embed). Each image (HD crops, a separator, the global view) is
    # one run and budget; audio tokens are kept whole, like text.
    Family("Phi-4-multimodal", ("phi4_multimodal",), lm_attr="",
           visual_token_attrs=("vision_config.image_token_id",), image_token_counts=_phi4_counts,
           embed=_phi4_embed),
    # Nemotron-H Omni: no base model (as Llama 4): the wrapper merges the features and calls its causal LM,
    # whose decoder (Mamba-2, attention and MoE layers) the hooks run; each image between <img> markers, one
    # run and budget. A video's tubelets are images to its processor (the image token, each after its label:
    # no question text). Its own video pruning (EVS) drops video tokens inside the wrapper: refused.
    Family("Nemotron-H Omni", ("nemotron_h_omni",), unnamed_markers=True,
           lm_attr="language_model.model", frame_token_attr=None,
           video_spans=_labelled_frame_spans(TUBELET_LABEL, TUBELET_WINDOW),
           refuse_config=lambda config: None if not getattr(config, "video_pruning_rate", 0) else (
               "model: zspa_kernels.prune cannot prune Nemotron-H Omni with video_pruning_rate="
               f"{config.video_pruning_rate}: its own video pruning drops tokens inside the model, after the "
               "inputs the hooks read; set video_pruning_rate=0.0")),
    # Each tile of an image (and its global view) is a run between separators: its own budget. The
    # separators and the image marker before the global view stand between the begin/end-of-image
    # markers the config names: the image's, no question text, with or without a tokenizer.
    # No base model: the wrapper merges the image features and calls its causal LM, whose
    # decoder the hooks run. Chunked attention and the NoPE layers' temperature tuning number the
    # cache slots (the kept tokens), RoPE the original positions. transformers 5.24's wrapper reads
    # image_outputs from its causal LM's output, which has none: its forward fails, pruned or not
    # (5.25 reads them only where they are there).
    Family("Llama 4", ("llama4",), lm_attr="language_model.model",
           video_spans=_marked_spans("boi_token_index", "eoi_token_index"), frame_token_attr=None,
           broken_in=((5, 24), (5, 25), "its Llama4ForConditionalGeneration.forward fails unpatched (it reads "
                                        "image_outputs from its causal LM's output, which has none); "
                                        "use transformers 4.57 to 5.17, or 5.25 on")),
    # Apertus 1.5: a VQ tokenizer's image codes are ids of the text vocabulary, embedded by its table;
    # each image between begin/end-of-image markers, a row of codes per line, lines joined by end-of-line
    # tokens: one budget an image (its size says how many codes), audio codes kept whole.
    Family("Apertus 1.5", ("apertus1p5",), unnamed_markers=True, video_spans=_labelled_frame_spans(GRID_SIZE),
           image_token_counts=_cell_counts("Apertus 1.5", "image", "image_sizes",
                                           lambda c: c.vision_config.spatial_scale_factor), min_transformers=(5, 24)),
    # Chameleon: each image a fixed grid of VQ codes, ids of the text vocabulary embedded by its table,
    # written over placeholders between begin/end-of-image markers; its base model is its decoder and
    # embeds them itself (Family.embed). Query/key norms and the swin-norm variant run inside the layers.
    Family("Chameleon", ("chameleon",), unnamed_markers=True, lm_attr="", embed=_chameleon_embed),
    # Emu3: each image its VQ codes, a line per row, each line ended by an end-of-line token, all written
    # over the image placeholders between markers (the end-of-line tokens are placeholders too: visual
    # tokens, as LLaVA-NeXT's newline features); the base model passes them to its text model.
    # transformers 4.57's wrapper does not pass the images to its base model: its placeholders stay
    # placeholders, unpatched (nothing to prune, nor to test the hooks against).
    Family("Emu3", ("emu3",), unnamed_markers=True, lm_attr="text_model", min_transformers=(5, 0),
           video_spans=_labelled_frame_spans(GRID_SIZE)),
    # Muse Glimmer: each image between image markers, one run; a video's temporal groups each a run after
    # its timestamp (one budget each); 1-D positions; sliding windows that count cache slots, NoPE layers.
    Family("Muse Glimmer", ("muse_glimmer",), unnamed_markers=True,
           visual_token_attrs=("image_token_id", "video_token_id"),
           video_spans=_stamped_video_spans(TIME_SECONDS)),
    # Muse Spark: Muse Glimmer's layout around a MoE text model (its wrapper returns the router logits
    # without a loss); audio tokens kept whole.
    Family("Muse Spark", ("muse_spark",), unnamed_markers=True, visual_token_attrs=("image_token_id", "video_token_id"),
           min_transformers=(5, 24), video_spans=_stamped_video_spans(TIME_SECONDS)),
    # Inkling: each image a run of its patch tokens after an image-begin marker (no marker ends it); its
    # text model's short convolutions and relative-position logits run over cache slots (the kept tokens);
    # the hooks pass its language model the 2-D mask, from which it builds its masks (full, sliding,
    # recurrent) for the kept tokens, in place of those its base model built. Audio tokens kept whole.
    Family("Inkling", ("inkling_mm_model",)),
    # Inkling2: each image a run of image tokens without markers, back to back or not (counted from
    # image_grid_thw); its queries are log-scaled by their (original) positions. Inkling2-Loop: its
    # layout and classes, its looped layers run again on cache layers of their own.
    Family("Inkling2", ("inkling2", "inkling2_loop"), image_token_counts=_grid_token_counts("Inkling2"),
           min_transformers=(5, 24)),
    # Fuyu: no vision tower (a linear layer embeds each patch); an image's rows of patch tokens each end
    # with a newline token (text): one budget an image, as many tokens as its patches.
    Family("Fuyu", ("fuyu",), unnamed_markers=True, image_token_counts=_fuyu_counts,
           video_spans=_fuyu_newline_spans),
    # UnlimitedOCR: DeepSeek-OCR-2's layout (an image's crops, global view and view separator one run, each
    # row of a view's features ended by a newline feature) around a text model whose reference sliding window
    # attention keeps the prompt's tokens (the kept ones) and slides over the generated ones.
    Family("UnlimitedOCR", ("unlimited_ocr",), image_token_counts=_one_run_per_image, on_prefill=_reference_prefill),
    # Dots3-Note: Qwen2-VL's grids with 1-D positions and no markers in its processor (images back to back are one
    # run, and so are videos: each counted by its grid; a video is one budget), around a latent-attention text
    # model whose DeepSeek indexer and sliding windows run over the kept tokens; its audio tokens are kept whole,
    # like text.
    Family("Dots3-Note", ("dots3_note",), unnamed_markers=True, visual_token_attrs=("image_token_id", "video_token_id"),
           image_token_counts=_grid_token_counts("Dots3-Note", lambda config: config.vision_config.spatial_merge_size),
           video_token_counts=_grid_token_counts("Dots3-Note", lambda config: config.vision_config.spatial_merge_size,
                                                 "video")),
    # Llama 3.2 Vision: one <|image|> token in the text marks an image; its tiles' features are the keys
    # and values of the text model's cross-attention layers (cross_attention.py). Each image is a budget.
    Family("Llama 3.2 Vision", ("mllama",), visual_token_attrs=("image_token_index",), cross_attention=True),
)


def find_family(model: torch.nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            refusal = family.refusal(model.config)
            if refusal is not None:
                raise ValueError(refusal)
            return family
    thinker = getattr(model, "thinker", None)
    thinker_type = getattr(getattr(thinker, "config", None), "model_type", None)
    if any(thinker_type in family.model_types for family in FAMILIES):
        # A Qwen Omni model: its generate() runs the thinker for the text, then the talker reads the
        # thinker's hidden state at every prompt position to speak it, which a pruned prefill drops.
        raise ValueError(
            f"model: zspa_kernels.prune prunes the thinker of {type(model).__name__}: prune(model.thinker, ...) "
            "and generate text only (return_audio=False or generation_mode=\"text\", as the release names it); "
            "its talker reads the thinker's hidden state at every prompt position, which pruning drops")
    names = ", ".join(f.name for f in FAMILIES)
    raise ValueError(
        f"model: zspa_kernels.prune supports {names}; got model_type={model_type!r} "
        f"({type(model).__name__})"
    )


def split_model(model: torch.nn.Module, family: Family) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(base, language_model)``: the module that merges visual features into the
    embeddings, and the text decoder it calls. Accepts the ``...ForConditionalGeneration``
    wrapper or the base model itself."""
    # The wrapper first: in transformers 4.x it also exposes .language_model, as a property.
    paths = (family.lm_attr,) if isinstance(family.lm_attr, str) else family.lm_attr

    def lm_of(module):
        for path in paths:
            if not path:
                return module
            found = module
            for name in path.split("."):
                found = getattr(found, name, None)
            if isinstance(found, torch.nn.Module):
                return found
        return None

    inner = getattr(model, "model", None)
    base = inner if isinstance(inner, torch.nn.Module) and lm_of(inner) is not None else model
    lm = lm_of(base)
    if lm is None:
        where = " or ".join(f".{p} (or .model.{p})" for p in paths)
        raise ValueError(f"model: expected a {family.name} model with {where}, got {type(model).__name__}")
    return base, lm


# Config keys that name a token id: ``*_token_id``/``*_token_index``/``*_token_ids``, and the
# marker ids some configs name otherwise (HunYuan-VL's ``im_start_id``/``im_end_id``/``im_newline_id``,
# MiniCPM-V 4.7's ``image_start_id``/``slice_end_id``/``newline_id``, Molmo2's ``image_patch_id``).
# Never a bare ``*_id``: ``insert_layer_id`` and its like are layer numbers.
TOKEN_ID_KEYS = ("token_id", "token_index", "token_ids", "_start_id", "_end_id", "newline_id", "_patch_id")


def special_token_ids(config) -> set[int]:
    """Every token id the config tree names (:data:`TOKEN_ID_KEYS`, and lists of them):
    bos/eos/pad, image/video placeholders, vision start/end markers, image boundaries."""
    found: set[int] = set()
    seen: set[int] = set()

    def visit(cfg) -> None:
        if id(cfg) in seen:
            return
        seen.add(id(cfg))
        for key, value in vars(cfg).items():
            if key.endswith(TOKEN_ID_KEYS):
                values = value if isinstance(value, (list, tuple)) else [value]
                found.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
                visit(value)
        for attr in ("image_token_id", "video_token_id"):  # attribute_map aliases
            value = getattr(cfg, attr, None)
            if isinstance(value, int):
                found.add(value)

    visit(config)
    return found


def text_tokenizer(tokenizer):
    """``tokenizer`` itself, or the tokenizer a processor holds (``.tokenizer``)."""
    if not hasattr(tokenizer, "all_special_ids") and hasattr(tokenizer, "tokenizer"):
        return tokenizer.tokenizer
    return tokenizer


def tokenizer_special_ids(tokenizer) -> set[int]:
    """The special token ids of a transformers tokenizer, or of the one a processor holds
    (``.tokenizer``): ``all_special_ids`` (named and extra special tokens) and every added
    token marked special, where checkpoints put image markers they name nowhere else
    (Idefics3's ``<fake_token_around_image>``, InternVL's ``<img>``, MiniCPM-V's slice markers)."""
    tokenizer = text_tokenizer(tokenizer)
    ids = getattr(tokenizer, "all_special_ids", None)
    if not isinstance(ids, (list, tuple, set)):
        raise TypeError("tokenizer: expected a transformers tokenizer (with .all_special_ids) or a processor "
                        f"holding one, got {type(tokenizer).__name__}")
    found = {i for i in ids if isinstance(i, int)}
    try:
        added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    except NotImplementedError:  # a tokenizer without added tokens of its own
        added = None
    if isinstance(added, dict):  # MistralCommonBackend has a method (that raises): its ids are all above
        found.update(i for i, token in added.items() if getattr(token, "special", False))
    return found


@torch.compiler.disable  # host-side tokenizer calls: nothing for Dynamo to trace
def blank_token_ids(tokenizer, ids, known: dict) -> list[int]:
    """Of ``ids``, those ``tokenizer`` decodes to whitespace or control characters alone: the
    newlines that processors write around images and between rows of tiles (Gemma3's ``"\\n\\n"``
    around every image, Idefics3's and SmolVLM's after each row of tiles, PaliGemma's after the
    prompt), which are ordinary tokens of their vocabularies, and the byte tokens that stand for a
    control character (Fuyu's ``<0x04>``, "beginning of answer", written after every prompt; its
    ``<0x00>``..``<0x03>`` around box and point coordinates), which carry no words. ``known``
    caches each id's answer across calls."""
    for i in ids:
        if i not in known:
            try:
                text = tokenizer.decode([i])
            except Exception:  # an id this tokenizer cannot decode is no whitespace it knows
                known[i] = False
            else:
                known[i] = all(c.isspace() or unicodedata.category(c) == "Cc" for c in text)
    return [i for i in ids if known[i]]


# Text of no tokenizer's vocabulary in one piece: the system's and the user's message (and an assistant's
# answer) when a chat template is rendered to find the template's own text around them.
TEMPLATE_SENTINELS = ("Zqx7", "Wvk3")
ANSWER_SENTINEL = "Jbm5"


def _render(source, conversation: list[dict], generation_prompt: bool) -> list[str]:
    """``source``'s chat template rendered for ``conversation`` (role, content: a sentinel) in each form: the
    user's message alone, then with an image after it and before it (what a template writes next to an image
    differs: LLaVA-1.5's newline after it), as lists of parts (a processor's template), then as strings (a
    tokenizer's may take them); the renderings that hold every message."""
    image = {"type": "image"}
    rendered = []
    for form in (lambda t: [t], lambda t: [t, image], lambda t: [image, t], None):  # None: content a string
        messages = [{"role": m["role"], "content": m["content"] if form is None else
                     form({"type": "text", "text": m["content"]}) if m["role"] == "user" else
                     [{"type": "text", "text": m["content"]}]} for m in conversation]
        try:
            text = source.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses this form (or a system message)
            continue
        if isinstance(text, list):  # a batch of one
            text = text[0] if text else None
        if isinstance(text, str) and all(m["content"] in text for m in conversation):
            rendered.append(text)
    return rendered


def _rendered_templates(source) -> list[tuple[str, tuple[str, ...]]]:
    """``source``'s chat template rendered (:func:`_render`) with the generation prompt for one user message,
    then a system message and one user message, then a user message, an answer and a user message:
    ``(text, the sentinels in it)``."""
    system, user = TEMPLATE_SENTINELS
    # The last: a past exchange before the question, for the text the template writes between turns (ERNIE's
    # ``<|end_of_sentence|>User: ``), which a conversation of one turn does not write.
    conversations = ([{"role": "user", "content": user}],
                     [{"role": "system", "content": system}, {"role": "user", "content": user}],
                     [{"role": "user", "content": user}, {"role": "assistant", "content": ANSWER_SENTINEL},
                      {"role": "user", "content": user}])
    return [(text, tuple(m["content"] for m in conversation))
            for conversation in conversations for text in _render(source, conversation, generation_prompt=True)]


def _message_tokens(tokenizer, text: str, spans: list[tuple[int, int]], before: Optional[int] = None
                    ) -> list[Optional[int]]:
    """Each token of ``text`` (that starts before character ``before``) as ``tokenizer`` writes it in context,
    None where it overlaps one of the messages' character ``spans`` (a space merged into a message's first
    word); raises where the tokenizer gives no offsets."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [None if any(start < e and s < end for s, e in spans) else token
            for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
            if before is None or start < before]


def _trim_blanks(run: tuple[int, ...], tokenizer, known: dict) -> tuple[int, ...]:
    """``run`` without the blank tokens at its ends: a blank next to a message may be merged into its
    first word in context."""
    blank = set(blank_token_ids(tokenizer, list(run), known))
    first, last = 0, len(run)
    while first < last and run[first] in blank:
        first += 1
    while last > first and run[last - 1] in blank:
        last -= 1
    return tuple(run[first:last])


@torch.compiler.disable  # host-side tokenizer calls: nothing for Dynamo to trace
def template_token_runs(source, split_at=()) -> list[tuple[int, ...]]:
    """The token ids of the text a chat template writes around the messages (role headers, turn
    markers, a default system prompt, the generation prompt: Gemma3's ``<end_of_turn>\\n
    <start_of_turn>model\\n``, LLaVA-1.5's ``ASSISTANT:``), each maximal run as the tokenizer of
    ``source`` (a tokenizer, or a processor holding one and the template) writes it: no question text.
    A token that straddles a message's text (a space merged into its first word) is left out of the
    run, and so are the ids ``split_at`` (the image tokens, which a processor writes many of where the
    template writes one, and the markers the config names, which a processor writes around an image with
    text of its own, such as Gemma3's newlines): they end a run. None found (no template, or one that
    renders no message as given): ``[]``."""
    if not getattr(source, "chat_template", None):
        return []
    tokenizer = text_tokenizer(source)
    runs: set[tuple[int, ...]] = set()
    for text, names in _rendered_templates(source):
        spans = [(m.start(), m.end()) for name in names for m in re.finditer(re.escape(name), text)]
        try:  # each token, None where it overlaps a message
            tokens = _message_tokens(tokenizer, text, spans)
        except Exception:  # noqa: BLE001 - a tokenizer without offsets: each piece between messages alone
            pieces = re.split("|".join(map(re.escape, names)), text)
            tokens = [t for p in pieces for t in [*tokenizer(p, add_special_tokens=False)["input_ids"], None]]
        run: list[int] = []
        for token in tokens + [None]:
            if token is not None and token not in split_at:
                run.append(int(token))
            elif run:
                runs.add(tuple(run))
                run = []
    known: dict[int, bool] = {}
    trimmed = {_trim_blanks(run, tokenizer, known) for run in runs}
    return sorted(r for r in trimmed if len(r) > 1)  # one ordinary word alone could be the question's


def answer_header_runs(source, split_at=()) -> list[tuple[int, ...]]:
    """The token ids a chat template writes right before an assistant's answer, as the tokenizer of
    ``source`` writes them in context: LLaVA-1.5's ``ASSISTANT:``, Gemma3's ``<start_of_turn>model``,
    ChatML's ``<|im_start|>assistant``. Where one occurs in a conversation rendered for training, an answer
    begins after it. Runs end at ``split_at`` and lose their blank ends, as :func:`template_token_runs`'
    do; a run of one token counts only where the tokenizer marks it special (one ordinary word alone could
    be the question's). None found (no template, or one that renders no answer as given): ``[]``."""
    if not getattr(source, "chat_template", None):
        return []
    tokenizer = text_tokenizer(source)
    user, answer = TEMPLATE_SENTINELS[1], ANSWER_SENTINEL
    headers: set[tuple[int, ...]] = set()
    known: dict[int, bool] = {}
    special = tokenizer_special_ids(tokenizer)
    # Rendered for training: a user message, then the answer, the last message (no generation prompt).
    for text in _render(source, [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                        generation_prompt=False):
        start = text.rindex(answer)
        spans = [(m.start(), m.end()) for name in (user, answer) for m in re.finditer(re.escape(name), text)]
        try:  # the tokens before the answer's first, None where one overlaps a message
            tokens = _message_tokens(tokenizer, text, spans, before=start)
        except Exception:  # noqa: BLE001 - a tokenizer without offsets: the text since the last message alone
            since = max((e for s, e in spans if e <= start), default=0)
            tokens = [None] + tokenizer(text[since:start], add_special_tokens=False)["input_ids"]
        run: list[int] = []
        for token in reversed(tokens):
            if token is None or token in split_at:
                break
            run.insert(0, int(token))
        run = _trim_blanks(tuple(run), tokenizer, known)
        if len(run) > 1 or (run and run[0] in special):
            headers.add(run)
    return sorted(headers)


def answer_positions(ids: torch.Tensor, headers: list[tuple[int, ...]], stops: torch.Tensor,
                     last: bool = False) -> torch.Tensor:
    """Bool ``(B, L)``: the positions of ``ids`` (host ``(B, L)``) in an answer, each from the end of an
    occurrence of one of ``headers`` (:func:`answer_header_runs`) to the next position of ``stops`` (the
    end of its turn: a special token, the template's next text, an image, padding), ends excluded;
    ``last``: only the answer after a row's last header."""
    header = torch.zeros(ids.shape, dtype=torch.bool)
    for run in headers:  # the header's last token, where the answer starts after it
        m = len(run)
        if m <= ids.shape[1]:
            header[:, m - 1:] |= (ids.unfold(1, m, 1) == torch.tensor(run, dtype=ids.dtype)).all(-1)
    positions = torch.arange(ids.shape[1]).expand(ids.shape)
    last_header = torch.where(header, positions, -1).cummax(1).values
    last_stop = torch.where(stops & ~header, positions, -1).cummax(1).values
    answer = (last_header > last_stop) & ~header & ~stops
    return answer & (last_header == last_header[:, -1:]) if last else answer


def template_positions(ids: torch.Tensor, runs: list[tuple[int, ...]]) -> torch.Tensor:
    """Bool ``(B, L)``: the positions of ``ids`` (host ``(B, L)``) inside an occurrence of one of
    ``runs`` (:func:`template_token_runs`)."""
    hit = torch.zeros(ids.shape, dtype=torch.bool)
    length = ids.shape[1]
    for run in runs:
        m = len(run)
        if m > length:
            continue
        starts = (ids.unfold(1, m, 1) == torch.tensor(run, dtype=ids.dtype)).all(-1)  # (B, L - m + 1)
        for j in range(m):
            hit[:, j:j + length - m + 1] |= starts
    return hit
