"""PI0 and PI0.5 with their real processors (transformers 5.17+ and 5.25+): ``PI0Processor``/``PI05Processor``
over a word-level tokenizer and SigLIP's image processor, around a tiny random model (tiny.pi0's or pi05's, over
the tokenizer's vocabulary). The processors write each camera's image tokens first, then ``<bos>`` and the task:
PI0's followed by ``"\\n"``, right-padded to at least 48 tokens; PI0.5's as ``Task: {task}, State: {bins};\\nAction: ``
(the robot's state discretized into 256 bins), right-padded to at least 200."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zspa_kernels  # noqa: E402

from .test_action_expert_prune import _UnprunedNumbering  # noqa: E402
from .reference import masked_out  # noqa: E402
from .test_real_processors import _image_processor, _photo, _prompt_words, _tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(transformers, "PI0Processor"), reason="PI0 is not in this transformers")


def _with_its_processor(name: str):
    """The tiny ``name`` (``"PI0"`` or ``"PI05"``) over a word-level tokenizer, and its processor."""
    from zspa_kernels.integrations.transformers.tiny import pi0, pi05

    # The words PI0.5's processor writes around the task, and the state's bins (256).
    tokenizer = _tokenizer([], plain=["\n", ",", ";"], bos="<bos>",
                           words=("Task:", "State:", "Action:", *map(str, range(256))))
    tokenizer.padding_side = "right"  # as PI0 checkpoints' tokenizers pad (the processor asks for it too)
    image_processor = _image_processor("SiglipImageProcessor", size={"height": 16, "width": 16})
    image_processor.image_seq_length = 16  # as PaliGemma checkpoints' image processor configs give it
    # The processor adds <image> (special) and PaliGemma's <locNNNN>/<segNNN> words to the tokenizer.
    processor = getattr(transformers, name + "Processor")(
        image_processor=image_processor, tokenizer=tokenizer, state_mean=[0.0] * 6, state_std=[1.0] * 6,
        max_state_dim=6, chunk_size=4)
    built = (pi0 if name == "PI0" else pi05)().model
    config = built.config.to_dict()
    config["vlm_config"]["text_config"].update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    config["vlm_config"]["image_token_id"] = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    model = type(built)(type(built.config)(**config)).eval()
    # The tiny model's weights where the vocabulary leaves them their shapes (PI0.5's adaptive norms drawn).
    model.load_state_dict({k: v for k, v in built.state_dict().items() if model.state_dict()[k].shape == v.shape},
                          strict=False)
    return model, processor, tokenizer


@torch.no_grad()
def test_pi0_cameras_are_budgeted_apart_and_ranked_by_the_task():
    model, processor, tokenizer = _with_its_processor("PI0")
    gen = torch.Generator().manual_seed(0)
    images = [[_photo(16, 16, gen), _photo(24, 16, gen)], [_photo(16, 16, gen)]]
    inputs = processor(images=images, text=["w1 w2 w3", "w4 w5"], state=torch.randn(2, 6, generator=gen),
                       return_tensors="pt")
    inputs["noise"] = torch.randn(2, 4, 6, generator=gen)
    ids = inputs["input_ids"]
    assert ids.shape == (2, 48) and inputs["attention_mask"].sum(1).tolist() == [2 * 16 + 5, 16 + 4]
    expected = model.sample_actions(**inputs)
    with zspa_kernels.prune(model, keep=1.0, tokenizer=processor):
        assert torch.equal(model.sample_actions(**inputs), expected)
    for tokenizer_arg, newline in ((processor, []), (None, ["\n"])):
        with zspa_kernels.prune(model, keep=4, tokenizer=tokenizer_arg) as handle:
            got = model.sample_actions(**inputs)
        selections = handle.last_selection
        assert [(s.batch_row, s.n_tokens, s.order.numel()) for s in selections] == [(0, 16, 4), (0, 16, 4), (1, 16, 4)]
        assert [_prompt_words(tokenizer, inputs, s) for s in selections] == (
            [["w1", "w2", "w3"] + newline] * 2 + [["w4", "w5"] + newline])
    image = model.config.vlm_config.image_token_id
    with _UnprunedNumbering(model, inputs["attention_mask"], ids.shape[1]):
        reference = model.sample_actions(**masked_out(dict(inputs), handle.last_kept_positions, image))
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    assert (got - expected).abs().max() > 1e-3


@pytest.mark.skipif(not hasattr(transformers, "PI05Processor"), reason="PI0.5 is not in this transformers")
@torch.no_grad()
def test_pi05_template_words_and_state_are_no_question():
    """PI0.5's processor writes ``Task: w1 w2 w3, State: {bins};\\nAction: ``: with ``tokenizer=`` the question is
    the task's words alone (the state's bins would outnumber them in the mean); without, every word after bos."""
    model, processor, tokenizer = _with_its_processor("PI05")
    gen = torch.Generator().manual_seed(0)
    images = [[_photo(16, 16, gen), _photo(16, 16, gen)], [_photo(16, 16, gen)]]
    inputs = processor(images=images, text=["w1 w2 w3", "w4 w5"], state=torch.rand(2, 6, generator=gen) * 2 - 1,
                       return_tensors="pt")
    inputs["noise"] = torch.randn(2, 4, 6, generator=gen)
    words = [tokenizer.convert_ids_to_tokens(row[m.bool()].tolist())
             for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    assert words[1][16:21] == ["<bos>", "Task:", "w4", "w5", ","] and words[1][-3:] == [";", "\n", "Action:"]
    expected = model.sample_actions(**inputs)
    with zspa_kernels.prune(model, keep=1.0, tokenizer=processor):
        assert torch.equal(model.sample_actions(**inputs), expected)
    with zspa_kernels.prune(model, keep=4, tokenizer=processor) as handle:
        got = model.sample_actions(**inputs)
    assert [(s.batch_row, s.n_tokens, s.order.numel()) for s in handle.last_selection] == [(0, 16, 4)] * 2 + [(1, 16, 4)]
    assert [_prompt_words(tokenizer, inputs, s) for s in handle.last_selection] == (
        [["w1", "w2", "w3"]] * 2 + [["w4", "w5"]])
    image = model.config.vlm_config.image_token_id
    with _UnprunedNumbering(model, inputs["attention_mask"], inputs["input_ids"].shape[1]):
        reference = model.sample_actions(**masked_out(dict(inputs), handle.last_kept_positions, image))
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    with zspa_kernels.prune(model, keep=4) as handle:
        model.sample_actions(**inputs)
    untokenized = _prompt_words(tokenizer, inputs, handle.last_selection[2])
    assert untokenized[:4] == ["Task:", "w4", "w5", ","] and untokenized[-3:] == [";", "\n", "Action:"]
