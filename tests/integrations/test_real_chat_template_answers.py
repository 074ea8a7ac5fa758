"""A training call labelled over every token, as most VLM collators label a chat (TRL's default for a
conversation, the fine-tuning cookbooks': ``labels = input_ids`` with padding and image tokens at -100),
holds its answers in the question text. With ``tokenizer=`` (the processor, holding the chat template) the
answers are the text after each of the template's assistant headers, to the end of the turn, and are left
out of the prompt: each image keeps the tokens that the question alone gives, as generation will. Without
the template that cannot be told, and prune() warns. On the real processors of Qwen2.5-VL (ChatML), Gemma 3
and LLaVA-1.5 with their chat templates."""
from __future__ import annotations

import warnings

import pytest
import torch

from .test_real_processors import (GEMMA3_TEMPLATE, LLAVA_TEMPLATE, QWEN_TEMPLATE, _bpe_tokenizer, _gemma3,
                                   _image_processor, _photo, _prompt_words, _qwen, _retokenized)

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402
from zspa_kernels.integrations.transformers.families import answer_header_runs, special_token_ids  # noqa: E402

QUESTION, ANSWER, FOLLOW_UP, SECOND_ANSWER = "w4 w5 w6", "w7 w8", "w9 w10", "w11"
UNMARKED = r"labels cover every question token of a row with images \(a loss over all its text\); "


def _qwen_chat():
    model, processor, tokenizer = _qwen("2.5", ["<|im_start|>", "<|im_end|>"],
                                        tuple("system You are a helpful assistant. user assistant".split()))
    processor.chat_template = QWEN_TEMPLATE
    return model, processor, tokenizer, 56, [["<|im_start|>", "assistant"]]


def _gemma3_chat():
    model, processor, tokenizer = _gemma3(["<start_of_turn>", "<end_of_turn>"], ("user", "model"))
    processor.chat_template = GEMMA3_TEMPLATE
    return model, processor, tokenizer, 16, [["<start_of_turn>", "model"]]


def _llava_chat():
    words = [QUESTION, ANSWER, FOLLOW_UP, SECOND_ANSWER]
    tokenizer = _bpe_tokenizer(["<image>"], ["USER: ASSISTANT: " + " ".join(words)])
    images = _image_processor("CLIPImageProcessor", size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            image_token="<image>", chat_template=LLAVA_TEMPLATE)
    model = _retokenized("llava", tokenizer, dict(image_token_id="<image>", image_token_index="<image>"))
    # After a word the space is merged into ASSISTANT; after an image's newline the BPE splits it otherwise.
    return model, processor, tokenizer, 16, [["ĠASSISTANT", ":"], ["AS", "SISTAN", "T", ":"]]


CHATS = {"qwen2_5_vl": _qwen_chat, "gemma3": _gemma3_chat, "llava": _llava_chat}


