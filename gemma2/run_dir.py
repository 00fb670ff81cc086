"""A training run's output directory: who may write it, what in it is the run's, and what a resume
must agree with.

    out_dir/.lock              "pid host" of the process training into it (one at a time)
    out_dir/metrics.jsonl      one JSON object a line (non-finite numbers as null, see `json_line`)
    out_dir/step-XXXXXX/       checkpoints (gemma2.train_state); trainer_state.json names the run

- One writer: `open_run` takes the lock (gemma2.locks) and refuses a second process, naming the
  holder; a lock whose holder is gone is taken over with a notice (from another machine: once
  unrefreshed for two minutes), and a holder whose lock was taken over stops at its next metrics
  line or save (`Run.saving`).
- Nothing that is not the run's is touched: a fresh run refuses a non-empty directory that holds
  no previous run unless `overwrite`; rotation deletes only `step-\\d{6}` directories whose
  trainer_state.json carries this run's id, never a user's `step-000000/` or `step-old/`.
- A resume continues the same run: every TrainConfig field that changes the run's meaning (the
  on-policy settings too), the training tokens (fingerprint: data, tokenizer, seq_len), the
  student's config (its checkpoint's config.json) and the teacher (`models`: a model's config,
  dtype and weights' checksum, or a cache's k, temperature and splits) must equal the checkpoint's
  (a field the checkpoint predates, its default; a teacher it did not record, unchecked); a
  difference is refused with the list. `SAFE_TO_CHANGE` may differ (each change is printed).
- Damaged files are read robustly: a torn last line of metrics.jsonl is dropped, a checkpoint whose
  trainer_state.json does not parse is skipped for the one before it, each with a notice naming
  the file.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch.distributed.checkpoint.api import CheckpointException

from .checkpoint import written_by_save
from .config import Gemma2Config
from .distributed import local_shard
from .files import TMP_PREFIX, is_temporary, notice, remove_stale_temporaries
from .locks import LOCK_FILE, acquire_lock, ensure_held, release_lock

if TYPE_CHECKING:
    from .data import Datasets
    from .trainer import TrainConfig

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"step-(\d{6})")
RNG_FILE = "rng-{rank}.pt"  # in a checkpoint, each rank's RNG states (gemma2.train_state)
# Fields a resume may change: they decide when to save, evaluate and log (peak_flops only scales
# the logged MFU), where, or how memory is traded for time, not what the run computes. steps may
# only grow (the cosine schedule then ends later); the data are compared through their
# fingerprint, which covers the tokenizer.
SAFE_TO_CHANGE = ("steps", "save_every", "eval_every", "eval_sequences", "keep_last", "out_dir", "tokenizer_file",
                  "activation_checkpointing", "device", "peak_flops", "compile_sampling",
                  "sample_sharded", "stop_grace")  # fmt: skip
# Only their product with the number of ranks, the global batch, changes the run: one step's
# gradient is the mean over its sequences however they are split (gemma2.trainer).
BATCH_SPLIT = ("batch_size", "grad_accum")


# ------------------------------------------------------------------------------------------------
# Checkpoints and their state


def read_state(ckpt: Path) -> dict | None:
    """A checkpoint's trainer_state.json, or None (with a notice naming the file) when it is not
    valid JSON."""
    file = ckpt / STATE_FILE
    try:
        state = json.loads(file.read_text())
        if isinstance(state, dict) and isinstance(state.get("step"), int):
            return state
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    notice(f"{file} is corrupt (not the JSON a checkpoint writes); skipping {ckpt.name}")
    return None


def step_dirs(out: str | os.PathLike) -> list[Path]:
    """The out/step-XXXXXX directories (exactly six digits) with a trainer_state.json, oldest first."""
    found = [p for p in Path(out).iterdir() if STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_complete(out: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint whose trainer_state.json reads, with that state; None if none."""
    if not Path(out).is_dir():
        return None
    for ckpt in reversed(step_dirs(out)):
        state = read_state(ckpt)
        if state is not None:
            return ckpt, state
    return None


def _run_id(state: dict | None) -> str | None:
    run = state.get("run") if state else None
    return run.get("id") if isinstance(run, dict) else None


