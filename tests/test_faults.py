"""Faults and bad input, as a user meets them: the commands never destroy a file they did not
write, never train on silently changed settings, and end every user error in one line.

The command-line cases run the scripts in subprocesses (signals are real: SIGKILL, SIGINT, SIGTERM, SIGUSR1) on the
shipped tiny teacher and a ~0.4M-parameter student, so each takes a few seconds.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gemma2 import Gemma2ForCausalLM, load_model, save_model
from gemma2 import run_dir as R
from gemma2.checkpoint import CheckpointError, stored_dtype
from gemma2.generation import Session, generate
from gemma2.sampling import sample
from gemma2.teacher_cache import TeacherCache

from conftest import TIMINGS, assert_same_metrics

ROOT = Path(__file__).parents[1]
TEACHER = ROOT / "checkpoints" / "tiny-teacher"
TOKENIZER = TEACHER / "tokenizer.model"
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def script(name: str, *args, env: dict = ENV, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / name), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, **kwargs)


def start(name: str, *args, **kwargs) -> subprocess.Popen:
    """A script as a user starts it from a terminal: Ctrl-C (SIGINT) interrupts it, even where this
    test runs with SIGINT ignored (a background job of a shell without job control)."""
    cmd = [sys.executable, str(ROOT / "scripts" / name), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)  # fmt: skip


def one_line_error(done, code: int = 2) -> str:
    """The process ended with `code` and exactly one "error: " line, no traceback; that line."""
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line.removeprefix("> ") for line in done.stderr.splitlines() if line.removeprefix("> ").startswith("error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    lines = [f"Line {i}: the quick brown fox jumps over the lazy dog number {i * 7}." for i in range(80)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


def distill_args(docs: Path, out: Path, *extra) -> list:
    """A plain next-token run of the tiny student: ~20 ms a step on one thread."""
    return ["--student", "tiny", "--tokenizer", TOKENIZER, "--data", docs, "--seq-len", 16, "--batch-size", 2,
            "--eval-every", 0, "--alpha", 0, "--warmup", 2, "--no-progress", "--out", out, *extra]  # fmt: skip


def distill(docs: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return script("distill.py", *distill_args(docs, out, *extra))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Gemma2ForCausalLM, b: Gemma2ForCausalLM) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture
def fp32_checkpoint(tmp_path) -> Path:
    """A copy of the tiny teacher (fp32) with its tokenizer."""
    path = tmp_path / "ckpt"
    shutil.copytree(TEACHER, path)
    return path


# ------------------------------------------------------------------------------------------------
# 1. save_model and convert_checkpoint never destroy what was there


def test_save_model_failing_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    import gemma2.checkpoint as C

    model = load_model(TEACHER)
    save_model(model, tmp_path / "m", max_shard_bytes=2**20)  # sharded: several files to write
    calls = []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    real = C.save_file
    monkeypatch.setattr(C, "save_file", full_disk)
    with pytest.raises(OSError):
        save_model(model.to(torch.bfloat16), tmp_path / "m", max_shard_bytes=2**20)
    assert same_weights(load_model(tmp_path / "m"), load_model(TEACHER))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary left behind


def test_save_model_killed_midway_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL at random moments of repeated saves into one directory: it always loads, whole."""
    child = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from gemma2 import load_model, save_model\n"
        f"m = load_model({str(TEACHER)!r})\n"
        "while True:\n"
        f"    save_model(m, {str(tmp_path / 'm')!r}); print('saved', flush=True)\n"
    )
    want = load_model(TEACHER)
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=ENV)
        assert proc.stdout.readline() == "saved\n"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.wait()
        assert same_weights(load_model(tmp_path / "m"), want)


def test_save_model_keeps_files_it_did_not_write(tmp_path):
    model = load_model(TEACHER)
    save_model(model, tmp_path / "m", max_shard_bytes=2**20)
    (tmp_path / "m" / "tokenizer.model").write_bytes(b"tok")
    (tmp_path / "m" / "model-extra.safetensors").write_bytes(b"someone else's")
    (tmp_path / "m" / "notes").mkdir()
    (tmp_path / "m" / "notes" / "a.txt").write_text("mine")
    save_model(model, tmp_path / "m")  # unsharded now: the old shards were this save's to replace
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["config.json", "model-extra.safetensors", "model.safetensors", "notes", "tokenizer.model"]
    assert (tmp_path / "m" / "model-extra.safetensors").read_bytes() == b"someone else's"
    assert (tmp_path / "m" / "notes" / "a.txt").read_text() == "mine"
    assert same_weights(load_model(tmp_path / "m"), model)


