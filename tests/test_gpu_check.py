"""benchmarks/gpu_check.py (the prepared GPU check) runs end to end with --tiny on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_with_tiny(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--json", str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    steps = {r["step"]: r for r in data["table"]}
    assert list(steps) == ["build", "bare forward", "census", "evaluate fp",
                           "calibrate+quantize w8a8-tensor-static", "evaluate w8a8-tensor-static",
                           "calibrate+quantize w4a16-g64-gptq-seq", "evaluate w4a16-g64-gptq-seq"]
    assert data["device"] == "none (CPU)" and all(r["peak_gpu_mb"] is None for r in data["table"])
    assert steps["evaluate w4a16-g64-gptq-seq"]["kl"] > 0  # the model really was quantized
    assert all(steps[s]["tok_s"] > 0 for s in ("bare forward", "evaluate fp", "evaluate w8a8-tensor-static"))
    assert "| evaluate w4a16-g64-gptq-seq |" in res.stdout