def rotate(out: Path, run_id: str | None, keep_last: int | None) -> None:
    """Delete run `run_id`'s checkpoints beyond its newest `keep_last`; nothing else (nothing at
    all without a run id)."""
    if keep_last is None or run_id is None:
        return
    ours = [p for p in step_dirs(out) if _run_id(read_state(p)) == run_id]
    for old in ours[:-keep_last]:
        # Renamed first, in one step: a run killed while deleting leaves a temporary (cleared at the
        # next start), never a half-deleted step-XXXXXX that looks like a checkpoint.
        doomed = out / (TMP_PREFIX + old.name)
        if doomed.exists():
            shutil.rmtree(doomed)
        old.rename(doomed)
        shutil.rmtree(doomed)


def finite_weights(ckpt: Path) -> bool:
    """Whether every tensor of a checkpoint's safetensors files is finite."""
    for file in sorted(ckpt.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            if not all(bool(f.get_tensor(name).isfinite().all()) for name in f.keys()):
                return False
    return True


# ------------------------------------------------------------------------------------------------
# metrics.jsonl


def json_line(record: dict) -> str:
    """One metrics line. JSON has no NaN or inf: such values are written as null and their keys
    listed under "nonfinite", so every reader parses the file."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        record = {k: None if k in bad else v for k, v in record.items()} | {"nonfinite": bad}
    return json.dumps(record, allow_nan=False) + "\n"


def read_metrics(file: Path) -> list[dict]:
    """The records of a metrics.jsonl; lines that do not parse (a torn last line after a kill) are
    dropped with a notice naming the file and line."""
    records = []
    for lineno, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
                continue
        except json.JSONDecodeError:
            pass
        notice(f"{file}:{lineno} is not a complete metrics record (a run killed mid-write?); dropped")
    return records


# ------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Run:
    """What train() needs to know about its output directory, from `open_run`."""

    out: Path
    id: str  # stored in every checkpoint: rotation deletes only this run's
    checkpoint: Path | None  # where to resume from
    fingerprint: str  # of the training tokens
    models: dict  # the student's config, the teacher's record (gemma2.teacher.teacher_record), the compute dtype
    stored: dict  # the resumed checkpoint's run record ({} for a new run)
    lock: Path | None = None  # out/.lock, on the rank that holds it

    @property
    def record(self) -> dict:
        """The run's entry in trainer_state.json."""
        return {"id": self.id, "train_fingerprint": self.fingerprint, "models": self.models}

    def check_teacher_weights(self, checksum: list[float]) -> None:
        """Record the teacher's weights' checksum (gemma2.teacher.Teacher.checksum); on a resume,
        refuse one that is not the checkpoint's (another teacher of the same shape, e.g. the
        instruction-tuned one for the base one). Equal within 1e-9 relative: the sums' order
        depends on the ranks' shards."""
        stored = ((self.stored.get("models") or {}).get("teacher") or {}).get("weights")
        if stored is not None and not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(stored, checksum)):
            raise ValueError(
                f"cannot resume from {self.checkpoint}: the teacher's weights differ from the run's (checksum "
                f"{stored} -> {checksum}); resume with the teacher it was trained with, or start a new run "
                "in another out_dir"
            )
        self.models["teacher"]["weights"] = checksum

    @contextmanager
    def saving(self, model: torch.nn.Module) -> Iterator[None]:
        """Around a checkpoint save: torch's writers report a full disk as a RuntimeError
        ("unexpected pos ...", wrapped by DCP in a CheckpointException); it becomes the OSError it
        is when the filesystem has less room left than the model's weights, which every save writes.
        First, the rank holding the lock checks that it still does (gemma2.locks.ensure_held)."""
        if self.lock is not None:
            ensure_held(self.lock)
        try:
            yield
        except (RuntimeError, CheckpointException) as e:
            needed = sum(p.numel() * p.element_size() for p in model.parameters())
            free = shutil.disk_usage(self.out).free
            if free < needed:
                raise OSError(errno.ENOSPC, f"No space left on device ({free:,} bytes free)", str(self.out)) from e
            raise

    def nonfinite_message(self, step: int, first_step: int, loss: float, grad_norm: float, model: torch.nn.Module) -> str:
        """Why training stopped at `step`, the last checkpoint whose weights are finite, and the fix."""
        weights_ok = all(bool(local_shard(p).isfinite().all()) for p in model.parameters())
        good = next((p for p in reversed(step_dirs(self.out)) if _run_id(read_state(p)) == self.id
                     and finite_weights(p)), None)  # fmt: skip
        where = f"the last good checkpoint is {good} (its weights are finite)" if good else "no checkpoint has finite weights"
        head = f"step {step}: loss {loss}, gradient norm {grad_norm}; stopped before the update, and {where}"
        if weights_ok:
            return f"{head}. The loss blew up: lower lr or raise warmup (or check the data), then resume from it"
        if step == first_step:
            return (f"{head}. The student's weights were already NaN/inf when training started: load a "
                    "checkpoint with finite weights as the student")  # fmt: skip
        return (f"{head}. An update made the weights NaN/inf: lower lr, raise warmup or set grad_clip, "
                "then resume from that checkpoint (move the newer ones away)")  # fmt: skip


