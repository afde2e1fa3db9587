"""`kdcache demo` runs the whole pipeline end to end (here with few steps) and reports every phase."""

from __future__ import annotations

from kdcache.demo import run_demo


def test_the_demo_runs_every_phase_and_reports_the_comparison(tmp_path):
    report = run_demo(tmp_path, teacher_steps=3, student_steps=3, transfer_sentences=24, progress=False)
    for line in ("teacher (4 layers, 128)", "KD student (2 layers, 64)", "CE-only student (same)", "bytes/token",
                 "train teacher", "dump teacher (2 caches)", "train KD student", "train CE-only student"):
        assert line in report, line
    teacher_row = next(line for line in report.splitlines() if line.startswith("teacher"))
    assert teacher_row.split()[-2:] == ["0.000", "100.0%"], "the held-out cache is exact: the teacher agrees with itself"
    assert {"teacher", "cache", "cache-heldout", "kd", "ce-only"} <= {path.name for path in tmp_path.iterdir()}
