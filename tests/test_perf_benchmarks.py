"""The performance benchmarks (benchmarks/vs_timm_pipeline.py, benchmarks/machine_limit.py).

The fast tests check what the numbers rest on: the PNG folder timm's pipeline reads holds
the same images and labels, and the FLOP count matches a count from the layer shapes. The
slow ones run each script at a tiny size and read its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from convrecipes.data import ImageTensorDataset  # noqa: E402


def test_png_folder_reads_back_through_timm_with_the_same_images_and_labels(tmp_path):
    from timm.data import create_dataset
    from vs_timm_pipeline import write_png_folder

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 2, 1, 11, 2, 0, 11, 1, 5, 5, 3, 4, 6, 7, 8, 9, 10])  # 12 classes: "10" sorts after "09"
    images = torch.randint(0, 256, (len(labels), 1, 28, 28), dtype=torch.uint8, generator=g)
    ds = ImageTensorDataset(images, labels, [f"c{k}" for k in range(12)])
    root = write_png_folder(ds, tmp_path / "png")
    timm_ds = create_dataset("", root=str(root), split="train", is_training=False, input_img_mode="L")
    assert len(timm_ds) == len(ds)
    seen = set()
    for i in range(len(timm_ds)):
        image, label = timm_ds[i]
        pixels = torch.from_numpy(np.array(image)).unsqueeze(0)
        matches = [j for j in range(len(ds)) if torch.equal(ds.images[j], pixels)]
        assert len(matches) == 1 and int(ds.labels[matches[0]]) == label
        seen.add(matches[0])
    assert seen == set(range(len(ds)))
    assert write_png_folder(ds, root) == root  # finished: not rewritten
    assert (root / "complete").read_text() == str(len(ds))


def _forward_flops_by_layer(model: nn.Module, x: torch.Tensor) -> list[int]:
    """2 x multiply-adds of every conv and linear layer in call order, from the shapes."""
    flops: list[int] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            fan_in = module.in_features
        flops.append(2 * output.numel() * fan_in)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return flops


@pytest.mark.parametrize("name", ["tiny_cnn", "small_resnet8"])
def test_train_flops_per_image_matches_the_layer_shapes(name):
    from _training_speed import model_kwargs
    from machine_limit import train_flops_per_image

    from convrecipes.models import create_model

    batch = 8
    model = create_model(name, 1, 10, **model_kwargs(name)).train()
    per_layer = _forward_flops_by_layer(model, torch.randn(batch, 1, 28, 28))
    # backward: the input gradient and the weight gradient each cost the forward's FLOPs,
    # except that the first layer's input (the images) needs no gradient
    expected = (3 * sum(per_layer) - per_layer[0]) / batch
    assert train_flops_per_image(name, batch_size=batch) == pytest.approx(expected, rel=1e-9)


def test_counted_flops_of_a_matmul_is_2mkn():
    from machine_limit import counted_flops

    a, b = torch.randn(7, 5), torch.randn(5, 3)
    assert counted_flops(lambda: a @ b) == 2 * 7 * 5 * 3


def _run(script: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_vs_timm_pipeline_tiny_run_writes_a_resumable_result(tmp_path):
    args = ["--steps", "2", "--warmup", "1", "--rounds", "1", "--models", "tiny_cnn", "--ours-threads", "1",
            "--timm-threads", "1", "--timm-workers", "1", "--images", "256", "--cache-dir", str(tmp_path / "cache")]
    doc = _run("vs_timm_pipeline", args, tmp_path)
    res = doc["models"]["tiny_cnn"]
    assert set(res["median"]) == {"ours t1", "timm t1 w1"}
    assert all(v > 0 for v in res["median"].values())
    assert res["ours_best"]["cell"] == "ours t1" and res["timm_best"]["cell"] == "timm t1 w1"
    assert res["ratio"] == pytest.approx(res["median"]["ours t1"] / res["median"]["timm t1 w1"])
    again = _run("vs_timm_pipeline", args, tmp_path)  # same settings: read back, not re-measured
    assert again["models"]["tiny_cnn"]["images_per_s"] == res["images_per_s"]


@pytest.mark.slow
def test_machine_limit_tiny_run_reports_fractions_and_a_profile(tmp_path):
    doc = _run("machine_limit", ["--models", "tiny_cnn", "--threads", "1", "--steps", "2", "--warmup", "1",
                                 "--rounds", "1", "--profile-steps", "2", "--matmul-n", "128",
                                 "--peak-seconds", "0.05"], tmp_path)
    res = doc["threads"]["1"]
    assert res["peak"]["matmul_gflops"] > 0 and res["peak"]["conv_gflops"] > 0
    m = res["models"]["tiny_cnn"]
    assert m["train_gflop_per_image"] > 0 and m["images_per_s"] > 0
    assert m["achieved_gflops"] == pytest.approx(m["images_per_s"] * m["train_gflop_per_image"])
    assert m["fraction_of_conv_peak"] == pytest.approx(m["achieved_gflops"] / res["peak"]["conv_gflops"])
    prof = m["profile"]
    assert prof["steps"] == 2
    assert sum(prof["percent"].values()) == pytest.approx(100.0)
    assert prof["percent"]["forward"] > 0 and prof["percent"]["backward"] > 0 and prof["percent"]["augment"] > 0