def test_convert_in_place_refuses_a_dtype_change_and_keeps_the_weights(fp32_checkpoint):
    before = load_model(fp32_checkpoint)
    done = script("convert_checkpoint.py", "--input", fp32_checkpoint, "--output", fp32_checkpoint)
    assert "float32 weights into torch.bfloat16 in place" in one_line_error(done)
    assert stored_dtype(fp32_checkpoint) == torch.float32
    assert same_weights(load_model(fp32_checkpoint), before)
    # The same dtype in place is a safe rewrite.
    done = script("convert_checkpoint.py", "--input", fp32_checkpoint, "--output", fp32_checkpoint, "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert same_weights(load_model(fp32_checkpoint), before)
    assert (fp32_checkpoint / "README.md").is_file() and (fp32_checkpoint / "tokenizer.model").is_file()


def test_a_save_never_replaces_the_directory_it_runs_in(fp32_checkpoint, tmp_path):
    """A directory is saved by swapping a new one in: "." or ".." would leave the shell in a deleted
    directory. Refused, with nothing written; "out/.." names tmp_path's own child as it should."""
    here = tmp_path / "here"
    (here / "inner").mkdir(parents=True)
    (here / "mine.txt").write_text("mine")
    for output, cwd in ((".", here), ("..", here / "inner"), (here, here / "inner")):
        done = script("convert_checkpoint.py", "--input", fp32_checkpoint, "--output", output, "--overwrite", cwd=cwd)
        assert "is or holds the current directory" in one_line_error(done), output
        assert sorted(p.name for p in here.iterdir()) == ["inner", "mine.txt"]
    done = script("convert_checkpoint.py", "--input", fp32_checkpoint, "--output", "new/../made", cwd=here)
    assert done.returncode == 0, done.stderr
    assert stored_dtype(here / "made") == torch.bfloat16 and not (here / "new").exists()


def test_a_checkpoint_of_more_than_tensors_is_refused_naming_the_entry(tmp_path):
    """A training checkpoint (weights beside other state) is not a model: one line naming what is
    not a tensor, not an AttributeError from deep inside the loader."""
    weights = load_model(TEACHER).state_dict()
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "trained.ckpt")
    done = script("convert_checkpoint.py", "--input", tmp_path / "trained.ckpt", "--config", TEACHER / "config.json",
                  "--output", tmp_path / "out")  # fmt: skip
    assert "entry 'state_dict' is not a tensor (OrderedDict)" in one_line_error(done)
    assert not (tmp_path / "out").exists()


def test_the_stored_dtype_is_the_weights_not_the_official_rope_table(tmp_path):
    """The official reference's state dict begins with its complex RoPE table (freqs_cis)."""
    weights = {k: v.to(torch.bfloat16) for k, v in load_model(TEACHER).state_dict().items()}
    torch.save({"model_state_dict": {"freqs_cis": torch.zeros(4, 2, dtype=torch.complex64), **weights}}, tmp_path / "m.ckpt")
    assert stored_dtype(tmp_path / "m.ckpt") == torch.bfloat16


def test_a_directory_of_checkpoints_names_one_to_pass(tmp_path):
    """A training run's directory where a checkpoint is expected: the error names its newest."""
    run = tmp_path / "run"
    for step in ("step-000002", "step-000010"):
        shutil.copytree(TEACHER, run / step)
    newest = run / "step-000010"
    with pytest.raises(CheckpointError, match=f"subdirectories hold models: pass one of them, such as {newest}"):
        load_model(run)
    done = script("generate.py", "--checkpoint", run, "--prompt", "Hi")
    assert f"such as {newest}" in one_line_error(done)


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0.2"], "--beta goes with --objective jsd"),
    (["--gen-temperature", "0.5", "--max-new-tokens", "8"], "--gen-temperature goes with --lmbda > 0 or --seq-kd "
                                                             "(sampling); --max-new-tokens goes with"),
    (["--compile-sampling"], "--compile-sampling goes with --lmbda > 0, --seq-kd, or --prompts with a --teacher"),
])
def test_flags_the_run_would_ignore_are_refused(docs, tmp_path, flags, message):
    """They would do nothing, then block a --resume that changes them: one line before any work."""
    done = distill(docs, tmp_path / "out", "--steps", 1, *flags)
    assert message in one_line_error(done) and "this run would ignore it" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["tokenize_data.py", "distill.py"])
