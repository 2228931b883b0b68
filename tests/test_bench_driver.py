"""The benchmark driver survives its cases: a case killed by a signal (SIGILL, as oneDNN's bf16
convolution on a VM that does not grant AMX), one raising, one exiting with no output at all and
one running past its timeout are each reported as such, and the other cases still run, in
interleaved rounds, with medians and min-max."""

import sys

from benchmarks.bench import aggregate, failure_lines, ratio_spreads, run_command, run_rounds, table, PRESETS

PY = sys.executable
OK = ("import json, sys; n = int(sys.argv[1]); "
      "print(json.dumps({'case': sys.argv[2], 'kind': 'train', 'images_per_s': n, 'peak_mib': 10.0 + n,"
      " 'loss_step1': 1.5, 'passes': {'student_fwd': 2.0, 'student_bwd': 2.0}}))")
COMMANDS = {
    "sigill": [PY, "-c", "import os, signal, sys; print('about to run bf16', file=sys.stderr, flush=True); "
               "os.kill(os.getpid(), signal.SIGILL)"],
    "raises": [PY, "-c", "raise RuntimeError('a bug in the case')"],
    "silent": [PY, "-c", "import sys; sys.exit(3)"],
    "slow": [PY, "-c", "import time; time.sleep(30)"],
}


def test_failing_cases_are_reported_and_the_others_run():
    calls = []
    speeds = {"darwin": iter([100, 80, 120]), "rslad": iter([400, 240, 600])}

    def run(case):
        calls.append(case)
        if case in COMMANDS:
            return run_command(case, COMMANDS[case], timeout=3)
        return run_command(case, [PY, "-c", OK, str(next(speeds[case])), case], timeout=60)

    cases = ["darwin", "sigill", "rslad", "raises", "silent", "slow"]
    rounds = run_rounds(cases, 3, run, log=lambda _: None)
    # interleaved: every case once per round; a failed case is not run again
    assert calls == cases + ["darwin", "rslad"] * 2

    results = [aggregate(c, [r for this in rounds for r in this if r["case"] == c]) for c in cases]
    by = {r["case"]: r for r in results}
    assert by["sigill"]["error"] == "killed by SIGILL" and by["sigill"]["stderr_tail"] == ["about to run bf16"]
    assert by["raises"]["error"] == "exit 1: RuntimeError: a bug in the case"
    assert by["silent"]["error"] == "exit 3: no error output"   # was an IndexError of the driver
    assert by["slow"]["error"] == "timed out after 3 s"

    d = by["darwin"]
    assert d["images_per_s"] == 100 and d["spread"]["images_per_s"] == {"median": 100, "min": 80, "max": 120, "n": 3}
    assert d["spread"]["peak_mib"]["max"] == 130 and d["passes"]["student_fwd"] == 2.0
    ratios = ratio_spreads(rounds, PRESETS["cpu"])
    # ratios within each round (4.0, 3.0, 5.0), not the ratio of medians (400/100 only by chance)
    assert ratios["darwin_step_cost_vs_rslad"] == {"median": 4.0, "min": 3.0, "max": 5.0, "n": 3}
    assert ratios["vs_darwin.rslad"]["min"] == 3.0

    text = table(results, PRESETS["cpu"], ratios)
    assert "| darwin | 100.0 (80.0-120.0) | 1.00x (1.00-1.00) |" in text
    assert "| rslad | 400.0 (240.0-600.0) | 4.00x (3.00-5.00) |" in text
    assert "| sigill | **failed**: killed by SIGILL |" in text
    report = "\n".join(failure_lines(results))
    assert "sigill: killed by SIGILL (round 1)\n    about to run bf16" in report and "slow: timed out" in report
