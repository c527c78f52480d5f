"""Hyperparameters of a NAMM, with the defaults of the released BAM NAMM.

Every number the reference hard-codes in its hydra configs lives here, so a
converted checkpoint, an evolved one and a hand-tuned one all say explicitly
what pipeline they were scored with (spec §2-§5, Appendix A).
"""

from __future__ import annotations

import dataclasses
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

    def __post_init__(self) -> None:
        if self.n_fft != 2 * self.hop:
            raise ValueError(
                f"n_fft ({self.n_fft}) must be twice the hop ({self.hop}): the "
                "carried STFT context is one hop long"
            )
        if self.update_interval % self.hop:
            raise ValueError(
                f"update_interval ({self.update_interval}) must be a multiple of "
                f"the hop ({self.hop})"
            )
        if self.recency_dim % 2:
            raise ValueError("recency_dim must be even (sin and cos halves)")
        if self.hidden_dim % self.num_heads:
            raise ValueError("hidden_dim must be divisible by num_heads")
        if self.attention_dtype not in ("bfloat16", "float32"):
            raise ValueError("attention_dtype must be 'bfloat16' or 'float32'")

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
        """Features per token: recency then spectrum (25)."""
        return self.recency_dim + self.n_bins

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
    def from_dict(cls, values: dict[str, Any]) -> "NAMMConfig":
        """Build from a ``namm_config.json`` dict, ignoring keys we do not know
        (provenance and the like) so newer files stay readable."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})
