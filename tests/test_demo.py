"""The out-of-the-box demo (gemma2.demo, scripts/demo.py) and the shipped tiny teacher."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from gemma2.config import TINY_TEACHER
from gemma2.corpus import help_topics
from gemma2.demo import QUICK, TEACHER_DIR, greedy_sample, load_teacher, make_way, report, run, student_config
from gemma2.model import Gemma2ForCausalLM

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()


def test_shipped_teacher_is_the_documented_config(teacher):
    model, tokenizer = teacher
    assert model.config == TINY_TEACHER.replace(vocab_size=tokenizer.vocab_size)
    assert model.config.sliding_window < model.config.max_position_embeddings
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    size = sum(f.stat().st_size for f in TEACHER_DIR.iterdir())
    assert size < 30e6, f"the shipped teacher grew to {size / 1e6:.1f} MB"


def test_student_is_about_a_quarter_of_the_teacher():
    with torch.device("meta"):
        n_t = sum(p.numel() for p in Gemma2ForCausalLM(TINY_TEACHER).parameters())
        n_s = sum(p.numel() for p in Gemma2ForCausalLM(student_config(TINY_TEACHER)).parameters())
    assert 0.2 <= n_s / n_t <= 0.3
    assert student_config(TINY_TEACHER).vocab_size == TINY_TEACHER.vocab_size


def test_shipped_teacher_generates(teacher):
    model, tokenizer = teacher
    text = greedy_sample(model, tokenizer, "Return a new list", max_new_tokens=12)
    assert isinstance(text, str) and text.strip()


def test_shipped_teacher_matches_transformers(teacher):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = teacher
    hf = transformers.Gemma2ForCausalLM.from_pretrained(
        TEACHER_DIR, attn_implementation="eager", dtype=torch.float32
    ).eval()
    # Real text filling the whole context, four sliding windows long, so local layers differ
    # from global ones; the second row is the first one shuffled.
    text = "\n".join(help_topics()[:3])
    ids = torch.tensor([tokenizer.encode(text)[: model.config.max_position_embeddings]] * 2)
    ids[1, 1:] = ids[1, 1:][torch.randperm(ids.shape[1] - 1, generator=torch.Generator().manual_seed(0))]
    assert ids.shape[1] == model.config.max_position_embeddings > 3 * model.config.sliding_window
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits.float()
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_load_teacher_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_teacher.py"):
        load_teacher(tmp_path)


@pytest.mark.slow
def test_quick_demo_writes_results_and_curves(tmp_path):
    pytest.importorskip("matplotlib")
    results = run(QUICK, tmp_path, progress=False, echo=lambda line: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("teacher_ppl", "distilled_ppl", "scratch_ppl", "seconds", "acceptance_seconds"):
        assert isinstance(saved[key], float) and math.isfinite(saved[key]) and saved[key] > 0, key
    for key in ("distilled_acceptance", "scratch_acceptance"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert saved["steps"] == QUICK.steps
    assert saved["teacher_params"] > saved["student_params"] > 0
    assert set(saved["samples"]) == {"teacher", "distilled", "scratch"}
    assert all(isinstance(s, str) for s in saved["samples"].values())
    for name in ("distilled", "scratch"):
        assert saved["curves"][name]["step"] == [0, QUICK.steps]
    # Both students start from the same weights: their step-0 held-out losses are equal.
    assert saved["curves"]["distilled"]["eval_ce"][0] == pytest.approx(saved["curves"]["scratch"]["eval_ce"][0])
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    assert b"Matplotlib" in png  # the Software text chunk matplotlib writes
    text = report(results)
    assert "held-out ppl" in text and ("YES" in text or "NO" in text)
    assert f"{saved['distilled_acceptance']:.1%}" in text and "k = 4" in text

    # A second demo into the same directory replaces the first one's outputs and keeps the user's file.
    (tmp_path / "notes.txt").write_text("mine")
    first = {name: (tmp_path / name).read_bytes() for name in ("results.json", "curves.png")}
    run(QUICK, tmp_path, progress=False, echo=lambda line: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "results.json").read_text())["seconds"] != saved["seconds"]
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
    for name in ("distilled", "scratch"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["metrics.jsonl", f"step-{QUICK.steps:06d}"]
    # A user's file among the run's is refused before anything is written.
    (tmp_path / "scratch" / "notes.txt").write_text("also mine")
    second = {name: (tmp_path / name).read_bytes() for name in ("results.json", "curves.png")}
    assert second != first
    with pytest.raises(ValueError, match=r"scratch/notes\.txt; move it away"):
        run(QUICK, tmp_path, progress=False, echo=lambda line: None)
    assert (tmp_path / "scratch" / "notes.txt").read_text() == "also mine"
    assert {name: (tmp_path / name).read_bytes() for name in ("results.json", "curves.png")} == second


def _fake_run(directory: Path, fingerprint: str, step: int = 2) -> None:
    """What a training run on tokens `fingerprint` leaves: metrics, a checkpoint, a stale lock, a temporary."""
    ckpt = directory / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "run": {"train_fingerprint": fingerprint}}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (directory / "metrics.jsonl").write_text('{"step": 1}\n')
    (directory / ".lock").write_text("999999999 " + os.uname().nodename)  # no such process
    (directory / ".tmp-step-000001").mkdir(exist_ok=True)


def test_the_demo_replaces_only_its_own_runs_and_outputs(tmp_path, monkeypatch):
    """make_way: a previous demo's runs (on the same tokens) go, its results stay for the new run
    to replace; whatever else stands in the way is refused, named, and left as it was."""
    results = {"corpus_fingerprint": "c", "distilled_ppl": 9.0, "samples": {}}
    out = tmp_path / "demo"
    for name in ("distilled", "scratch"):
        _fake_run(out / name, "fp")
    (out / "results.json").write_text(json.dumps(results))
    (out / "curves.png").write_bytes(PNG_SIGNATURE)
    (out / "notes.txt").write_text("mine")
    make_way(out, "fp")
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "notes.txt", "results.json"]
    make_way(tmp_path / "new", "fp")  # nothing there: nothing to do
    assert not (tmp_path / "new").exists()

    cases = {
        "a user's file in a run": (lambda o: (o / "distilled" / "notes.txt").write_text("x"), "distilled/notes.txt"),
        "a run on other tokens": (lambda o: _fake_run(o / "scratch", "other", 5),
                                  r"scratch/step-000005 \(a checkpoint of other data\)"),
        "a step directory without a state": (lambda o: (o / "scratch" / "step-000009").mkdir(), "scratch/step-000009"),
        "a user's file in a checkpoint": (lambda o: (o / "scratch" / "step-000002" / "notes.txt").write_text("x"),
                                          "scratch/step-000002/notes.txt"),
        "a file where a run goes": (lambda o: shutil.rmtree(o / "scratch") or (o / "scratch").write_text("x"),
                                    r": scratch; move"),
        "a results.json not a demo's": (lambda o: (o / "results.json").write_text("{}"), "results.json"),
        "curves.png without a demo's results": (lambda o: (o / "curves.png").write_bytes(b"x"), "curves.png"),
    }
    # Killed while removing a run: no half checkpoint under its name, only a temporary the next call clears.
    out = tmp_path / "killed"
    for name in ("distilled", "scratch"):
        _fake_run(out / name, "fp")
    (out / "distilled" / "step-000002" / "rng-0.pt").write_bytes(b"rng")  # a checkpoint's own file
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            make_way(out, "fp")
    left = sorted(p.name for p in out.iterdir())
    assert left[0].startswith(".tmp-new-distilled-") and left[1:] == ["scratch"], left
    assert not (out / "distilled").exists()
    with monkeypatch.context() as m:
        m.setattr("gemma2.files.process_alive", lambda pid: False)  # as if the killed process were gone
        make_way(out, "fp")
    assert list(out.iterdir()) == [] and shutil.rmtree is real_rmtree

    for what, (make, named) in cases.items():
        out = tmp_path / what.replace(" ", "_").replace("'", "")
        for name in ("distilled", "scratch"):
            _fake_run(out / name, "fp")
        make(out)
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        with pytest.raises(ValueError, match=named) as refused:
            make_way(out, "fp")
        assert "move it away, or choose another --out" in str(refused.value), what
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before, what


def test_an_installed_package_finds_the_shipped_teacher(tmp_path):
    """A regular install (the wheel) carries the teacher as package data and TEACHER_DIR finds it
    there, away from any checkout; a checkout or `pip install -e .` uses checkpoints/ (above)."""
    root = Path(__file__).parents[1]
    src = tmp_path / "src"  # build from a copy: building in the work tree would leave build/ there
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src)
    shutil.copytree(root / "gemma2", src / "gemma2", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(TEACHER_DIR, src / "checkpoints" / "tiny-teacher")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("gemma2-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs by unpacking
    probe = "import gemma2.demo as d; m, t = d.load_teacher(); print(d.TEACHER_DIR, m.config.vocab_size == t.vocab_size)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env=os.environ | {"PYTHONPATH": str(site)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(site / "gemma2" / "tiny_teacher"), "True"]
