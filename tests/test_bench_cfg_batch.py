"""benchmarks/cfg_batch.py --smoke: both ways of a guided step run on the CPU and agree (float32)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cfg_batch_smoke_rows(tmp_path):
    out = tmp_path / "cfg.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cfg_batch.py"), "--smoke", "--json", str(out)],
                   check=True, timeout=300, capture_output=True)
    info = json.loads(out.read_text())
    assert [r["tokens"] for r in info["results"]] == [48, 96]
    for r in info["results"]:
        assert r["max_rel_diff"] < 1e-5 and r["two passes"]["time_s"] > 0 and r["one batch of 2"]["time_s"] > 0
