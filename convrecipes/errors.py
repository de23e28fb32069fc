"""Errors a user can cause. The CLI prints their message and exits with code 2."""

from __future__ import annotations


class ConvrecipesError(Exception):
    """Base class for user-facing errors: the message names the cause and the fix."""


class RecipeError(ConvrecipesError, ValueError):
    """A recipe key, value or name is wrong."""


class UnknownNameError(RecipeError, KeyError):
    """A name looked up in a registry does not exist."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class DataError(ConvrecipesError):
    """A dataset is missing, unreadable or inconsistent."""


class CheckpointError(ConvrecipesError):
    """A checkpoint is not ours, is truncated, or does not fit the model."""


class NonFiniteLossError(ConvrecipesError):
    """The training loss became NaN or infinite."""
