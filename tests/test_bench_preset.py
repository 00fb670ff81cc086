"""scripts/bench_preset.py end to end on the tiny preset on the CPU (the GPU check runs it on the 2B
preset): every figure present and sane, user errors one line with exit status 2, an existing
--json file never replaced without --overwrite."""

import json
import subprocess
import sys
from pathlib import Path

from gemma2.config import PRESETS
from gemma2.memory_plan import GiB, plan_memory

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_preset.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_figures_of_the_tiny_preset(tmp_path):
    out = tmp_path / "tiny.json"
    done = run("--preset", "tiny", "--seq-len", "40", "--decode-steps", "4", "--device", "cpu", "--json", str(out))
    assert done.returncode == 0, done.stderr
    res = json.loads(out.read_text())
    assert res["preset"] == "tiny" and res["seq_len"] == 40 and res["distill_teacher"] == "top-k cache, k 32"
    for key in ("prefill_tok_s", "decode_tok_s", "decode_compiled_tok_s", "distill_step_s", "distill_planned_peak_gib"):
        assert res[key] > 0, key
    assert "distill_measured_peak_gib" not in res  # measured on CUDA only
    # The plan of the step it ran: a top-k cache of k 32, the tiny preset's full sequence, "auto" kernels.
    plan = plan_memory(PRESETS["tiny"], seq_len=40, batch_size=1, teacher_cache_k=32, device_type="cpu")
    assert res["distill_planned_peak_gib"] == plan.peak / GiB
    assert f"decode_tok_s: {res['decode_tok_s']:.4g}" in done.stdout

    # An existing --json is kept as it was; the refusal comes before any work.
    again = run("--preset", "tiny", "--json", str(out))
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--overwrite" in again.stderr
    assert json.loads(out.read_text()) == res


def test_user_errors_are_one_line():
    for args, words in [
        (["--preset", "tiny", "--seq-len", "300"], "the model's context"),
        (["--preset", "7b"], "presets:"),
        (["--preset", "tiny", "--teacher", "2b"], "vocab size"),
    ]:
        done = run(*args, "--device", "cpu")
        assert done.returncode == 2 and done.stderr.startswith("error: ") and words in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
