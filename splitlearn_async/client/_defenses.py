"""Defenses at the cut: noise on the bottom's output before it crosses to the trunk.

The client sends the trunk the bottom's hidden states, one vector per token, and a server
that knows the public model reads most of the tokens back from them (README, "Privacy at
the cut"). A defense replaces those vectors on the client, on its worker thread, before
they leave: :class:`SplitPipeline` applies it to every prompt and decode step,
:class:`SplitTrainer` to every training and evaluation forward. Both are off by default
(``defense=None``), and then nothing changes: the bytes sent are the bottom's own.

Two defenses ship, both additive noise drawn independently of the hidden states:

- :class:`GaussianNoise`: ``h + z`` with ``z ~ N(0, sigma^2 I)``, the baseline that inversion
  papers test (arXiv 2501.05965, 2409.00960).
- :class:`DChiNoise`: d_chi-privacy (metric local differential privacy), ``h + z`` with
  density ``p(z) ∝ exp(-eta ||z||_2)``: Feyisetan et al., "Privacy- and Utility-Preserving
  Textual Analysis via Calibrated Multivariate Perturbations", WSDM 2020 (arXiv 1910.08902),
  applied to split-LLM representations by Split-N-Denoise (Mai et al., arXiv 2310.09130,
  on the token embeddings) and Split-and-Privatize (Shen et al., arXiv 2312.15603, IJCAI
  2025, on the bottom's output in split fine-tuning). For any two hidden states ``h, h'``
  the outputs' densities differ by at most ``exp(eta ||h - h'||_2)``: the guarantee is in
  the metric, so it is weak where hidden states of different tokens lie far apart.

Because the noise is added, the gradient of the trunk's input is the gradient of the
bottom's output: training back-propagates through ``h + z`` exactly (the trainer runs the
defense inside the bottom's autograd graph, so a defense of another form gets its own
Jacobian). Each defense draws from its own ``torch.Generator``, seeded from the operating
system unless ``seed`` is given: a seed makes the noise reproducible, for tests and
benchmarks, and so known to whoever knows the seed. The generator is not a cryptographic
one.
"""

from __future__ import annotations

import math
import threading
from typing import Protocol, runtime_checkable

import torch

from ..errors import ArgumentError, ConfigError

__all__ = ["DChiNoise", "Defense", "GaussianNoise", "check_defense", "defense_from_spec"]


@runtime_checkable
class Defense(Protocol):
    """What the client does to the bottom's output before it crosses to the trunk."""

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The vectors to send instead of ``hidden (B, T, H)``: same shape, dtype and device."""
        ...


class _Noise:
    """Additive noise from a generator of its own; thread-safe (one draw at a time)."""

    def __init__(self, seed: int | None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ArgumentError(f"seed must be an int or None, got {seed!r}; leave it None outside tests.")
        self.seed = seed
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()  # from the operating system: not reproducible, not guessable from torch's seed
        else:
            self._generator.manual_seed(seed)
        self._lock = threading.Lock()

    def sample(self, shape: torch.Size) -> torch.Tensor:
        """(worker) ``shape`` of noise, float32 on the CPU."""
        raise NotImplementedError

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (B, T, H)`` plus noise drawn for every vector (float32 on the CPU, then cast)."""
        with self._lock:
            noise = self.sample(hidden.shape)  # (B, T, H)
        return hidden + noise.to(device=hidden.device, dtype=hidden.dtype)


