"""One registry pattern for every name used in recipes (trainers, losses, schedules,
augment presets, datasets, optimizers).

Things register where they are defined (``@TRAINERS.register("distillation")``). Lookups
and parameter checks go through the registry, so every kind of name fails the same way:
an unknown name or parameter names the closest valid one ("did you mean") and lists all
of them.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, Optional, TypeVar

from convrecipes.errors import RecipeError, UnknownNameError

T = TypeVar("T")


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``valid``, or ``""``."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def signature_params(fn: Any, exclude: Iterable[str] = ()) -> dict[str, inspect.Parameter]:
    """The keyword-settable parameters of a callable (a class: its ``__init__``), by name,
    without ``self``, ``*args``/``**kwargs`` and the names in ``exclude``."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    skip = {"self", *exclude}
    return {k: p for k, p in inspect.signature(target).parameters.items()
            if k not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_params(
    what: str,
    params: Mapping[str, Any],
    valid: Mapping[str, inspect.Parameter],
    *,
    key: Optional[str] = None,
    require: bool = True,
) -> dict[str, Any]:
    """Refuse unknown (and, with ``require``, missing required) parameters.

    Args:
        what: the thing they are for, e.g. ``"schedule 'cyclic'"``.
        params: the given parameters.
        valid: the accepted ones (see ``signature_params``).
        key: the recipe key they come from (e.g. ``"schedule.params"``), for the message.
        require: also refuse when a parameter without default is missing.

    Returns:
        ``dict(params)``.

    Raises:
        RecipeError: naming the parameter, the closest valid name and all valid names.
    """
    listing = ", ".join(sorted(valid)) or "(none)"
    where = f" ({key})" if key else ""
    unknown = sorted(set(params) - set(valid))
    if unknown:
        name = unknown[0]
        raise RecipeError(f"{what} has no parameter {name!r}{did_you_mean(name, valid)}{where}; valid params: "
                          f"{listing}")
    if require:
        missing = sorted(k for k, p in valid.items() if p.default is inspect.Parameter.empty and k not in params)
        if missing:
            raise RecipeError(f"{what} needs {', '.join(map(repr, missing))}{where}; set "
                              f"{' and '.join(missing)} (valid params: {listing})")
    return dict(params)


class Registry(Generic[T]):
    """A mapping from recipe names to factories (classes or functions).

    Args:
        kind: what the names are ("loss", "dataset", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name is a bug."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The entry for ``name``; an unknown name raises naming the closest and listing all."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{did_you_mean(str(name), self._entries)}; valid {self.kind} names: "
                f"{', '.join(self.names())}"
            ) from None

    def params(self, name: str, exclude: Iterable[str] = ()) -> dict[str, inspect.Parameter]:
        """The keyword parameters the entry ``name`` takes (see ``signature_params``)."""
        return signature_params(self.get(name), exclude)

    def check_params(self, name: str, params: Mapping[str, Any], *, exclude: Iterable[str] = (),
                     key: Optional[str] = None, require: bool = True) -> dict[str, Any]:
        """``check_params`` against the signature of the entry ``name``, less ``exclude``
        (arguments the builder fills in itself)."""
        return check_params(f"{self.kind} {name!r}", params, self.params(name, exclude), key=key, require=require)

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
