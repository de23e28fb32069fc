"""FractalNet for small images (Larsson, Maire & Shakhnarovich 2017), registered with timm.

The fractal expansion rule: ``f_1(z) = conv(z)``, ``f_{C+1}(z) = join(f_C(f_C(z)), conv(z))``,
with consecutive joins merged into one. Column ``c`` (0 = shallowest) of a block is a chain
of ``2^c`` conv-BN-ReLU layers; the deepest column's layers mark positions ``1..2^(C-1)``,
and at position ``t`` every column whose layer ends there (``t`` a multiple of
``2^(C-1-c)``) is joined by the **mean** (``MeanJoin``), the joined columns continuing from
the join. ``blocks`` such blocks at widths ``w, 2w, 4w, 4w, ...`` with 2x2 max-pooling
between them, then global average pooling and the classifier.

Drop-path (``drop_path_rate > 0``, the paper's p = 0.15), decided once per training batch:
with probability ``global_drop_share`` (0.5) *global* - one column, drawn uniformly, is the
whole network for that batch; otherwise *local* - at every join each input is dropped with
probability ``drop_path_rate``, at least one kept. Dropped layers are not executed (no
gradient: several processes need DDP's ``find_unused_parameters``). Draws come from
``path_generator`` when set (a generator shared by every process makes all ranks drop the
same paths), else from torch's global generator, which checkpoints save and restore.

``column=c`` (a constructor argument, or ``set_column``) runs column ``c`` alone in every
block, in training and evaluation: Larsson et al.'s single-column subnetworks, which with
drop-path nearly match the whole network.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from timm.models import register_model

from convrecipes.models.branch_joins import JoinError, MeanJoin, local_keep_mask
from convrecipes.models.small_image import (
    MODELS,
    ModelArgumentError,
    _build,
    _check_common,
    _check_int,
    _check_rate,
    _ClassifierMixin,
    _conv_bn_relu,
)

__all__ = ["FractalBlock", "FractalNet"]


class FractalBlock(nn.Module):
    """One fractal block of ``columns`` columns from ``cin`` to ``cout`` channels."""

    def __init__(self, cin: int, cout: int, columns: int) -> None:
        super().__init__()
        self.num_columns = columns
        self.depth = 2 ** (columns - 1)  # layers of the deepest column
        self.columns = nn.ModuleList(
            nn.ModuleList(_conv_bn_relu(cin if i == 0 else cout, cout) for i in range(2 ** c)) for c in range(columns)
        )
        #: position t -> the columns joined there (those whose layer ends at t)
        self.joined_at = {t: [c for c in range(columns) if t % self.stride(c) == 0] for t in range(1, self.depth + 1)}
        self.joins = nn.ModuleDict({str(t): MeanJoin(len(cols)) for t, cols in self.joined_at.items() if len(cols) > 1})

    def stride(self, column: int) -> int:
        """Positions between two layers of ``column``."""
        return 2 ** (self.num_columns - 1 - column)

    def forward_column(self, x: torch.Tensor, column: int) -> torch.Tensor:
        """Column ``column`` alone (global drop-path, single-column evaluation)."""
        for layer in self.columns[column]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor, drop_prob: float = 0.0, generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
        """All columns, joined by the mean; ``drop_prob > 0``: local drop-path at every join
        (the dropped inputs' layers are skipped)."""
        inputs = [x] * self.num_columns  # what each column's next layer reads
        out = x
        for t, cols in self.joined_at.items():
            if len(cols) > 1 and drop_prob > 0:
                keep = local_keep_mask(len(cols), drop_prob, generator)
            else:
                keep = torch.ones(len(cols), dtype=torch.bool)
            # a dropped input's layer is not run: None in the join's list
            outputs = [self.columns[c][t // self.stride(c) - 1](inputs[c]) if k else None
                       for c, k in zip(cols, keep.tolist())]
            out = outputs[0] if len(cols) == 1 else self.joins[str(t)](outputs, keep)
            for c in cols:
                inputs[c] = out
        return out


class FractalNet(_ClassifierMixin, nn.Module):
    """FractalNet: ``blocks`` fractal blocks of ``columns`` columns, widths ``w * 2^i`` (at most
    ``4w``), max-pooling between blocks, global average pooling. Defaults (3 columns, 3
    blocks, width 28) have 809K parameters for 1-channel 28 px input (811K for RGB).

    Args:
        columns: columns per block (>= 2); the deepest has ``2^(columns-1)`` layers.
        blocks: fractal blocks (each but the last followed by 2x2 max-pooling).
        width: channels of the first block.
        drop_path_rate: local drop-path probability per join input (0: no drop-path; the
            paper uses 0.15).
        global_drop_share: share of training batches that use global drop-path (one column).
        column: run only this column (None: the whole fractal).
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, columns: int = 3, blocks: int = 3, width: int = 28,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_drop_share: float = 0.5,
                 column: Optional[int] = None) -> None:
        super().__init__()
        _check_common(in_chans, num_classes, width, drop_rate)
        _check_int("columns", columns, 2)
        _check_int("blocks", blocks, 1)
        _check_rate("drop_path_rate", drop_path_rate)
        if isinstance(global_drop_share, bool) or not isinstance(global_drop_share, (int, float)) \
                or not 0.0 <= global_drop_share <= 1.0:
            raise ModelArgumentError("global_drop_share", f"global_drop_share is the share of batches with global "
                                                          f"drop-path and must be in [0, 1], got {global_drop_share!r}")
        self.num_columns = columns
        self.drop_path_rate = float(drop_path_rate)
        self.global_drop_share = float(global_drop_share)
        #: set by the trainer to a generator shared by all processes; None: torch's global one
        self.path_generator: Optional[torch.Generator] = None
        widths = [width * min(2 ** i, 4) for i in range(blocks)]
        stages: list[nn.Module] = []
        cin = in_chans
        for i, cout in enumerate(widths):
            stages.append(FractalBlock(cin, cout, columns))
            cin = cout
        self.blocks = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(2)
        self.head_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = widths[-1]
        self.drop_rate = drop_rate
        self._init_classifier(num_classes)
        self.column: Optional[int] = None
        try:
            self.set_column(column)
        except JoinError as exc:  # as a constructor argument: create_model names model.kwargs.column
            raise ModelArgumentError("column", str(exc)) from None
        #: how the last training forward dropped paths: "none", "local" or "global:<column>"
        self.last_drop = "none"

    def set_column(self, column: Optional[int]) -> None:
        """Run only ``column`` from now on (None: the whole fractal again)."""
        if column is not None and (isinstance(column, bool) or not isinstance(column, int)
                                   or not 0 <= column < self.num_columns):
            raise JoinError(f"column {column!r} is out of range: this FractalNet has columns 0..{self.num_columns - 1} "
                            f"({self.num_columns - 1} is the deepest)")
        self.column = column

    @property
    def drops_paths(self) -> bool:
        """Whether training forwards leave some parameters unused (drop-path on)."""
        return self.drop_path_rate > 0 and self.column is None

    def _draw_global_column(self) -> Optional[int]:
        g = self.path_generator
        if float(torch.rand((), generator=g)) < self.global_drop_share:
            return int(torch.randint(self.num_columns, (), generator=g))
        return None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        column, drop = self.column, 0.0
        if column is None and self.training and self.drop_path_rate > 0:
            column = self._draw_global_column()
            drop = self.drop_path_rate if column is None else 0.0
            self.last_drop = "local" if column is None else f"global:{column}"
        for i, block in enumerate(self.blocks):
            if i:
                x = self.pool(x)
            x = block.forward_column(x, column) if column is not None else block(x, drop, self.path_generator)
        return self.head_pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


MODELS["fractalnet"] = (FractalNet, {})


@register_model
def fractalnet(pretrained: bool = False, **kwargs: Any) -> FractalNet:
    """FractalNet for small images (3 columns x 3 blocks, width 28: 809K parameters at 1 channel)."""
    return _build("fractalnet", pretrained, kwargs)