def _conversation(processor, turns: list[tuple[str, str]], image_first: bool) -> str:
    """``turns`` of (question, answer) rendered for training (no generation prompt), the image in the
    first question, before or after its text; an answer None: the generation prompt instead, as at inference."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = [{"type": "text", "text": question}]
        if i == 0:
            content.insert(0 if image_first else 1, {"type": "image"})
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, add_generation_prompt=turns[-1][1] is None)


def _inputs(model, processor, texts: list[str], size: int):
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=texts, images=[[_photo(size, size, gen)] for _ in texts], padding=True,
                       return_tensors="pt")
    inputs.pop("token_type_ids", None)  # 4.57's tokenizers return them; these models take none (Gemma3 builds its own)
    if model.config.model_type == "gemma3":
        inputs["token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).long()
    return inputs


def _visual_ids(model) -> set[int]:
    """The config's image (and video) token ids."""
    values = [getattr(model.config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")]
    return {v for value in values if value is not None for v in (value if isinstance(value, list) else [value])}


def _collated_labels(model, inputs) -> torch.Tensor:
    """A VLM collator's labels: every token, but padding and image (and video) tokens."""
    ids = inputs["input_ids"]
    visual = torch.isin(ids, torch.tensor(sorted(_visual_ids(model))))
    return ids.masked_fill((inputs["attention_mask"] == 0) | visual, -100)


@torch.no_grad()
def _picked(model, inputs, vocabulary, labels=None, **prune):
    """The prompt's tokens (in ``vocabulary``) and the picks of each selection of one pruned forward."""
    with zspa_kernels.prune(model, keep=4, **prune) as handle:
        model(**inputs, **({} if labels is None else dict(labels=labels)))
    return ([_prompt_words(vocabulary, inputs, s) for s in handle.last_selection],
            [(s.batch_row, s.kept.tolist(), s.order.tolist()) for s in handle.last_selection])


@pytest.mark.parametrize("chat", CHATS)
def test_the_template_assistant_header_is_found_as_the_tokenizer_writes_it(chat):
    """The header before an answer, each way the tokenizer writes it in the template's context (runs that
    start with the end of the user's turn, where the config names no end-of-turn id)."""
    model, processor, tokenizer, _, headers = CHATS[chat]()
    split_at = _visual_ids(model) | special_token_ids(model.config)
    runs = [tokenizer.convert_ids_to_tokens(list(r)) for r in answer_header_runs(processor, split_at)]
    assert {tuple(h) for h in headers} == {tuple(r[-len(h):]) for r in runs for h in headers if r[-len(h):] == h}
    assert all(any(r[-len(h):] == h for h in headers) for r in runs)
    assert answer_header_runs(tokenizer, split_at) == []  # the template is the processor's


@pytest.mark.parametrize("chat", CHATS)
def test_a_conversation_labelled_over_every_token_selects_as_its_generation_will(chat):
    """Rows of one question and its answer, the image before and after the question, labelled over every
    token: with ``tokenizer=`` the prompt is the question's words and each image keeps exactly the tokens
    (in the same order) that the generation prompt of the same question keeps; the loss is the pruned one.
    Labels over the answers alone (an assistant-only loss) select the same. Without a tokenizer the answers
    are ranked as question, and prune() warns."""
    model, processor, tokenizer, size, _ = CHATS[chat]()
    questions = [_conversation(processor, [(QUESTION, None)], first) for first in (True, False)]
    conversations = [_conversation(processor, [(QUESTION, ANSWER)], first) for first in (True, False)]
    assert all(c.startswith(q) and ANSWER in c[len(q):] for c, q in zip(conversations, questions))
    asked, trained = (_inputs(model, processor, texts, size) for texts in (questions, conversations))
    labels = _collated_labels(model, trained)
    prompts, picks = _picked(model, asked, tokenizer, tokenizer=processor)
    assert [tokenizer.convert_tokens_to_string(p).split() for p in prompts] == [QUESTION.split()] * 2

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the answers are told apart: nothing to warn of
        assert _picked(model, trained, tokenizer, labels, tokenizer=processor) == (prompts, picks)
    # An assistant-only loss (TRL's prompt-completion form): the labels of what the answer adds to the
    # generation prompt (the answer and the end of its turn), the rest -100.
    answers_only = torch.full_like(labels, -100)
    for r in range(labels.shape[0]):
        attended = trained["attention_mask"][r].nonzero()[:, 0]
        added = int(trained["attention_mask"][r].sum() - asked["attention_mask"][r].sum())
        assert added > 0
        answers_only[r, attended[-added:]] = labels[r, attended[-added:]]
    assert _picked(model, trained, tokenizer, answers_only, tokenizer=processor) == (prompts, picks)

    with pytest.warns(UserWarning, match=UNMARKED + r"pass prune\(model, \.\.\., tokenizer=processor\)"):
        untold, _ = _picked(model, trained, tokenizer, labels)
    assert all(ANSWER.split()[-1] in tokenizer.convert_tokens_to_string(p) for p in untold)

    with zspa_kernels.prune(model, keep=1.0, tokenizer=processor), torch.no_grad():  # keep-all: the unpatched loss
        kept_all = model(**trained, labels=labels).loss
    assert torch.equal(kept_all, model(**trained, labels=labels).loss)


@pytest.mark.parametrize("chat", CHATS)
def test_every_answer_of_a_conversation_is_left_out(chat):
    """Two turns, labelled over every token: both answers are left out (as an assistant-only loss marks
    both), the prompt is the questions' words; with ``prompt="all_text"`` no answer is in it either."""
    model, processor, tokenizer, size, _ = CHATS[chat]()
    turns = [(QUESTION, ANSWER), (FOLLOW_UP, SECOND_ANSWER)]
    trained = _inputs(model, processor, [_conversation(processor, turns, first) for first in (True, False)], size)
    labels = _collated_labels(model, trained)
    prompts, _ = _picked(model, trained, tokenizer, labels, tokenizer=processor)
    words = [tokenizer.convert_tokens_to_string(p).split() for p in prompts]
    # The question is the text after the first image: both questions, or the follow-up where the first
    # stands before the image.
    assert words == [(QUESTION + " " + FOLLOW_UP).split(), FOLLOW_UP.split()]
    every, _ = _picked(model, trained, tokenizer, labels, tokenizer=processor, prompt="all_text")
    for text in (tokenizer.convert_tokens_to_string(p).split() for p in every):
        assert set(QUESTION.split() + FOLLOW_UP.split()) <= set(text)
        assert not set(ANSWER.split() + SECOND_ANSWER.split()) & set(text)


@pytest.mark.parametrize("chat", CHATS)
def test_text_labelled_over_every_token_without_an_assistant_turn_warns(chat):
    """A caption written after the image without the template (pretraining), labelled over every token:
    no answer can be told apart, so the caption is ranked as question, and prune() says so."""
    model, processor, tokenizer, size, _ = CHATS[chat]()
    image = {"qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "gemma3": "<start_of_image>",
             "llava": "<image>"}[chat]
    captions = _inputs(model, processor, [f"{image}{ANSWER}", f"{image} {QUESTION}"], size)
    with pytest.warns(UserWarning, match=UNMARKED + "no answer after the chat template's assistant header"):
        prompts, _ = _picked(model, captions, tokenizer, _collated_labels(model, captions), tokenizer=processor)
    assert [tokenizer.convert_tokens_to_string(p).split() for p in prompts] == [ANSWER.split(), QUESTION.split()]


@pytest.mark.parametrize("chat", CHATS)
def test_an_answer_scored_after_the_generation_prompt_is_no_question(chat):
    """An evaluation that scores candidate answers (each appended to the generation prompt, its
    log-likelihood read from one forward, no labels): with ``tokenizer=`` each candidate is no question,
    so every candidate is scored on the tokens that generation from the same prompt keeps, not on tokens
    picked by its own words. Earlier turns' answers stay: they are the conversation generation sees."""
    model, processor, tokenizer, size, _ = CHATS[chat]()
    for turns in ([(QUESTION, None)], [(QUESTION, ANSWER), (FOLLOW_UP, None)]):
        prompts = [_conversation(processor, turns, first) for first in (True, False)]
        asked = _inputs(model, processor, prompts, size)
        generation = _picked(model, asked, tokenizer, tokenizer=processor)
        for candidate in (SECOND_ANSWER, ANSWER + " " + FOLLOW_UP):
            scored = _inputs(model, processor, [p + " " + candidate for p in prompts], size)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert _picked(model, scored, tokenizer, tokenizer=processor) == generation
            words, _ = _picked(model, scored, tokenizer)  # without the template the candidate is question text
            assert all(set(candidate.split()) <= set(tokenizer.convert_tokens_to_string(w).split()) for w in words)
    # The second conversation's generation prompt holds the first answer as question text.
    assert [tokenizer.convert_tokens_to_string(w).split() for w in generation[0]] == [
        (QUESTION + " " + ANSWER + " " + FOLLOW_UP).split(), (ANSWER + " " + FOLLOW_UP).split()]
