"""kronfluence's EK-FAC as the reference of benchmarks/kfac.py and benchmarks/kfac_resnet.py:
one cross-entropy task, the settings both benchmarks compare against (empirical Fisher,
its damping heuristic, aggregated query gradients), and the two timed calls.

Imports torch and kronfluence only (never jax): kfac_resnet's kronfluence child process
measures its own peak memory.
"""

from __future__ import annotations

import tempfile


def ekfac_analysis(net, train_ds, val_ds, *, name: str, chunk: int, query_batch: int):
    """(fit_factors(), pairwise_scores() -> torch [N_train], out_dir, the prepared net) for
    `net` (a torch module, eval mode) on TensorDatasets of (x, y). The caller removes
    `out_dir`.

    fit_factors: EK-FAC with the EMPIRICAL Fisher (observed labels); pairwise_scores:
    influence of every training row on the summed validation cross-entropy, damping 0.1 x
    the mean eigenvalue (kronfluence's ``damping_factor=None``)."""
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class CETask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # not reached: use_empirical_fisher=True
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    task = CETask()
    net = prepare_model(net, task)
    out_dir = tempfile.mkdtemp(prefix="kdprune_bench_kronfluence_")
    analyzer = Analyzer(analysis_name=name, model=net, task=task, cpu=True,
                        disable_tqdm=True, output_dir=out_dir)
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    score_args = ScoreArguments(damping_factor=None, aggregate_query_gradients=True)

    def fit_factors():
        analyzer.fit_all_factors("ekfac", train_ds, per_device_batch_size=chunk,
                                 factor_args=factor_args, overwrite_output_dir=True)

    def pairwise_scores():
        analyzer.compute_pairwise_scores("scores", "ekfac", val_ds, train_ds,
                                         per_device_query_batch_size=query_batch,
                                         per_device_train_batch_size=chunk,
                                         score_args=score_args, overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("scores")["all_modules"]

    return fit_factors, pairwise_scores, out_dir, net


def datasets(x_train, y_train, x_val, y_val):
    """(train, val) torch TensorDatasets of (x float32, y int64) from numpy arrays."""
    import torch

    return tuple(torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())
                 for x, y in ((x_train, y_train), (x_val, y_val)))