def test_a_holdout_fraction_beside_held_out_files_is_refused(docs, tmp_path, name):
    """It would split nothing: the held-out set is the files named."""
    if name == "distill.py":
        args = distill_args(docs, tmp_path / "out", "--eval-data", docs, "--holdout-fraction", 0.5)
    else:
        args = ["--tokenizer", TOKENIZER, "--data", docs, "--eval-data", docs, "--holdout-fraction", 0.5,
                "--out", tmp_path / "out.npy"]  # fmt: skip
    done = script(name, *args)
    assert "--holdout-fraction splits the training files, but --eval-data" in one_line_error(done)
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_recorded_an_ignored_flag_resumes_with_it(tmp_path, docs, monkeypatch):
    """A run started before such flags were refused holds one in its checkpoint: --resume with the
    same command goes on (the resume check compares it with the checkpoint's, and they agree)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("distill_script", ROOT / "scripts" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "check_unused", lambda args: None)  # as before the check existed
    args = [str(a) for a in distill_args(docs, tmp_path / "out", "--steps", 2, "--beta", 0.3)]
    monkeypatch.setattr(sys, "argv", ["distill.py", *args])
    usr1 = signal.getsignal(signal.SIGUSR1)
    try:
        assert module.main(module.parse_args()) == 0
    finally:
        signal.signal(signal.SIGUSR1, usr1)  # main notes SIGUSR1 (gemma2.preemption)
    resumed = distill(docs, tmp_path / "out", "--steps", 4, "--beta", 0.3, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [m["step"] for m in R.read_metrics(tmp_path / "out" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_missing_teacher_is_named_before_the_tokenizer_sought_beside_it(tmp_path):
    for flag in ("--teacher", "--teacher-cache"):
        done = script("distill.py", "--student", "tiny", flag, tmp_path / "nope", "--out", tmp_path / "out")
        assert one_line_error(done) == f"error: {flag} {tmp_path / 'nope'}: no such file or directory"
        assert not (tmp_path / "out").exists()


def test_a_bench_scripts_user_error_is_one_line(tmp_path):
    done = script("bench_tokenize.py", "--tokenizer", tmp_path / "missing.model", "--mb", 1)
    assert "missing.model" in one_line_error(done)


@pytest.mark.parametrize("name", ["generate.py", "benchmark.py"])
def test_threads_below_one_are_refused(tmp_path, name):
    done = script(name, "--checkpoint", tmp_path, "--prompt", "x", "--threads", 0) if name == "generate.py" else \
        script(name, "--threads", -1)  # fmt: skip
    assert one_line_error(done).startswith("error: --threads ") and "pass 1 or more" in done.stderr


def test_benchmark_refuses_an_existing_json_before_any_work(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("mine")
    done = script("benchmark.py", "--json", out)
    assert "exists; pass --overwrite" in one_line_error(done)
    assert out.read_text() == "mine"
    done = script("benchmark.py", "--json", tmp_path / "missing" / "bench.json")
    assert "does not exist" in one_line_error(done)


def test_convert_refuses_an_existing_output_without_overwrite(fp32_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = script("convert_checkpoint.py", "--input", fp32_checkpoint, "--output", out)
    assert "already exists and is not empty; pass --overwrite" in one_line_error(done)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    done = script("convert_checkpoint.py", "--input", fp32_checkpoint, "--output", out, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (out / "keep.txt").read_text() == "mine" and stored_dtype(out) == torch.bfloat16
    # The input's tokenizer replaces another one only with --overwrite: it belongs to these weights.
    (out / "tokenizer.model").write_bytes(b"another model's")
    done = script("convert_checkpoint.py", "--input", fp32_checkpoint, "--output", out, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (out / "tokenizer.model").read_bytes() == (fp32_checkpoint / "tokenizer.model").read_bytes()
    # --to-official onto an existing .ckpt
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"old")
    done = script("convert_checkpoint.py", "--input", fp32_checkpoint, "--output", ckpt, "--to-official")
    assert "pass --overwrite" in one_line_error(done)
    assert ckpt.read_bytes() == b"old"


def test_written_files_get_the_usual_permissions(tmp_path, fp32_checkpoint):
    mode = 0o666 & ~_umask()
    save_model(load_model(TEACHER), tmp_path / "m")
    done = script("convert_checkpoint.py", "--input", fp32_checkpoint, "--output", tmp_path / "o.ckpt",
                  "--to-official")  # fmt: skip
    assert done.returncode == 0, done.stderr
    for f in [*(tmp_path / "m").iterdir(), tmp_path / "o.ckpt"]:
        assert f.stat().st_mode & 0o777 == mode, f


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------
# 2. cache_teacher checks its arguments before touching an existing cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory, docs) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    done = script("cache_teacher.py", "--teacher", TEACHER, "--data", docs, "--seq-len", 16, "--k", 4, "--out", out)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("flag", [["--temperature", 0], ["--chunk-size", 0], ["--batch-size", 0], []])
def test_cache_teacher_keeps_an_existing_cache(cache, docs, flag):
    before = (cache / "cache.json").read_bytes()
    done = script("cache_teacher.py", "--teacher", TEACHER, "--data", docs, "--seq-len", 16, "--out", cache, *flag)
    line = one_line_error(done)
    assert (flag[0].removeprefix("--").replace("-", "_") if flag else "pass overwrite=True") in line
    assert (cache / "cache.json").read_bytes() == before
    assert TeacherCache(cache).k == 4


def test_cache_teacher_overwrite_replaces_the_cache(tmp_path, docs):
    out = tmp_path / "c"
    for k in (4, 2):
        done = script("cache_teacher.py", "--teacher", TEACHER, "--data", docs, "--seq-len", 16, "--k", k,
                      "--out", out, "--overwrite")  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert TeacherCache(out).k == 2
    mode = 0o666 & ~_umask()
    assert all(f.stat().st_mode & 0o777 == mode for f in out.iterdir())


def test_cache_teacher_killed_midway_is_finished_by_the_same_command(tmp_path, docs):
    """SIGKILL once some shards are written: the same command then takes over the dead process's
    lock, computes the missing shards alone and writes the cache an uninterrupted run writes."""
    args = ["--teacher", TEACHER, "--data", docs, "--seq-len", 16, "--k", 4, "--batch-size", 1, "--shard-mb", 0.0005]
    proc = start("cache_teacher.py", *args, "--out", tmp_path / "c")
    partial, deadline = tmp_path / "c.partial", time.monotonic() + 120
    while len(list(partial.glob("train-*.safetensors"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.communicate()
    finished = len(list(partial.glob("*.safetensors")))
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "c").exists() and finished >= 3
    done = script("cache_teacher.py", *args, "--out", tmp_path / "c")
    assert done.returncode == 0, done.stderr
    assert f"was left by process {proc.pid}" in done.stderr
    total = sum(len(s["shards"]) for s in json.loads((tmp_path / "c" / "cache.json").read_text())["splits"].values())
    assert f"resuming the teacher cache in {partial}: {finished} of its {total} shards" in done.stderr
    whole = script("cache_teacher.py", *args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "whole"]


# ------------------------------------------------------------------------------------------------
# 3. The trainer touches only its own step-XXXXXX directories


def test_rotation_spares_step_directories_the_run_did_not_write(tmp_path, docs):
    out = tmp_path / "run"
    (out / "step-000000").mkdir(parents=True)
    (out / "step-000000" / "mine.txt").write_text("mine")
    (out / "step-old").mkdir()
    done = distill(docs, out, "--steps", 3, "--save-every", 1, "--keep-last", 1)
    assert "holds no previous training run" in one_line_error(done)
    done = distill(docs, out, "--steps", 3, "--save-every", 1, "--keep-last", 1, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "step-000000", "step-000003", "step-old"]
    assert (out / "step-000000" / "mine.txt").read_text() == "mine"


def test_grouping_packed_rows_by_length_is_one_line_before_any_work(tmp_path, docs):
    done = distill(docs, tmp_path / "out", "--steps", 1, "--group-by-length", 8)
    assert "--group-by-length goes with --prompts" in one_line_error(done)
    assert not (tmp_path / "out").exists()


def test_a_step_directory_in_the_way_is_refused(tmp_path, docs):
    second = tmp_path / "b"
    (second / "step-000002").mkdir(parents=True)  # the user's, or another tool's
    (second / "step-000002" / "mine.txt").write_text("mine")
    done = distill(docs, second, "--steps", 2, "--overwrite")
    assert "holds step-000002, which this run would overwrite but did not write" in one_line_error(done)


# ------------------------------------------------------------------------------------------------
# 4. One run per output directory


def test_a_second_run_on_the_same_out_is_refused_and_the_first_goes_on(tmp_path, docs):
    out = tmp_path / "run"
    first = start("distill.py", *distill_args(docs, out, "--steps", 100_000, "--save-every", 20))
    try:
        while not (out / "metrics.jsonl").exists():  # the first run holds the lock and trains
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        done = distill(docs, out, "--steps", 100_000, "--resume")
        line = one_line_error(done)
        assert f"in use by process {first.pid} on {socket.gethostname()}" in line
        logged = len(R.read_metrics(out / "metrics.jsonl"))
        while len(R.read_metrics(out / "metrics.jsonl")) < logged + 25:  # it keeps training and saving
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130, first.communicate()
    finally:
        first.kill()
    assert R.latest_complete(out) is not None and not (out / ".lock").exists()


def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path, docs):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    done = distill(docs, out, "--steps", 2)
    assert done.returncode == 0, done.stderr
    assert f"left by process {dead.pid}" in done.stderr and "taking it over" in done.stderr


# A distill.py started as if on another machine: its host name, and gemma2.locks' intervals shortened.
ON_NODE = """import runpy, socket, sys
_, host, *sys.argv = sys.argv
socket.gethostname = lambda: host
from gemma2 import locks
locks.HEARTBEAT_S, locks.STALE_S, locks.WATCH_S = 0.2, 3.0, 1.5
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def holder(out: Path) -> list[str]:
    """The pid and host a lock names ([] when there is none)."""
    try:
        pid, where = (out / ".lock").read_text().split()
        return [pid, where.partition("#")[0]]
    except FileNotFoundError:
        return []


