"""``zspa fidelity``: what pruning changes on your own model and data, and which keep and
core ratio to choose.

The unpruned model runs once per sample and the pruned one once per (keep, core ratio)
grid point, on the same batches; per grid point it reports first-token agreement,
greedy-answer agreement, KL(unpruned || pruned) of the next-token distribution, prefill
time and KV-cache bytes beside the unpruned ones, and the ``prune(...)`` call to paste
for each budget. Modules: :mod:`.samples` (data in), :mod:`.offline` (the no-download
default), :mod:`.grid` (the measurement and its resumable journal), :mod:`.report`
(JSON, markdown, heatmap, recommendations), :mod:`.command` (the console command).
"""
from .grid import GridPoint, Journal, kl_divergence, measure_pass, parse_core_ratios, parse_keeps, run_grid
from .report import recommend, summarise, write
from .samples import Prompts, Sample, read_samples

__all__ = ["GridPoint", "Journal", "Prompts", "Sample", "kl_divergence", "measure_pass", "parse_core_ratios",
           "parse_keeps", "read_samples", "recommend", "run_grid", "summarise", "write"]
