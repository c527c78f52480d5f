"""Distillation: a NAMM learned by gradient from a dense signal, before evolution.

Evolution over 4,172 weights needs thousands of evaluations; a recording of
full-cache prefills gives, for every cached token at every eviction step, the
NAMM's own input features and the attention that token goes on to receive.
Regressing the BAM's score onto that target (in log space) is minutes of
gradient descent on a laptop, and gives evolution a starting point that
already ranks tokens like the best hand-made rule.

* :mod:`.record` turns documents into per-step feature/target records;
* :mod:`.fit` fits the BAM and read-out and calibrates the threshold;
* :mod:`.evaluate` measures held-out future-attention recall of any policy.
"""

from .fit import DistillOptions, fit_namm
from .record import ItemRecord, StepRecord, record_item

__all__ = ["DistillOptions", "ItemRecord", "StepRecord", "fit_namm", "record_item"]
