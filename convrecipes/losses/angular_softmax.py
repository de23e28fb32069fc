"""A-Softmax / SphereFace (Liu et al. 2017, "SphereFace: Deep Hypersphere Embedding for Face Recognition")."""

from __future__ import annotations

import math
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from convrecipes.losses.base import LossOutput
from convrecipes.losses.registry import LOSSES, at_least_fp32, class_indices, embeddings_of
from convrecipes.models.output import ModelOutput

# cos(m theta) as a polynomial in c = cos(theta): the Chebyshev polynomials T_m.
_CHEBYSHEV = {
    1: lambda c: c,
    2: lambda c: 2 * c**2 - 1,
    3: lambda c: 4 * c**3 - 3 * c,
    4: lambda c: 8 * c**4 - 8 * c**2 + 1,
}


def _check_m(m: int) -> int:
    if isinstance(m, bool) or int(m) != m or not 1 <= int(m) <= 4:
        raise ValueError(f"A-Softmax margin m must be an integer in 1..4, got {m!r}")
    return int(m)


def cos_multiple_angle(cos_theta: torch.Tensor, m: int) -> torch.Tensor:
    """``cos(m * theta)`` from ``cos(theta)`` via the Chebyshev polynomial T_m.

    Unlike ``cos(m * acos(c))`` its gradient is finite at ``c = +-1``.
    """
    return _CHEBYSHEV[_check_m(m)](cos_theta)


def sphereface_psi(cos_theta: torch.Tensor, m: int = 4) -> torch.Tensor:
    """SphereFace's monotone margin function of the true-class angle.

    ``psi(theta) = (-1)^k cos(m theta) - 2k`` for ``theta`` in ``[k pi/m, (k+1) pi/m]``,
    ``k = 0..m-1``; it falls from 1 at theta = 0 to ``1 - 2m`` at theta = pi (-7 for m = 4)
    and is continuous at every ``k pi / m``. ``k`` is computed without gradient.

    Args:
        cos_theta: cosines in [-1, 1].
        m: the angular margin, 1..4.
    """
    m = _check_m(m)
    with torch.no_grad():
        theta = torch.acos(cos_theta.clamp(-1.0, 1.0))
        k = torch.floor(theta * (m / math.pi)).clamp(0, m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)  # (-1)^k
    return sign * cos_multiple_angle(cos_theta, m) - 2.0 * k


def sphereface_lambda(
    iteration: Union[int, torch.Tensor],
    base: float = 1000.0,
    gamma: float = 0.12,
    power: float = 1.0,
    lambda_min: float = 5.0,
) -> torch.Tensor:
    """The original code's annealing weight ``max(lambda_min, base * (1 + gamma * it)^(-power))``.

    Returns a 0-dim float32 tensor on the iteration's device (no host sync).
    """
    it = torch.as_tensor(iteration).to(torch.float32)
    return torch.clamp(base * (1.0 + gamma * it) ** (-power), min=lambda_min)