def start_on(host: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ON_NODE, host, str(ROOT / "scripts" / "distill.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)  # fmt: skip


def test_a_run_on_another_machine_is_refused_while_it_runs_and_yields_once_stopped_past_the_stale_age(tmp_path, docs):
    """A run on node-a holds out/; node-b is refused while node-a refreshes its lock. node-a is then
    suspended (SIGSTOP) past the stale age: node-b takes over (as a job requeued there would) and
    trains; node-a, woken, stops at its next check with one line. (A write it was stopped in the
    middle of, a metrics line, say, may still land: not checked here.)"""
    out = tmp_path / "run"
    a = start_on("node-a", *distill_args(docs, out, "--steps", 100_000, "--save-every", 1_000_000))
    b = None
    try:
        while not (out / "metrics.jsonl").exists():
            assert a.poll() is None, a.communicate()
            time.sleep(0.05)
        refused = start_on("node-b", *distill_args(docs, out, "--steps", 100_000, "--resume"))
        refused.wait(timeout=120)
        line = one_line_error(subprocess.CompletedProcess(refused.args, refused.returncode, *refused.communicate()))
        assert f"in use by process {a.pid} on node-a" in line and "refreshed it while this process watched" in line
        a.send_signal(signal.SIGSTOP)
        b = start_on("node-b", *distill_args(docs, out, "--steps", 100_000, "--resume"))
        while holder(out) != [str(b.pid), "node-b"] or len(R.read_metrics(out / "metrics.jsonl")) < 5:
            assert b.poll() is None, b.communicate()
            time.sleep(0.05)
        a.send_signal(signal.SIGCONT)
        done_a = subprocess.CompletedProcess(a.args, a.wait(timeout=60), *a.communicate())
        assert f"was taken over by process {b.pid} on node-b" in one_line_error(done_a)
        assert holder(out) == [str(b.pid), "node-b"] and b.poll() is None  # node-b goes on
        b.send_signal(signal.SIGTERM)  # node-b's checkpoint: its lock still held when it saves
        err = b.communicate(timeout=60)[1]
        assert b.returncode == 143 and f"left by process {a.pid} on node-a, which has not refreshed it for" in err, err
    finally:
        for p in (a, b):
            if p is not None:
                p.kill()
    assert R.latest_complete(out)[0].name == f"step-{R.read_metrics(out / 'metrics.jsonl')[-1]['step']:06d}"
    assert not (out / ".lock").exists()


# ------------------------------------------------------------------------------------------------
# 5. A resume continues the same run or says why not


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, docs) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    done = distill(docs, out, "--steps", 4, "--save-every", 2, "--keep-last", 2)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize(
    "change, name",
    [
        (["--batch-size", 4], "batch_size"),
        (["--lr", 1e-3], "lr"),
        (["--alpha", 0.5, "--teacher", TEACHER], "alpha"),
        (["--temperature", 2.0], "temperature"),
        (["--objective", "jsd"], "objective"),
        (["--seq-len", 32], "training tokens"),
        (["--seed", 1], "seed"),
    ],
)
def test_resume_refuses_changed_settings(tmp_path, finished_run, docs, change, name):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    args = distill_args(docs, out, "--steps", 6, "--resume")
    for i in range(0, len(change), 2):  # replace the flag where distill_args sets it
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i : i + 2]
    done = script("distill.py", *args)
    line = one_line_error(done)
    assert "cannot resume from" in line and name in line, line
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "step-000002", "step-000004"]


