"""``Trainer``: the training loop, written once.

Subclasses change one thing, ``training_step(batch) -> StepOutput``. Everything else lives
here: Accelerate (mixed precision, data parallel), gradient accumulation, clipping, weight
EMA, per-optimizer-step scheduling, the NaN guard, callbacks, progress, metrics, and full
training-state checkpoints with exact resume.

Exact resume: the data order of epoch ``e`` is a function of (seed, e), so a checkpoint
needs only the position (epoch, batch within the epoch) plus the RNG states of every
process (augmentation and dropout draw from torch's global generator). A run stopped after
any optimizer step and resumed produces bit-identical weights on CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from convrecipes.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from convrecipes.data.loader import InMemoryLoader
from convrecipes.errors import CheckpointError, NonFiniteLossError
from convrecipes.losses.base import as_loss_output
from convrecipes.models.output import ModelOutput, logits_of
from convrecipes.trainers.callbacks import Callback
from convrecipes.trainers.metrics_log import append_jsonl, format_metrics, plot_curves, read_jsonl


@dataclass
class StepOutput:
    """What ``training_step`` returns: the loss to backpropagate and 0-dim tensors to log."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class Trainer:
    """The training loop. Construct it from plain objects; ``fit`` trains.

    Args:
        model: any ``nn.Module`` mapping images to logits or to a ``ModelOutput``.
        optimizer: a torch optimizer over the model's (and the loss's) parameters.
        loss_fn: ``loss_fn(output, targets)`` returning a tensor or a ``LossOutput``.
        scheduler: stepped once per optimizer step (``step()``); its optional
            ``on_epoch_end(metrics)`` is called after each evaluation.
        augment: ``augment(images_float01, targets) -> (images, targets)`` for training batches.
        eval_transform: the same call for evaluation batches (normalisation).
        accelerator: an ``Accelerator``; if None one is made with ``mixed_precision``.
        mixed_precision: "no", "fp16", "bf16", or None to let ``accelerate launch`` decide.
        grad_accum_steps: micro-batches per optimizer step.
        grad_clip: clip the global gradient norm to this value.
        ema_decay: keep an exponential moving average of the weights (timm's ``ModelEmaV3``),
            evaluated alongside the raw weights as ``ema_val_*``.
        callbacks: ``Callback`` objects.
        run_dir: where ``metrics.jsonl`` and ``curves.png`` go (None: nowhere).
        seed: seeds torch on every process (different per process, for augmentation).
        channels_last: use the channels-last memory format (faster convolutions on CPU and
            tensor cores).
        progress: show a progress bar (on the main process only).
        checkpoint_metadata: JSON-able facts stored in every checkpoint (e.g. the recipe).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        *,
        scheduler: Any = None,
        augment: Optional[nn.Module] = None,
        eval_transform: Optional[nn.Module] = None,
        accelerator: Optional[Accelerator] = None,
        mixed_precision: Optional[str] = None,
        grad_accum_steps: int = 1,
        grad_clip: Optional[float] = None,
        ema_decay: Optional[float] = None,
        callbacks: Sequence[Callback] = (),
        run_dir: Optional[Union[str, Path]] = None,
        seed: int = 0,
        channels_last: bool = False,
        progress: bool = True,
        checkpoint_metadata: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.accelerator = accelerator or Accelerator(mixed_precision=mixed_precision)
        self.device = self.accelerator.device
        self.channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.loss_fn = loss_fn.to(self.device)
        self.scheduler = scheduler
        self.augment = augment.to(self.device) if augment is not None else None
        self.eval_transform = eval_transform.to(self.device) if eval_transform is not None else None
        self.grad_accum_steps = grad_accum_steps
        self.grad_clip = grad_clip
        self.ema = None
        if ema_decay is not None:
            from timm.utils import ModelEmaV3

            # warmup: the effective decay ramps up, so short runs do not average in the random init
            self.ema = ModelEmaV3(self.unwrapped_model, decay=ema_decay, use_warmup=True)
        self.callbacks = list(callbacks)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.seed = seed
        self.progress = progress
        self.checkpoint_metadata = dict(checkpoint_metadata or {})
        # position in training: the next epoch/batch to run and optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.should_stop = False
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: Optional[Path] = None
        # running sums of the logged values over the epoch (device tensors: no host sync per step)
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._epoch_samples = 0

    # -- small conveniences -------------------------------------------------------
    @property
    def unwrapped_model(self) -> nn.Module:
        """The model without DDP/compile wrappers."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        """Print on the main process only (above the progress bar)."""
        if self.is_main_process:
            tqdm.write(" ".join(str(a) for a in args))

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- the one thing subclasses change ------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutput:
        """Loss of one augmented batch ``(images, targets)``; runs under autocast."""
        images, targets = batch
        output = self.model(images)
        loss = as_loss_output(self.loss_fn(output, targets))
        return StepOutput(loss.loss, {**loss.parts, **loss.stats} if len(loss.parts) > 1 or loss.stats else {})

    def extra_state(self) -> dict[str, Any]:
        """State a subclass adds to checkpoints (tensors allowed)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``extra_state``'s output."""

    # -- batches ------------------------------------------------------------------------
    def prepare_batch(self, images: torch.Tensor, targets: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images on the device -> float in [0, 1] -> augment (train) or normalise (eval)."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        transform = self.augment if train else self.eval_transform
        if transform is not None:
            images, targets = transform(images, targets)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def _configure_loader(self, loader: Iterable) -> Iterable:
        if isinstance(loader, InMemoryLoader):
            loader.shard(self.accelerator.num_processes, self.accelerator.process_index, self.device)
            return loader
        return self.accelerator.prepare_data_loader(loader)

    # -- training -----------------------------------------------------------------------
    def fit(
        self,
        train_loader: Iterable,
        val_loader: Optional[Iterable] = None,
        epochs: int = 1,
        resume_from: Optional[Union[str, Path]] = None,
    ) -> list[dict[str, float]]:
        """Train for ``epochs`` epochs in total (a resumed run continues to the same total).

        Returns:
            The per-epoch metrics of this call.
        """
        train_loader = self._configure_loader(train_loader)
        if val_loader is not None:
            val_loader = self._configure_loader(val_loader)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self.print(f"resumed from {resume_from} at epoch {self.epoch + 1}, batch {self.batch_in_epoch}, "
                       f"optimizer step {self.global_step}")
        elif self.global_step == 0 and self.batch_in_epoch == 0 and self.epoch == 0:
            # seed once, at the start of training: a later fit() call continues the same stream
            set_seed(self.seed, device_specific=True)
        if self.run_dir is not None and self.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        new_history = []
        while self.epoch < epochs and not self.should_stop:
            for cb in self.callbacks:
                cb.on_epoch_start(self, self.epoch)
            metrics = {"epoch": self.epoch + 1, **self._train_epoch(train_loader, epochs)}
            if val_loader is not None:
                metrics.update(self.evaluate(val_loader, prefix="val_"))
                if self.ema is not None:
                    metrics.update(self.evaluate(val_loader, model=self.ema.module, prefix="ema_val_"))
            if self.scheduler is not None and hasattr(self.scheduler, "on_epoch_end"):
                self.scheduler.on_epoch_end(metrics)
            self.epoch += 1
            self.batch_in_epoch = 0
            self._log_epoch(metrics, epochs)
            new_history.append(metrics)
            for cb in self.callbacks:
                cb.on_epoch_end(self, metrics)
        for cb in self.callbacks:
            cb.on_fit_end(self)
        self._plot()
        return new_history

    def _train_epoch(self, loader: Iterable, epochs: int) -> dict[str, float]:
        self.model.train()
        self.loss_fn.train()
        start = self.batch_in_epoch
        if isinstance(loader, InMemoryLoader):
            loader.set_epoch(self.epoch, start_batch=start)
        elif start:
            loader = self.accelerator.skip_first_batches(loader, start)
        n_batches = len(loader) + (start if not isinstance(loader, InMemoryLoader) else 0)  # type: ignore[arg-type]
        if n_batches == 0:
            raise ValueError("the training loader yields no batches; lower data.batch_size or add data")
        if start == 0:
            self._epoch_sums, self._epoch_samples = {}, 0
        accum = self.grad_accum_steps
        bar = tqdm(total=n_batches, initial=start, desc=f"epoch {self.epoch + 1}/{epochs}", leave=False,
                   disable=not (self.progress and self.is_main_process), dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        t0, samples_this_call, group_samples = time.perf_counter(), 0, 0
        for b, (images, targets) in enumerate(loader, start=start):
            group_start = (b // accum) * accum
            group_size = min(accum, n_batches - group_start)
            boundary = b + 1 - group_start == group_size
            sync = contextlib.nullcontext() if boundary else self.accelerator.no_sync(self.model)
            with sync:
                images, targets = self.prepare_batch(images, targets, train=True)
                with self.accelerator.autocast():
                    out = self.training_step((images, targets))
                self._check_finite(out.loss, b, n_batches)
                self.accelerator.backward(out.loss / group_size)
            n = images.shape[0]
            samples_this_call += n
            group_samples += n
            for key, value in {"train_loss": out.loss, **out.logs}.items():
                value = value.detach().double() * n
                sums[key] = sums[key] + value if key in sums else value
            if boundary:
                self._optimizer_step()
                self.batch_in_epoch = b + 1
                # fold the running sums into the resumable per-epoch totals only at step
                # boundaries, so a checkpoint taken here carries exactly what was trained
                for key, value in sums.items():
                    self._epoch_sums[key] = self._epoch_sums[key] + value if key in self._epoch_sums else value
                self._epoch_samples += group_samples
                sums, group_samples = {}, 0
                for cb in self.callbacks:
                    cb.on_step_end(self, self.global_step)
                if bar.n % 10 == 0 or b + 1 == n_batches:
                    bar.set_postfix(loss=f"{float(self._epoch_sums['train_loss']) / max(self._epoch_samples, 1):.4f}",
                                    lr=f"{self.current_lr():.3g}", refresh=False)
            bar.update(1)
        bar.close()
        elapsed = time.perf_counter() - t0
        totals = torch.stack([torch.tensor(float(self._epoch_samples), dtype=torch.float64, device=self.device),
                              *(v.to(torch.float64) for v in self._epoch_sums.values())])
        totals = self.accelerator.reduce(totals, "sum") if self.accelerator.num_processes > 1 else totals
        count = max(float(totals[0]), 1.0)
        metrics = {key: float(v) / count for key, v in zip(self._epoch_sums, totals[1:])}
        metrics["lr"] = self.current_lr()
        global_samples = samples_this_call * self.accelerator.num_processes
        metrics["images_per_s"] = global_samples / elapsed if elapsed > 0 else float("nan")
        metrics["train_time_s"] = elapsed
        return metrics

    def _check_finite(self, loss: torch.Tensor, batch: int, n_batches: int) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if self.accelerator.num_processes > 1:  # every rank must stop together
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item() > 0:
            where = self.last_checkpoint or "none written yet"
            raise NonFiniteLossError(
                f"the training loss became {float(loss.detach())} at epoch {self.epoch + 1}, batch {batch + 1}/"
                f"{n_batches} (optimizer step {self.global_step + 1}); training stopped before this step, and the "
                f"last good checkpoint is intact ({where}). Fix: lower the learning rate (optimizer.lr), clip "
                f"gradients (trainer.grad_clip=1.0), or use bf16 instead of fp16."
            )

    def _check_finite_weights(self) -> None:
        """Refuse to overwrite a good checkpoint with overflowed weights (the loss can still be
        finite for a step after a weight has become inf)."""
        models = [self.unwrapped_model] + ([self.ema.module] if self.ema is not None else [])
        for model in models:
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    where = self.last_checkpoint or "none written yet"
                    raise NonFiniteLossError(
                        f"weight {name!r} became inf/nan by optimizer step {self.global_step} (epoch "
                        f"{self.epoch + 1}); this state was not saved and the last good checkpoint is intact "
                        f"({where}). Fix: lower the learning rate (optimizer.lr), clip gradients "
                        f"(trainer.grad_clip=1.0), or use bf16 instead of fp16."
                    )

    def _optimizer_step(self) -> None:
        if self.grad_clip is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and not self.accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        if hasattr(self.loss_fn, "post_step"):
            self.loss_fn.post_step()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.unwrapped_model, step=self.global_step)

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, loader: Iterable, model: Optional[nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Logits, targets and (if the model gives them) embeddings of every sample, gathered
        from all processes, each sample exactly once."""
        logits_all, targets_all, emb_all = [], [], []
        for logits, targets, embeddings in self._eval_batches(loader, model):
            logits_all.append(logits.float().cpu())
            targets_all.append(targets.cpu())
            if embeddings is not None:
                emb_all.append(embeddings.float().cpu())
        embeddings = torch.cat(emb_all) if emb_all else None
        return torch.cat(logits_all), torch.cat(targets_all), embeddings

    @torch.no_grad()
    def evaluate(self, loader: Iterable, model: Optional[nn.Module] = None, prefix: str = "") -> dict[str, float]:
        """Loss, top-1 and (with >= 5 classes) top-5 accuracy in percent over all processes."""
        loss_sum, correct1, correct5, count, num_classes = 0.0, 0, 0, 0, 0
        for logits, targets, embeddings in self._eval_batches(loader, model):
            output = logits if embeddings is None else ModelOutput(logits, embeddings)
            n = targets.shape[0]
            loss_sum += float(as_loss_output(self.loss_fn(output, targets)).loss) * n
            num_classes = logits.shape[1]
            top = logits.topk(min(5, num_classes), dim=1).indices
            hits = top.eq(targets[:, None])
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            count += n
        if count == 0:
            raise ValueError("the evaluation loader yields no samples")
        metrics = {f"{prefix}loss": loss_sum / count, f"{prefix}top1": 100.0 * correct1 / count}
        if num_classes >= 5:
            metrics[f"{prefix}top5"] = 100.0 * correct5 / count
        return metrics

    def _eval_batches(self, loader: Iterable, model: Optional[nn.Module]):
        """Yield gathered (logits, targets, embeddings) batches with padding removed."""
        model = model if model is not None else self.model
        was_training, loss_was_training = model.training, self.loss_fn.training
        model.eval()
        self.loss_fn.eval()
        in_memory = isinstance(loader, InMemoryLoader)
        if in_memory:
            loader.shard(self.accelerator.num_processes, self.accelerator.process_index, self.device)
            loader.set_epoch(0)
            batches = loader.iter_with_mask()
        else:
            batches = ((x, y, None) for x, y in loader)
        try:
            for images, targets, valid in batches:
                images, targets = self.prepare_batch(images, targets, train=False)
                with self.accelerator.autocast():
                    output = model(images)
                logits = logits_of(output).float()
                embeddings = output.embeddings if isinstance(output, ModelOutput) else None
                if in_memory:
                    if self.accelerator.num_processes > 1:
                        logits, targets, valid = self.accelerator.gather((logits, targets, valid))
                        if embeddings is not None:
                            embeddings = self.accelerator.gather(embeddings.float().contiguous())
                    # padding of the last batch is marked invalid: each sample counts once
                    logits, targets = logits[valid], targets[valid]
                    embeddings = embeddings[valid] if embeddings is not None else None
                elif self.accelerator.num_processes > 1:
                    logits, targets = self.accelerator.gather_for_metrics((logits, targets))
                    if embeddings is not None:
                        embeddings = self.accelerator.gather_for_metrics(embeddings.float().contiguous())
                yield logits, targets, embeddings
        finally:
            model.train(was_training)
            self.loss_fn.train(loss_was_training)

    # -- logging ------------------------------------------------------------------------
    def _log_epoch(self, metrics: dict[str, float], epochs: int) -> None:
        self.history.append(metrics)
        self.print(f"epoch {metrics['epoch']}/{epochs}  {format_metrics(metrics)}")
        if self.run_dir is not None and self.is_main_process:
            append_jsonl(self.run_dir / "metrics.jsonl", metrics)

    def _plot(self) -> None:
        if self.run_dir is None or not self.is_main_process:
            return
        path = self.run_dir / "metrics.jsonl"
        if path.exists():  # includes epochs from before a resume
            plot_curves(read_jsonl(path), self.run_dir / "curves.png", title=self.run_dir.name)

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The full training state. Collective: every process must call it (RNG states are
        gathered from all of them)."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        rng_all = gather_object([rng]) if self.accelerator.num_processes > 1 else [rng]
        state: dict[str, Any] = {
            "model": self.unwrapped_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "rng": rng_all,
            "progress": {
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "global_step": self.global_step,
                "epoch_sums": {k: v.detach().cpu() for k, v in self._epoch_sums.items()},
                "epoch_samples": self._epoch_samples,
                "num_processes": self.accelerator.num_processes,
            },
            "callbacks": {f"{i}:{type(cb).__name__}": cb.state_dict() for i, cb in enumerate(self.callbacks)},
            "extra": self.extra_state(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def save_checkpoint(self, path: Union[str, Path], metadata: Optional[Mapping[str, Any]] = None) -> Path:
        """Write the full training state to ``path`` (collective; the main process writes)."""
        path = Path(path)
        self._check_finite_weights()
        state = self.state_dict()
        if self.is_main_process:
            meta = {
                **self.checkpoint_metadata,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "global_step": self.global_step,
                "metrics": self.history[-1] if self.history else {},
                **(metadata or {}),
            }
            save_checkpoint(path, state, meta)
        self.last_checkpoint = path
        self.wait_for_everyone()
        return path

    def load_checkpoint(self, path: Union[str, Path]) -> dict[str, Any]:
        """Restore the full training state from ``path``; returns the checkpoint's metadata."""
        state, metadata = load_checkpoint(path)
        self.load_state_dict(state, source=path)
        history_path = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
        if history_path is not None and history_path.exists():
            # epochs logged after this checkpoint was written will be trained again
            self.history = read_jsonl(history_path)[: self.epoch]
            if self.is_main_process:
                tmp = history_path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
                os.replace(tmp, history_path)
        self.last_checkpoint = Path(path)
        return metadata

    def load_state_dict(self, state: dict[str, Any], source: Union[str, Path] = "<memory>") -> None:
        """Restore ``state_dict()``'s output (model, EMA, optimizer, scheduler, loss, scaler,
        callbacks, position and every process's RNG state)."""
        path = source
        try:
            load_model_weights(self.unwrapped_model, state["model"], path)
            if self.ema is not None:
                if "ema" not in state:
                    raise CheckpointError(f"{path} has no EMA weights; resume with trainer.ema_decay unset")
                load_model_weights(self.ema.module, state["ema"], path)
            self.optimizer.load_state_dict(state["optimizer"])
            self.loss_fn.load_state_dict(state["loss"])
            if self.scheduler is not None and "scheduler" in state:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.accelerator.scaler is not None and "scaler" in state:
                self.accelerator.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this training set-up ({exc}); resume with "
                                  f"the same recipe it was written with") from None
        progress = state["progress"]
        self.epoch = progress["epoch"]
        self.batch_in_epoch = progress["batch_in_epoch"]
        self.global_step = progress["global_step"]
        self._epoch_sums = {k: torch.as_tensor(v).to(self.device) for k, v in progress["epoch_sums"].items()}
        self._epoch_samples = progress["epoch_samples"]
        for i, cb in enumerate(self.callbacks):
            key = f"{i}:{type(cb).__name__}"
            if key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][key])
        self.load_extra_state(state.get("extra", {}))
        rng_all = state["rng"]
        rank = self.accelerator.process_index
        if len(rng_all) == self.accelerator.num_processes:
            torch.set_rng_state(rng_all[rank]["torch"])
            if rng_all[rank].get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng_all[rank]["cuda"], self.device)
        else:
            self.print(f"warning: {path} was written by {len(rng_all)} processes and this run has "
                       f"{self.accelerator.num_processes}; augmentation randomness is re-seeded, so the "
                       f"continuation is valid but not bit-identical")
            set_seed(self.seed + self.global_step, device_specific=True)