def angular_softmax_loss(
    logits: torch.Tensor,
    embeddings: torch.Tensor,
    target: torch.Tensor,
    m: int = 4,
    lam: Union[float, torch.Tensor] = 0.0,
) -> torch.Tensor:
    """A-Softmax cross-entropy for one batch, given the margin-free angular logits.

    From ``logit_j = ||x|| cos(theta_j)`` (an ``AngularHead``'s output) it recovers
    ``cos(theta_y) = logit_y / ||x||`` (clamped to [-1, 1]), replaces the true-class logit by
    ``(lam * ||x|| cos(theta_y) + ||x|| psi(theta_y)) / (1 + lam)`` and takes the softmax
    cross-entropy, averaged over the batch. ``lam = 0`` is the pure margin
    (pytorch-metric-learning's ``SphereFaceLoss(margin=m, scale=1)``).

    Args:
        logits: ``(B, C)`` margin-free logits ``||x|| cos(theta_j)``.
        embeddings: ``(B, D)`` the features ``x`` they came from.
        target: class indices ``(B,)``.
        m: the angular margin, 1..4.
        lam: the annealing weight (``sphereface_lambda``).

    Raises:
        ValueError: logits larger than ``||x||`` (a plain linear head, not ``AngularHead``).
    """
    m = _check_m(m)
    x = at_least_fp32(embeddings)
    logits = at_least_fp32(logits)
    labels = class_indices(target, logits.shape[0], "AngularSoftmaxLoss")
    norm = x.norm(dim=1).clamp(min=1e-12)
    logit_y = logits.gather(1, labels[:, None]).squeeze(1)
    with torch.no_grad():
        # A plain linear head gives |logit| > ||x||: catch it instead of clamping silently.
        # The slack covers bf16 rounding.
        if bool((logits.abs() > 1.02 * norm[:, None] + 1e-4).any()):
            raise ValueError(
                "AngularSoftmaxLoss needs logits ||x|| cos(theta_j) from a head with unit-norm "
                "class weights and no bias, but |logit| > ||embedding||: use "
                "AngularSoftmaxLoss.make_head(embedding_dim, num_classes) as the model's head, or "
                "AngularSoftmaxLoss.with_head(embedding_dim, num_classes) and call it on the embeddings."
            )
    cos_y = logit_y / norm
    # Clamp the value to [-1, 1] but keep the gradient: T_m is a polynomial, well defined
    # at and beyond +-1, and torch.clamp would zero the gradient exactly at the bounds.
    cos_y = cos_y - (cos_y - cos_y.clamp(-1.0, 1.0)).detach()
    psi = sphereface_psi(cos_y, m)
    lam = torch.as_tensor(lam, dtype=norm.dtype, device=norm.device)
    margin_logit = (lam * norm * cos_y + norm * psi) / (1.0 + lam)
    true_class = F.one_hot(labels, logits.shape[1]).bool()
    adjusted = torch.where(true_class, margin_logit[:, None], logits)
    return F.cross_entropy(adjusted, labels)


