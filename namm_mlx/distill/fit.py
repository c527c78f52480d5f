"""Fit a NAMM's BAM and read-out to recorded future attention, by gradient.

The regression target is ``log(N * a + eps)``: ``a`` is the attention a token
receives per later query (a mix of the document's later queries and the
question's), ``N`` the tokens cached at that step, so a token attended like
the average scores about 0 and the heavy tail of attention sinks stays within
a few units. Normalisation statistics come from the same recording, and the
read-out bias is shifted afterwards so that threshold 0 keeps a chosen share of
the recorded tokens (regression alone puts the threshold at an arbitrary
quantile).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from ..bam import BAMWeights, bam_scores
from ..config import NAMMConfig
from ..features import RecencyTable, normalize_spectrum
from ..namm import NAMM
from .record import ItemRecord, StepRecord

#: Targets: which later queries' attention a token is regressed onto.
TARGETS = ("future", "question", "mixed", "question_max")
LOSSES = ("mse", "smooth_l1")


@dataclass
class DistillOptions:
    """Everything that shapes a fit (recorded in the NAMM's provenance)."""

    target: str = "question"
    #: share of the question's attention in the "mixed" target
    question_weight: float = 0.5
    loss: str = "mse"
    steps: int = 400
    learning_rate: float = 3e-3
    seed: int = 0
    #: share of recorded tokens that threshold 0 keeps after calibration
    keep: float = 0.5
    #: layers stacked into one gradient step (all recorded layers when None)
    layers_per_batch: int | None = 2
    #: tokens per gradient step: a random contiguous window of a step's cache
    #: (None: all). The BAM's attention is quadratic in the tokens it sees, so
    #: windows make a step affordable on a CPU; a token then attends only to the
    #: newer tokens inside its window.
    window: int | None = 1024
    eps: float = 1e-3
    #: whether the scorer may read a token's age. Without it the recency inputs'
    #: weights stay zero, so a fact is judged by its attention alone: documents
    #: that place facts early otherwise teach "keep the oldest tokens", which
    #: drops a fact read mid-document (the result is still a reference NAMM).
    recency: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if not 0.0 <= self.question_weight <= 1.0:
            raise ValueError(f"question_weight must be in [0, 1], got {self.question_weight}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.window is not None and self.window < 16:
            raise ValueError(f"window must be at least 16 tokens, got {self.window}")


def attention_target(step: StepRecord, options: DistillOptions) -> np.ndarray:
    """Per-token attention ``[H, N]`` the score should rank by (before the log)."""
    if options.target == "future":
        return step.future
    if options.target == "question":
        return step.question
    if options.target == "question_max":
        return step.question_max
    w = options.question_weight
    return (1.0 - w) * step.future + w * step.question


def log_target(step: StepRecord, options: DistillOptions) -> np.ndarray:
    n = step.ema.shape[-2]
    return np.log(n * attention_target(step, options) + options.eps).astype(np.float32)


def normalisation(records: Sequence[ItemRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin mean, variance and count of the EMA over every recorded token."""
    total = count = sq = 0.0
    for record in records:
        for s in record.steps:
            flat = s.ema.reshape(-1, s.ema.shape[-1]).astype(np.float64)
            total = total + flat.sum(axis=0)
            sq = sq + (flat * flat).sum(axis=0)
            count += flat.shape[0]
    if not count:
        raise ValueError("the recording holds no tokens")
    mean = total / count
    var = np.maximum(sq / count - mean * mean, 0.0)
    return mean.astype(np.float32), var.astype(np.float32), np.full(mean.shape, count, np.int64)


@dataclass
class _Group:
    """One (item, step offset): the recorded layers' tokens, ready for the BAM."""

    embedding: mx.array  # [L, H, N, E]
    target: mx.array  # [L, H, N]


def recorded_embedding(steps: Sequence[StepRecord], namm: NAMM, recency: RecencyTable) -> mx.array:
    """The BAM input ``[len(steps), H, N, E]`` of recorded steps of equal shape,
    as ``namm``'s online pipeline builds it from the same features."""
    ema = mx.array(np.stack([s.ema for s in steps]))
    normalized = normalize_spectrum(ema, namm.norm_mean, namm.norm_var, namm.config.norm_eps)
    parts = [recency(mx.array(np.stack([s.ages for s in steps]))), normalized]
    if namm.config.key_norm_input:
        parts.append(mx.array(np.stack([s.key_norm for s in steps]))[..., None])
    return mx.concatenate(parts, axis=-1)


def _groups(records: Sequence[ItemRecord], namm: NAMM, options: DistillOptions) -> list[_Group]:
    recency = RecencyTable(namm.config)
    by_key: dict[tuple[int, int], list[StepRecord]] = {}
    for i, record in enumerate(records):
        for s in record.steps:
            by_key.setdefault((i, s.offset), []).append(s)
    groups = []
    for steps in by_key.values():
        embedding = recorded_embedding(steps, namm, recency)
        target = mx.array(np.stack([log_target(s, options) for s in steps]))
        mx.eval(embedding, target)
        groups.append(_Group(embedding, target))
    return groups


def initial_weights(config: NAMMConfig, seed: int, bias: float = 0.0) -> dict[str, mx.array]:
    """Small random weights: an all-zero BAM has no gradient through its attention."""
    rng = np.random.default_rng(seed)
    e, h = config.embed_dim, config.hidden_dim

    def normal(shape: tuple[int, ...], std: float) -> mx.array:
        return mx.array(rng.normal(0.0, std, size=shape).astype(np.float32))

    return {
        "qkv_weight": normal((e, 3 * h), 1.0 / math.sqrt(e)),
        "qkv_bias": mx.zeros((3 * h,)),
        "out_weight": normal((h, 2 * e), 0.1 / math.sqrt(h)),
        "out_bias": mx.zeros((2 * e,)),
        # small: normalised features have a heavy tail (attention sinks sit tens of
        # standard deviations out), so a unit-scale read-out starts far off target
        "readout_weight": normal((e, 1), 0.01 / math.sqrt(e)),
        "readout_bias": mx.array([bias], dtype=mx.float32),
    }


def recency_masks(config: NAMMConfig) -> dict[str, mx.array]:
    """Zero rows for the recency inputs of the two weights that read the
    features (the attention's projections and the read-out); the gate's
    recency outputs then reach nothing."""
    keep = mx.array((np.arange(config.embed_dim) >= config.recency_dim).astype(np.float32))[:, None]
    return {"qkv_weight": keep, "readout_weight": keep}


def _loss(params: dict[str, mx.array], embedding: mx.array, target: mx.array, config: NAMMConfig, kind: str) -> mx.array:
    scores = bam_scores(embedding, BAMWeights(**params), config).scores
    diff = scores - target
    if kind == "smooth_l1":
        a = mx.abs(diff)
        return mx.where(a < 1.0, 0.5 * diff * diff, a - 0.5).mean()
    return (diff * diff).mean()


def calibrated_bias(namm: NAMM, groups: Sequence[_Group], keep: float, sample: int = 16, seed: int = 0) -> float:
    """The read-out bias at which threshold 0 keeps ``keep`` of the recorded
    tokens, estimated on up to ``sample`` groups (one layer each, drawn at
    random) since scoring every recorded step is as costly as many fit steps."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(groups), min(sample, len(groups)), replace=False)
    scores = []
    for i in picked:
        g = groups[int(i)]
        layer = int(rng.integers(g.embedding.shape[0]))
        s = bam_scores(g.embedding[layer], namm.weights, namm.config).scores
        scores.append(np.array(s).reshape(-1))
    all_scores = np.concatenate(scores)
    cut = float(np.quantile(all_scores, 1.0 - keep)) if keep < 1.0 else float(all_scores.min())
    return float(np.asarray(namm.weights.readout_bias).reshape(-1)[0]) - cut


#: progress(step, total, loss)
ProgressFn = Callable[[int, int, float], None]


def fit_namm(
    records: Sequence[ItemRecord],
    options: DistillOptions | None = None,
    config: NAMMConfig | None = None,
    progress: ProgressFn | None = None,
    metadata: dict[str, str] | None = None,
) -> NAMM:
    """A NAMM whose scores regress the recorded log attention targets."""
    options = options or DistillOptions()
    config = config or NAMMConfig()
    if config.key_norm_input and not all(r.has_key_norm for r in records):
        raise ValueError("the recordings hold no key norms (made before they were recorded): record them again")
    mean, var, count = normalisation(records)
    shell = NAMM.zeros(config)
    shell = NAMM(shell.weights, mx.array(mean), mx.array(var), config, count)
    groups = _groups(records, shell, options)
    start_bias = float(np.mean([float(g.target.mean()) for g in groups]))
    params = initial_weights(config, options.seed, start_bias)
    masks = {} if options.recency else recency_masks(config)
    params = {k: v * masks[k] if k in masks else v for k, v in params.items()}
    optimizer = optim.Adam(learning_rate=options.learning_rate)
    loss_and_grad = mx.value_and_grad(lambda p, x, y: _loss(p, x, y, config, options.loss))
    rng = np.random.default_rng(options.seed)
    losses: list[float] = []
    for step in range(options.steps):
        group = groups[int(rng.integers(len(groups)))]
        x, y = group.embedding, group.target
        per = options.layers_per_batch
        if per is not None and x.shape[0] > per:
            pick = mx.array(np.sort(rng.choice(x.shape[0], per, replace=False)))
            x, y = x[pick], y[pick]
        n, w = x.shape[-2], options.window
        if w is not None and n > w:
            start = int(rng.integers(0, n - w + 1))
            x, y = x[..., start : start + w, :], y[..., start : start + w]
        loss, grads = loss_and_grad(params, x, y)
        grads = {k: g * masks[k] if k in masks else g for k, g in grads.items()}
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, loss)
        losses.append(float(loss))
        if progress is not None:
            progress(step + 1, options.steps, float(np.mean(losses[-20:])))
    namm = NAMM(BAMWeights(**params), mx.array(mean), mx.array(var), config, count)
    params["readout_bias"] = mx.array([calibrated_bias(namm, groups, options.keep, seed=options.seed)], dtype=mx.float32)
    provenance = {
        "method": "distilled",
        "distill_options": json.dumps(asdict(options), sort_keys=True),
        "distill_final_loss": f"{np.mean(losses[-20:]):.6f}" if losses else "nan",
        **(metadata or {}),
    }
    return NAMM(BAMWeights(**params), mx.array(mean), mx.array(var), config, count, provenance)

