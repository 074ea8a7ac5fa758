"""A training call labelled over every token (``labels = input_ids`` with padding and image tokens at -100, as
most VLM collators label a chat) with ``tokenizer=processor``: the answers are the text after each of the chat
template's assistant headers, to the end of the turn, and no prompt (test_real_chat_template_answers.py shows it on
Qwen2.5-VL, Gemma 3, LLaVA-1.5). Here on the other chat templates the suite holds, with their real processors and
the tiny models their tests build: DeepSeek-VL (``\\n\\nAssistant: `` after a default system prompt), ERNIE-4.5-VL
and PaddleOCR-VL (``\\nAssistant: ``, ``\\nAssistant:\\n``), GLM-OCR (``<|assistant|>\\n``), LLaVA-NeXT (Mistral's
``[INST] ... [/INST]``, the answer after `` [/INST] ``), Llama 3.2 Vision (``<|start_header_id|>assistant
<|end_header_id|>\\n\\n``; a cross-attention model, its own handle), SmolVLM (``<end_of_utterance>\\nAssistant:``,
unsplit images). The suite's ERNIE-4.5-VL and PaddleOCR-VL templates write a user turn and the generation prompt
only: here with the checkpoints' assistant turn added (the generation prompt, the answer, ``<|end_of_sentence|>``).
ShieldGemma 2's template writes no assistant turn (every content item is a policy in a user turn of its own):
nothing to tell apart there."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from zspa_kernels.integrations.transformers.families import answer_header_runs, special_token_ids  # noqa: E402

from .test_real_chameleon_deepseek import _deepseek_vl  # noqa: E402
from .test_real_ernie_paddle import ERNIE_MARKERS, ERNIE_TEMPLATE, PADDLE_TEMPLATE, _ernie, _paddleocr_vl  # noqa: E402
from .test_real_hunyuan_glm import _glm_ocr_chat  # noqa: E402
from .test_real_llava_next_granite import _llava_next_templated  # noqa: E402
from .test_real_mllama import LLAMA_TEMPLATE, _mllama  # noqa: E402
from .test_real_chat_template_answers import _collated_labels, _conversation, _picked, _visual_ids  # noqa: E402
from .test_real_processors import _bpe_tokenizer, _photo  # noqa: E402
from .test_real_smolvlm_mistral_large4 import _smolvlm  # noqa: E402

QUESTION, ANSWER, FOLLOW_UP, SECOND_ANSWER = "w4 w5 w6", "w7 w8", "w9 w10", "w11"
WORDS = " ".join([QUESTION, ANSWER, FOLLOW_UP, SECOND_ANSWER])
END_OF_SENTENCE = "<|end_of_sentence|>"  # ERNIE's (and PaddleOCR-VL's) eos, special in their tokenizers


def _assistant_turns(template: str, header: str) -> str:
    """The suite's ERNIE-4.5-VL / PaddleOCR-VL template (a user turn and the generation prompt only) with the
    checkpoints' assistant turn: the generation prompt's header, the answer, ``<|end_of_sentence|>``."""
    tail = "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt"
    assert template.count(tail) == 1
    turn = ("{%- elif message.role == 'assistant' -%}{{- '" + header + "' -}}{%- for item in message.content -%}"
            "{{- item.text -}}{%- endfor -%}{{- '" + END_OF_SENTENCE + "' -}}")
    return template.replace(tail, turn + tail)


def _deepseek_chat(hybrid=False):
    model, processor, tokenizer = _deepseek_vl(hybrid)
    return model, processor, tokenizer, [(16, 16)]


def _ernie_chat():
    tokenizer = _bpe_tokenizer(list(ERNIE_MARKERS.values()) + [END_OF_SENTENCE],
                               [f"User: Picture 1:\nAssistant: {WORDS}"])
    model, processor = _ernie(tokenizer, chat_template=_assistant_turns(ERNIE_TEMPLATE, "\\nAssistant: "))
    return model, processor, tokenizer, [(12, 16)]


def _paddle_chat():
    tokenizer = _bpe_tokenizer(["<|IMAGE_START|>", "<|IMAGE_END|>", "<|IMAGE_PLACEHOLDER|>", "<|video_pad|>",
                                END_OF_SENTENCE], [f"User: \nAssistant:\n{WORDS}"])
    model, processor = _paddleocr_vl(tokenizer, chat_template=_assistant_turns(PADDLE_TEMPLATE, "\\nAssistant:\\n"))
    return model, processor, tokenizer, [(12, 16)]


def _glm_chat():
    model, processor, tokenizer = _glm_ocr_chat()
    return model, processor, tokenizer, [(16, 16)]


def _llava_next_chat():
    model, processor, tokenizer = _llava_next_templated()
    return model, processor, tokenizer, [(16, 16)]


def _smolvlm_chat():
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    model, processor, tokenizer = _smolvlm(words=("User:", "Assistant:"))
    processor.chat_template = DEFAULT_CHAT_TEMPLATE
    processor.image_processor.do_image_splitting = False  # one selection an image (its tiles: the other tests)
    return model, processor, tokenizer, [(16, 16)]


def _mllama_chat():
    model, processor, tokenizer = _mllama()
    processor.chat_template = LLAMA_TEMPLATE
    return model, processor, tokenizer, [(16, 40), (40, 40)]


CHATS = {"deepseek_vl": _deepseek_chat, "deepseek_vl_hybrid": lambda: _deepseek_chat(True), "ernie4_5_vl": _ernie_chat,
         "paddleocr_vl": _paddle_chat, "glm_ocr": _glm_chat, "llava_next": _llava_next_chat, "mllama": _mllama_chat,
         "smolvlm": _smolvlm_chat}


def _inputs(model, processor, texts, sizes):
    gen = torch.Generator().manual_seed(0)
    inputs = processor(text=texts, images=[[_photo(h, w, gen)] for (h, w), _ in zip(sizes * len(texts), texts)],
                       padding=True, return_tensors="pt")
    inputs.pop("token_type_ids", None)  # 4.57's tokenizers return them; these models take none
    return inputs


def _pruned(caught) -> list[str]:
    """prune()'s warnings among those caught (transformers' own, such as 5.17's deprecations, aside)."""
    return [str(w.message) for w in caught if str(w.message).startswith("prune()")]


