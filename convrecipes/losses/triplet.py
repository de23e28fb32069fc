"""Triplet loss with in-batch mining (Schroff et al. 2015, FaceNet; Hermans et al. 2017).

For an anchor ``a``, a positive ``p`` (same class, ``p != a``) and a negative ``n`` (other
class) the loss is ``f(d(a, p) - d(a, n))`` with ``f(x) = max(0, x + margin)``, or
``f(x) = log(1 + exp(x))`` with ``soft_margin`` (Hermans; the margin is then unused).

Mining strategies (each averages over what it mines):

* ``batch_hard`` (Hermans): per anchor, the farthest positive and the closest negative;
  mean over anchors.
* ``batch_all`` (Hermans): every valid triplet; mean over all of them.
* ``batch_all_nonzero`` (Hermans' "BA != 0"): every valid triplet; sum divided by the number
  of active triplets (loss term > 0). Larger than ``batch_all`` by the inverse active fraction.
* ``semi_hard`` (FaceNet): every anchor-positive pair with the closest negative that is
  farther than the positive, ``d(a, n) > d(a, p)`` (a semi-hard one whenever any negative
  lies within the margin); mean over pairs. Fallback when every negative is at most as far
  as the positive: the farthest negative, i.e. the least hard of the hard ones (as in
  TensorFlow Addons' ``triplet_semihard_loss``), so the pair still gives a gradient without
  pulling in the hardest negatives FaceNet found to collapse training. The share of pairs
  that fell back is reported as ``fallback_fraction``.

Anchors with no positive in the batch (a class seen once) or no negative (a one-class batch)
are excluded and counted in ``stats``; use a P x K batch sampler (P classes, K >= 2 images
each) so every anchor has positives. With no valid triplet at all the loss is a zero that
keeps the graph.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from convrecipes.losses.base import LossOutput
from convrecipes.losses.registry import LOSSES, at_least_fp32, class_indices, embeddings_of
from convrecipes.models.output import ModelOutput

MINING = ("batch_hard", "batch_all", "batch_all_nonzero", "semi_hard")
DISTANCES = ("euclidean", "squared")

# Inside the square root: d = sqrt(||a - b||^2 + EPS) keeps the gradient finite at zero distance.
SQRT_EPS = 1e-12


def pairwise_distances(embeddings: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """All ``(B, B)`` Euclidean (or squared Euclidean) distances between rows.

    Uses ``|a|^2 + |b|^2 - 2 a.b`` (clamped at 0) so memory is ``B^2``, not ``B^2 D``;
    the Euclidean distance is ``sqrt(. + SQRT_EPS)``. The batch is centred first (distances
    do not change under a common shift, nor do their gradients): otherwise a large shared
    offset ``o`` makes the three terms ``~|o|^2`` and float32 loses the small difference
    between them (a relative error of 1e-3 and more at ``|o| = 30``, against about 1e-7
    centred).
    """
    embeddings = embeddings - embeddings.mean(dim=0, keepdim=True)
    sq_norms = (embeddings * embeddings).sum(dim=1)
    sq = sq_norms[:, None] + sq_norms[None, :] - 2.0 * embeddings @ embeddings.T
    sq = sq.clamp(min=0.0)
    return sq if squared else torch.sqrt(sq + SQRT_EPS)


def triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.2,
    mining: str = "batch_hard",
    distance: str = "euclidean",
    normalize: bool = False,
    soft_margin: bool = False,
) -> LossOutput:
    """Mined triplet loss of a batch; see the module docstring for the definitions.

    Args:
        embeddings: ``(B, D)``.
        labels: class indices ``(B,)``.
        margin: the hinge margin (unused with ``soft_margin``).
        mining: one of ``MINING``.
        distance: ``"euclidean"`` or ``"squared"`` (FaceNet).
        normalize: L2-normalise the embeddings first (FaceNet).
        soft_margin: ``log(1 + exp(x))`` instead of the hinge.

    Returns:
        ``LossOutput`` (a 0-dim tensor) with ``parts={"triplet": loss}`` and ``stats``: ``anchors_without_positive``,
        ``anchors_without_negative`` (counts), ``active_fraction`` (mined triplets whose term is
        > 0; with the soft margin every term is) and, for semi-hard, ``fallback_fraction``.
    """
    if mining not in MINING:
        raise ValueError(f"unknown mining {mining!r}; valid: {', '.join(MINING)}")
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    x = at_least_fp32(embeddings)
    if normalize:
        x = F.normalize(x, dim=1)
    batch = x.shape[0]
    d = pairwise_distances(x, squared=distance == "squared")

    same = labels[:, None] == labels[None, :]
    pos_mask = same & ~torch.eye(batch, dtype=torch.bool, device=x.device)
    neg_mask = ~same
    has_pos, has_neg = pos_mask.any(dim=1), neg_mask.any(dim=1)
    valid = has_pos & has_neg

    def f(gap: torch.Tensor) -> torch.Tensor:
        return F.softplus(gap) if soft_margin else F.relu(gap + margin)

    zero = d.sum() * 0.0  # a zero on the graph, for batches with nothing to mine
    stats = {
        "anchors_without_positive": (~has_pos).sum().float(),
        "anchors_without_negative": (has_pos & ~has_neg).sum().float(),
    }

    if mining == "batch_hard":
        hardest_pos = torch.where(pos_mask, d, torch.full_like(d, -torch.inf)).amax(dim=1)
        hardest_neg = torch.where(neg_mask, d, torch.full_like(d, torch.inf)).amin(dim=1)
        terms = f(hardest_pos[valid] - hardest_neg[valid])
        loss = terms.mean() if terms.numel() else zero
        active, mined = (terms > 0).sum(), terms.numel()
    else:
        # One row per valid anchor-positive pair, one column per candidate negative: memory
        # B * (K - 1) * B for a P x K batch instead of B^3.
        anchor, positive = (pos_mask & valid[:, None]).nonzero(as_tuple=True)
        d_ap = d[anchor, positive]
        d_an = d[anchor]
        is_neg = neg_mask[anchor]
        if mining == "semi_hard":
            farther = is_neg & (d_an > d_ap[:, None])
            closest_farther = torch.where(farther, d_an, torch.full_like(d_an, torch.inf)).amin(dim=1)
            farthest = torch.where(is_neg, d_an, torch.full_like(d_an, -torch.inf)).amax(dim=1)
            fallback = ~farther.any(dim=1)
            terms = f(d_ap - torch.where(fallback, farthest, closest_farther))
            loss = terms.mean() if terms.numel() else zero
            active, mined = (terms > 0).sum(), terms.numel()
            stats["fallback_fraction"] = fallback.float().mean() if terms.numel() else zero.detach()
        else:
            all_terms = f(d_ap[:, None] - d_an)
            terms = torch.where(is_neg, all_terms, torch.zeros_like(all_terms))
            mined_count = is_neg.sum()
            active = (terms > 0).sum()
            mined = int(mined_count)
            divisor = mined_count if mining == "batch_all" else active
            loss = terms.sum() / divisor.clamp(min=1)

    stats["active_fraction"] = (
        active.float() / mined if mined else torch.zeros((), device=x.device)
    )
    stats = {key: value.detach() for key, value in stats.items()}
    return LossOutput(loss, {"triplet": loss.detach()}, stats)


@LOSSES.register("triplet")
class TripletLoss(nn.Module):
    """Triplet loss on embeddings with in-batch mining.

    ``output`` is the embeddings tensor ``(B, D)`` itself or a ``ModelOutput`` whose
    ``embeddings`` it uses; the result is a ``LossOutput`` (see ``triplet_loss``).

    Defaults follow Hermans et al. (batch-hard, Euclidean) with FaceNet's margin 0.2; for
    FaceNet itself use ``mining="semi_hard", distance="squared", normalize=True``. See the
    module docstring for the mining strategies and the semi-hard fallback.

    Args:
        margin: hinge margin, default 0.2.
        mining: ``batch_hard`` | ``batch_all`` | ``batch_all_nonzero`` | ``semi_hard``.
        distance: ``euclidean`` (epsilon inside the square root) | ``squared``.
        normalize: L2-normalise embeddings first.
        soft_margin: ``log(1 + exp(d_ap - d_an))`` instead of the hinge (margin unused).
    """

    needs_embeddings: bool = True
    lr: float | None = None

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "batch_hard",
        distance: str = "euclidean",
        normalize: bool = False,
        soft_margin: bool = False,
    ) -> None:
        super().__init__()
        if mining not in MINING:
            raise ValueError(f"unknown mining {mining!r}; valid: {', '.join(MINING)}")
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.mining = mining
        self.distance = distance
        self.normalize = bool(normalize)
        self.soft_margin = bool(soft_margin)

    def forward(self, output: Union[torch.Tensor, ModelOutput], target: torch.Tensor) -> LossOutput:
        embeddings = embeddings_of(output, "TripletLoss")
        labels = class_indices(target, embeddings.shape[0], "TripletLoss")
        return triplet_loss(
            embeddings, labels, self.margin, self.mining, self.distance, self.normalize, self.soft_margin
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}, "
            f"normalize={self.normalize}, soft_margin={self.soft_margin}"
        )