def test_resume_refuses_other_data(tmp_path, finished_run, docs):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    other = tmp_path / "other.jsonl"
    other.write_text(docs.read_text().replace("fox", "cat"))
    args = distill_args(docs, out, "--steps", 6, "--resume")
    args[args.index("--data") + 1] = other
    assert "the training tokens" in one_line_error(script("distill.py", *args))


def test_resume_prints_safe_changes(tmp_path, finished_run, docs):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    done = distill(docs, out, "--steps", 6, "--save-every", 3, "--keep-last", 3, "--resume")
    assert done.returncode == 0, done.stderr
    for change in ("steps: 4 -> 6", "save_every: 2 -> 3", "keep_last: 2 -> 3"):
        assert f"note: resuming with a changed setting: {change}" in done.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_resume_without_a_checkpoint_or_with_fewer_steps_says_so(tmp_path, finished_run, docs):
    done = distill(docs, tmp_path / "new", "--steps", 2, "--resume")
    assert done.returncode == 0 and "holds no checkpoint to resume from; starting a new run" in done.stderr
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert "is at step 4, past steps = 3" in one_line_error(distill(docs, out, "--steps", 3, "--resume"))
    done = distill(docs, out, "--steps", 4, "--resume")
    assert done.returncode == 0 and "already at step 4: nothing to train" in done.stderr


# ------------------------------------------------------------------------------------------------
# 6, 7. A tokenizer and a seq_len that do not fit the models


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Path:
    from gemma2.tokenizer import train_tokenizer

    texts = [f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(60)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "small.model", vocab_size=320)


def test_a_tokenizer_of_another_size_than_the_teacher_is_refused(tmp_path, docs, small_tokenizer):
    args = distill_args(docs, tmp_path / "run", "--steps", 2, "--teacher", TEACHER, "--alpha", 1)
    args[args.index("--tokenizer") + 1] = small_tokenizer
    line = one_line_error(script("distill.py", *args))
    assert "small.model (320 pieces) is not the one the teacher came with" in line and "4096 pieces)" in line
    assert not (tmp_path / "run").exists()


def test_a_teacher_with_other_special_ids_is_refused(tmp_path, docs, fp32_checkpoint):
    config = json.loads((fp32_checkpoint / "config.json").read_text())
    (fp32_checkpoint / "config.json").write_text(json.dumps(config | {"bos_token_id": 5}))
    done = distill(docs, tmp_path / "run", "--steps", 2, "--teacher", fp32_checkpoint, "--alpha", 1)
    assert "numbers its special tokens differently from the teacher: bos 2 (model: 5)" in one_line_error(done)


def test_generate_refuses_a_tokenizer_smaller_than_the_model(small_tokenizer, tmp_path):
    done = script("generate.py", "--checkpoint", TEACHER, "--tokenizer", small_tokenizer, "--prompt", "Hi")
    line = one_line_error(done)
    assert "small.model (320 pieces) is not the one the checkpoint came with" in line and "4096 pieces)" in line
    assert done.stdout == ""
    # A checkpoint without a tokenizer.model of its own: its config's vocabulary refuses it.
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TEACHER / name, tmp_path / name)
    done = script("generate.py", "--checkpoint", tmp_path, "--tokenizer", small_tokenizer, "--prompt", "Hi")
    assert "has 320 pieces but the model has a vocabulary of 4096" in one_line_error(done)
    assert done.stdout == ""


def test_seq_len_beyond_the_context_is_refused(tmp_path, docs):
    args = distill_args(docs, tmp_path / "run", "--steps", 2, "--holdout-fraction", 0)
    args[args.index("--seq-len") + 1] = 300
    line = one_line_error(script("distill.py", *args))
    assert "seq_len 300 exceeds" in line and "max_position_embeddings = 256" in line


# ------------------------------------------------------------------------------------------------
# 8. Non-finite weights and logits