def _non_empty_foreign(out: Path) -> list[str]:
    """The entries of `out` that show it is neither empty nor a previous run's directory."""
    if not out.is_dir():
        return []
    names = [p.name for p in out.iterdir() if p.name != LOCK_FILE and not p.name.startswith(TMP_PREFIX)]
    ours = METRICS_FILE in names or any(STEP_DIR.fullmatch(n) and (out / n / STATE_FILE).is_file() for n in names)
    return [] if ours else sorted(names)


def not_a_run_on(out: Path, fingerprint: str) -> list[str]:
    """The entries of directory `out` that are not a training run's on the tokens `fingerprint`
    names (`Datasets.fingerprint`): all but metrics.jsonl, the lock, a run's temporaries and
    step-XXXXXX/ checkpoints that recorded those tokens. Empty: `out` holds nothing but such a run,
    which a new run of the same kind may replace (gemma2.demo). A file in such a checkpoint that
    the trainer does not write (a user's) is named as `step-XXXXXX/NAME`."""
    found = []
    for p in sorted(out.iterdir()):
        name, plain_dir = p.name, p.is_dir() and not p.is_symlink()
        if name == LOCK_FILE or is_temporary(name) or name == METRICS_FILE and p.is_file() and not p.is_symlink():
            continue
        if plain_dir and name.startswith(TMP_PREFIX) and STEP_DIR.fullmatch(name.removeprefix(TMP_PREFIX)):
            continue  # an unfinished or rotated-away checkpoint (train_state, `_rotate`)
        if plain_dir and STEP_DIR.fullmatch(name) and (p / STATE_FILE).is_file():
            state = read_state(p) or {}
            if (state.get("run") or {}).get("train_fingerprint") == fingerprint:
                found += [f"{name}/{entry}" for entry in _not_saved(p)]
                continue
            name += " (a checkpoint of other data)"
        found.append(name)
    return found


def _not_saved(ckpt: Path) -> list[str]:
    """The entries of checkpoint `ckpt` that gemma2.train_state.save_checkpoint does not write."""
    saved = written_by_save(ckpt) | {STATE_FILE, "tokenizer.model", "optimizer"}
    rng = re.compile(re.escape(RNG_FILE).replace(r"\{rank\}", r"\d+"))
    return sorted(p.name for p in ckpt.iterdir() if p.name not in saved and not rng.fullmatch(p.name))


def check_resume(cfg: TrainConfig, state: dict, fingerprint: str, ckpt: Path, world: int = 1,
                 models: dict | None = None) -> None:  # fmt: skip
    """Refuse a resume whose settings would change the run's meaning; print each safe change.
    `world`: the number of ranks now (the checkpoint records its own); `models`: the student's
    config and the teacher's record now (Run.models)."""
    differ, changed = _setting_changes(cfg, state, ckpt, world)
    old_fp = (state.get("run") or {}).get("train_fingerprint")
    if old_fp is not None and old_fp != fingerprint:
        differ.append(f"the training tokens (data, tokenizer or seq_len; fingerprint {old_fp} -> {fingerprint})")
    if models is not None:
        differ += _model_changes(models, ckpt, (state.get("run") or {}).get("models") or {})
    _refuse_differences(ckpt, differ)
    for change in changed:
        notice(f"resuming with a changed setting: {change}")


def check_resume_settings(cfg: TrainConfig, found: tuple[Path, dict], world: int = 1,
                          decided_later: tuple[str, ...] = ()) -> None:  # fmt: skip
    """The checks of a resume from `found` (check_out_dir's newest checkpoint and state) that need
    neither the data nor the models, so that scripts/distill.py refuses a changed flag before
    minutes of loading (open_run checks them again, with the rest). `decided_later`: the settings
    that the data fill in (a prompt dataset's prompt_len), left to that later check."""
    ckpt, state = found
    _check_resumable(cfg, ckpt, state)
    _refuse_differences(ckpt, _setting_changes(cfg, state, ckpt, world, skip=decided_later)[0])


