"""A step the fp16 gradient scaler skips (inf/NaN gradients) must not step the LR schedule.

Accelerate creates no scaler on CPU (fp16 there is a no-op), but torch has a CPU
``GradScaler``: giving it to the ``Accelerator`` before the trainer prepares its optimizer
runs the real scaler path (scaled backward, ``scaler.step`` skipping on inf, ``update``)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from convrecipes.data.loader import InMemoryLoader
from convrecipes.trainers import SupervisedTrainer


def _scaled_trainer(blobs):
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    accelerator.native_amp = True
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    trainer = SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), scheduler=sched, accelerator=accelerator,
                                progress=False)
    batches = list(InMemoryLoader(blobs, 16, seed=0))
    return trainer, sched, batches


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_a_scaler_skipped_step_does_not_step_the_schedule(blobs):
    trainer, sched, batches = _scaled_trainer(blobs)
    optimizer = trainer.optimizers[trainer.resolve_part(None)]
    before = _params(trainer.unwrapped_model)
    overflow = [True]  # the first backward's gradient of one bias overflows, as an fp16 one can

    def overflow_once(grad: torch.Tensor) -> torch.Tensor:
        if overflow[0]:
            overflow[0] = False
            return torch.full_like(grad, float("inf"))
        return grad

    trainer.unwrapped_model[1].bias.register_hook(overflow_once)
    out = trainer.train_step([batches[0]])
    assert torch.isfinite(out.loss), "the loss itself is finite: only a gradient overflowed"
    assert optimizer.step_was_skipped, "the scaler must have skipped this step"
    assert trainer.accelerator.scaler.get_scale() == 2.0**9, "the scaler backed off"
    assert torch.equal(_params(trainer.unwrapped_model), before), "a skipped step leaves the weights alone"
    assert sched.last_epoch == 0 and sched.get_last_lr() == [0.1], "the schedule did not advance"

    trainer.train_step([batches[1]])
    assert not optimizer.step_was_skipped
    assert not torch.equal(_params(trainer.unwrapped_model), before)
    assert sched.last_epoch == 1 and sched.get_last_lr() == [0.1 / 2], "a step that went through steps the schedule"


def test_without_overflow_every_step_steps_the_schedule(blobs):
    trainer, sched, batches = _scaled_trainer(blobs)
    for i, batch in enumerate(batches[:3]):
        trainer.train_step([batch])
        assert sched.last_epoch == i + 1
    assert sched.get_last_lr() == [0.1 / 4]
