"""The benchmark runs end to end at tiny sizes (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _bench(root: Path, base_url: str, out: Path, *args: str, timeout: float) -> None:
    """Run bench/bench.py with ``args`` against ``base_url``, its results written to ``out``."""
    env = os.environ | {"FHIR_BASE_URL": base_url, "PYTHONPATH": str(root / "src")}
    result = subprocess.run(
        [sys.executable, str(root / "bench" / "bench.py"), *args, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_bench_quick_runs(root: Path, fhir_base_url: str, tmp_path: Path) -> None:
    _bench(root, fhir_base_url, tmp_path, "--quick", timeout=900)
    results = json.loads((tmp_path / "results-quick.json").read_text())
    assert set(results) >= {
        "machine",
        "mapping",
        "one_bundle",
        "push",
        "latency",
        "pull",
        "memory",
        "client_cpu",
        "incremental",
        "repush",
    }
    assert len(results["one_bundle"]["round_ratios"]) == 3
    push = results["push"][0]
    assert push["repush_writes"] == 0  # re-pushing unchanged encounters writes nothing
    assert (
        push["ours_actions"] == {"created": push["encounters"]}
        or "entered-in-error" in push["ours_actions"]
    )
    # Two transactions of 10, each after one batch that looks for what is on the server
    # already (nothing is known of a first push); before them, a preflight of two reads.
    assert push["ours_requests"] == {"GET": 2, "POST": 4}
    assert len(push["rounds"]) == 1 and push["ours_over_limit"] > 0 and push["ours_over_peer"] > 0
    cpu = results["client_cpu"]
    assert len(cpu["round_ratios"]) == 2 and cpu["create_ms"] > 0 and cpu["update_ms"] > 0
    # The nightly sync sends only what changed: 1 of 20 encounters each night.
    incremental = results["incremental"]
    nights = incremental["rounds"]
    assert incremental["changed"] == 1 and nights == 4 == len(incremental["round_ratios"])
    actions = incremental["ours_actions"]
    assert actions["unchanged"] == 19 * nights, incremental
    assert sum(actions.values()) == 20 * nights, incremental
    # A re-push of unchanged encounters finds them all unchanged with nothing sent (it pushes
    # to a port nothing listens on), at both sizes.
    repush = results["repush"]
    assert repush["again_1000"]["actions"] == {"unchanged": 1000}, repush
    assert repush["again_100"]["first_result_s"] > 0 and repush["ratio"] > 0
    table = (tmp_path / "RESULTS-quick.md").read_text()
    assert "| mapping forward" in table and "| mapping reverse, one Bundle of 200" in table
    assert "| push client CPU per new encounter" in table and "| nightly sync: 20" in table
    assert "| peak RSS, re-push of unchanged encounters" in table
    assert "| mapping reverse of the same Bundles as a server returns them" in table


def test_bench_cpu_only_runs_without_a_server(root: Path, tmp_path: Path) -> None:
    """--cpu-only measures the rows of one core (mapping, the client's CPU) and nothing else."""
    # Nothing listens at its server address: no row may need one.
    _bench(root, "http://127.0.0.1:9", tmp_path, "--cpu-only", "--quick", timeout=600)
    results = json.loads((tmp_path / "results-cpu-quick.json").read_text())
    assert set(results) == {"mode", "date", "machine", "mapping", "one_bundle", "client_cpu"}
    mapping = results["mapping"]
    assert mapping["served_reverse_per_s"] > 0 and mapping["floor_served_reverse_per_s"] > 0
    table = (tmp_path / "RESULTS-cpu-quick.md").read_text()
    assert "| mapping reverse of the same Bundles as a server returns them" in table
    assert "| push client CPU per changed encounter" in table and "| push 20" not in table
