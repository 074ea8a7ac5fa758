"""prune() on Nemotron-H Omni inputs that hold AUDIO beside images and videos, as its real processor
(``NemotronH_Omni_Reasoning_V3Processor``, built offline around a byte-level BPE tokenizer holding its markers)
writes them. Each audio clip (a numpy waveform at 16 kHz, mel features from Parakeet's feature extractor) is
``<so_start>`` then ``<so_embedding>`` as many times as the sound encoder's subsampled frames, then ``<so_end>``:
the model scatters the sound encoder's features onto the ``<so_embedding>`` tokens (its config's
``audio_token_id``); ``<so_start>``/``<so_end>`` are named by no config. The model is the tiny builder's, with
this tokenizer's ids and the smallest Parakeet encoder that runs (the builder's has no ``audio_config``).

What must hold: audio tokens are neither visual tokens (selected, pruned) nor question text; every image, and
every tubelet of a video, is a selection of exactly its own run of image tokens; with ``tokenizer=`` the prompt
words are the question's alone; without one the audio placeholders stay out (the config names their id) and the
audio begin/end markers count as text, as the image markers do (prune() warns of them)."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402

from .test_real_processors import (  # noqa: E402
    _bpe_tokenizer, _nemotron_omni_processor, _photo, _prompts_and_warnings, _runs, _video)

BEFORE, AFTER = "What is in the picture?", " Describe the sound and the picture in one sentence."
LABEL = "Frame 3 sampled at 1.00 seconds and frame 4 sampled at 1.50 seconds: "
MARKERS = ["<image>", "<img>", "</img>", "<video>", "<so_embedding>", "<so_start>", "<so_end>"]
WARNED = ("prune(): Nemotron-H Omni processors write image markers (or row breaks) that model.config does not "
          "name; without tokenizer= they count as question text")


def _nemotron_omni():
    """The real processor (RADIO's image processor, 4 px patches, 64 to 256 of them an image; the video
    processor, 64 patches a frame; Parakeet's feature extractor, 80 mel bins, a 160-sample hop) and the tiny
    builder's model on this tokenizer's ids, with a one-layer Parakeet encoder (8x subsampling, as the
    processor counts its placeholders) and its projector into the language model."""
    if not hasattr(transformers, "NemotronH_Omni_Reasoning_V3Processor"):
        pytest.skip(f"transformers {transformers.__version__} has no Nemotron-H Omni")
    from zspa_kernels.integrations.transformers.tiny import nemotron_h_omni

    tokenizer = _bpe_tokenizer(MARKERS, [BEFORE + AFTER, LABEL])
    processor = _nemotron_omni_processor(tokenizer, min_num_patches=64, max_num_patches=256)
    config = nemotron_h_omni().model.config.to_dict()  # the tiny builder's, with this tokenizer's ids
    config["text_config"].update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config["vision_config"].update(summary_idxs=[0])  # its one class token (the video path reads them)
    config.update(image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
                  audio_token_id=processor.audio_token_id,
                  audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    conv_kernel_size=3, subsampling_conv_channels=8, num_mel_bins=80,
                                    projection_hidden_size=32, projection_bias=False))
    torch.manual_seed(0)
    model = transformers.NemotronH_Omni_Reasoning_V3(transformers.NemotronH_Omni_Reasoning_V3_Config(**config)).eval()
    return model, processor, tokenizer


def _waves(*lengths: int):
    """Random waveforms of ``lengths`` samples (16 kHz: a quarter to a half second)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


@torch.no_grad()
def _audio_kept_whole(model, inputs, processor, keep=4):
    """A pruned forward: every position that is no image token (audio, markers, text) is kept, and each
    image run keeps ``keep`` of its tokens."""
    with zspa_kernels.prune(model, keep=keep, tokenizer=processor) as handle:
        model(**inputs)
    ids, image = inputs["input_ids"], processor.image_token_id
    kept = handle.last_kept_positions
    for r in range(ids.shape[0]):
        positions = set(kept[r][kept[r] >= 0].tolist())
        attended = set(inputs["attention_mask"][r].nonzero().flatten().tolist())
        assert {p for p in attended if int(ids[r, p]) != image} <= positions
    for s in handle.last_selection:
        assert s.order.numel() == keep


def _strings(tokenizer, prompts):
    return [tokenizer.convert_tokens_to_string(p) for p in prompts]


def test_nemotron_h_omni_audio_beside_images_is_neither_visual_nor_question():
    """Row 0: audio, the question, its image, more audio (``<so_start><so_embedding>x4<so_end> What is in the
    picture? <img><image>x16</img><so_start><so_embedding>x6<so_end>``); row 1: an image, audio, the question,
    another image. Each image is one selection of its own run (16, 24, 24 tokens); the audio runs (4, 6, 7)
    are no selection and are kept whole. With ``tokenizer=`` the prompts are the question words alone: row 0's, whose
    text after its image is only audio and markers, the question before it. Without a tokenizer the
    ``<so_embedding>`` tokens stay out of the prompt (the config's ``audio_token_id``), but ``<so_start>`` and
    ``<so_end>`` count as text, as ``</img>`` does, and prune() warns."""
    model, processor, tokenizer = _nemotron_omni()
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"<so_embedding> {BEFORE} <image><so_embedding>", f"<image><so_embedding>{AFTER}<image>"],
                       images=[_photo(32, 32, gen), _photo(24, 40, gen), _photo(40, 24, gen)],
                       audio=_waves(4000, 6400, 8000), padding=True, return_tensors="pt")
    ids, audio = inputs["input_ids"], processor.audio_token_id
    assert audio == model.config.audio_token_id and audio != model.config.image_token_id
    text = [tokenizer.decode(row) for row in ids]
    assert text[0].endswith("<so_start>" + "<so_embedding>" * 4 + "<so_end> What is in the picture? <img>"
                            + "<image>" * 16 + "</img><so_start>" + "<so_embedding>" * 6 + "<so_end>")
    assert _runs(ids, audio) == [(0, 4), (0, 6), (1, 7)]
    runs = _runs(ids, model.config.image_token_id)
    assert runs == [(0, 16), (1, 24), (1, 24)]

    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert _strings(tokenizer, prompts) == [BEFORE, AFTER, AFTER]
    for s in selections:
        assert not (ids[s.batch_row, s.prompt_tokens] == audio).any()
    assert len(warned) == 1 and warned[0].startswith(WARNED)  # the run without the tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with it: none
        zspa_kernels.prune(model, keep=4, tokenizer=processor).remove()
    _audio_kept_whole(model, inputs, processor)

    # Without a tokenizer: no audio placeholder, but the unnamed audio markers, as the image markers.
    assert untokenized[0] == ["</img>", "<so_start>", "<so_end>"]
    assert untokenized[1:] == [["</img>", "<so_start>", "<so_end>", *tokenizer.tokenize(AFTER), "<img>", "</img>"]] * 2


