"""CMA-ES of the NAMM reference trainer (namm-spec §7.1), maximising fitness.

This is the "active" CMA-ES of SakanaAI/evo-memory's ``memory_evolution/cma_es.py``
(Hansen's tutorial with negative recombination weights), step for step:

* elite ratio 0.5: the best ``mu = floor(lambda / 2)`` members move the mean with the
  positive, truncated weights; the other half get negative weights that only enter the
  covariance update (rescaled by ``n / |C^-1/2 y|^2``, the "w°" of the spec);
* initial step size 0.065, ``c_m = 1``; ``c_1``, ``c_mu``, ``c_sigma``, ``d_sigma``, ``c_c``
  and ``chi_n`` derived from ``n`` and ``lambda`` exactly as the reference does (the
  recombination constants are :func:`cma_defaults`);
* ``ask`` eigendecomposes the symmetrised covariance (eigenvalues <= 0 clamped to 1e-20;
  at generation 0 every entry gets +1e-6 like the reference's ``shift_first_gen``) and
  samples ``y = z diag(D) B^T``, ``x = mean + sigma y``;
* ``tell`` updates mean, both evolution paths (with the ``h_sigma`` stall test), the
  covariance and the step size, and keeps the best member sampled so far.

Differences from the reference, all deliberate:

* **float64.** Every state array is numpy float64 (the reference keeps float32 torch
  tensors). With ``n = 4172`` the covariance learning rates are ~1e-7, below float32's
  resolution around 1.0, so float32 would silently drop most covariance updates; float64
  also makes runs bitwise reproducible and resumable on one platform. The recombination
  weights are the reference's float32 values (from ``cma_defaults``) widened to float64.
* **Seeded numpy RNG.** Samples come from ``np.random.Generator(PCG64(seed))`` (the
  reference uses ``torch.randn``, so populations differ from it for the same seed); the
  generator's state is part of :meth:`CMAES.state_dict`, so a resumed run continues the
  same random stream and equals an uninterrupted one.
* **Lazy eigendecomposition (opt-in).** A full ``n x n`` ``eigh`` costs ~10 s for
  n = 4172 on a laptop CPU. ``eig_every=1`` (the default) decomposes at every ``ask``
  exactly like the reference; ``eig_every=k`` reuses ``B, D`` for ``k`` generations, as
  Hansen's tutorial suggests (B.2: decompose every ``1 / (10 n (c_1 + c_mu))``
  generations, see :func:`lazy_eig_interval`; ~25 for the released configuration, where
  ``C`` barely moves anyway). The stored ``B, D`` are then part of the state.
* **Separable option.** ``separable=True`` is sep-CMA-ES (Ros & Hansen 2008, "A Simple
  Modification in CMA-ES Achieving Linear Time and Space Complexity"): ``C`` is kept
  diagonal (``B = I``, ``D = sqrt(diag C)``), the rank-one and rank-mu updates keep only
  their diagonals, and the covariance learning rates are multiplied by ``(n + 2) / 3``
  (``c_1' = min(1, c_1 (n+2)/3)``, ``c_mu' = min(1 - c_1' - 1e-8, c_mu (n+2)/3)``). The
  negative weights' ``alpha_min`` is recomputed with these rates (its positive-definiteness
  bound depends on them) and there is no first-generation shift (it only matters for the
  off-diagonal entries). O(n) time and memory per member instead of O(n^2).
* ``tell`` sorts with a stable argsort, so equal fitnesses keep member order
  (deterministic; torch's sort is not stable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import NammError

__all__ = [
    "CMAES",
    "CMAESError",
    "CMAParams",
    "CmaDefaults",
    "DEFAULT_SIGMA",
    "ELITE_RATIO",
    "STATE_FORMAT",
    "cma_defaults",
    "cma_params",
    "lazy_eig_interval",
]

DEFAULT_SIGMA = 0.065
"""The reference's ``init_sigma``."""
ELITE_RATIO = 0.5
"""The reference's share of the population that moves the mean."""
STATE_FORMAT = "namm-mlx-cma-es/1"
FIRST_GEN_SHIFT = 1e-6
EIG_FLOOR = 1e-20
_BEST_FITNESS_INIT = -float(np.finfo(np.float32).max)  # the reference's "-float32 max"


