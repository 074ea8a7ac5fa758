"""What a fidelity run found, rebuilt from its journal alone (so a resumed run writes the
same report): the summary JSON, a markdown table, a heatmap, and the ``prune(...)`` call
recommended for each budget.

An agreement is a share of a few samples, so each comes with its 95% Wilson score interval, and
each recommendation names the other core ratios of its budget that these samples cannot tell from
it: an exact McNemar test on the samples where exactly one of the two answers agrees with the
unpruned one (paired: the same samples, the same unpruned answers), two-sided at 5%."""
from __future__ import annotations

import json
import math
import pathlib
import statistics

from .grid import Journal, keep_key

FILES = ("fidelity.json", "fidelity.md", "fidelity.png")
CONFIDENCE = 0.95  # of the agreements' intervals; the McNemar test's level is 1 - CONFIDENCE


def wilson_interval(agree: int, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """The Wilson score interval of a share ``agree / n``: unlike the normal approximation it stays
    inside [0, 1] and is not empty at 0 or n agreements, which few samples often give."""
    if n < 1:
        raise ValueError(f"n: expected at least one sample, got {n}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    share, z2 = agree / n, z * z
    centre = (share + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At 0 (n) agreements the lower (upper) end is exactly 0 (1); the formula leaves rounding there.
    return [0.0 if agree == 0 else centre - half, 1.0 if agree == n else centre + half]


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for paired outcomes: ``only_a`` samples agree under a and not b,
    ``only_b`` the reverse (samples where both or neither agree say nothing about which is better)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _point_summary(record: dict, unpruned: dict) -> dict:
    n = len(unpruned["first_tokens"])
    first = [a == b for a, b in zip(record["first_tokens"], unpruned["first_tokens"])]
    answer = [a == b for a, b in zip(record["answers"], unpruned["answers"])]
    return {
        "keep": record["keep"], "core_ratio": record["core_ratio"],
        "first_token_agreement": sum(first) / n,
        "first_token_agreement_interval": wilson_interval(sum(first), n),
        "answer_agreement": sum(answer) / n,
        "answer_agreement_interval": wilson_interval(sum(answer), n),
        "kl_mean": statistics.fmean(record["kl"]), "kl_max": max(record["kl"]),
        "prefill_ms": record["prefill_ms"],
        "prefill_speedup": unpruned["prefill_ms"] / record["prefill_ms"],
        "kv_cache_bytes_per_sample": record["kv_cache_bytes"] / n,
        "kv_cache_ratio": unpruned["kv_cache_bytes"] / record["kv_cache_bytes"],
        "visual_tokens_per_sample": record["visual_tokens"] / n,
        "visual_tokens_kept_per_sample": record["visual_tokens_kept"] / n,
        "per_sample": [{"first_token": t, "answer": a, "kl": k, "first_token_agrees": f, "answer_agrees": m}
                       for t, a, k, f, m in zip(record["first_tokens"], record["answers"], record["kl"],
                                                first, answer)],
    }


def prune_call(keep, core_ratio: float, tokenizer: bool = True) -> str:
    """The call to paste; ``tokenizer``: whether the run pruned with one (which changes the prompt's tokens)."""
    extra = ", tokenizer=processor" if tokenizer else ""
    return f"zspa_kernels.prune(model, keep={keep}, core_ratio={core_ratio}{extra})"


def answers_apart_p(a: dict, b: dict) -> float:
    """:func:`mcnemar_exact_p` of two grid points' answer agreements, sample by sample."""
    pairs = [(x["answer_agrees"], y["answer_agrees"]) for x, y in zip(a["per_sample"], b["per_sample"])]
    return mcnemar_exact_p(sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs))


def recommend(points: list[dict], tokenizer: bool = True) -> list[dict]:
    """Per budget, the core ratio whose greedy answers agree most with the unpruned ones;
    ties go to first-token agreement, then to the lower mean KL. ``tokenizer``: whether the run pruned with
    ``prune(..., tokenizer=)`` (the calls say so). ``not_distinguished``: the budget's other core ratios whose
    answer agreement the exact McNemar test does not tell from the recommended one's (p >= 1 - CONFIDENCE)."""
    best, budget = {}, {}
    for p in points:
        rank = (p["answer_agreement"], p["first_token_agreement"], -p["kl_mean"])
        key = keep_key(p["keep"])
        budget.setdefault(key, []).append(p)
        if key not in best or rank > best[key][0]:
            best[key] = (rank, p)
    return [{"keep": p["keep"], "core_ratio": p["core_ratio"], "call": prune_call(p["keep"], p["core_ratio"], tokenizer),
             "answer_agreement": p["answer_agreement"], "answer_agreement_interval": p["answer_agreement_interval"],
             "first_token_agreement": p["first_token_agreement"], "kl_mean": p["kl_mean"],
             "prefill_speedup": p["prefill_speedup"],
             "not_distinguished": [q["core_ratio"] for q in budget[key]
                                   if q is not p and answers_apart_p(p, q) >= 1 - CONFIDENCE]}
            for key, (_, p) in best.items()]


def summarise(journal: Journal) -> dict:
    """Everything measured, with agreements, KL and ratios worked out per grid point."""
    unpruned = journal.unpruned()
    points = [_point_summary(r, unpruned) for r in journal.records if r["kind"] == "pruned"]
    # Grid order whatever order the passes ran in: counts before fractions, then by value.
    points.sort(key=lambda p: (*keep_key(p["keep"]), p["core_ratio"]))
    run = {k: v for k, v in journal.run.items() if k != "kind"}
    n = len(unpruned["first_tokens"])
    return {"run": run,
            "unpruned": {"prefill_ms": unpruned["prefill_ms"],
                         "kv_cache_bytes_per_sample": unpruned["kv_cache_bytes"] / n,
                         "first_tokens": unpruned["first_tokens"], "answers": unpruned["answers"]},
            "points": points,
            "recommendations": recommend(points, tokenizer=run.get("tokenizer_special_ids") is not None)}


def _bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def markdown(summary: dict) -> str:
    run, base = summary["run"], summary["unpruned"]
    n = len(run["samples"])
    lines = [
        f"# zspa fidelity: {run.get('model', 'model')}",
        "",
        f"{n} samples, greedy answers of {run['new_tokens']} tokens, batches of {run['batch_size']}, "
        f"{run['dtype']} on {run['environment']['device']}, torch {run['environment']['torch']}"
        + (f", transformers {run['transformers']}" if "transformers" in run else "")
        + f", backend {run['backend']}, started {run['started']}"
        + (f" (load average {run['environment']['load_average_1min']:.1f})"
           if "load_average_1min" in run["environment"] else "") + ".",
        f"Unpruned: prefill {base['prefill_ms']:.1f} ms for all samples, KV cache "
        f"{_bytes(base['kv_cache_bytes_per_sample'])} per sample.",
        "",
        f"Agreements: the share of the {n} samples, [its {CONFIDENCE:.0%} Wilson interval].",
        "",
        "| keep | core ratio | visual tokens kept | first token agrees | answer agrees | KL mean | KL max "
        "| prefill | speed-up | KV cache / sample | smaller |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in summary["points"]:
        lines.append(
            f"| {p['keep']} | {p['core_ratio']} | {p['visual_tokens_kept_per_sample']:.0f} of "
            f"{p['visual_tokens_per_sample']:.0f} | {_share(p, 'first_token_agreement')} "
            f"| {_share(p, 'answer_agreement')} "
            f"| {p['kl_mean']:.3g} | {p['kl_max']:.3g} | {p['prefill_ms']:.1f} ms | {p['prefill_speedup']:.2f}x "
            f"| {_bytes(p['kv_cache_bytes_per_sample'])} | {p['kv_cache_ratio']:.1f}x |")
    lines += ["", "Recommended per budget (best answer agreement, then first token, then lowest KL; the core ratios "
              f"these samples cannot tell from it: exact McNemar test on the answers, p >= {1 - CONFIDENCE:.2g}):", ""]
    lines += [f"- keep {r['keep']}: `{r['call']}`" + _not_distinguished(r) for r in summary["recommendations"]]
    return "\n".join(lines) + "\n"


def _share(point: dict, key: str) -> str:
    low, high = point[f"{key}_interval"]
    return f"{point[key]:.2f} [{low:.2f}, {high:.2f}]"


def _not_distinguished(recommendation: dict) -> str:
    others = recommendation.get("not_distinguished") or []
    return f" (these samples cannot tell it from core ratio {', '.join(str(c) for c in others)})" if others else ""


def heat_cells(points: list[dict]) -> tuple[list[str], list[float], list[tuple[int, int]]]:
    """The heatmap's rows (keeps, labelled as given: "1" one token, "1.0" every token), its columns (core ratios)
    and each point's ``(row, column)``."""
    keeps = list(dict.fromkeys(keep_key(p["keep"]) for p in points))
    ratios = sorted({p["core_ratio"] for p in points})
    cells = [(keeps.index(keep_key(p["keep"])), ratios.index(p["core_ratio"])) for p in points]
    return [str(k) for _, k in keeps], ratios, cells


def heatmap_figure(summary: dict):
    """Keep x core ratio; colour: greedy-answer agreement; text: agreement and prefill speed-up. At least the size
    its title and labels take, however small the grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = summary["points"]
    keeps, ratios, cells = heat_cells(points)
    grid = [[float("nan")] * len(ratios) for _ in keeps]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(ratios) + 2.5), max(4.0, 0.8 * len(keeps) + 1.8)))
    for (r, c), p in zip(cells, points):
        grid[r][c] = p["answer_agreement"]
        ax.text(c, r, f"{p['answer_agreement']:.2f}\nprefill {p['prefill_speedup']:.2f}x", ha="center", va="center",
                fontsize=9, color="black" if p["answer_agreement"] > 0.5 else "white")
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(ratios)), [str(r) for r in ratios])
    ax.set_yticks(range(len(keeps)), keeps)
    ax.set_xlabel("core ratio")
    ax.set_ylabel("keep (tokens per image, or a fraction)")
    run = summary["run"]
    ax.set_title(f"{run.get('model', 'model')}: {len(run['samples'])} samples\n"
                 "colour: greedy answers equal to the unpruned ones;\ntext: that share and the prefill speed-up",
                 fontsize=9)
    fig.colorbar(image, ax=ax, label="greedy answer agreement")
    fig.tight_layout()
    return fig


def heatmap(summary: dict, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig = heatmap_figure(summary)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(summary: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
    paths = [out_dir / name for name in FILES]
    paths[0].write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(summary), encoding="utf-8")
    heatmap(summary, paths[2])
    return paths
