from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_mode_reports_every_part(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    pre = data["pretrain"]
    for key in ("lightly_ips", "ours_ips", "floor_eager_ips"):
        assert pre[key] > 0
    assert pre["ratio_ours_vs_lightly"] == pytest.approx(pre["ours_ips"] / pre["lightly_ips"])
    assert pre["ratio_ours_vs_floor"] == pytest.approx(pre["ours_ips"] / pre["floor_eager_ips"])
    assert {r["sampler"] for r in data["purify"] if r.get("kind") == "purifier"} == {
        "oneshot",
        "ddim",
        "ddpm",
    }
    assert data["corruptions"] and all(r["ours_img_s"] > 0 for r in data["corruptions"])
    assert all(r["images_per_s"] > 0 for r in data["purify"])
    assert "b/a =" in res.stdout and "b/c =" in res.stdout