def _text(tokenizer, tokens) -> str:
    """The tokens' text, its blanks aside (a tokenizer's blank tokens are no prompt, so words run together)."""
    return "".join(tokenizer.convert_tokens_to_string(tokens).split())


# Each template's assistant header, as its tokenizer writes it in context (the blanks around it trimmed), and whether
# the template writes a message's images before its text whatever their order (PaddleOCR-VL's, LLaVA-NeXT's).
HEADERS = {"deepseek_vl": ["Assistant", ":"], "deepseek_vl_hybrid": ["Assistant", ":"],
           "ernie4_5_vl": ["Assistant", ":"], "paddleocr_vl": ["Assistant", ":"], "glm_ocr": ["<|assistant|>"],
           "llava_next": ["Ġ[/", "INST", "]"], "mllama": ["<|start_header_id|>", "assistant", "<|end_header_id|>"],
           "smolvlm": ["<end_of_utterance>", "\n", "Assistant:"]}
IMAGES_FIRST = {"paddleocr_vl", "llava_next"}


def _occurrences(ids: list[int], run: list[int]) -> int:
    return sum(ids[i:i + len(run)] == run for i in range(len(ids) - len(run) + 1))


@pytest.mark.parametrize("chat", CHATS)
def test_the_assistant_header_is_found_and_written_so_in_the_processor_rows(chat):
    """:func:`answer_header_runs` finds one header a template: DeepSeek-VL's, ERNIE-4.5-VL's and PaddleOCR-VL's
    ``Assistant:`` (its newline and the space before the answer are blanks, trimmed), GLM-OCR's ``<|assistant|>``
    (special), LLaVA-NeXT's `` [/INST]`` (three BPE pieces, the space merged into the first), Llama 3.2 Vision's
    ``<|start_header_id|>assistant<|end_header_id|>`` (the ``<|eot_id|>`` before it an eos id of the config: a run
    ends there). The processor writes images (and the text around them) where the template writes a placeholder:
    the header must still stand in its rows as the template's tokenizer writes it, once a turn, for the image
    before the question and after it."""
    model, processor, tokenizer, sizes = CHATS[chat]()
    split_at = _visual_ids(model) | special_token_ids(model.config)
    runs = [tokenizer.convert_ids_to_tokens(list(r)) for r in answer_header_runs(processor, split_at)]
    assert runs == [HEADERS[chat]]
    header = tokenizer.convert_tokens_to_ids(HEADERS[chat])
    for turns in ([(QUESTION, ANSWER)], [(QUESTION, ANSWER), (FOLLOW_UP, SECOND_ANSWER)]):
        trained = _inputs(model, processor, [_conversation(processor, turns, first) for first in (True, False)], sizes)
        for r in range(2):
            ids = trained["input_ids"][r][trained["attention_mask"][r].bool()].tolist()
            assert _occurrences(ids, header) == len(turns), tokenizer.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("chat", CHATS)
