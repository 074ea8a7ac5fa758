"""prune() on the token layouts that Gemma 4 Unified's and ShieldGemma 2's real processor classes write, built
offline around a word-level tokenizer holding each family's markers; the models are tiny and random, with the
tokenizer's ids in their configs. Gemma 4 Unified (5.x): each image ``<|image>`` its soft tokens
``<image|>``, a video each frame so after its ``MM:SS`` timestamp (Gemma 4's layout). ShieldGemma 2: its chat
template writes the image, then its instructions around the policy; the processor writes ``\\n\\n`` around the
image's markers (GLM-5-Next: with GLM-4.6V, in ``test_real_hunyuan_glm.py``)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402

from .test_real_processors import (  # noqa: E402
    AFTER_IMAGES, BEFORE_IMAGE, GEMMA4_MARKERS, MINUTES, _gemma4, _image_processor, _photo, _prompt_words,
    _prompts_and_warnings, _runs, _runs_of_both, _text, _token_layout, _tokenizer, _video, _video_inputs, _vision)

BETWEEN = "w5 w6"


# --- Gemma 4 Unified ---------------------------------------------------------------------------------------

def test_gemma4_unified_images_are_budgeted_apart_and_their_markers_are_no_question():
    """Gemma 4 Unified's processor writes each image as ``<|image>``, its soft tokens (one a merged patch, as
    many as its resized size gives), ``<image|>``: in a batch of one image, two back to back and two around
    words, every image is one selection over exactly its run. The config names the markers, so with a
    tokenizer or without the prompts are the question words; prune() does not warn. Keep-all logits bit for
    bit, generate() the same prompts."""
    model, processor, tokenizer = _gemma4(unified=True)
    boi, eoi, image = GEMMA4_MARKERS[:3]
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=[f"{BEFORE_IMAGE} {image}", f"{BEFORE_IMAGE} {image}{image}",
                             f"{image} {BETWEEN} {image} {AFTER_IMAGES}"],
                       images=[[_photo(24, 20, gen)], [_photo(16, 48, gen), _photo(40, 40, gen)],
                               [_photo(20, 28, gen), _photo(48, 12, gen)]], padding=True, return_tensors="pt")
    runs = _runs(inputs["input_ids"], model.config.image_token_id)
    counts = [n for _, n in runs]
    assert len(set(counts)) > 1  # images of other sizes: other counts
    around = lambda n: [boi, f"{image}*{n}", eoi]  # noqa: E731
    assert _token_layout(tokenizer, inputs, 0, image) == BEFORE_IMAGE.split() + around(counts[0])
    assert _token_layout(tokenizer, inputs, 1, image) == BEFORE_IMAGE.split() + around(counts[1]) + around(counts[2])
    assert _token_layout(tokenizer, inputs, 2, image) == (around(counts[3]) + BETWEEN.split() + around(counts[4])
                                                          + AFTER_IMAGES.split())
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs and [r for r, _ in runs] == [0, 1, 1, 2, 2]
    question = (BETWEEN + " " + AFTER_IMAGES).split()
    assert prompts == untokenized == [BEFORE_IMAGE.split()] * 3 + [question] * 2
    assert not warned


def test_gemma4_unified_frames_are_budgeted_apart_and_their_timestamps_are_no_question():
    """Gemma 4 Unified's processor writes a video as Gemma 4's does: each frame ``MM:SS <|image>`` its video
    tokens ``<image|>``, joined by spaces: every frame is a selection (after an image in the row), and the
    timestamps are no question text with a tokenizer; without one the first (nothing marks where the video
    starts) stays, as on Gemma 4. Also in generate()."""
    model, processor, tokenizer = _gemma4(unified=True)
    boi, eoi, image = GEMMA4_MARKERS[:3]
    frames = 4
    inputs, (before, question), words = _video_inputs(processor, _video(frames, 24, 32), [(24, 20), (20, 28)], fps=1,
                                                      do_sample_frames=False)
    runs = _runs_of_both(inputs, model)
    assert len(runs) == 2 + frames
    n = runs[-1][1]
    frame = lambda t: [MINUTES[t], boi, f"{processor.video_token}*{n}", eoi]  # noqa: E731
    layout = _token_layout(tokenizer, inputs, 1, processor.video_token)  # row 1: image, words, video, question
    assert layout[-(2 + 4 * frames + 3):] == (BETWEEN.split() + sum((frame(t) for t in range(frames)), [])
                                              + AFTER_IMAGES.split())
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == runs
    assert prompts == [before] + [question] * (1 + frames)
    row_1 = question[:2] + [MINUTES[0]] + question[2:]
    assert untokenized == [before] + [row_1] * (1 + frames)
    assert not warned


# --- ShieldGemma 2 -------------------------------------------------------------------------------------------

# ShieldGemma 2's chat template, as its conversion script (transformers' convert_shieldgemma2_weights_orbax_to_hf.py)
# writes it into the checkpoint: each content item in a user turn of its own; a text item is the policy inside
# the template's instructions. The text between ``}}`` and ``{{`` (a newline, indentation) is rendered.
SHIELD_TEMPLATE = """{{ bos_token }}
{%- for message in messages -%}
    {%- if message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {{ '<start_of_turn>user\\n' }}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ 'You are a policy expert trying to help determine whether a generated or real image is in' }}
                {{ ' violation of the safety policy below. Your decision must very clearly follow the specific'}}
                {{ ' language used in the safety policy and should not include any interpretation outside of the' }}
                {{ ' safety policy.\\n\\n' }}
                {{ '<BEGIN_SAFETY_POLICY>\\n' }}
                {{ item['text'] + '\\n' }}
                {{ '</END_SAFETY_POLICY>\\n\\n' }}
                {{ 'Does the image violate the above policy? Your Answer must start with \\'Yes\\' or \\'No\\'.' }}
                {{ '<end_of_turn>\\n' }}
            {%- endif -%}
        {%- endfor -%}
        {{'<start_of_turn>model\\n'}}
    {%- else -%}
        {{ raise_exception("Conversation messages must contain iterable content containing images and policy definitions in text.") }}
    {%- endif -%}
{%- endfor -%}
"""
INSTRUCTIONS = ("You are a policy expert trying to help determine whether a generated or real image is in violation of "
                "the safety policy below. Your decision must very clearly follow the specific language used in the "
                "safety policy and should not include any interpretation outside of the safety policy. "
                "<BEGIN_SAFETY_POLICY>").split()
ASK = "</END_SAFETY_POLICY> Does the image violate the above policy? Your Answer must start with 'Yes' or 'No'.".split()
POLICIES = {"short": "w10 w11", "long": "w20 w21 w22 w23"}


def _shieldgemma2():
    """A tiny random ShieldGemma 2 classifier (its Gemma3 model inside: 16 soft tokens a 16x16 image) with the
    real processor and its checkpoint's chat template; the policies ``POLICIES`` (2 and 4 words)."""
    boi, eoi, image = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    turns = ["<start_of_turn>", "<end_of_turn>"]
    tokenizer = _tokenizer([boi, eoi, image, *turns], plain=["\n\n", "\n"], bos="<bos>",
                           words=tuple(dict.fromkeys(INSTRUCTIONS + ASK + ["user", "model"])),
                           boi_token=boi, eoi_token=eoi, image_token=image)
    processor = transformers.ShieldGemma2Processor(
        image_processor=_image_processor("Gemma3ImageProcessor", size={"height": 16, "width": 16}),
        tokenizer=tokenizer, image_seq_length=16, chat_template=SHIELD_TEMPLATE, policy_definitions=POLICIES)
    ids = tokenizer.convert_tokens_to_ids
    config = transformers.ShieldGemma2Config(
        vision_config=_vision(model_type="siglip_vision_model", image_size=16, patch_size=4),
        text_config=_text(tokenizer, model_type="gemma3_text", head_dim=8, query_pre_attn_scalar=8,
                          max_position_embeddings=512, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        mm_tokens_per_image=16, image_token_index=ids(image), boi_token_index=ids(boi), eoi_token_index=ids(eoi),
        pad_token_id=tokenizer.pad_token_id, yes_token_index=ids("w0"), no_token_index=ids("w1"))
    torch.manual_seed(0)
    classifier = transformers.ShieldGemma2ForImageClassification(config).eval()
    with torch.no_grad():  # initialised to zeros: every image token would be the same
        classifier.model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=32 ** -0.5)
    return classifier, processor, tokenizer


