"""Hyperparameters of a NAMM, with the defaults of the released BAM NAMM.

Every number the reference hard-codes in its hydra configs lives here, so a
converted checkpoint, an evolved one and a hand-tuned one all say explicitly
what pipeline they were scored with (spec §2-§5, Appendix A).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NAMMConfig:
    """Everything that shapes the NAMM pipeline except the evolved weights.

    The defaults reproduce SakanaAI/evo-memory's released ``namm_bam`` runs.
    """

    #: The memory model runs every time the absolute token count reaches a
    #: multiple of this (prompt and generated tokens alike).
    update_interval: int = 512
    #: STFT window / FFT length; ``n_fft // 2 + 1`` magnitude bins.
    n_fft: int = 32
    #: STFT hop; also the stride of the EMA over frames.
    hop: int = 16
    #: EMA coefficient per query row: per-frame decay is ``ema_coeff ** hop``,
    #: the carried state decays by ``ema_coeff ** n_new`` per call.
    ema_coeff: float = 0.99
    #: Epsilon on the standard deviation of the frozen bin normalisation.
    norm_eps: float = 1e-7
    #: Width of the sinusoidal age embedding (half sin, half cos).
    recency_dim: int = 8
    #: Lowest recency frequency is ``recency_max_freq ** -1``.
    recency_max_freq: float = 50000.0
    #: Age of the newest token (the reference overrides 1 with 0).
    start_recency_from: int = 0
    #: Width of the BAM attention.
    hidden_dim: int = 32
    #: Heads of the BAM attention.
    num_heads: int = 1
    #: Tokens scoring ``>= threshold`` pass.
    threshold: float = 0.0
    #: Precision the attention probabilities are rounded to before the
    #: features, as the reference's bf16 model hands them over ("float32" to
    #: skip the rounding).
    attention_dtype: str = "bfloat16"
    #: The newest tokens always kept at a step, whatever they score (0: none,
    #: as in the reference). A token read just before a question has had too
    #: few later queries for its attention spectrogram to single it out.
    recent_window: int = 0
    #: One more input per token: its key's norm (``-log ||k||``, z-scored over
    #: the head's cached tokens at the step), after the spectrum. Off in the
    #: reference. A fact that later text never looks at again leaves no mark on
    #: its attention, yet its key norm still tells it apart (KNorm's signal).
    key_norm_input: bool = False
    #: With a key probe (``NAMM.key_probe``): each marked token also keeps the
    #: ``key_probe_span`` slots before it. A fact is found through the phrase
    #: that introduces it ("the magic number for X is"), which the probe, fitted
    #: on answer tokens, does not mark itself.
    key_probe_span: int = 0
    #: Marked slots take at most this share of the kept slots (the surest
    #: first); the rest is ranked by the BAM. Under a fixed budget that is a
    #: share of the budget; at the threshold the BAM's own count is the rest,
    #: so marks add at most ``share / (1 - share)`` of it. Marks that later
    #: text never attends to cost the cache what attention needs, so a small
    #: share keeps the facts and leaves the budget to the BAM.
    key_probe_share: float = 1.0
    #: Under a budget, marked slots also get at least this share of the tokens
    #: read so far, up to half of the kept slots (0: off). The probe marks a
    #: share of the text, not of the budget, so a budget far below the document
    #: would leave ``key_probe_share`` of it too few slots for the facts: at
    #: 1,024 tokens of a 7,680-token document, share 0.3 is 307 slots and a
    #: passkey digit is lost in some heads, where 512 slots keep it.
    key_probe_document_share: float = 0.0
    #: Whose probe scores mark a token in each KV head: ``"own"`` (the head's
    #: own probe on the head's own cached key), or ``"mean"`` / ``"max"`` over
    #: the layer's KV heads, scored once when the token enters and carried with
    #: it. Being a fact is a property of the token, not of a head: one head's
    #: probe misses a digit another head's finds, and a number with one digit
    #: missing in one head is a different number to that head.
    key_probe_heads: str = "own"
    #: Which layers' probes mark a token in a layer: ``"own"`` (the layer's
    #: own), or ``"mean"``: the mean of the pooled scores of this layer and
    #: every layer below it, the ones whose keys of a new token exist when this
    #: layer's step runs (layers step in order within a forward). Each layer's
    #: probe is a weak, noisy marker; a fact is marked by most of them, a word
    #: that one probe happens to like is not, so the mean marks several times
    #: fewer tokens than one layer's probe and ranks the facts among its first.
    key_probe_layers: str = "own"
    #: Each token's BAM attention sees only the ``bam_window`` tokens from it
    #: on (0: every newer token, as in the reference). The reference BAM costs
    #: ``N^2 / 2`` logits per head at every step, more than the forward pass it
    #: follows on a CPU; a window makes it ``N x window``.
    bam_window: int = 0
    #: Each token's score is ``(1 - w) * BAM + w * log(N * a + 1e-3)``, where
    #: ``a`` is the attention the step's newest query pays it (its KV head's
    #: queries averaged) and ``N`` the cached tokens (0: the BAM alone, as in
    #: the reference). The spectrogram's Hann window gives the newest queries
    #: almost no weight, so the BAM cannot see what the newest query reads,
    #: which is TOVA's whole signal and predicts later attention well.
    newest_query_weight: float = 0.0

    def __post_init__(self) -> None:
        for name, (kind, check, wanted) in _SCHEMA.items():
            value = getattr(self, name)
            if not _has_kind(value, kind) or not check(value):
                raise ValueError(f"{name} must be {wanted}, got {_show(value)}")
        if self.n_fft != 2 * self.hop:
            raise ValueError(
                f"n_fft ({self.n_fft}) must be twice the hop ({self.hop}): the "
                "carried STFT context is one hop long"
            )
        if self.update_interval % self.hop:
            raise ValueError(
                f"update_interval must be a multiple of the hop ({self.hop}), got {self.update_interval}"
            )
        if self.key_probe_layers != "own" and self.key_probe_heads == "own":
            raise ValueError(
                "key_probe_layers 'mean' needs key_probe_heads 'mean' or 'max': a token's "
                "mark is carried from the step it enters at, when every layer below has scored it"
            )
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads, got num_heads {self.num_heads}"
            )

    @property
    def n_bins(self) -> int:
        """Number of one-sided STFT magnitude bins (17)."""
        return self.n_fft // 2 + 1

    @property
    def context_len(self) -> int:
        """Samples of each token's attention series carried between calls (16)."""
        return self.n_fft - self.hop

    @property
    def embed_dim(self) -> int:
        """Features per token: recency, spectrum, then the key norm if used (25 or 26)."""
        return self.recency_dim + self.n_bins + int(self.key_norm_input)

    @property
    def param_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Named tensors of the flat parameter vector, in vector order (spec §5.1).

        Weights are input-major ``[in, out]``; the qkv columns are q|k|v and the
        output columns are additive|multiplicative.
        """
        e, h = self.embed_dim, self.hidden_dim
        return [
            ("bam.attn.qkv.weight_in_out", (e, 3 * h)),
            ("bam.attn.qkv.bias", (3 * h,)),
            ("bam.attn.out.weight_in_out", (h, 2 * e)),
            ("bam.attn.out.bias", (2 * e,)),
            ("bam.mlp.weight_in_out", (e, 1)),
            ("bam.mlp.bias", (1,)),
        ]

    @property
    def param_size(self) -> int:
        """Length of the flat vector (4,172 with the defaults)."""
        total = 0
        for _, shape in self.param_layout:
            size = 1
            for d in shape:
                size *= d
            total += size
        return total

    def layout_description(self) -> str:
        """One line naming each tensor's shape, for error messages."""
        parts = [f"{name} {'x'.join(map(str, shape))}" for name, shape in self.param_layout]
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> "NAMMConfig":
        """Build from a ``namm_config.json`` dict, ignoring keys we do not know
        (provenance and the like) so newer files stay readable. A recorded
        ``param_size`` must match the one the other values imply."""
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object of settings, got {_show(values)}")
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in names})
        recorded = values.get("param_size")
        if recorded is not None and recorded != config.param_size:
            raise ValueError(
                f"param_size must be {config.param_size} for these settings, got {_show(recorded)}"
            )
        return config


