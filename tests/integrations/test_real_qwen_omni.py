"""prune() on the layouts of the real Qwen2-VL and Qwen Omni processors (``Qwen2VLProcessor``,
``Qwen2_5OmniProcessor``, ``Qwen3OmniMoeProcessor``), built offline around a word-level tokenizer holding their
markers (and a small Whisper feature extractor): images and videos, each one selection (README, "Where an image
is": a Qwen2-VL or Qwen Omni video is one budget), and above all a video whose audio track the Omni processors
interleave with it (``use_audio_in_video``, ``load_audio_from_video`` from transformers 5.24): chunks of audio
tokens between chunks of the video's tokens, inside the one video's span. The audio tokens are no visual tokens
(never selected, all kept) and no question text; the video stays one selection of all its tokens."""
from __future__ import annotations

import re

import pytest
import torch

from .test_real_processors import (
    _photo,
    _prompts_and_warnings,
    _retokenized,
    _runs,
    _runs_of_both,
    _tokenizer,
    _video,
    _video_inputs,
    _image_processor,
)

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402

V4 = transformers.__version__.startswith("4.")
QWEN2_MARKERS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# The tiny builders' towers: 2 px patches, 2x2 merged (4 px a token), two frames a temporal patch.
PIXELS = dict(min_pixels=4 * 16, max_pixels=4 * 64)
SIZE = {"shortest_edge": PIXELS["min_pixels"], "longest_edge": PIXELS["max_pixels"]}
BEFORE, BETWEEN, AFTER = "w44 w39 w53 w0", "w5 w6", "w43 w39 w7"


def _qwen_layout(tokenizer, row: torch.Tensor, short: dict) -> str:
    """Row ``row`` decoded without spaces, each run of a token of ``short`` (token -> letter) ``letter*n``."""
    text = tokenizer.decode(row).replace(" ", "")
    for token, letter in short.items():
        text = re.sub(f"(?:{re.escape(token)})+", lambda m: f"{letter}*{m.group(0).count(token)}", text)
    return text


@torch.no_grad()
def test_qwen2_vl_budgets_each_image_and_each_video_whole():
    """Qwen2-VL's processor writes each image and each video as one run of tokens between
    ``<|vision_start|>``/``<|vision_end|>`` (both named by the config): a batch of two rows, images of
    different sizes, row 1 an image, words, a video and the question. Every run is one selection (the video
    too); the prompts hold each row's question words, with a tokenizer, without one and in generate()."""
    pytest.importorskip("torchvision", reason="Qwen2-VL's video processor needs torchvision")
    tokenizer = _tokenizer(QWEN2_MARKERS, plain=[], bos="<|endoftext|>", cls=transformers.Qwen2TokenizerFast if V4 else None)
    processor = transformers.Qwen2VLProcessor(
        image_processor=_image_processor("Qwen2VLImageProcessor", patch_size=2, **PIXELS), tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(patch_size=2, **PIXELS))
    ids = {name: token for name, token in zip(
        ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), QWEN2_MARKERS)}
    model = _retokenized("qwen2_vl", tokenizer, ids)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    inputs, questions, _ = _video_inputs(processor, _video(4, 16, 16), [(12, 12), (16, 24)], image, video,
                                         do_sample_frames=False)
    assert _qwen_layout(tokenizer, inputs["input_ids"][1], {"<|image_pad|>": "I", "<|video_pad|>": "V"}) == (
        f"<|vision_start|>I*12<|vision_end|>{BETWEEN}<|vision_start|>V*32<|vision_end|>{AFTER}".replace(" ", ""))
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs_of_both(inputs, model) == [(0, 9), (1, 12), (1, 32)]
    assert prompts == untokenized == [questions[0], questions[1], questions[1]]
    assert warned == []


