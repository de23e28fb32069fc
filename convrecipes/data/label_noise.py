"""Label noise for experiments: symmetric, pair and permutation noise, seeded and recorded.

A noise model is a row-stochastic matrix ``T`` with ``T[i, j] = P(noisy label j | true
label i)``; every image's label is redrawn from the row of its true label, independently,
with a ``numpy.random.RandomState`` (its stream is frozen by NumPy's compatibility policy,
so the same seed gives the same flips on any version).

- **symmetric**: with probability ``rate`` the label becomes one of the *other* K - 1
  classes, uniformly (``T = (1 - rate) I + rate / (K - 1) (J - I)``).
- **pair** (asymmetric): each listed class ``a`` flips to its partner ``b`` with
  probability ``rate`` (``shirt: t_shirt`` or ``shirt<->t_shirt`` both ways); unlisted classes
  stay clean. Without pairs every class flips to the next one, ``i -> i + 1 mod K`` (the
  "pair flipping" of Han et al. 2018).
- **permutation** (Reed et al. 2015): a fixed derangement ``pi`` of the classes (no class
  maps to itself), drawn from the seed unless given; each label becomes ``pi(label)`` with
  probability ``rate``.

``apply_label_noise`` returns the noisy labels and ``LabelNoiseReport`` (the flipped indices,
the requested and the realised flip matrices) that a run writes to ``label_noise.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from convrecipes.errors import RecipeError

NOISE_KINDS = ("symmetric", "pair", "permutation")
NOISE_FILE = "label_noise.json"

PairSpec = Union[Mapping[Union[str, int], Union[str, int]], Sequence[str], None]


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
        raise RecipeError(f"label noise rate must be in [0, 1), got {rate!r}; e.g. data.label_noise.rate=0.44 (a "
                          f"rate of 1 would leave no correct label to learn from)")
    return float(rate)


def check_kind(kind: str) -> str:
    """``kind`` if it is a known noise kind, else a ``RecipeError`` listing them."""
    if kind not in NOISE_KINDS:
        from convrecipes.registry import did_you_mean

        raise RecipeError(f"unknown label noise kind {kind!r}{did_you_mean(str(kind), NOISE_KINDS)} "
                          f"(data.label_noise.kind); valid: {', '.join(NOISE_KINDS)}")
    return kind


def symmetric_matrix(num_classes: int, rate: float) -> np.ndarray:
    """``T[i, i] = 1 - rate``, ``T[i, j] = rate / (K - 1)`` for ``j != i``."""
    rate = _check_rate(rate)
    if num_classes < 2:
        raise ValueError("label noise needs at least two classes")
    t = np.full((num_classes, num_classes), rate / (num_classes - 1))
    np.fill_diagonal(t, 1.0 - rate)
    return t


def _class_index(name: Union[str, int], classes: Sequence[str]) -> int:
    if isinstance(name, int) and not isinstance(name, bool):
        if 0 <= name < len(classes):
            return name
    elif str(name) in classes:
        return list(classes).index(str(name))
    else:
        # a label given by its number in a YAML string, e.g. "3" for digits whose classes are "0".."9"
        lowered = {c.lower(): i for i, c in enumerate(classes)}
        if str(name).lower() in lowered:
            return lowered[str(name).lower()]
    from convrecipes.registry import did_you_mean

    raise RecipeError(f"pair noise names class {name!r}, which the dataset does not have"
                      f"{did_you_mean(str(name), list(classes))} (data.label_noise.pairs); its classes: "
                      f"{', '.join(classes)}")


def pair_targets(pairs: PairSpec, classes: Sequence[str]) -> dict[int, int]:
    """``{source class: target class}`` from a mapping (``{shirt: t_shirt}``), a list of
    ``"a->b"`` / ``"a<->b"`` strings, or None (every class to the next one)."""
    k = len(classes)
    if pairs is None:
        return {i: (i + 1) % k for i in range(k)}
    out: dict[int, int] = {}
    items: list[tuple[Any, Any, bool]] = []
    if isinstance(pairs, Mapping):
        items = [(a, b, False) for a, b in pairs.items()]
    elif isinstance(pairs, (list, tuple)):
        for text in pairs:
            if not isinstance(text, str) or not ("->" in text):
                raise RecipeError(f"data.label_noise.pairs: {text!r} is not 'a->b' or 'a<->b' (class names)")
            both = "<->" in text
            a, b = (part.strip() for part in text.split("<->" if both else "->", 1))
            items.append((a, b, both))
    else:
        raise RecipeError(f"data.label_noise.pairs must map classes to classes ({{shirt: t_shirt}}) or list "
                          f"'a<->b' strings, got {pairs!r}")
    for a, b, both in items:
        src, dst = _class_index(a, classes), _class_index(b, classes)
        if src == dst:
            raise RecipeError(f"data.label_noise.pairs: {a!r} -> {b!r} flips a class to itself; name another class")
        for s, d in ((src, dst), (dst, src)) if both else ((src, dst),):
            if s in out and out[s] != d:
                raise RecipeError(f"data.label_noise.pairs: class {classes[s]!r} flips to both "
                                  f"{classes[out[s]]!r} and {classes[d]!r}; give each class one partner")
            out[s] = d
    return out


def pair_matrix(num_classes: int, rate: float, targets: Mapping[int, int]) -> np.ndarray:
    """``T[a, a] = 1 - rate``, ``T[a, b] = rate`` for each pair ``a -> b``; other rows identity."""
    rate = _check_rate(rate)
    t = np.eye(num_classes)
    for a, b in targets.items():
        t[a, a], t[a, b] = 1.0 - rate, rate
    return t


def random_derangement(num_classes: int, seed: int) -> list[int]:
    """A permutation ``pi`` of ``0..K-1`` with ``pi[i] != i`` for every i, drawn uniformly
    among derangements (by rejection) from ``seed``."""
    if num_classes < 2:
        raise ValueError("a derangement needs at least two classes")
    rng = np.random.RandomState(seed)
    while True:
        pi = rng.permutation(num_classes)
        if not np.any(pi == np.arange(num_classes)):
            return [int(x) for x in pi]


def permutation_matrix(num_classes: int, rate: float, permutation: Sequence[int]) -> np.ndarray:
    """``T[i, i] = 1 - rate``, ``T[i, pi(i)] = rate``; ``pi`` must be a derangement."""
    rate = _check_rate(rate)
    pi = [int(x) for x in permutation]
    if sorted(pi) != list(range(num_classes)):
        raise RecipeError(f"data.label_noise.permutation must be a permutation of 0..{num_classes - 1}, got {pi}")
    fixed = [i for i in range(num_classes) if pi[i] == i]
    if fixed:
        raise RecipeError(f"data.label_noise.permutation maps class {fixed[0]} to itself; permutation noise needs a "
                          f"derangement (every class to another one), or leave it unset to draw one")
    t = np.zeros((num_classes, num_classes))
    for i, j in enumerate(pi):
        t[i, i], t[i, j] = 1.0 - rate, rate
    return t


@dataclass
class LabelNoise:
    """A noise model, as a recipe's ``data.label_noise`` section gives it.

    Attributes:
        kind: ``symmetric``, ``pair`` or ``permutation``.
        rate: flip probability in [0, 1).
        seed: the draw's seed (None: the recipe's seed).
        pairs: pair noise's partners (see ``pair_targets``).
        permutation: permutation noise's derangement (None: drawn from the seed).
        clean_val: keep the validation split clean (for analysis; a user's own validation
            set would be as noisy as the training set, which is the default).
    """

    kind: str = "symmetric"
    rate: float = 0.2
    seed: Optional[int] = None
    pairs: Any = None
    permutation: Optional[list[int]] = None
    clean_val: bool = False

    def matrix(self, classes: Sequence[str], seed: int = 0) -> tuple[np.ndarray, Optional[list[int]]]:
        """The ``(K, K)`` flip matrix for ``classes`` and, for permutation noise, ``pi``."""
        check_kind(self.kind)
        _check_rate(self.rate)
        k = len(classes)
        if self.kind == "symmetric":
            return symmetric_matrix(k, self.rate), None
        if self.kind == "pair":
            return pair_matrix(k, self.rate, pair_targets(self.pairs, classes)), None
        pi = list(self.permutation) if self.permutation is not None else random_derangement(k, self._seed(seed))
        return permutation_matrix(k, self.rate, pi), pi

    def _seed(self, default: int) -> int:
        return int(self.seed if self.seed is not None else default)


@dataclass
class LabelNoiseReport:
    """What noise was applied: JSON-able, written to a run's ``label_noise.json``."""

    kind: str
    rate: float
    seed: int
    classes: list[str]
    matrix: list[list[float]]
    realised_matrix: list[list[float]]
    #: indices (into the labels given to apply_label_noise; a recipe run: dataset indices) whose
    #: label was drawn flipped. With ``clean_val`` the validation ones among them were restored
    #: afterwards (``extra["flipped_in_val"]`` counts them, ``extra["val_restored_to_clean"]``).
    flipped: list[int]
    permutation: Optional[list[int]] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flip_fraction(self) -> float:
        """The share of labels that changed."""
        total = self.extra.get("num_labels", 0)
        return len(self.flipped) / total if total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "rate": self.rate, "seed": self.seed, "classes": self.classes,
                "permutation": self.permutation, "matrix": self.matrix, "realised_matrix": self.realised_matrix,
                "num_flipped": len(self.flipped), **self.extra, "flipped": self.flipped}

    def write(self, path: Union[str, Path]) -> Path:
        """Write the report as JSON (atomically)."""
        import os

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)
        return path