def _has_kind(value: Any, kind: type) -> bool:
    """JSON-safe type test: bools are not numbers, ints are acceptable floats."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and math.isfinite(value)
    if kind is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, kind)


def _show(value: Any) -> str:
    """A bad value as the user wrote it (JSON spelling), cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: The values of ``NAMMConfig.key_probe_heads``.
KEY_PROBE_HEADS = ("own", "mean", "max")

#: The values of ``NAMMConfig.key_probe_layers``.
KEY_PROBE_LAYERS = ("own", "mean")

#: Type, range check and wording of every setting (the ranges keep the
#: pipeline's arithmetic meaningful: a zero interval never steps, a negative
#: epsilon divides by zero, an EMA coefficient past 1 grows without bound).
_SCHEMA: dict[str, tuple[type, Any, str]] = {
    "update_interval": (int, lambda v: 0 < v <= 1 << 20, "a positive integer up to 1048576 (tokens between NAMM steps)"),
    "n_fft": (int, lambda v: 2 <= v <= 4096, "an integer from 2 to 4096"),
    "hop": (int, lambda v: 1 <= v <= 2048, "an integer from 1 to 2048"),
    "ema_coeff": (float, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "norm_eps": (float, lambda v: 0 < v < 1, "a positive number below 1"),
    "recency_dim": (int, lambda v: 2 <= v <= 4096 and v % 2 == 0, "an even integer from 2 to 4096 (sin and cos halves)"),
    "recency_max_freq": (float, lambda v: v > 1, "a number above 1"),
    "start_recency_from": (int, lambda v: v >= 0, "a non-negative integer"),
    "hidden_dim": (int, lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    "num_heads": (int, lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    "threshold": (float, lambda v: True, "a finite number"),
    "attention_dtype": (str, lambda v: v in ("bfloat16", "float32"), "'bfloat16' or 'float32'"),
    "recent_window": (int, lambda v: 0 <= v <= 1 << 20, "a non-negative integer up to 1048576 (newest tokens always kept)"),
    "key_norm_input": (bool, lambda v: True, "true or false"),
    "key_probe_span": (int, lambda v: 0 <= v <= 4096, "an integer from 0 to 4096 (slots kept before a marked token)"),
    "key_probe_share": (float, lambda v: 0 < v <= 1, "a number above 0 and at most 1 (the kept slots' share for marked slots)"),
    "key_probe_document_share": (float, lambda v: 0 <= v <= 1, "a number from 0 to 1 (the share of the tokens read that marked slots may always take)"),
    "key_probe_heads": (str, lambda v: v in KEY_PROBE_HEADS, "'own', 'mean' or 'max' (whose probe scores mark a token)"),
    "key_probe_layers": (str, lambda v: v in KEY_PROBE_LAYERS, "'own' or 'mean' (which layers' probes mark a token)"),
    "bam_window": (int, lambda v: 0 <= v <= 1 << 20, "a non-negative integer up to 1048576 (newer tokens each BAM query sees; 0: all)"),
    "newest_query_weight": (float, lambda v: 0 <= v <= 1, "a number from 0 to 1 (the newest query's share of a token's score)"),
}