def _poison(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_load_model_refuses_nan_weights_naming_the_tensor(fp32_checkpoint):
    _poison(fp32_checkpoint)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' holds NaN or inf"):
        load_model(fp32_checkpoint)
    assert load_model(fp32_checkpoint, check_finite=False).model.layers[1].mlp.up_proj.weight.isnan().any()
    done = script("generate.py", "--checkpoint", fp32_checkpoint, "--prompt", "Once upon")
    assert "holds NaN or inf" in one_line_error(done) and done.stdout == ""


def test_generation_refuses_non_finite_logits(fp32_checkpoint):
    _poison(fp32_checkpoint)
    model = load_model(fp32_checkpoint, check_finite=False)
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match="logits are NaN or inf at new token 1"):
            generate(model, torch.tensor([[2, 100, 200]]), max_new_tokens=4, temperature=temperature)


# ------------------------------------------------------------------------------------------------
# Errors that are one line, exit status 2


def test_an_output_path_that_is_a_file_is_one_line(tmp_path, docs, fp32_checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "exists and is not a directory" in one_line_error(distill(docs, blocker, "--steps", 1))
    done = script("convert_checkpoint.py", "--input", fp32_checkpoint, "--output", blocker)
    assert "is a file" in one_line_error(done)
    done = script("cache_teacher.py", "--teacher", TEACHER, "--data", docs, "--seq-len", 16, "--out", blocker)
    assert "file" in one_line_error(done)
    assert blocker.read_text() == "x"


def test_missing_paths_are_one_line(tmp_path, docs):
    assert "no such file or directory" in one_line_error(distill(docs, tmp_path / "o", "--data", tmp_path / "none"))
    done = script("convert_checkpoint.py", "--input", tmp_path / "none", "--output", tmp_path / "out")
    assert "none: no such file or directory" in one_line_error(done)


def test_gemma2_traceback_keeps_the_traceback_above_the_line(tmp_path):
    args = ("--input", tmp_path / "none", "--output", tmp_path / "out")
    done = script("convert_checkpoint.py", *args, env=ENV | {"GEMMA2_TRACEBACK": "1"})
    assert done.returncode == 2 and done.stderr.startswith("Traceback (most recent call last):"), done.stderr
    assert done.stderr.splitlines()[-1] == one_line_error(script("convert_checkpoint.py", *args))


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_is_intact(tmp_path, docs):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=8m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = disk / "run"
        # Each checkpoint is ~1.8 MB of weights and ~3.5 MB of optimizer state: the second cannot fit.
        done = distill(docs, out, "--steps", 4, "--save-every", 2, "--keep-last", 0)
        line = one_line_error(done)
        assert "no space left on device" in line and "previous files and checkpoints are intact" in line
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".tmp-")) == ["metrics.jsonl", "step-000002"]
        assert load_model(out / "step-000002").config.vocab_size == 4096
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_in_process_keeps_the_checkpoint(tmp_path, docs, monkeypatch, capsys):
    """The same without root: the second save's weights fail to write."""
    import runpy

    import gemma2.checkpoint as C

    real, calls = C.save_file, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "save_file", full_disk)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["distill.py", *map(str, distill_args(docs, out, "--steps", 4, "--save-every", 2))])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "distill.py"), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: no space left on device" in err
    assert err.endswith(f"the latest complete checkpoint is {out / 'step-000002'}; continue with the same command "
                        "and --resume\n")  # fmt: skip
    assert load_model(out / "step-000002").config.vocab_size == 4096
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".tmp-")) == ["metrics.jsonl", "step-000002"]


def test_a_read_only_filesystem_is_one_line(tmp_path, docs):
    disk = tmp_path / "ro"
    if not _mount_tmpfs(disk, "ro,size=1m"):
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        assert "read-only" in one_line_error(distill(docs, disk / "run", "--steps", 1))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("device, message", [("cuda:7", "CUDA"), ("tpu", "unknown device 'tpu'")])
def test_unavailable_devices_are_one_line(tmp_path, docs, device, message):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has that many GPUs")
    assert message in one_line_error(script("generate.py", "--checkpoint", TEACHER, "--prompt", "Hi", "--device", device))
    assert message in one_line_error(distill(docs, tmp_path / "run", "--device", device))


def test_prompts_that_are_not_utf8_are_one_line():
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint", str(TEACHER)]
    done = subprocess.run([*cmd, "--prompt", b"caf\xe9"], capture_output=True, text=True, env=ENV, timeout=120)
    assert "--prompt is not valid UTF-8" in one_line_error(done)
    # A line on stdin that is not UTF-8 is skipped and the chat goes on (tests/test_generate_cli.py).


def test_interactive_with_stdin_closed_is_one_line():
    cmd = f"exec {sys.executable} {ROOT / 'scripts' / 'generate.py'} --checkpoint {TEACHER} --interactive <&-"
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=ENV, timeout=120)
    assert "stdin, which is closed" in one_line_error(done)


def test_a_tiny_temperature_samples_like_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 10
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, temperature=1e-300, generator=g), logits.argmax(-1))
    done = script("generate.py", "--checkpoint", TEACHER, "--prompt", "Once upon", "--temperature", "1e-300",
                  "--max-new-tokens", 4)  # fmt: skip
    greedy = script("generate.py", "--checkpoint", TEACHER, "--prompt", "Once upon", "--max-new-tokens", 4)
    assert done.returncode == 0, done.stderr
    assert done.stdout == greedy.stdout


def test_a_jsonl_text_that_is_not_a_string_names_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 123}\n')
    assert f'{data}:2: "text" must be a string' in one_line_error(distill(data, tmp_path / "run", "--steps", 1))