def sample_noisy_labels(labels: torch.Tensor, matrix: np.ndarray, seed: int) -> torch.Tensor:
    """Draw each label's noisy version from row ``matrix[label]`` (inverse-CDF sampling with
    one uniform per label, so the draw of label i does not depend on the others' classes)."""
    t = np.asarray(matrix, dtype=np.float64)
    k = t.shape[0]
    if t.shape != (k, k) or np.any(t < 0) or not np.allclose(t.sum(1), 1.0):
        raise ValueError(f"the noise matrix must be a square row-stochastic matrix, got shape {t.shape}")
    y = torch.as_tensor(labels).long().cpu().numpy()
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must be in 0..{k - 1} for a {k}-class noise matrix")
    u = np.random.RandomState(seed).random_sample(y.shape[0])
    cdf = np.cumsum(t, axis=1)
    cdf[:, -1] = 1.0  # no label falls off the end through rounding
    noisy = (u[:, None] >= cdf[y]).sum(axis=1)
    return torch.from_numpy(noisy.astype(np.int64))


def realised_matrix(clean: torch.Tensor, noisy: torch.Tensor, num_classes: int) -> np.ndarray:
    """The empirical flip matrix: row i is the distribution of noisy labels among true class i."""
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (clean.numpy(), noisy.numpy()), 1)
    rows = counts.sum(1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def apply_label_noise(labels: torch.Tensor, classes: Sequence[str], noise: LabelNoise,
                      seed: int = 0) -> tuple[torch.Tensor, LabelNoiseReport]:
    """Noisy labels for ``labels`` under ``noise``, and the report of what changed.

    Args:
        labels: ``(N,)`` true class indices.
        classes: the class names (pair noise names classes by them).
        noise: the noise model.
        seed: used when ``noise.seed`` is None (a recipe passes its own seed).

    Returns:
        ``(noisy_labels, report)``; ``report.flipped`` lists the indices whose label changed.
    """
    s = noise._seed(seed)
    t, pi = noise.matrix(classes, s)
    noisy = sample_noisy_labels(labels, t, s)
    clean = torch.as_tensor(labels).long().cpu()
    flipped = (noisy != clean).nonzero().squeeze(1).tolist()
    report = LabelNoiseReport(noise.kind, float(noise.rate), s, list(classes), np.round(t, 6).tolist(),
                              np.round(realised_matrix(clean, noisy, len(classes)), 6).tolist(), flipped, pi,
                              {"num_labels": int(clean.numel())})
    return noisy, report