class AngularHead(nn.Module):
    """The A-Softmax classifier layer: unit-norm class weights, no bias.

    ``forward(x)`` returns ``ModelOutput(logits=x @ W_hat^T, embeddings=x)``, i.e.
    ``logit_j = ||x|| cos(theta_j)``: margin-free logits that evaluation and accuracy use
    as they are. ``AngularSoftmaxLoss`` adds the margin during training.

    Args:
        in_features: embedding dimension D.
        num_classes: number of classes.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(F.linear(x, F.normalize(self.weight, dim=1)), x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


@LOSSES.register("angular_softmax")
class AngularSoftmaxLoss(nn.Module):
    """A-Softmax (SphereFace) with the original code's lambda annealing.

    Where the class weights live decides what the loss is called on:

    * **in the model** (recipes): the model's head is ``AngularHead`` (``make_head``) and the
      loss takes its ``ModelOutput(logits, embeddings)``; a plain tensor is refused, since the
      loss could not tell the logits it would need.
    * **in the loss** (research code): ``AngularSoftmaxLoss.with_head(embedding_dim,
      num_classes)`` owns an ``AngularHead``, so it takes the plain embeddings tensor ``(B, D)``
      (or a ``ModelOutput``, whose ``embeddings`` it uses and whose logits it ignores);
      ``loss.logits(embeddings)`` gives the margin-free logits for predictions, and the head's
      weights must be given to the optimizer (``loss.parameters()``; the trainer does it
      through ``loss_param_groups``).

    From the logits ``||x|| cos(theta_j)`` and the embeddings it recovers
    ``cos(theta_y) = logit_y / ||x||`` (clamped to [-1, 1]), replaces the true-class logit by
    ``(lambda * ||x|| cos(theta_y) + ||x|| psi(theta_y)) / (1 + lambda)`` and takes the
    softmax cross-entropy (``angular_softmax_loss``). ``lambda = max(lambda_min, base * (1 + gamma * it)^(-power))``
    starts huge (plain normalized-weight softmax) and anneals towards the margin; ``it`` is a
    persistent buffer advanced by ``post_step()``, so the schedule survives a resume. With
    lambda = 0 this is pytorch-metric-learning's ``SphereFaceLoss(margin=m, scale=1)``.

    Args:
        m: angular margin, an integer 1..4 (m = 1: no margin).
        base, gamma, power, lambda_min: the annealing schedule (1000, 0.12, 1, 5).
    """

    needs_embeddings: bool = True
    lr: float | None = None

    def __init__(
        self,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
    ) -> None:
        super().__init__()
        self.m = _check_m(m)
        if base < 0 or gamma < 0 or lambda_min < 0:
            raise ValueError(f"base, gamma and lambda_min must be >= 0, got {base}, {gamma}, {lambda_min}")
        self.base, self.gamma, self.power, self.lambda_min = float(base), float(gamma), float(power), float(lambda_min)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        #: The loss's own class weights (``with_head``); None: they are the model's head.
        self.head: AngularHead | None = None

    @classmethod
    def make_head(cls, in_features: int, num_classes: int) -> AngularHead:
        """The head this loss needs, for the recipe layer to put on the backbone."""
        return AngularHead(in_features, num_classes)

    @classmethod
    def with_head(cls, embedding_dim: int, num_classes: int, **params: Any) -> "AngularSoftmaxLoss":
        """A-Softmax that owns its ``AngularHead``: call it on plain embeddings ``(B, D)``.

        Args:
            embedding_dim: D, the size of the embeddings the loss will get.
            num_classes: number of classes.
            **params: the loss's own arguments (``m``, ``base``, ``gamma``, ``power``,
                ``lambda_min``).
        """
        loss = cls(**params)
        loss.head = AngularHead(embedding_dim, num_classes)
        return loss

    def current_lambda(self) -> torch.Tensor:
        """The annealing weight at the current iteration (0-dim float32 tensor)."""
        return sphereface_lambda(self.iteration, self.base, self.gamma, self.power, self.lambda_min)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Margin-free logits ``||x|| cos(theta_j)`` of the loss's own head (``with_head``), for
        predictions and accuracy: ``loss.logits(embeddings).argmax(1)``."""
        if self.head is None:
            raise ValueError(
                "this AngularSoftmaxLoss has no head of its own: build it with "
                "AngularSoftmaxLoss.with_head(embedding_dim, num_classes), or read the logits of the "
                "model's AngularHead"
            )
        return self.head(embeddings).logits

    def forward(self, output: Union[torch.Tensor, ModelOutput], target: torch.Tensor) -> LossOutput:
        if self.head is not None:
            # The loss owns the class weights: embeddings in, its own logits (a ModelOutput's
            # logits, from some other head, are not used).
            x = embeddings_of(output, "AngularSoftmaxLoss")
            logits = self.head(x).logits
        elif isinstance(output, ModelOutput):
            x = embeddings_of(output, "AngularSoftmaxLoss")
            logits = output.logits
        else:
            raise ValueError(
                "AngularSoftmaxLoss got a plain tensor but has no head of its own to turn embeddings "
                "into logits: build it with AngularSoftmaxLoss.with_head(embedding_dim, num_classes) "
                "(and give its parameters to the optimizer), or pass ModelOutput(logits, embeddings) "
                "from a model whose head is AngularSoftmaxLoss.make_head(embedding_dim, num_classes)."
            )
        lam = self.current_lambda().to(x.device)
        loss = angular_softmax_loss(logits, x, target, self.m, lam)
        return LossOutput(loss, {"angular_softmax": loss.detach()}, {"lambda": lam.detach()})

    @torch.no_grad()
    def post_step(self) -> None:
        """Advance the annealing iteration; called by the trainer after each optimizer step."""
        self.iteration.add_(1)

    def extra_repr(self) -> str:
        return (
            f"m={self.m}, base={self.base}, gamma={self.gamma}, power={self.power}, "
            f"lambda_min={self.lambda_min}"
        )