def test_a_torn_metrics_line_is_dropped_with_a_notice(tmp_path, finished_run, docs):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lr": 0.0')  # a kill in the middle of a write
    done = distill(docs, out, "--steps", 6, "--save-every", 2, "--keep-last", 2, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"note: {out / 'metrics.jsonl'}:5 is not a complete metrics record" in done.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_a_corrupt_trainer_state_falls_back_to_the_previous_checkpoint(tmp_path, finished_run, docs):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "step-000004" / "trainer_state.json").write_text('{"step": 4, "da')
    done = distill(docs, out, "--steps", 6, "--save-every", 2, "--keep-last", 2, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"note: {out / 'step-000004' / 'trainer_state.json'} is corrupt" in done.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metrics(out)][:4] == [m["loss"] for m in metrics(finished_run)]


def test_a_checkpoint_without_optimizer_state_is_one_line(tmp_path, finished_run, docs):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "step-000004" / "optimizer")
    line = one_line_error(distill(docs, out, "--steps", 6, "--resume"))
    assert "step-000004 has no optimizer/ directory" in line


def test_config_errors_are_checkpoint_errors(fp32_checkpoint):
    (fp32_checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid Gemma 2 config"):
        load_model(fp32_checkpoint)
    (fp32_checkpoint / "config.json").write_text(json.dumps({"hidden_size": 256}))
    with pytest.raises(CheckpointError, match="not a valid Gemma 2 config"):
        load_model(fp32_checkpoint)
    config = json.loads((TEACHER / "config.json").read_text()) | {"vocab_size": 1000}
    (fp32_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match this checkpoint"):
        load_model(fp32_checkpoint)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(input_ids=torch.zeros(0, 3, dtype=torch.long)), "input_ids is an empty batch"),
        (dict(input_ids=torch.tensor([[2, 4096]])), r"input_ids holds ids outside \[0, 4096\)"),
        (dict(input_ids=torch.tensor([[2, -1]])), r"input_ids holds ids outside \[0, 4096\)"),
        (dict(temperature=None), "temperature must be a number"),
        (dict(attention_mask=torch.tensor([[1, 2]])), "attention_mask must hold only 1"),
    ],
)
def test_python_api_bad_arguments_name_the_argument(kwargs, name):
    model = load_model(TEACHER)
    args = dict(input_ids=torch.tensor([[2, 5]]), max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=name):
        Session(model).stream(**args)


# ------------------------------------------------------------------------------------------------
# Signals and the NaN stop


def test_ctrl_c_in_generate_is_one_line_with_status_130():
    proc = start("generate.py", "--checkpoint", TEACHER, "--interactive", stdin=subprocess.PIPE)
    seen = ""
    while not seen.endswith("> "):  # the prompt: the model is loaded, waiting on stdin
        seen += proc.stderr.read(1)
        assert proc.poll() is None, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "interrupted", err