def _check_resumable(cfg: TrainConfig, ckpt: Path, state: dict) -> None:
    """A checkpoint a run can continue: with its optimizer, and not past `cfg.steps`."""
    if not (ckpt / "optimizer").is_dir():
        raise ValueError(
            f"{ckpt} has no optimizer/ directory, so it cannot be resumed (it holds weights only); start a "
            f"new run with it as the student, or delete it to resume from an earlier checkpoint"
        )
    if cfg.steps < state["step"]:
        raise ValueError(
            f"{ckpt} is at step {state['step']}, past steps = {cfg.steps}; pass steps > {state['step']} "
            "to train further (a run cannot go back)"
        )


def _refuse_differences(ckpt: Path, differ: list[str]) -> None:
    if differ:
        raise ValueError(
            f"cannot resume from {ckpt}: these settings differ from the run it continues: {'; '.join(differ)}. "
            "Resume with the checkpoint's settings (its trainer_state.json lists them), or start a new run "
            "in another out_dir"
        )


def _setting_changes(cfg: TrainConfig, state: dict, ckpt: Path, world: int,
                     skip: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:  # fmt: skip
    """How `cfg` differs from the settings `state` recorded: the differences that change the
    run's meaning, and the safe changes (SAFE_TO_CHANGE, a batch split, more steps)."""
    stored = state.get("config") or {}
    now = dataclasses.asdict(cfg)
    differ, changed = [], []
    global_batch = {
        "checkpoint": stored.get("batch_size", 0) * stored.get("grad_accum", 1) * state.get("world_size", 1),
        "now": cfg.batch_size * cfg.grad_accum * world,
    }
    # A checkpoint older than a field ran with that field's default (e.g. lmbda = 0: no on-policy steps).
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    for name, value in now.items():
        if name in skip or name not in stored and name not in defaults:
            continue
        old = stored.get(name, defaults.get(name))
        old = tuple(old) if isinstance(old, list) else old
        if old == value:
            continue
        if name == "tokenizer_file" and value and _same_bytes(ckpt / "tokenizer.model", Path(value)):
            continue  # the same tokenizer under another path
        if name == "dtype" and "compute_dtype" in ((state.get("run") or {}).get("models") or {}):
            continue  # "auto" or a name: the compute dtype it gives decides (_model_changes)
        if name in BATCH_SPLIT and global_batch["checkpoint"] == global_batch["now"]:
            changed.append(f"{name}: {old} -> {value} (the global batch stays {global_batch['now']})")
        elif name in BATCH_SPLIT:
            differ.append(f"{name} (checkpoint: {old!r}, now: {value!r}; the global batch, batch_size x "
                          f"grad_accum x ranks, would go from {global_batch['checkpoint']} to {global_batch['now']})")  # fmt: skip
        elif name == "steps" and value > old:
            changed.append(f"steps: {old} -> {value} (the cosine schedule is stretched to end at step {value}: "
                           f"from step {state['step']} on, the learning rate follows it, above the old schedule's)")  # fmt: skip
        elif name in SAFE_TO_CHANGE and not (name == "steps" and value < state["step"]):
            changed.append(f"{name}: {old} -> {value}")
        else:
            differ.append(f"{name} (checkpoint: {old!r}, now: {value!r})")
    return differ, changed


def _model_changes(models: dict, ckpt: Path, stored: dict) -> list[str]:
    """How the student's config (against the checkpoint's config.json), the compute dtype and the
    teacher (against the checkpoint's record of them, when it has one) differ now."""
    changes = []
    fields = Gemma2Config.from_json(ckpt / "config.json").differences(Gemma2Config(**models["student"]))
    if fields:
        changes.append(f"the student's config ({', '.join(fields)})")
    if stored.get("compute_dtype", models["compute_dtype"]) != models["compute_dtype"]:
        changes.append(f"the compute dtype ({stored['compute_dtype']} -> {models['compute_dtype']}; dtype 'auto' "
                       f"picks it per device: pass --dtype {stored['compute_dtype']} to keep it)")  # fmt: skip
    if "teacher" in stored:
        before, after = stored["teacher"] or {}, _as_json(models["teacher"]) or {}
        before = {k: v for k, v in before.items() if k != "weights"}  # checked once on the device
        if before != {k: v for k, v in after.items() if k != "weights"}:
            changes.append(f"the teacher ({_describe(stored['teacher'])} -> {_describe(models['teacher'])})")
    return changes


def _as_json(value):
    """`value` as JSON gives it back (tuples as lists)."""
    return json.loads(json.dumps(value))


def _describe(teacher: dict | None) -> str:
    """A teacher record (gemma2.teacher.teacher_record) in a few words."""
    if teacher is None:
        return "none"
    if "cache" in teacher:
        c = teacher["cache"]
        return f"a top-{c['k']} cache at temperature {c['temperature']}, splits {c['splits']}"
    cfg = teacher["config"]
    return (f"a model of {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}, "
            f"in {teacher['dtype']}")  # fmt: skip


def _same_bytes(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> tuple[Path, dict] | None:
    """What `out` must be for a run, seen from the directory alone (before any model or data is
    read: scripts/distill.py asks first): a directory or nothing; one holding checkpoints only with
    `resume`, other files only with `overwrite`. Returns its newest checkpoint and state, if any."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out} exists and is not a directory; choose a directory")
    found = latest_complete(out)
    if found is not None and not resume:
        raise ValueError(
            f"{out} already holds checkpoints ({found[0].name}); pass resume=True (--resume) to continue "
            "from the newest, or choose a new out_dir"
        )
    foreign = _non_empty_foreign(out)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{out} is not empty ({shown}) and holds no previous training run; choose a new out_dir, "
            "or pass overwrite=True (--overwrite) to write into it (nothing in it is deleted)"
        )
    return found


@contextmanager
def open_run(cfg: TrainConfig, data: Datasets, *, models: dict, resume: bool, overwrite: bool, main: bool = True,
             world: int = 1) -> Iterator[Run]:  # fmt: skip
    """Check the output directory for a run and hold its lock while the run lasts (rank 0 only:
    `main`; `world` ranks in all). Raises ValueError for a directory that is not this run's to write (see the module
    docstring) and for a resume that does not continue the stored run. models: Run.models."""
    out = Path(cfg.out_dir)
    found = check_out_dir(out, resume=resume, overwrite=overwrite)
    fingerprint = data.train.fingerprint()
    if found is not None:
        ckpt, state = found
        _check_resumable(cfg, ckpt, state)
        check_resume(cfg, state, fingerprint, ckpt, world, models)
        if main and cfg.steps == state["step"]:
            notice(f"{ckpt} is already at step {cfg.steps}: nothing to train (pass a larger steps to continue)")
    elif resume and main:
        notice(f"{out} holds no checkpoint to resume from; starting a new run at step 0")
    stored = found[1].get("run") if found else None
    stored = stored if isinstance(stored, dict) else {}
    run = Run(out, stored.get("id") or uuid.uuid4().hex, found[0] if found else None, fingerprint, models, stored)
    clash = _in_the_way(out, found[1]["step"] if found else 0, cfg.steps, run.id)
    if clash:
        raise ValueError(
            f"{out} holds {', '.join(clash)}, which this run would overwrite but did not write; move them "
            "away or choose another out_dir"
        )
    if not main:
        yield run
        return
    out.mkdir(parents=True, exist_ok=True)
    run.lock = lock = acquire_lock(out)
    try:
        _remove_temporaries(out)  # left by a failed save, or a process killed mid-write
        yield run
    finally:
        release_lock(lock)


def _in_the_way(out: Path, start: int, end: int, run_id: str) -> list[str]:
    """The step directories this run would save into (steps start + 1 .. end) that are not its
    own: no trainer_state.json (a user's), or another run's. A corrupt or id-less state is a
    checkpoint of this directory's run, replaced like any unfinished one."""
    clash = []
    for p in sorted(out.iterdir()) if out.is_dir() else []:
        m = STEP_DIR.fullmatch(p.name)
        if m and start < int(m[1]) <= end:
            if not (p / STATE_FILE).exists() or _run_id(read_state(p)) not in (None, run_id):
                clash.append(p.name)
    return clash


def _remove_temporaries(out: Path) -> None:
    """Clear what a killed run left in out (we hold the lock, so nothing else writes there): the
    temporaries of gemma2.files, and unfinished checkpoints (train_state's `.tmp-step-XXXXXX`).
    Anything else, a user's `.tmp-notes` included, stays."""
    remove_stale_temporaries(out)
    for stale in out.glob(TMP_PREFIX + "step-*"):
        if STEP_DIR.fullmatch(stale.name.removeprefix(TMP_PREFIX)) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)

