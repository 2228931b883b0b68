"""benchmarks/gpu.py (make benchmark-gpu): its arithmetic and one real measured case on CPU."""

import math

import torch

from benchmarks import gpu


def test_fraction_of_flop_limit_and_full_run_hours():
    results = [{"case": "matmul", "tflops": 100.0},
               {"case": "darwin_default", "method": "darwin", "batch": 128, "images_per_s": 2500.0,
                "flops_per_step": 128 * 1e10, "fast_path": "bf16"},
               {"case": "darwin_reduce_overhead", "error": "killed by SIGSEGV"}]
    text, summary = gpu.summarise(results, gpu.PRESETS["paper"])
    d = results[1]
    assert math.isclose(d["flop_limit_images_per_s"], 1e14 / 1e10)           # 10,000 images/s
    assert math.isclose(d["fraction_of_flop_limit"], 0.25)
    assert math.isclose(d["full_run_hours"], 50000 * 200 / 2500 / 3600)      # DARWIN: 200 epochs
    assert "| darwin_reduce_overhead | killed by SIGSEGV |" in text
    assert math.isclose(summary["darwin_default_fraction_of_flop_limit"], 0.25)


def test_a_case_measures_the_resolved_fast_path_on_cpu():
    preset = {"student": "resnet10_w8", "teacher": "resnet10_w8", "batch": 4, "steps": 1, "train_images": 64}
    r = gpu.measure("darwin", preset, torch.device("cpu"), "auto", "auto", "auto", "default", 4, timed_steps=1)
    assert r["fast_path"] == "fp32, contiguous (NCHW), eager"        # auto on a CPU
    assert r["images_per_s"] > 0 and math.isfinite(r["loss_step1"])
    assert r["flops_per_step"] > 0