def test_sigterm_outside_training_is_one_line_with_status_143():
    """A scheduler's SIGTERM unwinds like Ctrl-C (here while a model waits on stdin)."""
    proc = start("generate.py", "--checkpoint", TEACHER, "--interactive", stdin=subprocess.PIPE)
    seen = ""
    while not seen.endswith("> "):
        seen += proc.stderr.read(1)
        assert proc.poll() is None, seen
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip() == "terminated (SIGTERM)", err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_schedulers_signal_saves_a_checkpoint_and_the_resume_is_exact(tmp_path, docs, signum):
    """The step in progress ends, a checkpoint is saved there (none was due: --save-every 0), the
    lock is released, and --resume continues exactly as an uninterrupted run."""
    args = ("--steps", 60, "--save-every", 0)
    whole = distill(docs, tmp_path / "whole", *args)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "run"
    proc = start("distill.py", *distill_args(docs, out, *args))
    logged = lambda: len(R.read_metrics(out / "metrics.jsonl")) if (out / "metrics.jsonl").exists() else 0  # noqa: E731
    while logged() < 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    step = logged()
    assert 3 <= step < 60
    name = signal.Signals(signum).name
    saved = out / f"step-{step:06d}"
    assert err.strip().splitlines()[-1] == (f"stopped by {name} after step {step} of 60; saved {saved}: continue with "
                                            "the same command and --resume")  # fmt: skip
    assert R.latest_complete(out)[0].name == f"step-{step:06d}" and not (out / ".lock").exists()
    resumed = distill(docs, out, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_metrics(R.read_metrics(out / "metrics.jsonl"), R.read_metrics(tmp_path / "whole" / "metrics.jsonl"),
                        rel=0, abs=0)  # fmt: skip


def test_ctrl_c_in_distill_names_the_latest_checkpoint(tmp_path, docs):
    out = tmp_path / "run"
    proc = start("distill.py", *distill_args(docs, out, "--steps", 2000, "--save-every", 5))
    while not (out / "step-000005").is_dir():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted; the latest complete checkpoint is " + str(out / "step-0")), last
    assert last.endswith("continue with the same command and --resume")
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("how", ["interrupt", "zip cleanup"])
def test_ctrl_c_inside_the_optimizer_save_is_one_line_and_keeps_the_checkpoint(tmp_path, docs, monkeypatch, capsys, how):
    """DCP catches what interrupts its file writer and re-raises it wrapped in a
    CheckpointException; torch.save's zip writer, interrupted mid-file, raises a RuntimeError as it
    closes. Either way Ctrl-C must end the script as Ctrl-C (status 130, one line)."""
    import runpy

    import torch.distributed.checkpoint.filesystem as dcp_files

    real, out = dcp_files._write_item, tmp_path / "run"

    def interrupted_write(*args, **kwargs):
        if (out / "step-000002").is_dir():  # the second save's optimizer state
            try:
                raise KeyboardInterrupt
            finally:
                if how == "zip cleanup":
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(*args, **kwargs)

    monkeypatch.setattr(dcp_files, "_write_item", interrupted_write)
    monkeypatch.setattr(sys, "argv", ["distill.py", *map(str, distill_args(docs, out, "--steps", 4, "--save-every", 2))])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "distill.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"interrupted; the latest complete checkpoint is {out / 'step-000002'}")
    assert load_model(out / "step-000002").config.vocab_size == 4096 and not (out / "step-000004").exists()


def test_the_nan_stop_names_the_last_checkpoint_with_finite_weights(tmp_path, docs, monkeypatch, capsys):
    """An update that overflows the weights after step 3 (saved) makes step 4's loss NaN: the
    message must point at step 2, the last checkpoint that is not poisoned."""
    import runpy

    real_step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        self.steps_done = getattr(self, "steps_done", 0) + 1
        if self.steps_done == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    out = tmp_path / "run"
    argv = distill_args(docs, out, "--steps", 6, "--save-every", 1, "--keep-last", 0)
    monkeypatch.setattr(sys, "argv", ["distill.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "distill.py"), run_name="__main__")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"the last good checkpoint is {out / 'step-000002'} (its weights are finite)" in err
    assert "An update made the weights NaN/inf" in err


def test_non_finite_evaluation_is_written_as_null(tmp_path, docs):
    """A student whose weights are NaN (loaded without the check) evaluates to NaN at step 0:
    metrics.jsonl stays strict JSON, the value null and its key flagged; the stop says why."""
    student = tmp_path / "student"
    shutil.copytree(TEACHER, student)
    _poison(student)
    import gemma2.trainer as T
    from gemma2.data import load_datasets
    from gemma2.tokenizer import Tokenizer

    data = load_datasets([docs], Tokenizer(TOKENIZER), 16, holdout_fraction=0.1)
    cfg = T.TrainConfig(out_dir=str(tmp_path / "run"), steps=2, batch_size=2, eval_every=1, alpha=0.0)
    with pytest.raises(T.NonFiniteLossError, match="already NaN/inf when training started"):
        T.train(cfg, load_model(student, check_finite=False), data, progress=False)
    line = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    assert record["eval_ce"] is None and record["nonfinite"] == ["eval_ce", "eval_ppl"]


# ------------------------------------------------------------------------------------------------
# The fault-injection run


def test_random_kills_then_resume_give_the_uninterrupted_run(tmp_path, docs):
    """SIGKILL a distillation run at random moments, half of them while a checkpoint is being
    written, and resume each time: every step-XXXXXX loads, no temporary outlives the next start,
    and the final metrics equal those of a run never interrupted."""
    steps = 30
    args = ("--steps", steps, "--save-every", 3, "--keep-last", 2)
    reference = distill(docs, tmp_path / "reference", *args)
    assert reference.returncode == 0, reference.stderr
    out, rng = tmp_path / "run", random.Random(1234)
    kills = during_save = 0
    stale: set[tuple] = set()
    while kills < 12:
        before = _identity(out / "metrics.jsonl")
        proc = start("distill.py", *distill_args(docs, out, *args, "--resume"))
        # Startup takes ~2 s; odd kills wait (longer) for a save to be under way.
        deadline = time.monotonic() + (rng.uniform(2.0, 3.5) if kills % 2 == 0 else 10.0)
        saving = False
        while proc.poll() is None and time.monotonic() < deadline:
            if kills % 2 and out.is_dir() and any(p.name.startswith(".tmp-step-") for p in out.iterdir()):
                saving = True  # a save is under way: kill it there
                break
            time.sleep(0.001)
        if proc.poll() is not None:  # it finished before the kill: start over from scratch
            assert proc.returncode == 0, proc.communicate()
            shutil.rmtree(out)
            continue
        proc.kill()
        proc.communicate()
        kills += 1
        during_save += saving
        # What the killed process left. If it got as far as rewriting metrics.jsonl (which follows
        # the clean-up at its start), no earlier leftover may have survived.
        entries = {_identity(p) for p in out.iterdir()} if out.is_dir() else set()
        if _identity(out / "metrics.jsonl") != before:
            assert not (stale & entries), stale & entries
            stale = set()
        stale |= {e for e in entries if e[0].startswith(".tmp-")}
        for ckpt in out.glob("step-*") if out.is_dir() else []:
            load_model(ckpt)
            json.loads((ckpt / "trainer_state.json").read_text())
    assert during_save >= 3
    final = distill(docs, out, *args, "--resume")
    assert final.returncode == 0, final.stderr
    assert not any(p.name.startswith(".tmp-") or p.name == ".lock" for p in out.iterdir())
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMINGS} for m in ms]  # noqa: E731
    assert strip(metrics(out)) == strip(metrics(tmp_path / "reference"))
    assert same_weights(load_model(out / f"step-{steps:06d}"), load_model(tmp_path / "reference" / f"step-{steps:06d}"))


def _identity(path: Path) -> tuple | None:
    """A file's name, inode and change time: a file written anew under the same name differs."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return path.name, st.st_ino, st.st_ctime_ns
