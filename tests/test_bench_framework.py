"""bench/: run_all.py runs every benchmark in its own process, records failures, and report.py writes REPORT.md from
the result files; a real (cheap) benchmark runs end to end. Speed itself is never asserted here."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from bench import common, report
from conftest import REPO

RUN_ALL = [sys.executable, os.path.join(REPO, "bench", "run_all.py")]


def check_result(path, name):
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    assert result["name"] == name and not result.get("failed")
    assert {"machine", "settings", "table", "goals", "notes", "elapsed_s"} <= set(result)
    assert result["machine"]["versions"]["torch"].startswith("2.13.0")
    assert result["table"] and all("case" in row for row in result["table"])
    assert all({"goal", "target", "measured", "met"} <= set(g) and isinstance(g["met"], bool) for g in result["goals"])
    return result


def test_run_all_quick_memory_estimate_writes_result_and_report(tmp_path):
    results, report_path = tmp_path / "results", tmp_path / "REPORT.md"
    proc = subprocess.run(RUN_ALL + ["--quick", "--only", "6", "--results_dir", str(results), "--report",
                                     str(report_path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = check_result(results / "bench_6_memory_estimate.json", "bench_6_memory_estimate")
    assert len(result["goals"]) == 4 and any(g["met"] for g in result["goals"])
    text = report_path.read_text(encoding="utf-8")
    assert "## bench_6_memory_estimate" in text and "| GLM-4-9B LoRA |" in text and "Versions: torch 2.13.0" in text
    assert "Quick (development) runs, not for reporting: bench_6_memory_estimate" in text
    for goal in result["goals"]:  # every goal is in the report with its verdict
        assert goal["goal"] in text
    assert text.count("**NOT met**") == 2 * sum(not g["met"] for g in result["goals"])  # summary + section


def test_a_failing_benchmark_is_reported_and_the_others_still_run(tmp_path):
    bench_dir = tmp_path / "benches"
    bench_dir.mkdir()
    (bench_dir / "bench_1_ok.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from bench.common import bench_name, parse_args, write_result
        args = parse_args("ok")
        write_result(bench_name(__file__), settings={{"quick": args.quick}}, table=[{{"case": "a", "x": 1.5}}],
                     goals=[{{"goal": "x >= 1", "target": 1, "measured": 1.5, "met": True}}])
    """), encoding="utf-8")
    (bench_dir / "bench_2_broken.py").write_text("import sys\nsys.exit('boom: something broke')\n", encoding="utf-8")
    (bench_dir / "bench_3_silent.py").write_text("print('forgot to write a result')\n", encoding="utf-8")
    results, report_path = tmp_path / "results", tmp_path / "REPORT.md"
    proc = subprocess.run(RUN_ALL + ["--quick", "--bench_dir", str(bench_dir), "--results_dir", str(results),
                                     "--report", str(report_path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    ok = check_result(results / "bench_1_ok.json", "bench_1_ok")
    assert ok["settings"] == {"quick": True}
    broken = json.loads((results / "bench_2_broken.json").read_text())
    assert broken["failed"] and broken["returncode"] == 1 and "boom: something broke" in broken["stderr_tail"]
    silent = json.loads((results / "bench_3_silent.json").read_text())
    assert silent["failed"] and "wrote no result" in silent["stderr_tail"]
    text = report_path.read_text(encoding="utf-8")
    assert "3 benchmarks, 2 failed (bench_2_broken, bench_3_silent); goals met 1 of 1" in text
    assert "**FAILED** (exit code 1)" in text and "boom: something broke" in text


def test_write_result_rejects_rows_without_case_and_incomplete_goals(tmp_path, monkeypatch):
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="case"):
        common.write_result("x", settings={}, table=[{"a": 1}], goals=[])
    with pytest.raises(ValueError, match="met"):
        common.write_result("x", settings={}, table=[], goals=[{"goal": "g", "target": 1, "measured": 2}])
    assert not list(tmp_path.iterdir())  # nothing half-written
    path = common.write_result("x", settings={"a": 1}, table=[{"case": "c"}],
                               goals=[{"goal": "g", "target": 1, "measured": 2, "met": 1}])
    assert json.loads(open(path, encoding="utf-8").read())["goals"][0]["met"] is True


def test_peak_rss_of_child_counts_the_child_only():
    import torch  # noqa: F401  (this process is big; the child must not inherit its size)

    small, code = common.peak_rss_mib_of_child([sys.executable, "-c", "pass"])
    big, _ = common.peak_rss_mib_of_child([sys.executable, "-c", "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"])
    assert code == 0 and small < 100 and 300 < big < 300 + small + 50
    assert common.peak_rss_mib_of_child([sys.executable, "-c", "import sys; sys.exit(3)"])[1] == 3


def test_report_number_format():
    assert [report.fmt(v) for v in (34220.4, 123.45, 1.234, 0.01234, 5, True, None)] == \
        ["34,220", "123.5", "1.23", "0.0123", "5", "yes", "–"]