OMNI_MARKERS = dict(image_token="<|IMAGE|>", audio_token="<|AUDIO|>", video_token="<|VIDEO|>",
                    vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
                    audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>")
# The thinker config's names of the markers' ids.
OMNI_IDS = dict(image_token_id="image_token", video_token_id="video_token", audio_token_id="audio_token",
                vision_start_token_id="vision_bos_token", vision_end_token_id="vision_eos_token",
                audio_start_token_id="audio_bos_token", audio_end_token_id="audio_eos_token")


def _wave(seconds: float):
    import numpy as np

    return (np.random.default_rng(1).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def _omni_kwargs(audio_in_video: bool, **videos_kwargs) -> dict:
    """The processor's keyword arguments: ``videos_kwargs``, and with ``audio_in_video`` those asking for the
    video's audio track (given, as decoded) to be interleaved with it: ``load_audio_from_video`` and the audio's
    source (transformers 5.24+, whose omni processors load it), else ``use_audio_in_video``."""
    import transformers.processing_utils

    if not audio_in_video:
        return dict(videos_kwargs=videos_kwargs)
    if hasattr(transformers.processing_utils, "OmniModalProcessorMixin"):
        return dict(videos_kwargs=videos_kwargs, load_audio_from_video=True, audio_from_video_indices=[0])
    return dict(videos_kwargs=dict(videos_kwargs, use_audio_in_video=True))


def _omni(processor_class: str, markers: dict, builder: str):
    """The real Qwen Omni processor ``processor_class`` (Qwen2-VL's image and video processors, 2 px patches; a
    Whisper feature extractor of 8 mel bins, 4 s windows) around a tokenizer holding ``markers``, and the tiny
    ``builder``'s thinker on this tokenizer's ids."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    tokenizer = _tokenizer(list(markers.values()), plain=[], bos="<|endoftext|>",
                           cls=transformers.Qwen2TokenizerFast if V4 else None, **markers)
    processor = getattr(transformers, processor_class)(
        image_processor=_image_processor("Qwen2VLImageProcessor", patch_size=2, **PIXELS),
        video_processor=transformers.Qwen2VLVideoProcessor(patch_size=2, **PIXELS),
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=8, chunk_length=4), tokenizer=tokenizer)
    model = _retokenized(builder, tokenizer, {name: markers[token] for name, token in OMNI_IDS.items()})
    return model, processor, tokenizer


@pytest.mark.parametrize("audio_in_video", [False, True], ids=["video", "audio_in_video"])
@torch.no_grad()
def test_qwen2_5_omni_video_is_one_budget_with_its_audio_interleaved(audio_in_video):
    """Qwen2.5-Omni's processor writes each image and video as one run between ``<|vision_bos|>`` and
    ``<|vision_eos|>``; with its audio track (``use_audio_in_video``), a video of ``t`` temporal patches (2 s
    of 25 positions a chunk) as ``<|vision_bos|><|audio_bos|>``, then chunk by chunk its tokens and its audio
    tokens, ``<|audio_eos|><|vision_eos|>``: the video is cut into runs by audio tokens. It is still one video,
    one selection of all its tokens (one budget, as without audio), and the audio tokens (ids the config names)
    are neither selected nor dropped nor question text; with a tokenizer, without one (no warning: the config
    names every marker) and in generate() the prompts hold the question words alone. The selections once split
    the video into a budget per chunk (twice the tokens kept)."""
    model, processor, tokenizer = _omni("Qwen2_5OmniProcessor", OMNI_MARKERS, "qwen2_5_omni")
    model.config.position_id_per_seconds, model.config.seconds_per_chunk = 25, 2  # TMRoPE timing: the processor's
    gen = torch.Generator().manual_seed(0)
    image, video = (f"{OMNI_MARKERS['vision_bos_token']}{OMNI_MARKERS[k]}{OMNI_MARKERS['vision_eos_token']}"
                    for k in ("image_token", "video_token"))
    inputs = processor(text=[f"{BEFORE} {image}", f"{image} {BETWEEN} {video} {AFTER}"],
                       images=[[_photo(16, 24, gen)], [_photo(24, 16, gen)]], videos=[_video(8, 16, 16)],
                       audio=[_wave(3)] if audio_in_video else None, padding=True, return_tensors="pt",
                       **_omni_kwargs(audio_in_video, fps=2.0, do_sample_frames=False, size=SIZE))
    layout = _qwen_layout(tokenizer, inputs["input_ids"][1], {"<|IMAGE|>": "I", "<|VIDEO|>": "V", "<|AUDIO|>": "A"})
    # 8 frames: 4 temporal patches of 4x4 tokens at 0, 1, 2, 3 s; 3 s of audio: 75 tokens at 25 a second.
    inner = "<|audio_bos|>V*32A*50V*32A*25<|audio_eos|>" if audio_in_video else "V*64"
    assert layout == f"<|vision_bos|>I*12<|vision_eos|>w5w6<|vision_bos|>{inner}<|vision_eos|>w43w39w7"
    video_tokens = int(inputs["video_grid_thw"][0].prod()) // 4
    if audio_in_video:
        inputs["use_audio_in_video"] = True  # the thinker's TMRoPE numbers the chunks so
        assert _runs(inputs["input_ids"], model.config.video_token_id) == [(1, video_tokens // 2)] * 2
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens, s.order.numel()) for s in selections] == [(0, 12, 4), (1, 12, 4),
                                                                                 (1, video_tokens, 4)]
    questions = [BEFORE.split(), (BETWEEN + " " + AFTER).split()]
    assert prompts == untokenized == [questions[0], questions[1], questions[1]]
    assert warned == []
    # The pruned forward keeps 4 of the video's tokens and every audio token, wherever they stand.
    with zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle:
        model(**inputs)
    ids = inputs["input_ids"][1]
    kept = ids[handle.last_kept_positions[1][handle.last_kept_positions[1] >= 0]]
    assert int((kept == model.config.video_token_id).sum()) == 4
    assert int((kept == model.config.audio_token_id).sum()) == int((ids == model.config.audio_token_id).sum()) == (
        75 if audio_in_video else 0)


QWEN3_OMNI_MARKERS = dict(image_token="<|image_pad|>", audio_token="<|audio_pad|>", video_token="<|video_pad|>",
                          vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>",
                          audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>")


@pytest.mark.parametrize("audio_in_video", [False, True], ids=["video", "audio_in_video"])
@torch.no_grad()
def test_qwen3_omni_video_is_one_budget_with_its_audio_interleaved(audio_in_video):
    """Qwen3-Omni-MoE's processor interleaves a video's audio track token by token in time (13 positions a
    second): each temporal patch's tokens at its start, then the audio tokens up to the next, inside
    ``<|audio_start|>``/``<|audio_end|>`` between the vision markers. The video stays one selection of all its
    tokens, the audio tokens all kept and no question: the question before the video is its prompt (nothing
    after it but markers and audio, all named by the config), with a tokenizer, without one and in generate().
    A video alone (transformers 4.57's thinker fails on images and videos in one call)."""
    if not hasattr(transformers, "Qwen3OmniMoeProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-Omni-MoE")
    markers = QWEN3_OMNI_MARKERS
    model, processor, tokenizer = _omni("Qwen3OmniMoeProcessor", markers,
                                        "qwen3_omni_moe_video" if V4 else "qwen3_omni_moe")
    model.config.position_id_per_seconds = 13  # the processor's
    video = f"{markers['vision_bos_token']}{markers['video_token']}{markers['vision_eos_token']}"
    inputs = processor(text=[f"{BEFORE} {video}"], videos=[_video(8, 16, 16)], audio=[_wave(3)] if audio_in_video else None,
                       return_tensors="pt", **_omni_kwargs(audio_in_video, fps=2.0, do_sample_frames=False, size=SIZE))
    layout = _qwen_layout(tokenizer, inputs["input_ids"][0], {"<|video_pad|>": "V", "<|audio_pad|>": "A"})
    # 8 frames: 4 temporal patches of 4x4 tokens at 0, 1, 2, 3 s; 3 s of audio: 39 tokens at 13 a second.
    inner = "<|audio_start|>" + "A*13".join(["V*16"] * 4) + "<|audio_end|>" if audio_in_video else "V*64"
    assert layout == f"{BEFORE}<|vision_start|>{inner}<|vision_end|>".replace(" ", "")
    video_tokens = int(inputs["video_grid_thw"][0].prod()) // 4
    if audio_in_video:
        inputs["use_audio_in_video"] = True
        assert len(_runs(inputs["input_ids"], model.config.video_token_id)) > 1
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens, s.order.numel()) for s in selections] == [(0, video_tokens, 4)]
    assert prompts == untokenized == [BEFORE.split()]
    assert warned == []
    with zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle:
        model(**inputs)
    ids = inputs["input_ids"][0]
    kept = ids[handle.last_kept_positions[0]]
    assert int((kept == model.config.video_token_id).sum()) == 4
    assert int((kept == model.config.audio_token_id).sum()) == int((ids == model.config.audio_token_id).sum())
