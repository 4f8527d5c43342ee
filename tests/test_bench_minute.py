"""benchmarks/minute.py --smoke: the whole few-step sampling runs on the CPU and its JSON holds what the table says."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_minute_smoke_writes_the_sampling_row(tmp_path):
    out = tmp_path / "minute.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "minute.py"), "--smoke", "--shots", "3",
                    "--shot-frames", "2", "--steps", "3", "--json", str(out)], check=True, timeout=300,
                   capture_output=True)
    info = json.loads(out.read_text())
    r = info["sampling"]
    assert r["shots"] == [2, 2, 2] and r["latent_frames"] == 6
    assert r["tokens"] == 6 * 4 * 6            # latent frames x the smoke frame's tokens
    assert len(r["step_s"]) == 3 and all(s > 0 for s in r["step_s"])
    assert r["sampling_s"] >= sum(r["step_s"]) * 0.99
    assert info["capacity"] == 1.0 and info["groups"] == 20
