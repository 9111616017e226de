"""`kernelscope bench --quick`: a smoke run on the real kernel, not a performance test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernelscope.bench.config import KIB, MIB, Config, Result, parse_size
from kernelscope.bench.report import targets
from kernelscope.bench.run import plan

ROOT = Path(__file__).resolve().parent.parent


def test_sizes_parse_to_power_of_two_pages() -> None:
    assert parse_size("64K") == 64 * KIB
    assert parse_size("4MiB") == 4 * MIB
    with pytest.raises(ValueError, match="power-of-two"):
        parse_size("12K")


def test_plan_interleaves_the_runs_the_live_target_compares() -> None:
    cfg = Config()
    runs = plan(cfg)
    first = runs[: len(runs) // 2]
    undisturbed = [r for r in runs if r.scenario == "undisturbed"]
    assert [r.per_call for r in undisturbed] == [1, 16] * cfg.target_rounds
    assert all(r in first for r in undisturbed)
    assert {r.size for r in undisturbed} == {128 * MIB}  # 3 M records of 40 bytes fit
    ring_4m = [(r.consumer, r.per_call) for r in runs
               if (r.scenario, r.kind, r.size) == ("live", "ring", 4 * MIB)]
    assert sorted(ring_4m) == sorted(
        [(c, k) for c in ("bcc", "libbpf", "kernelscope") for k in (1, 16)] * cfg.target_rounds)
    other = {r.per_call for r in runs if r.scenario == "live" and (r.kind, r.size) != ("ring", 4 * MIB)}
    assert other == {1}


def _run(scenario: str, consumer: str, per_call: int, received: int, seconds: float,
         **extra: object) -> Result:
    return Result(scenario, "ring", consumer, 4 * MIB if scenario == "live" else 128 * MIB,
                  3_000_000, per_call, made=3_000_000, received=received, seconds=seconds,
                  producer_seconds=seconds, extra=dict(extra))


def test_live_target_compares_kernelscope_with_the_undisturbed_producer_only() -> None:
    undisturbed = [_run("undisturbed", "nobody", 1, 3_000_000, 1.0),
                   _run("undisturbed", "nobody", 16, 3_000_000, 0.25)]
    bcc = [_run("live", "bcc", k, 3_000_000, 1.0) for k in (1, 16)]  # BCC dropping nothing is fine

    def live_target(runs: list[Result]) -> object:
        (t,) = [t for t in targets(runs) if t.name.startswith("live ")]
        return t.passed

    keeps_up = [_run("live", "kernelscope", 1, 3_000_000, 1.05),
                _run("live", "kernelscope", 16, 3_000_000, 0.27)]
    assert live_target(undisturbed + bcc + keeps_up) is True
    slow = [keeps_up[0], _run("live", "kernelscope", 16, 3_000_000, 0.3)]  # 0.83x at 16 per call
    assert live_target(undisturbed + bcc + slow) is False
    dropped_once = [keeps_up[0], _run("live", "kernelscope", 16, 3_000_000, 0.27, attempts=[
        {"made": 3_000_000, "received": 3_000_000}, {"made": 3_000_000, "received": 2_999_000}])]
    assert live_target(undisturbed + bcc + dropped_once) is False
    assert live_target(bcc + keeps_up) is None  # no undisturbed rate: cannot judge


@pytest.mark.kernel
def test_quick_bench_measures_every_consumer(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "kernelscope.bench", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert elapsed < 60, f"--quick took {elapsed:.1f} s"  # a hang guard: 12 s quiet, 34 s under load
    assert "TARGETS" in r.stdout
    assert "[bench]" in r.stderr

    doc = json.loads(out.read_text())
    assert {"machine", "config", "undisturbed", "live", "drain", "overflow", "ratios",
            "targets"} <= doc.keys()
    runs = doc["undisturbed"] + doc["live"] + doc["drain"] + doc["overflow"]
    seen = {(x["scenario"], x["kind"], x["consumer"]) for x in runs}
    for scenario in ("live", "drain"):
        for kind in ("ring", "perf"):
            for consumer in ("bcc", "libbpf", "kernelscope"):
                assert (scenario, kind, consumer) in seen
    # the producer's undisturbed rate, at each events-per-call of the live 4 MiB ring runs
    per_calls = doc["config"]["live_per_calls"]
    assert sorted(x["per_call"] for x in doc["undisturbed"]) == sorted(per_calls) == [1, 16]
    for x in doc["undisturbed"]:
        assert x["consumer"] == "nobody"
        assert x["size"] >= x["events"] * 40  # the ring holds every event: no output fails
        assert x["received"] == x["made"], x
        assert doc["undisturbed_events_per_s"][str(x["per_call"])] == x["producer_events_per_s"]
    live_4m = {(x["consumer"], x["per_call"]) for x in doc["live"]
               if x["kind"] == "ring" and x["size"] == 4 * MIB}
    assert live_4m == {(c, k) for c in ("bcc", "libbpf", "kernelscope") for k in per_calls}
    for k in per_calls:
        assert doc["ratios"][f"live/ring/4MiB/{'' if k == 1 else f'{k}pc/'}kernelscope_vs_undisturbed"] > 0
    for x in runs:
        assert x["error"] is None, x
        assert x["received"] > 0, x
        assert x["made"] == x["received"] + x["dropped"]
        assert x["events_per_s"] > 0
    for x in runs:
        if x["consumer"] == "kernelscope":
            assert x["extra"]["accounting"] == "exact", x
    assert len(doc["targets"]) == 4
    assert all(t["passed"] in (True, False) for t in doc["targets"])
    # every target is about kernelscope: the live one against the producer's own rate
    live = [t for t in doc["targets"] if t["name"].startswith("live ")]
    assert len(live) == 1
    assert "undisturbed" in live[0]["name"]
    assert "BCC" not in live[0]["name"]
    assert "producer undisturbed" in r.stdout
    # what waking the consumer cost the producer: IRQ-work interrupts on its CPU (x86)
    if "IWI:" in Path("/proc/interrupts").read_text():
        assert all(isinstance(x["extra"]["irq_work"], int) for x in doc["live"]), doc["live"]
    # SEND: both writers put every sample into the user ring intact (the program's count and sum)
    assert [s["writer"] for s in doc["send"]] == ["libbpf C", "kernelscope"]
    for s in doc["send"]:
        assert s["error"] is None, s
        assert s["sent"] == s["drained"] == doc["config"]["send_samples"], s
        assert s["checksum_ok"], s
        assert s["samples_per_s"] > 0
    assert doc["ratios"]["send/userring/kernelscope_vs_libbpf"] > 0
    assert "SEND:" in r.stdout
