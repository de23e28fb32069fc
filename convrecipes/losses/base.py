"""What a loss returns: a 0-dim tensor you can ``backward()``, carrying its named parts.

``LossOutput`` is a ``torch.Tensor`` subclass, so a loss from the zoo drops into any training
loop (``loss_fn(output, y).backward()``, ``accelerator.backward(loss)``, ``loss.item()``)
while a trainer still reads ``loss.parts`` (the weighted terms of a composite objective) and
``loss.stats`` (diagnostics such as the fraction of active triplets) to log them.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch


class LossOutput(torch.Tensor):
    """A scalar loss that also carries its named parts and diagnostics.

    Construct it as ``LossOutput(loss, parts, stats)``; the result *is* ``loss`` (same value,
    same autograd graph) with three extra attributes. Arithmetic on it (``0.5 * loss``,
    ``loss + other``) gives plain tensors, so the attributes never leak into a derived value
    that they no longer describe.

    Attributes:
        parts: the weighted components that sum to the loss (detached 0-dim tensors), logged
            each epoch; a single-term loss has one part, itself, named after the loss.
        stats: diagnostics that are not part of the sum (e.g. the fraction of active
            triplets, anchors without a positive), also logged.
        loss: the same value as a plain ``torch.Tensor`` on the same graph (for code that
            wants no subclass; also keeps ``out.loss`` of earlier versions working).
    """

    # Plain torch semantics: every op on a LossOutput returns a torch.Tensor.
    __torch_function__ = torch._C._disabled_torch_function_impl

    parts: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]

    def __new__(
        cls,
        loss: torch.Tensor,
        parts: Mapping[str, torch.Tensor],
        stats: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> "LossOutput":
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"LossOutput needs the loss as a torch.Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(
                f"LossOutput needs a scalar loss, got shape {tuple(loss.shape)}; reduce it first (e.g. .mean())"
            )
        loss = loss.reshape(())  # a (1,)-shaped scalar becomes 0-dim, still on the graph
        out = loss.as_subclass(cls)  # an alias of ``loss``: same storage, gradient flows through
        out.parts = dict(parts)
        out.stats = dict(stats or {})
        return out

    @property
    def loss(self) -> torch.Tensor:
        """This loss as a plain ``torch.Tensor`` (an alias on the same graph)."""
        return self.as_subclass(torch.Tensor)

    def __deepcopy__(self, memo: dict[int, Any]) -> "LossOutput":
        import copy

        plain = copy.deepcopy(self.loss, memo)
        return LossOutput(plain, copy.deepcopy(self.parts, memo), copy.deepcopy(self.stats, memo))

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickle as the plain value plus the attributes (torch's default for subclasses
        # expects a ``new_empty`` that returns the subclass).
        return (_rebuild_loss_output, (self.detach(), self.parts, self.stats))

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        parts = ", ".join(f"{k}={float(v):.4g}" for k, v in self.parts.items())
        return f"LossOutput({self.loss!r}, parts={{{parts}}})"


def _rebuild_loss_output(
    loss: torch.Tensor, parts: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]
) -> LossOutput:
    return LossOutput(loss, parts, stats)


def single_part(loss: torch.Tensor, name: str) -> LossOutput:
    """``loss`` as a ``LossOutput`` whose one part, named ``name``, is itself."""
    return LossOutput(loss, {name: loss.detach()}, {})


def as_loss_output(value: Union[torch.Tensor, LossOutput], name: str = "loss") -> LossOutput:
    """Normalise a loss module's return value to ``LossOutput``.

    A plain tensor (e.g. from ``torch.nn.CrossEntropyLoss``) becomes a single part named
    ``name``.
    """
    if isinstance(value, LossOutput):
        return value
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"a loss must return a 0-dim torch.Tensor or a LossOutput, got {type(value).__name__}; "
            "return the scalar to backpropagate"
        )
    return single_part(value, name)