def test_shieldgemma2_prompt_is_the_policy_not_the_templates_instructions():
    """ShieldGemma 2's processor makes a row for each image and policy: its chat template writes
    ``<bos><start_of_turn>user\\n<start_of_image><start_of_turn>user\\n`` then its instructions (``You are a
    policy expert ... <BEGIN_SAFETY_POLICY>``), the policy, ``</END_SAFETY_POLICY> Does the image violate the
    above policy? ...<end_of_turn>\\n<start_of_turn>model\\n``; the processor writes the image as
    ``\\n\\n<start_of_image>`` 16 soft tokens ``<end_of_image>\\n\\n``. Each image is one selection of 16 tokens in
    every row. With ``tokenizer=processor`` (which holds the template) the prompt is the policy's words alone:
    the template's text both before and after it is no question (README, ``prompt="question"``), in the
    classifier as in its Gemma3 model's generate(). With the tokenizer alone (no template) the template's
    words stay, its special tokens and newlines do not; without a tokenizer every token after the image
    counts (the turn markers too: only the image markers are named by the config); no warning."""
    classifier, processor, tokenizer = _shieldgemma2()
    model, image = classifier.model, "<image_soft_token>"
    gen = torch.Generator().manual_seed(0)
    inputs = processor(images=[_photo(30, 30, gen), _photo(40, 24, gen)], return_tensors="pt")
    policies = [POLICIES["short"].split(), POLICIES["long"].split()] * 2  # image-major: img1 x 2 policies, img2 x 2
    # The template's text, tokenized: spaces dropped by the word-level tokenizer, its newlines kept.
    head = ["<bos>", "<start_of_turn>", "user", "\n\n", "\n", "<start_of_image>", f"{image}*16", "<end_of_image>", "\n\n",
            "<start_of_turn>", "user", "\n"]
    for row, policy in enumerate(policies):
        layout = _token_layout(tokenizer, inputs, row, image)
        assert layout[:len(head)] == head
        text = [w for w in layout[len(head):] if w not in ("\n", "\n\n")]
        assert text == INSTRUCTIONS + policy + ASK + ["<end_of_turn>", "<start_of_turn>", "model"]
        assert layout[-3:] == ["<start_of_turn>", "model", "\n"]
    selections, prompts, untokenized, warned = _prompts_and_warnings(model, inputs, processor, tokenizer)
    assert [(s.batch_row, s.n_tokens) for s in selections] == _runs(inputs["input_ids"], model.config.image_token_id) \
        == [(r, 16) for r in range(4)]
    assert prompts == policies
    after_image = [tokenizer.convert_ids_to_tokens(row[row.tolist().index(model.config.eoi_token_id) + 1:].tolist())
                   for row in inputs["input_ids"]]
    assert untokenized == after_image
    assert not warned
    with torch.no_grad(), zspa_kernels.prune(model, keep=4, tokenizer=tokenizer) as handle:
        model(**inputs)  # the tokenizer alone holds no template: its words stay
    assert [_prompt_words(tokenizer, inputs, s) for s in handle.last_selection] == [
        ["user"] + INSTRUCTIONS + policy + ASK + ["model"] for policy in policies]
    with torch.no_grad():  # the classifier (the yes/no logits of the last position): bit for bit, same prompts
        expected = classifier(**inputs)
        with zspa_kernels.prune(classifier, keep=1.0, tokenizer=processor):
            assert torch.equal(classifier(**inputs).logits, expected.logits)
        with zspa_kernels.prune(classifier, keep=4, tokenizer=processor) as handle:
            classifier(**inputs)
    assert [_prompt_words(tokenizer, inputs, s) for s in handle.last_selection] == policies