def test_nemotron_h_omni_audio_after_video_tubelets_is_no_question():
    """One prompt (the processor takes a video with one prompt only): ``What is in the picture?`` then a
    video of 4 frames as 2 tubelets, each ``Frame 1 sampled at 0.00 seconds and frame 2 ...: <img><image>x16</img>``
    one a line, then audio (``<so_start><so_embedding>x4<so_end>``) and the question. Each tubelet is a selection
    of its own 16 tokens; with ``tokenizer=`` the prompt is the question after the video, neither its labels
    nor the audio; without one the audio placeholders stay out and the second label and the audio markers stay."""
    import torchvision  # noqa: F401  (its video processor needs it: an error here, not a skip)

    model, processor, tokenizer = _nemotron_omni()
    from transformers.video_utils import VideoMetadata

    frames = 4
    metadata = [VideoMetadata(total_num_frames=frames, fps=2, frames_indices=list(range(frames)))]
    inputs = processor(text=[f"{BEFORE} <video><so_embedding>{AFTER}"], videos=[_video(frames, 32, 32)],
                       audio=_waves(5000), return_tensors="pt", videos_kwargs=dict(video_metadata=metadata))
    ids, audio = inputs["input_ids"], processor.audio_token_id
    text = tokenizer.decode(ids[0])
    assert LABEL in text and ("</img><so_start>" + "<so_embedding>" * 4 + "<so_end>" + AFTER) in text
    runs = _runs(ids, model.config.image_token_id)
    assert runs == [(0, 16)] * (frames // 2)

    selections, prompts, untokenized, _ = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert _strings(tokenizer, prompts) == [AFTER] * (frames // 2)
    for s in selections:
        assert not (ids[s.batch_row, s.prompt_tokens] == audio).any()
    _audio_kept_whole(model, inputs, processor)
    # Without a tokenizer: all text after the first tubelet, but the audio placeholders.
    stays = text[text.index("</img>"):].replace("<image>", "").replace("<so_embedding>", "")
    assert _strings(tokenizer, untokenized) == [stays] * (frames // 2)
