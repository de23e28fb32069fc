"""Output for logs: a tqdm bar on a terminal, plain lines every N steps anywhere else."""

from __future__ import annotations

import io
import re
import sys

from tqdm import tqdm

from convrecipes.cli import main
from convrecipes.progress import LineProgress, is_terminal, progress_bar, shows_next

# one quick epoch of the quickstart: 1295 training digits in batches of 64 -> 20 batches
QUICK = ["trainer.epochs=1", "model.kwargs.width=4", "schedule.warmup_epochs=0"]
BATCHES = 1295 // 64


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_line_progress_prints_a_line_at_every_multiple_and_nothing_else():
    out = io.StringIO()
    bar = LineProgress(total=7, desc="epoch 1/2", unit="batch", every=3, stream=out)
    for i in range(7):
        if shows_next(bar):
            bar.set_postfix(loss=f"{i:.1f}", refresh=False)
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[:3] for line in lines] == [["epoch 1/2", "batch 3/7", "loss 2.0"],
                                                        ["epoch 1/2", "batch 6/7", "loss 5.0"]]
    assert all(re.search(r"  \d+\.\d batch/s$", line) for line in lines)
    assert "\r" not in out.getvalue()


def test_line_progress_counts_from_a_resumed_position_and_over_an_iterable():
    out = io.StringIO()
    bar = LineProgress(total=10, initial=4, every=5, stream=out)
    bar.update(3)  # 4 -> 7 passes 5
    bar.update(2)  # 7 -> 9 passes nothing
    assert out.getvalue().startswith("it 7/10")
    assert out.getvalue().count("\n") == 1
    out = io.StringIO()
    assert list(LineProgress(range(4), every=2, stream=out)) == [0, 1, 2, 3]
    assert [line.split("  ")[0] for line in out.getvalue().splitlines()] == ["it 2/4", "it 4/4"]


def test_progress_bar_is_tqdm_on_a_terminal_and_lines_elsewhere():
    assert isinstance(progress_bar(total=5, stream=io.StringIO()), LineProgress)
    terminal = Terminal()
    bar = progress_bar(total=5, desc="x", stream=terminal)
    assert isinstance(bar, tqdm)
    bar.update(5)
    bar.close()
    assert "\r" in terminal.getvalue()  # tqdm's frames, where they belong
    disabled = progress_bar(total=5, stream=Terminal(), disable=True)
    assert isinstance(disabled, tqdm) and disabled.disable
    assert is_terminal(Terminal()) and not is_terminal(io.StringIO()) and not is_terminal(object())
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(closed)  # isatty() of a closed stream raises; no terminal then


def test_training_into_a_log_writes_plain_lines_and_no_frames(tmp_path, capsys):
    # under pytest's capture neither stdout nor stderr is a terminal, as in a log file
    assert not sys.stderr.isatty()
    assert main(["train", "quickstart", *QUICK, "trainer.log_every_steps=5", "--run-dir", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out and "\r" not in captured.err
    steps = re.findall(r"^epoch 1/1  batch (\d+)/(\d+)  loss (\d+\.\d{4})  lr \S+  [\d.]+ batch/s$", captured.out,
                       re.M)
    assert [int(n) for n, _, _ in steps] == list(range(5, BATCHES + 1, 5))
    assert all(int(total) == BATCHES for _, total, _ in steps)
    # the last line's loss is the epoch's running mean: the epoch summary's train_loss
    summary = re.search(r"^epoch 1/1  train_loss (\d+\.\d{4})", captured.out, re.M)
    assert summary and steps[-1][2] == summary.group(1)


def test_training_on_a_terminal_still_draws_a_tqdm_bar(tmp_path, capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["train", "quickstart", *QUICK, "trainer.log_every_steps=5", "--run-dir", str(tmp_path / "r")]) == 0
    drawn = terminal.getvalue()
    assert "\r" in drawn and f"/{BATCHES}" in drawn and "batch/s" in drawn
    assert re.search(r"epoch 1/1:\s+\d+%\|", drawn)  # tqdm's "desc: pct|bar|" layout
    assert "batch 5/" not in capsys.readouterr().out  # and no plain lines besides it
