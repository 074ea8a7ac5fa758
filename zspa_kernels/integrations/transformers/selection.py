"""Per-image budgets and the batched selection call.

Every image of a prefill (any row, any size) becomes one row of a padded
``(I, N_max, D)`` tensor with ``lengths``, so one ``zspa::select_tokens`` call
selects for all of them. The op takes one scalar ``k``; a fractional ``keep``
gives different budgets to images of different sizes, so those are grouped by
budget (one call per distinct budget; a count ``keep`` is always one call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from ... import op as _op  # noqa: F401  (registers torch.ops.zspa.select_tokens)
from ...spec import core_count, keep_budget


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, without a stream sync. On CUDA a copy from
    pageable memory (``.to(device)``, ``torch.tensor(..., device=)``) waits until every kernel
    queued before it has run (in a prefill hook: the vision tower, then the selection), so the
    host could not queue the language model meanwhile. A copy from pinned memory goes
    asynchronously; PyTorch's pinned-memory cache keeps the staging buffer until it has run."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` copied to the host without a stream sync: on CUDA into pinned memory,
    asynchronously, so its values are there only once the stream has been synchronised (the
    caller reads them after the prefill's one sync, which follows on the same stream)."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def padded_positions(flat: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Every image's positions as the rows of one zero-padded host ``(I, max size)`` tensor, from ``flat`` (the
    images' positions one image after another) and ``sizes`` (each image's count, a host tensor): in a fixed
    number of ops whatever the number of images (``pad_sequence`` copies one row at a time)."""
    padded = flat.new_zeros(sizes.shape[0], int(sizes.max()))
    padded[torch.arange(padded.shape[1]) < sizes[:, None]] = flat  # row-major: image by image
    return padded


def columns_to_device(padded: torch.Tensor, end: int, device: torch.device) -> torch.Tensor:
    """``padded`` (host ``(I, N_max)``, :func:`padded_positions`) on ``device`` with one column more, holding
    ``end`` (the row's length): where :func:`keep_picks` lands a -1 pick. :func:`select_images` takes the others
    (``[:, :-1]``)."""
    return to_device(torch.cat([padded, padded.new_full((padded.shape[0], 1), end)], 1), device)


def keep_picks(keep: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """``keep`` (host bool ``(B, W)``) on the device of ``cols``, with every image's picks set too: image ``i``'s
    pick ``p`` at ``(rows[i], cols[i, p])``, in one gather and one scatter whatever the number of images. ``cols``:
    :func:`columns_to_device`'s, whose last column (W, past the row) takes the -1 picks (an image of fewer tokens
    than its budget, or of a smaller budget than another's), dropped after."""
    out = to_device(torch.cat([keep, keep.new_zeros(keep.shape[0], 1)], 1), cols.device)
    at = cols.gather(1, picks.remainder(cols.shape[1]))
    out.index_put_((rows[:, None].expand_as(at), at), out.new_ones(()))  # a device scalar: no copy
    return out[:, :-1]


@dataclass
class ImageSelection:
    """What was kept of one image (or video) of one prefill row.

    ``order`` holds indices into that image's ``n_tokens`` tokens in pick order:
    the ``n_core`` most prompt-relevant first (falling relevance), then the greedy
    max-min diversity picks. It lives on the model's device. ``prompt_tokens``
    (host) are the positions in the row's ``input_ids`` whose embeddings formed the
    prompt the relevance was measured against.
    """

    batch_row: int
    image_index: int
    n_tokens: int
    order: torch.LongTensor
    n_core: int
    prompt_tokens: torch.LongTensor

    @property
    def kept(self) -> torch.LongTensor:
        """The kept token indices in ascending (spatial) order."""
        return self.order.sort().values


def select_images(
    embeds: torch.Tensor,
    rows: list[int],
    cols: torch.Tensor,
    sizes: list[int],
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    keep: Union[int, float],
    core_ratio: float,
    relevance: str,
    backend: str,
    prompt_tokens: list[torch.Tensor],
    rows_d: torch.Tensor,
) -> tuple[list[ImageSelection], torch.Tensor]:
    """Select tokens of every image ``i`` = ``embeds[rows[i], cols[i, :sizes[i]]]``.

    ``cols`` is ``(I, N_max)`` on ``embeds``' device (the tail past each size is never
    read). ``prompt`` is ``(B, T, D)`` with ``prompt_mask`` ``(B, T)``, one per batch row,
    and ``prompt_tokens[b]`` the positions it was gathered from (recorded only). ``rows_d``: ``rows``
    on the device (the caller scatters the picks with them too: :func:`keep_picks`).
    Returns one :class:`ImageSelection` per image, in the order given, and every image's picks
    at once: ``(I, k_max)`` on the device, image ``i``'s ``order`` then -1 (for callers that keep
    or drop the picks of all images in a fixed number of ops).
    """
    device = embeds.device
    size_t = to_device(torch.tensor(sizes), device)
    visual = embeds[rows_d[:, None], cols]
    budgets_i = [keep_budget(keep, n) for n in sizes]
    orders: list[torch.Tensor] = [None] * len(sizes)
    budgets = sorted(set(budgets_i))
    picks = None if len(budgets) == 1 else torch.full((len(sizes), budgets[-1]), -1, dtype=torch.long, device=device)
    for k in budgets:
        members = [i for i, b in enumerate(budgets_i) if b == k]
        whole = len(members) == len(sizes)
        idx = None if whole else to_device(torch.tensor(members), device)
        picked = torch.ops.zspa.select_tokens(
            visual if whole else visual[idx],
            prompt[rows_d if whole else rows_d[idx]],
            k,
            core_ratio,
            size_t if whole else size_t[idx],
            prompt_mask[rows_d if whole else rows_d[idx]],
            relevance,
            backend,
            True,
        )
        if whole:
            picks = picked
        else:
            picks[idx, :k] = picked
        # An image of fewer than k tokens has -1 after its picks (a view of the first min(k, n) then).
        for i, order in zip(members, picked.unbind(0)):
            orders[i] = order if sizes[i] >= k else order[: sizes[i]]
    out = []
    image_of_row: dict[int, int] = {}
    for i, (r, n) in enumerate(zip(rows, sizes)):
        core = core_count(core_ratio, min(budgets_i[i], n))
        out.append(ImageSelection(r, image_of_row.get(r, 0), n, orders[i], core, prompt_tokens[r]))
        image_of_row[r] = image_of_row.get(r, 0) + 1
    return out, picks