class CMAESError(NammError, ValueError):
    """Bad CMA-ES arguments or state; the message is one user-facing line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class CMAParams:
    """Strategy constants for ``n`` parameters and population ``pop_size`` (spec §7.1)."""

    n: int
    pop_size: int
    mu: int
    separable: bool
    weights: np.ndarray  # [lambda] float64, best first, negative tail
    weights_truncated: np.ndarray  # [lambda] weights with the non-elite entries zeroed
    mu_eff: float
    mu_eff_minus: float
    alpha_min: float
    c_1: float  # rank-one learning rate actually used (sep-rescaled when separable)
    c_mu: float  # rank-mu learning rate actually used (sep-rescaled when separable)
    c_sigma: float
    d_sigma: float
    c_c: float
    c_m: float
    chi_n: float


@dataclass(frozen=True)
class CmaDefaults:
    """Recombination constants of the reference CMA-ES (namm-spec §7.1)."""

    mu_eff: float
    mu_eff_minus: float
    c_1: float
    c_mu: float
    alpha_min: float
    weights: np.ndarray
    weights_truncated: np.ndarray


def cma_defaults(pop_size: int, n: int, elite_ratio: float = ELITE_RATIO) -> CmaDefaults:
    """The reference's ``get_cma_defaults``/``init_cma_es_params`` weights for ``pop_size``
    members of ``n`` parameters (also what a written reference checkpoint carries)."""
    lam = pop_size
    mu = int(math.floor(lam * elite_ratio))
    n_clip = min(n, 40000)
    w_prime = math.log((lam + 1) / 2) - np.log(np.arange(lam, dtype=np.float64) + 1)
    elite, rest = w_prime[:mu], w_prime[mu:]
    mu_eff = float(elite.sum() ** 2 / (elite**2).sum())
    mu_eff_minus = float(rest.sum() ** 2 / (rest**2).sum())
    c_1 = 2 / ((n_clip + 1.3) ** 2 + mu_eff)
    c_mu = min(1 - c_1 - 1e-8, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n_clip + 2) ** 2 + mu_eff))
    alpha_min = min(1 + c_1 / c_mu, 1 + 2 * mu_eff_minus / (mu_eff + 2), (1 - c_1 - c_mu) / (n * c_mu))
    positive_sum = w_prime[w_prime > 0].sum()
    negative_sum = np.abs(w_prime[w_prime < 0]).sum()
    weights = np.where(w_prime >= 0, w_prime / positive_sum, alpha_min * w_prime / max(negative_sum, 1e-300))
    truncated = np.where(np.arange(lam) < mu, weights, 0.0)
    return CmaDefaults(
        mu_eff, mu_eff_minus, c_1, c_mu, alpha_min, weights.astype(np.float32), truncated.astype(np.float32)
    )


def cma_params(
    n: int,
    pop_size: int,
    elite_ratio: float = ELITE_RATIO,
    separable: bool = False,
    c_m: float = 1.0,
) -> CMAParams:
    """The reference's defaults (``get_cma_defaults`` + ``init_cma_es_params``)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise CMAESError(f"the number of parameters must be a positive int, got {n!r}")
    if not isinstance(pop_size, (int, np.integer)) or isinstance(pop_size, bool) or pop_size < 4:
        raise CMAESError(f"pop_size must be an int >= 4 (at least 2 elite members), got {pop_size!r}")
    if not 0 < elite_ratio < 1 or math.floor(pop_size * elite_ratio) < 2:
        raise CMAESError(f"elite_ratio {elite_ratio!r} leaves fewer than 2 elite members of {pop_size}")
    n, pop_size = int(n), int(pop_size)
    d = cma_defaults(pop_size, n, elite_ratio)
    mu = int(math.floor(pop_size * elite_ratio))
    weights = d.weights.astype(np.float64)
    c_1, c_mu, alpha_min = d.c_1, d.c_mu, d.alpha_min
    if separable:
        scale = (n + 2) / 3
        c_1 = min(1.0, c_1 * scale)
        c_mu = min(1 - c_1 - 1e-8, c_mu * scale)
        alpha_sep = min(1 + c_1 / c_mu, 1 + 2 * d.mu_eff_minus / (d.mu_eff + 2), (1 - c_1 - c_mu) / (n * c_mu))
        weights = np.where(weights < 0, weights * (alpha_sep / d.alpha_min), weights)
        alpha_min = alpha_sep
    truncated = np.where(np.arange(pop_size) < mu, weights, 0.0)
    mu_eff = d.mu_eff
    n_clip = min(n, 40000)
    c_sigma = (mu_eff + 2) / (n + mu_eff + 5)
    d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + c_sigma
    c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n_clip**2))
    return CMAParams(
        n=n,
        pop_size=pop_size,
        mu=mu,
        separable=bool(separable),
        weights=weights,
        weights_truncated=truncated,
        mu_eff=mu_eff,
        mu_eff_minus=d.mu_eff_minus,
        alpha_min=alpha_min,
        c_1=c_1,
        c_mu=c_mu,
        c_sigma=c_sigma,
        d_sigma=d_sigma,
        c_c=c_c,
        c_m=float(c_m),
        chi_n=chi_n,
    )


