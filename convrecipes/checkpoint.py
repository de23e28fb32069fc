"""Full training state in one safetensors file: tensors in the body, everything else as
JSON in the header metadata. Nothing we load can execute code (no pickle).

A nested state (dicts, lists, tuples, tensors, numbers, strings, None) is flattened: each
tensor is stored under its path (``model/conv.weight``, ``optimizer/state/0/exp_avg``) and
replaced in a JSON "skeleton" by ``{"__tensor__": path}``. Writes go to a temporary file in
the same folder, are fsynced, then renamed over the target, so a crash (even SIGKILL) leaves
either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from convrecipes.errors import CheckpointError

FORMAT = "convrecipes-checkpoint"
VERSION = 1
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_FLOAT = "__float__"  # inf/nan, which strict JSON cannot hold
_INT_KEYS = "__int_keys__"  # optimizer state is keyed by int; JSON would make the keys str

PathLike = Union[str, os.PathLike]


def flatten_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON-able skeleton and a flat ``{path: tensor}`` dict."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            # clone: safetensors refuses tensors that share memory (tied weights, views)
            tensors[path] = obj.detach().to("cpu").contiguous().clone()
            return {_TENSOR: path}
        if isinstance(obj, Mapping):
            node = {str(k): walk(v, f"{path}/{k}" if path else str(k)) for k, v in obj.items()}
            if obj and all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
                return {_INT_KEYS: node}
            return node
        if isinstance(obj, tuple):
            return {_TUPLE: [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, float) and not math.isfinite(obj):
            return {_FLOAT: repr(obj)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint")

    return walk(state, prefix), tensors


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        if set(skeleton) == {_TUPLE}:
            return tuple(unflatten_state(v, tensors) for v in skeleton[_TUPLE])
        if set(skeleton) == {_FLOAT}:
            return float(skeleton[_FLOAT])
        if set(skeleton) == {_INT_KEYS}:
            return {int(k): unflatten_state(v, tensors) for k, v in skeleton[_INT_KEYS].items()}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def encode_checkpoint(state: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> bytes:
    """``state`` (nested, with tensors) and JSON ``metadata`` as the bytes of a checkpoint."""
    skeleton, tensors = flatten_state(dict(state))
    header = {
        "format": FORMAT,
        "version": str(VERSION),
        "state": json.dumps(skeleton),
        "metadata": json.dumps(dict(metadata or {})),
    }
    return save(tensors, metadata=header)


TMP_MARK = ".tmp-"


def temp_path_for(path: PathLike) -> Path:
    """Where ``write_atomic`` stages ``path`` (a hidden sibling named by the process id)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def remove_stale_temp_files(folder: PathLike) -> list[Path]:
    """Delete temp files a killed write left in ``folder`` (``.<name>.tmp-<pid>``); returns them."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_MARK}*"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def write_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through one fsynced temp file and a rename: a crash (even
    SIGKILL) leaves the old file or the new one, never a torn one. Every file gets the
    same mode (0666 less the umask), whichever checkpoint it is.

    Raises:
        CheckpointError: the disk is full or the folder is not writable (the old file is intact).
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise CheckpointError(f"could not write {path} ({exc.strerror or exc}); the previous file is intact. Fix: free "
                              f"disk space or make {path.parent} writable, then resume with --resume") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_checkpoint(path: PathLike, state: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` (nested, with tensors) and JSON ``metadata`` to ``path`` atomically."""
    return write_atomic(path, encode_checkpoint(state, metadata))


def model_weights_of(state: Mapping[str, Any], source: PathLike) -> Mapping[str, torch.Tensor]:
    """The primary model's weights of a loaded checkpoint state, or a clear error."""
    weights = state.get("model")
    if not isinstance(weights, Mapping) or not weights:
        raise CheckpointError(f"checkpoint {source} holds no model weights; use a checkpoint written by "
                              f"`convrecipes train` (best.safetensors / last.safetensors of a run)")
    return weights


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without reading its tensors."""
    return _open(path)[1]


def load_checkpoint(path: PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint written by ``save_checkpoint``: returns ``(state, metadata)``.

    Raises:
        CheckpointError: the file is missing, truncated, not safetensors, or not ours.
    """
    header, metadata = _open(path)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
        state = unflatten_state(json.loads(header["state"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({exc}); use another checkpoint, e.g. best.safetensors "
            f"or last.safetensors of the same run"
        ) from None
    return state, metadata


def _open(path: PathLike) -> tuple[dict[str, str], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass a .safetensors file or a run directory")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated by a crash or not a "
            f"checkpoint — use another checkpoint of the run (best.safetensors / last.safetensors)"
        ) from None
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a convrecipes checkpoint (no '{FORMAT}' header); "
            f"to start from plain weights, load them into the model yourself or set model.pretrained"
        )
    try:
        return header, json.loads(header.get("metadata", "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path} has a corrupt header ({exc})") from None


def weights_mismatch(own: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                     expected: Optional[Sequence[str]] = None, source_word: str = "checkpoint") -> Optional[str]:
    """How ``weights`` fail to fit a model whose state dict is ``own`` (shape mismatches,
    missing and unexpected names, a few of each), or None when they fit. ``expected``: the
    names the weights must hold (default all of ``own``)."""
    expected = list(own) if expected is None else list(expected)
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched = [f"{k}: {source_word} {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in expected if k in weights and weights[k].shape != own[k].shape]
    if not (missing or unexpected or mismatched):
        return None
    lines = []
    if mismatched:
        lines.append(f"{len(mismatched)} shape mismatches, e.g. {'; '.join(mismatched[:3])}")
    if missing:
        lines.append(f"{len(missing)} weights missing from the {source_word}, e.g. {', '.join(missing[:3])}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected weights, e.g. {', '.join(unexpected[:3])}")
    return "; ".join(lines)


def load_model_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], source: PathLike) -> None:
    """``model.load_state_dict(weights)`` with a clear error when the architecture differs."""
    problem = weights_mismatch(model.state_dict(), weights)
    if problem:
        raise CheckpointError(
            f"checkpoint {source} does not fit this model ({problem}); it was probably saved from "
            f"another architecture or number of classes — use the recipe the checkpoint was trained with"
        )
    model.load_state_dict(weights)


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): a location-free
    fingerprint of its weights (e.g. a teacher's, recorded in a student's checkpoints)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
