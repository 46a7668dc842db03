"""The reference workload: a Flax recurrent text classifier, its data and its training loop.

Installed with the ``workload`` extra (``pip install "clipx[workload]"``); the
core ``clipx`` package never imports it. Modules:

- `clipx.workload.model`: the classifier (LSTM / GRU / vanilla RNN, pooling, head)
  and the named ``flax-sst2`` preset.
- `clipx.workload.data`: TSV loading with precise errors, tokenizer, vocabulary,
  bucketed padded batches, and the embedded synthetic temporal-order task.
- `clipx.workload.train`: the jitted training loop with any clipx clipper, JSONL
  logs, checkpoints and exact resumption.
- `clipx.workload.plots`: the figures ``clipx demo`` and ``clipx sweep`` write.
- `clipx.workload.sweep`: the learning-rate robustness sweep.
"""
