"""Every row of the README's bad-input table gets its error, naming the argument."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import zspa_kernels

B, N, D, T = 2, 6, 4, 3


def _good():
    return dict(visual=torch.randn(B, N, D), prompt=torch.randn(B, D), k=3, core_ratio=0.5,
                lengths=None, prompt_mask=None, relevance="mean", backend="auto")


BAD_INPUTS = [
    # (change to the good arguments, exception, words the message must contain)
    (dict(visual=torch.randn(N, D)), ValueError, "visual: expected 3 dims"),
    (dict(visual=torch.randn(B, 0, D)), ValueError, "visual: expected non-empty"),
    (dict(visual=torch.ones(B, N, D, dtype=torch.int64)), TypeError, "visual: expected float32, float16 or bfloat16"),
    (dict(visual=torch.randn(B, N, D, dtype=torch.float64)), TypeError, "visual: expected float32"),
    (dict(prompt=torch.randn(B, T, D, 1)), ValueError, "prompt: expected 2 dims"),
    (dict(prompt=torch.randn(B, D).half()), TypeError, "prompt: expected the dtype of visual"),
    (dict(prompt=torch.randn(B + 1, D)), ValueError, "prompt: expected batch size 2"),
    (dict(prompt=torch.randn(B, D + 1)), ValueError, "prompt: expected feature size D=4"),
    (dict(prompt=torch.randn(B, 0, D)), ValueError, "prompt: expected at least one text token"),
    (dict(prompt=torch.randn(B, D, device="meta")), ValueError, "prompt: expected a tensor on cpu"),
    (dict(k=0), ValueError, "k: expected an int in [1, 2**31 - 1], got 0"),
    (dict(k=2**40), ValueError, "k: expected an int in [1, 2**31 - 1], got 1099511627776"),
    (dict(core_ratio=1.5), ValueError, "core_ratio: expected a float in [0, 1], got 1.5"),
    (dict(core_ratio=-0.1), ValueError, "core_ratio: expected a float in [0, 1]"),
    (dict(core_ratio=float("nan")), ValueError, "core_ratio: expected a float in [0, 1], got nan"),
    (dict(lengths=torch.tensor([3.0, 2.0])), TypeError, "lengths: expected dtype int32 or int64"),
    (dict(lengths=torch.tensor([3, 2, 1])), ValueError, "lengths: expected shape (2,)"),
    (dict(lengths=torch.tensor([[3, 2]])), ValueError, "lengths: expected shape (2,)"),
    (dict(lengths=torch.tensor([3, 0])), ValueError, "lengths: expected values in [1, 6], got 0 at row 1"),
    (dict(lengths=torch.tensor([7, 1])), ValueError, "lengths: expected values in [1, 6], got 7 at row 0"),
    (dict(lengths=torch.tensor([3, 2], device="meta")), ValueError, "lengths: expected a tensor on cpu"),
    (dict(prompt_mask=torch.ones(B, T, dtype=torch.bool)), ValueError, "prompt_mask: only valid with a per-token prompt"),
    (dict(prompt=torch.randn(B, T, D), prompt_mask=torch.ones(B, T)), TypeError, "prompt_mask: expected dtype bool"),
    (dict(prompt=torch.randn(B, T, D), prompt_mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError,
     "prompt_mask: expected shape (2, 3)"),
    (dict(relevance="cosine"), ValueError, "relevance: expected one of ('mean', 'max'), got 'cosine'"),
    (dict(backend="cudnn"), ValueError, "backend: expected one of"),
    (dict(backend="cuda"), ValueError, "backend: 'cuda' needs CUDA tensors"),
    (dict(visual=torch.randn(B, N, D).to_sparse()), TypeError, "visual: expected a dense (strided) tensor, got layout "
     "torch.sparse_coo"),
    (dict(prompt=torch.randn(B, D).to_sparse()), TypeError, "prompt: expected a dense (strided) tensor"),
    (dict(lengths=torch.tensor([3, 2]).to_sparse()), TypeError, "lengths: expected a dense (strided) tensor"),
    (dict(prompt=torch.randn(B, T, D), prompt_mask=torch.ones(B, T, dtype=torch.bool).to_sparse()), TypeError,
     "prompt_mask: expected a dense (strided) tensor"),
]


@pytest.mark.parametrize("change, error, message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
@pytest.mark.parametrize("entry", ["api", "op"])
def test_bad_input_gets_a_clear_error(entry, change, error, message):
    args = {**_good(), **change}
    call = zspa_kernels.select_tokens if entry == "api" else torch.ops.zspa.select_tokens
    with pytest.raises(error) as info:
        call(**args)
    assert message in str(info.value)


# Python types the op schema itself rejects: the Python API names the argument in a TypeError;
# torch.ops.zspa.select_tokens raises the dispatcher's RuntimeError, which names it too.
SCHEMA_TYPES = [
    (dict(visual=[[0.0]]), "visual: expected a torch.Tensor"),
    (dict(prompt="a cat"), "prompt: expected a torch.Tensor"),
    (dict(k=2.0), "k: expected an int >= 1, got float"),
    (dict(core_ratio=None), "core_ratio: expected a float in [0, 1], got NoneType"),
    (dict(relevance=None), "relevance: expected one of ('mean', 'max'), got NoneType"),
    (dict(backend=None), "backend: expected one of"),
    (dict(lengths=[3, 2]), "lengths: expected None or an int32/int64 tensor"),
]


@pytest.mark.parametrize("change, message", SCHEMA_TYPES, ids=[m for _, m in SCHEMA_TYPES])
def test_wrong_python_types(change, message):
    args = {**_good(), **change}
    with pytest.raises(TypeError) as info:
        zspa_kernels.select_tokens(**args)
    assert message in str(info.value)
    name = message.split(":")[0]
    with pytest.raises(RuntimeError, match=f"argument '{name}'"):
        torch.ops.zspa.select_tokens(**args)


# Types the schema converts silently (the raw op cannot see them): the Python API rejects them.
CONVERTED_TYPES = [
    (dict(k=True), "k: expected an int >= 1, got bool"),
    (dict(k=np.bool_(True)), "k: expected an int >= 1, got bool"),
    (dict(core_ratio=True), "core_ratio: expected a float in [0, 1], got bool"),
    (dict(pick_order=None), "pick_order: expected a bool, got NoneType"),
    (dict(strict=1), "strict: expected a bool, got int"),
]


@pytest.mark.parametrize("change, message", CONVERTED_TYPES, ids=[m for _, m in CONVERTED_TYPES])
def test_api_rejects_types_the_schema_would_convert(change, message):
    with pytest.raises(TypeError) as info:
        zspa_kernels.select_tokens(**{**_good(), **change})
    assert message in str(info.value)


# Ints past what the schema (int64 k) or a float (core_ratio) holds: the API names them as it does any out of range.
HUGE_INTS = [
    (dict(k=2**64), "k: expected an int in [1, 2**31 - 1], got 18446744073709551616"),
    (dict(k=np.uint64(2**63)), "k: expected an int in [1, 2**31 - 1], got 9223372036854775808"),
    (dict(k=-2**70), "k: expected an int in [1, 2**31 - 1], got -1180591620717411303424"),
    (dict(core_ratio=10**400), "core_ratio: expected a float in [0, 1], got 1000"),
    (dict(core_ratio=-10**400), "core_ratio: expected a float in [0, 1], got -1000"),
]


@pytest.mark.parametrize("change, message", HUGE_INTS, ids=[m.split(",")[0] + str(i) for i, (_, m) in enumerate(HUGE_INTS)])
def test_api_names_ints_out_of_range_of_the_op(change, message):
    from zspa_kernels.checks import check_options

    with pytest.raises(ValueError) as info:
        zspa_kernels.select_tokens(**{**_good(), **change})
    assert message in str(info.value)
    if "core_ratio" in change:  # prune() checks its options by the op's rule, long before the op runs
        with pytest.raises(ValueError, match="core_ratio: expected a float in"):
            check_options(change["core_ratio"], "mean", "auto")


@pytest.mark.parametrize("k, core_ratio", [(np.int64(3), np.float32(0.25)), (np.uint8(3), np.float64(0.5))])
def test_numpy_scalars_select_as_the_python_numbers_they_hold(k, core_ratio):
    args = _good()
    expected = zspa_kernels.select_tokens(**{**args, "k": 3, "core_ratio": float(core_ratio)}, pick_order=True)
    kept = zspa_kernels.select_tokens(**{**args, "k": k, "core_ratio": core_ratio}, pick_order=True)
    assert torch.equal(kept, expected)


def test_each_check_runs_once_per_call(monkeypatch):
    from zspa_kernels import api, op

    calls = []
    for module, name in ((api, "check_python_types"), (op, "check_args"), (api, "check_lengths_range"),
                         (op, "check_lengths_range"), (api, "check_prompt_values")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **kw: calls.append(_n) or _o(*a, **kw))
    zspa_kernels.select_tokens(**_good(), strict=True)
    assert sorted(calls) == ["check_args", "check_lengths_range", "check_prompt_values", "check_python_types"]


def test_empty_backend_environment_means_unset(monkeypatch):
    monkeypatch.setenv("ZSPA_BACKEND", "")
    assert zspa_kernels.select_tokens(**_good()).shape == (B, 3)


def test_environment_override_is_checked(monkeypatch):
    monkeypatch.setenv("ZSPA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="ZSPA_BACKEND: expected one of"):
        zspa_kernels.select_tokens(**_good())


def test_a_backend_the_environment_chose_is_named_in_its_error(monkeypatch):
    monkeypatch.setenv("ZSPA_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"^ZSPA_BACKEND=cuda \(backend='auto'\): 'cuda' needs CUDA tensors, got cpu$"):
        zspa_kernels.select_tokens(**_good())
    with pytest.raises(ValueError, match=r"^backend: 'cuda' needs CUDA tensors"):  # the keyword's own choice
        zspa_kernels.select_tokens(**{**_good(), "backend": "cuda"})


STRICT_ONLY = [
    (dict(prompt=torch.tensor([[1.0, float("nan"), 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])),
     "prompt: row 0 holds a non-finite value"),
    (dict(prompt=torch.randn(B, T, D), prompt_mask=torch.tensor([[True, True, True], [False, False, False]])),
     "prompt_mask: row 1 has no valid prompt token"),
]


@pytest.mark.parametrize("change, message", STRICT_ONLY, ids=[m for _, m in STRICT_ONLY])
def test_strict_mode_rejects_bad_prompt_values(change, message):
    args = {**_good(), **change}
    zspa_kernels.select_tokens(**args)  # not strict: defined behaviour (acts as a zero prompt)
    with pytest.raises(ValueError) as info:
        zspa_kernels.select_tokens(**args, strict=True)
    assert message in str(info.value)


def test_strict_mode_accepts_finite_prompt_rows_whose_float32_sum_overflows():
    """spec.pool_shift: such rows pool to their finite mean, which strict mode has no reason to refuse."""
    args = {**_good(), "prompt": torch.stack([torch.ones(T, D), torch.full((T, D), 3e38)])}
    for relevance in ("max", "mean"):
        relaxed = zspa_kernels.select_tokens(**{**args, "relevance": relevance}, pick_order=True)
        assert torch.equal(zspa_kernels.select_tokens(**{**args, "relevance": relevance}, pick_order=True, strict=True),
                           relaxed)


def test_nonfinite_prompt_acts_as_zero_prompt():
    args = _good()
    args["prompt"] = torch.full((B, D), float("nan"))
    nan_prompt = zspa_kernels.select_tokens(**args, pick_order=True)
    args["prompt"] = torch.zeros(B, D)
    assert torch.equal(nan_prompt, zspa_kernels.select_tokens(**args, pick_order=True))
