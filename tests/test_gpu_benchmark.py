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


def test_a_group_stopped_by_the_budget_reports_the_cases_it_finished():
    """The methods group prints each finished case at once; a timeout keeps those (bytes or text)."""
    out = (gpu.CASE_PREFIX + '{"case": "method_rslad", "images_per_s": 10.0}\n# noise\n'
           + gpu.CASE_PREFIX + '{"case": "method_trades", "error": "RuntimeError: x"}\n')
    assert [r["case"] for r in gpu.finished_cases(out)] == ["method_rslad", "method_trades"]
    assert gpu.finished_cases(out.encode())[0]["images_per_s"] == 10.0
    assert gpu.finished_cases(None) == []


def test_the_gpu_checks_tier_counts_a_verbose_pytest_run():
    from benchmarks.gpu_check import tier_counts

    out = ("tests/test_gpu.py::test_a PASSED                      [ 10%]\n"
           "tests/test_gpu.py::test_b[darwin] FAILED              [ 20%]\n"
           "tests/test_gpu.py::test_c SKIPPED (gpu tier: no CUDA)  [ 30%]\n"
           "tests/test_gpu.py::test_d ERROR                       [ 40%]\n")
    assert tier_counts(out) == {"passed": 1, "failed": 1, "skipped": 1, "errors": 1,
                                "failures": ["tests/test_gpu.py::test_b[darwin]", "tests/test_gpu.py::test_d"]}
