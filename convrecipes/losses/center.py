"""Center loss (Wen et al. 2016, "A Discriminative Feature Learning Approach for Deep Face Recognition")."""

from __future__ import annotations

from typing import Union

import torch
import torch.distributed as dist
from torch import nn

from convrecipes.losses.base import LossOutput, single_part
from convrecipes.losses.registry import LOSSES, at_least_fp32, class_indices, embeddings_of
from convrecipes.models.output import ModelOutput


def center_loss(embeddings: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Wen et al.'s center term ``1/B sum_i 1/2 ||x_i - c_{y_i}||^2`` for given centers.

    The functional form, without the center update (``CenterLoss`` does that). The gradient
    reaches ``embeddings`` (and ``centers`` if they require grad).

    Args:
        embeddings: ``(B, D)``.
        labels: class indices ``(B,)`` in ``[0, C)``.
        centers: ``(C, D)``.
    """
    labels = class_indices(labels, embeddings.shape[0], "center_loss")
    if centers.dim() != 2 or centers.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"center_loss: centers of shape {tuple(centers.shape)} do not fit embeddings of shape "
            f"{tuple(embeddings.shape)}; give (num_classes, {embeddings.shape[1]}) centers"
        )
    diff = at_least_fp32(embeddings) - centers[labels]
    return 0.5 * (diff * diff).sum(dim=1).mean()


@LOSSES.register("center")
class CenterLoss(nn.Module):
    """``L_C = 1/2 * sum_i ||x_i - c_{y_i}||^2``, averaged over the batch (as the original Caffe code).

    Only the center term: the paper's total is ``softmax loss + lambda * L_C`` with lambda
    about 0.003-0.01, and that lambda is the weight of this term in a ``WeightedSumLoss``
    (recipe: ``[{name: cross_entropy}, {name: center, weight: 0.003}]``).

    The gradient reaches the embeddings ``x`` as usual. The centers are a buffer, not a
    parameter: the optimizer never touches them. They follow the paper's rule instead,
    ``delta_c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)``, ``c_j <- c_j - alpha * delta_c_j``
    (an SGD step on ``1/2 sum ||x - c||^2`` with per-class rate ``alpha / (1 + n_j)``):

    * ``forward`` in training mode adds ``sum (c_j - x_i)`` and ``n_j`` of the batch to pending
      sums (no gradient);
    * ``post_step()`` — called by the trainer after each optimizer step — applies the update
      once for all micro-batches accumulated since the last step, so gradient accumulation
      gives the same centers as one large batch. Under ``torch.distributed`` the pending sums
      are all-reduced first, so every rank applies the same update and the centers stay
      identical; ``post_step`` must then be called on every rank.

    Classes absent from the step's batches do not move. Centers start at zero (deterministic,
    identical on every rank) and are saved in ``state_dict()``; the pending sums are transient
    (always zero at a step boundary) and are not. ``set_centers(tensor)`` places them
    anywhere else (e.g. at the class means of a pretrained model's embeddings).

    ``output`` is the embeddings tensor ``(B, D)`` itself or a ``ModelOutput`` whose
    ``embeddings`` it uses. Returns a ``LossOutput`` (a 0-dim tensor) whose one part is
    named ``center``.

    Args:
        num_classes: number of classes (filled in by ``build_loss``).
        embedding_dim: dimension D of the embeddings (filled in by ``build_loss``).
        alpha: center learning rate, default 0.5.
    """

    needs_embeddings: bool = True
    lr: float | None = None

    def __init__(self, num_classes: int, embedding_dim: int, alpha: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(f"num_classes and embedding_dim must be >= 1, got {num_classes}, {embedding_dim}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.alpha = float(alpha)
        self.register_buffer("centers", torch.zeros(num_classes, embedding_dim))
        self.register_buffer("pending_sum", torch.zeros(num_classes, embedding_dim), persistent=False)
        self.register_buffer("pending_count", torch.zeros(num_classes), persistent=False)

    @torch.no_grad()
    def set_centers(self, centers: torch.Tensor) -> None:
        """Place the centers at ``centers``, a ``(num_classes, embedding_dim)`` tensor.

        The values are copied (into the buffer's dtype and device); an update accumulated
        since the last ``post_step()`` is discarded, since it was measured from the old
        centers. Under ``torch.distributed`` call it with the same tensor on every rank.

        Raises:
            ValueError: a wrong shape or non-finite values.
        """
        centers = torch.as_tensor(centers)
        expected = (self.num_classes, self.embedding_dim)
        if tuple(centers.shape) != expected:
            raise ValueError(
                f"CenterLoss.set_centers needs a tensor of shape (num_classes, embedding_dim) = {expected}, "
                f"got {tuple(centers.shape)}"
            )
        if not bool(torch.isfinite(centers).all()):
            raise ValueError("CenterLoss.set_centers: the centers contain NaN or inf; give finite positions")
        self.centers.copy_(centers.detach())
        self.pending_sum.zero_()
        self.pending_count.zero_()

    def forward(self, output: Union[torch.Tensor, ModelOutput], target: torch.Tensor) -> LossOutput:
        x = embeddings_of(output, "CenterLoss")
        labels = class_indices(target, x.shape[0], "CenterLoss")
        if x.shape[1] != self.embedding_dim:
            raise ValueError(
                f"CenterLoss was built for {self.embedding_dim}-dim embeddings, got {x.shape[1]}; "
                "set embedding_dim to the model's embedding size."
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"CenterLoss: labels must be in [0, {self.num_classes}), "
                f"got {int(labels.min())}..{int(labels.max())}; is num_classes right?"
            )
        centers = self.centers[labels]
        diff = at_least_fp32(x) - centers
        loss = 0.5 * (diff * diff).sum(dim=1).mean()
        if self.training:
            with torch.no_grad():
                self.pending_sum.index_add_(0, labels, -diff.detach().to(self.pending_sum.dtype))  # sum of (c_j - x_i)
                self.pending_count.index_add_(0, labels, torch.ones_like(labels, dtype=self.pending_count.dtype))
        return single_part(loss, "center")

    @torch.no_grad()
    def post_step(self) -> None:
        """Apply the center update accumulated since the last optimizer step, then reset."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.cat([self.pending_sum, self.pending_count[:, None]], dim=1)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            self.pending_sum.copy_(packed[:, :-1])
            self.pending_count.copy_(packed[:, -1])
        delta = self.pending_sum / (1.0 + self.pending_count)[:, None]
        self.centers.sub_(self.alpha * delta)  # classes with no samples have delta 0
        self.pending_sum.zero_()
        self.pending_count.zero_()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, alpha={self.alpha}"