def test_a_conversation_labelled_over_every_token_selects_as_its_generation_will(chat):
    """Rows of one question and its answer (the image before the question and after it, where the template keeps
    their order), labelled over every token but padding and image tokens: with ``tokenizer=processor`` the prompt
    is the question alone and each image keeps exactly the tokens, in the same order, that the generation prompt
    of the same question keeps, with no warning. (GLM-OCR's generation prompt writes ``<think></think>`` after its
    header, a past assistant turn does not: the prompts, not the texts, are the same.) Without a tokenizer the
    answer is ranked as question, and prune() warns."""
    model, processor, tokenizer, sizes = CHATS[chat]()
    questions = [_conversation(processor, [(QUESTION, None)], first) for first in (True, False)]
    conversations = [_conversation(processor, [(QUESTION, ANSWER)], first) for first in (True, False)]
    assert all(ANSWER in c and ANSWER not in q for c, q in zip(conversations, questions))
    asked, trained = (_inputs(model, processor, texts, sizes) for texts in (questions, conversations))
    labels = _collated_labels(model, trained)
    prompts, picks = _picked(model, asked, tokenizer, tokenizer=processor)
    assert [_text(tokenizer, p) for p in prompts] == ["".join(QUESTION.split())] * 2

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _picked(model, trained, tokenizer, labels, tokenizer=processor) == (prompts, picks)
    assert not _pruned(caught)  # the answers are told apart: nothing to warn of

    with pytest.warns(UserWarning, match=r"labels cover every question token of a row with images .*"
                                         r"tokenizer=processor"):
        untold, _ = _picked(model, trained, tokenizer, labels)
    assert all("".join(ANSWER.split()) in _text(tokenizer, p) for p in untold)


@pytest.mark.parametrize("chat", CHATS)
def test_every_answer_of_a_conversation_is_left_out(chat):
    """Two turns labelled over every token: both answers are left out, and the prompt is the questions' words
    alone (the text after the first image: both questions, or the follow-up where the first stands before the
    image): no answer, and none of the text the template writes between the turns (ERNIE-4.5-VL's and
    PaddleOCR-VL's ``<|end_of_sentence|>User: ``, DeepSeek-VL's ``<｜end▁of▁sentence｜>User: ``, LLaVA-NeXT's
    ``<\\s> [INST] ``). With ``prompt="all_text"`` no answer is in the text either."""
    model, processor, tokenizer, sizes = CHATS[chat]()
    turns = [(QUESTION, ANSWER), (FOLLOW_UP, SECOND_ANSWER)]
    trained = _inputs(model, processor, [_conversation(processor, turns, first) for first in (True, False)], sizes)
    labels = _collated_labels(model, trained)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompts, _ = _picked(model, trained, tokenizer, labels, tokenizer=processor)
    assert not _pruned(caught)
    both, follow_up = "".join((QUESTION + FOLLOW_UP).split()), "".join(FOLLOW_UP.split())
    assert [_text(tokenizer, p) for p in prompts] == [both, both if chat in IMAGES_FIRST else follow_up]
    every, _ = _picked(model, trained, tokenizer, labels, tokenizer=processor, prompt="all_text")
    for text in (tokenizer.convert_tokens_to_string(p) for p in every):
        assert all(w in text for w in (QUESTION + " " + FOLLOW_UP).split())
        assert not any(w in text for w in (ANSWER + " " + SECOND_ANSWER).split())


def test_shieldgemma2_template_writes_no_assistant_turn():
    """ShieldGemma 2's template (test_real_gemma4u_shield.py) writes an assistant message as it writes a user's:
    each content item a policy inside its instructions, in a user turn, then ``<start_of_turn>model``."""
    pytest.skip("ShieldGemma 2's template writes every content item as a policy in a user turn, an assistant's too: "
                "no answer to tell apart")