class GaussianNoise(_Noise):
    """Adds ``z ~ N(0, sigma^2)`` to every coordinate of every hidden state.

    Args:
        sigma: Standard deviation per coordinate, in the hidden states' units (``>= 0``;
            ``0`` sends the states unchanged). The expected noise norm per token is about
            ``sigma * sqrt(H)``; compare it with the states' own norm at the cut.
        seed: Seed of the defense's own generator; ``None`` (the default) seeds it from the
            operating system. A known seed gives the noise away.

    Raises:
        ConfigError: ``sigma`` is negative, infinite or not a number.
        ArgumentError: ``seed`` is not an int.
    """

    def __init__(self, sigma: float, seed: int | None = None) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma >= 0):
            raise ConfigError(
                f"GaussianNoise.sigma must be a finite number >= 0, got {sigma!r}; it is the noise's standard "
                "deviation per coordinate, in the hidden states' units (0 turns the noise off)."
            )
        super().__init__(seed)
        self.sigma = float(sigma)

    def sample(self, shape: torch.Size) -> torch.Tensor:
        """(worker) ``N(0, sigma^2)`` noise of ``shape``."""
        return torch.randn(shape, generator=self._generator) * self.sigma

    def __repr__(self) -> str:
        return f"GaussianNoise(sigma={self.sigma:g})"


class DChiNoise(_Noise):
    """d_chi-privacy noise: adds ``z`` with density ``∝ exp(-eta ||z||_2)`` to every hidden state.

    Sampled as in Feyisetan et al. (WSDM 2020, arXiv 1910.08902): a direction uniform on the
    sphere (a normalised standard normal vector) times a norm drawn from ``Gamma(H, 1/eta)``
    (here the sum of ``H`` exponentials over ``eta``, exact for the integer ``H``). The mean
    noise norm is ``H / eta``. Split-N-Denoise (arXiv 2310.09130) and Split-and-Privatize
    (arXiv 2312.15603) add this noise to the representations a split LLM's client sends.

    Args:
        eta: The privacy parameter (``> 0``): smaller is more noise. Outputs for hidden
            states ``h`` and ``h'`` are ``exp(eta ||h - h'||)``-indistinguishable.
        seed: Seed of the defense's own generator; ``None`` (the default) seeds it from the
            operating system. A known seed gives the noise away.

    Raises:
        ConfigError: ``eta`` is not a finite number > 0.
        ArgumentError: ``seed`` is not an int.
    """

    def __init__(self, eta: float, seed: int | None = None) -> None:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta > 0):
            raise ConfigError(
                f"DChiNoise.eta must be a finite number > 0, got {eta!r}; it is the privacy parameter "
                "(the mean noise norm is hidden_size / eta: smaller eta, more noise)."
            )
        super().__init__(seed)
        self.eta = float(eta)

    def sample(self, shape: torch.Size) -> torch.Tensor:
        """(worker) Noise of ``shape``: each last-axis vector has density ``∝ exp(-eta ||z||)``."""
        direction = torch.randn(shape, generator=self._generator)  # (..., H)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        uniform = torch.rand(shape, generator=self._generator)  # H draws per vector: Gamma(H, 1) is their sum
        radius = -torch.log1p(-uniform).sum(dim=-1, keepdim=True) / self.eta  # (..., 1), Gamma(H, 1/eta)
        noise: torch.Tensor = direction * radius
        return noise

    def __repr__(self) -> str:
        return f"DChiNoise(eta={self.eta:g})"


def defense_from_spec(spec: str, seed: int | None = None) -> Defense:
    """The defense that a command-line ``spec`` names: ``gaussian:SIGMA`` or ``dchi:ETA``.

    Raises:
        ConfigError: the spec names no defense, or its number is out of range.
    """
    kind, _, value = spec.partition(":")
    makers = {"gaussian": GaussianNoise, "dchi": DChiNoise}
    maker = makers.get(kind.strip().lower())
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if maker is None or not value:
        raise ConfigError(f"a defense is 'gaussian:SIGMA' or 'dchi:ETA' (e.g. gaussian:0.5, dchi:100), got {spec!r}.")
    defense: Defense = maker(number, seed=seed)
    return defense


def check_defense(defense: object) -> Defense | None:
    """``defense`` if it is ``None`` or callable, for the constructors that take one.

    Raises:
        ArgumentError: ``defense`` is not callable.
    """
    if defense is None or isinstance(defense, Defense):
        return defense
    raise ArgumentError(
        f"defense must be a callable hidden -> hidden (GaussianNoise, DChiNoise, ...) or None, "
        f"got {type(defense).__name__}."
    )