def lazy_eig_interval(n: int, pop_size: int) -> int:
    """Hansen's suggested decomposition interval ``max(1, floor(1 / (10 n (c_1 + c_mu))))``."""
    p = cma_params(n, pop_size)
    return max(1, int(1 / (10 * n * (p.c_1 + p.c_mu))))


class CMAES:
    """Active CMA-ES (reference variant) that maximises fitness.

    ``ask()`` returns ``[pop_size, n]`` float64 candidates, ``tell(fitness)`` takes one
    fitness per row (higher is better). ``state_dict()`` holds everything needed to
    continue bit for bit, including the random generator's state.
    """

    def __init__(
        self,
        n: int,
        pop_size: int = 32,
        sigma: float = DEFAULT_SIGMA,
        mean: Any = None,
        seed: int = 0,
        separable: bool = False,
        *,
        eig_every: int = 1,
        elite_ratio: float = ELITE_RATIO,
        c_m: float = 1.0,
        shift_first_gen: bool = True,
    ) -> None:
        self.params = cma_params(n, pop_size, elite_ratio, separable, c_m)
        if not (isinstance(sigma, (int, float, np.floating)) and math.isfinite(sigma) and sigma > 0):
            raise CMAESError(f"sigma must be a positive finite number, got {sigma!r}")
        if not isinstance(eig_every, (int, np.integer)) or isinstance(eig_every, bool) or eig_every < 1:
            raise CMAESError(f"eig_every must be an int >= 1, got {eig_every!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise CMAESError(f"seed must be a non-negative int, got {seed!r}")
        n = self.params.n
        self.elite_ratio = float(elite_ratio)
        self.eig_every = int(eig_every)
        self.shift_first_gen = bool(shift_first_gen)
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        if mean is None:
            self._mean = np.zeros(n)
        else:
            self._mean = _vector(mean, n, "mean")
        self._sigma = float(sigma)
        self._C = np.ones(n) if self.separable else np.eye(n)
        self._p_sigma = np.zeros(n)
        self._p_c = np.zeros(n)
        self._g = 0
        self._best_member = self._mean.copy()
        self._best_fitness = _BEST_FITNESS_INIT
        self._B: np.ndarray | None = None
        self._D: np.ndarray | None = None
        self._eig_g = -1  # generation of the last decomposition (-1: none)
        self._eig_shifted = False
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        return self.params.n

    @property
    def pop_size(self) -> int:
        return self.params.pop_size

    @property
    def separable(self) -> bool:
        return self.params.separable

    @property
    def mean(self) -> np.ndarray:
        """The distribution mean (a copy): the parameters the reference deploys."""
        return self._mean.copy()

    @property
    def sigma(self) -> float:
        return self._sigma

    @property
    def generation(self) -> int:
        """Number of completed ``tell`` calls (the reference's ``g``)."""
        return self._g

    @property
    def best_member(self) -> np.ndarray:
        """Best member sampled so far (by the possibly noisy training fitness)."""
        return self._best_member.copy()

    @property
    def best_fitness(self) -> float:
        return self._best_fitness

    @property
    def covariance(self) -> np.ndarray:
        """``C`` ([n, n], or its diagonal [n] when separable), a copy."""
        return self._C.copy()

    @property
    def pending(self) -> bool:
        """True between ``ask`` and ``tell``."""
        return self._x is not None

    # -------------------------------------------------------------------- ask/tell
    def _eig_stale(self) -> bool:
        if self._D is None or self._eig_g < 0:
            return True
        if self._eig_shifted and self._g > 0:
            return True  # the first-generation shift must not outlive generation 0
        return self._g - self._eig_g >= self.eig_every

    def _decompose(self) -> None:
        if self.separable:
            self._D = np.sqrt(np.where(self._C <= 0, EIG_FLOOR, self._C))
            self._B = None
            self._eig_shifted = False
        else:
            C = self._C
            shifted = self.shift_first_gen and self._g == 0
            if shifted:
                C = C + FIRST_GEN_SHIFT
            C = (C + C.T) / 2
            d2, B = np.linalg.eigh(C)
            self._D = np.sqrt(np.where(d2 <= 0, EIG_FLOOR, d2))
            self._B = B
            self._eig_shifted = shifted
        self._eig_g = self._g

    def ask(self) -> np.ndarray:
        """Sample a population ``[pop_size, n]`` (a new one at every call)."""
        if self._eig_stale():
            self._decompose()
        z = self._rng.standard_normal((self.pop_size, self.n))
        y = z * self._D
        if not self.separable:
            y = y @ self._B.T
        self._y = y
        self._x = self._mean + self._sigma * y
        return self._x.copy()

    def _inv_sqrt(self, v: np.ndarray) -> np.ndarray:
        """``C^-1/2 v`` with the decomposition of the last ``ask`` (rows of ``v``)."""
        if self.separable:
            return v / self._D
        return ((v @ self._B) / self._D) @ self._B.T

    def _inv_sqrt_norm2(self, ys: np.ndarray) -> np.ndarray:
        """``|C^-1/2 y_i|^2`` per row (B is orthonormal, so ``|diag(1/D) B^T y|^2``)."""
        if self.separable:
            return np.sum((ys / self._D) ** 2, axis=1)
        return np.sum(((ys @ self._B) / self._D) ** 2, axis=1)

    def tell(self, fitness: Any) -> None:
        """Update the distribution from one fitness per member of the last ``ask``."""
        if self._x is None or self._y is None:
            raise CMAESError("tell() needs a population: call ask() first")
        f = np.asarray(fitness, dtype=np.float64).reshape(-1)
        if f.size != self.pop_size:
            raise CMAESError(f"tell() needs {self.pop_size} fitness values, got {f.size}")
        if not np.isfinite(f).all():
            raise CMAESError("fitness values must be finite (got NaN or inf)")
        p = self.params
        n = p.n
        self._g += 1
        order = np.argsort(-f, kind="stable")
        xs, ys = self._x[order], self._y[order]
        y_w = p.weights_truncated @ ys
        self._mean = self._mean + p.c_m * self._sigma * y_w

        cs = p.c_sigma
        self._p_sigma = (1 - cs) * self._p_sigma + math.sqrt(cs * (2 - cs) * p.mu_eff) * self._inv_sqrt(y_w)
        ps_norm = float(np.linalg.norm(self._p_sigma))
        h_left = ps_norm / math.sqrt(1 - (1 - cs) ** (2 * self._g))
        h_sigma = 1.0 if h_left < (1.4 + 2 / (n + 1)) * p.chi_n else 0.0
        cc = p.c_c
        self._p_c = (1 - cc) * self._p_c + h_sigma * math.sqrt(cc * (2 - cc) * p.mu_eff) * y_w

        w = p.weights
        w_o = np.where(w > 0, w, w * n / (self._inv_sqrt_norm2(ys) + 1e-20))
        delta = (1 - h_sigma) * cc * (2 - cc)
        decay = 1 + p.c_1 * delta - p.c_1 - p.c_mu * float(np.sum(w))
        if self.separable:
            self._C = decay * self._C + p.c_1 * self._p_c**2 + p.c_mu * (w_o @ ys**2)
        else:
            rank_mu = (ys.T * w_o) @ ys
            self._C = decay * self._C + p.c_1 * np.outer(self._p_c, self._p_c) + p.c_mu * rank_mu

        self._sigma = self._sigma * math.exp((cs / p.d_sigma) * (ps_norm / p.chi_n - 1))
        best = float(f[order[0]])
        if best > self._best_fitness:
            self._best_fitness = best
            self._best_member = xs[0].copy()
        self._x = self._y = None

    # ----------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue bit for bit: numpy arrays plus JSON-able values.

        ``B``/``D`` are included only when the next ``ask`` would reuse them (lazy
        decomposition, or between ``ask`` and ``tell``); ``x``/``y`` only between ``ask``
        and ``tell``. With the default ``eig_every=1`` a checkpoint after ``tell`` holds
        ``C`` but no decomposition (the next ``ask`` recomputes it from ``C``)."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "n": self.n,
            "pop_size": self.pop_size,
            "separable": self.separable,
            "elite_ratio": self.elite_ratio,
            "c_m": self.params.c_m,
            "eig_every": self.eig_every,
            "shift_first_gen": self.shift_first_gen,
            "seed": self.seed,
            "generation": self._g,
            "sigma": self._sigma,
            "best_fitness": self._best_fitness,
            "eig_generation": self._eig_g,
            "eig_shifted": self._eig_shifted,
            "rng": _json_rng_state(self._rng.bit_generator.state),
            "mean": self._mean.copy(),
            "C": self._C.copy(),
            "p_sigma": self._p_sigma.copy(),
            "p_c": self._p_c.copy(),
            "best_member": self._best_member.copy(),
        }
        keep_decomposition = self.pending or not self._eig_stale()
        if keep_decomposition and self._D is not None:
            state["D"] = self._D.copy()
            if self._B is not None:
                state["B"] = self._B.copy()
        else:
            state["eig_generation"] = -1
            state["eig_shifted"] = False
        if self.pending:
            state["x"] = self._x.copy()
            state["y"] = self._y.copy()
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "CMAES":
        """A new optimizer continuing ``state`` (configuration taken from it)."""
        try:
            es = cls(
                int(state["n"]),
                int(state["pop_size"]),
                sigma=float(state["sigma"]),
                seed=int(state["seed"]),
                separable=bool(state["separable"]),
                eig_every=int(state["eig_every"]),
                elite_ratio=float(state["elite_ratio"]),
                c_m=float(state["c_m"]),
                shift_first_gen=bool(state["shift_first_gen"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, CMAESError):
                raise
            raise CMAESError(f"not a CMA-ES state: {type(err).__name__} {err}") from None
        es.load_state_dict(state)
        return es

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; its configuration must match this one."""
        try:
            if state.get("format") != STATE_FORMAT:
                raise CMAESError(f"not a CMA-ES state of format {STATE_FORMAT} (got {state.get('format')!r})")
            for key, have in (("n", self.n), ("pop_size", self.pop_size), ("separable", self.separable)):
                if state[key] != have:
                    raise CMAESError(f"the state has {key} = {state[key]!r} but this optimizer has {have!r}")
            n = self.n
            cov_shape = (n,) if self.separable else (n, n)
            mean = _vector(state["mean"], n, "mean")
            C = _array(state["C"], cov_shape, "C")
            p_sigma = _vector(state["p_sigma"], n, "p_sigma")
            p_c = _vector(state["p_c"], n, "p_c")
            best_member = _vector(state["best_member"], n, "best_member")
            sigma = float(state["sigma"])
            if not (math.isfinite(sigma) and sigma > 0):
                raise CMAESError(f"the state's sigma {sigma!r} is not a positive finite number")
            g = int(state["generation"])
            if g < 0:
                raise CMAESError(f"the state's generation {g} is negative")
            D = _vector(state["D"], n, "D") if "D" in state else None
            B = _array(state["B"], (n, n), "B") if "B" in state and not self.separable else None
            if D is not None and not self.separable and B is None:
                raise CMAESError("the state has D without B")
            x = _array(state["x"], (self.pop_size, n), "x") if "x" in state else None
            y = _array(state["y"], (self.pop_size, n), "y") if "y" in state else None
            if (x is None) != (y is None) or (x is not None and D is None):
                raise CMAESError("the state has an incomplete pending population")
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = dict(state["rng"])
            self.elite_ratio = float(state.get("elite_ratio", self.elite_ratio))
            self.eig_every = int(state["eig_every"])
            self.shift_first_gen = bool(state["shift_first_gen"])
            self.seed = int(state["seed"])
            best_fitness = float(state["best_fitness"])
            eig_g = int(state["eig_generation"]) if D is not None else -1
            eig_shifted = bool(state["eig_shifted"]) if D is not None else False
        except KeyError as err:
            raise CMAESError(f"the CMA-ES state lacks {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            if isinstance(err, CMAESError):
                raise
            raise CMAESError(f"the CMA-ES state is malformed: {type(err).__name__} {err}") from None
        self._mean, self._C, self._p_sigma, self._p_c = mean, C, p_sigma, p_c
        self._best_member, self._best_fitness = best_member, best_fitness
        self._sigma, self._g, self._rng = sigma, g, rng
        self._B, self._D, self._eig_g, self._eig_shifted = B, D, eig_g, eig_shifted
        self._x, self._y = x, y


def _json_rng_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """numpy's bit-generator state as plain JSON types (ints stay exact)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, np.integer):
            return int(value)
        return value

    return plain(state)


def _array(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise CMAESError(f"{what} must be numeric, got dtype {array.dtype}")
    if array.shape != shape:
        raise CMAESError(f"{what} has shape {list(array.shape)}, expected {list(shape)}")
    array = np.array(array, dtype=np.float64)
    if not np.isfinite(array).all():
        raise CMAESError(f"{what} contains NaN or inf")
    return array


def _vector(value: Any, n: int, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.size != n:
        raise CMAESError(f"{what} has {array.size:,} values, expected {n:,}")
    return _array(array.reshape(-1), (n,), what)
