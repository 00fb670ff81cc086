"""The offline top-k teacher cache: what is written is what the teacher computes, its loss equals
the on-the-fly top-k loss, and a cache cannot be read against other data or temperature."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import random_prompt_rows
from gemma2 import Gemma2Config, Gemma2ForCausalLM
from gemma2.data import IGNORE_INDEX, Datasets, PackedSequences
from gemma2.distill import chunked_distill_loss, teacher_topk
from gemma2.teacher_cache import TeacherCache, bytes_per_token, write_teacher_cache
from gemma2.student import init_weights
from gemma2.trainer import TrainConfig, train

V, K = 64, 8


def _config() -> Gemma2Config:
    return Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                        sliding_window=8, max_position_embeddings=64)  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, size=1200).astype(np.int32)
    data = Datasets(PackedSequences(tokens[:1000], 16), PackedSequences(tokens[1000:], 16))
    teacher = init_weights(Gemma2ForCausalLM(_config()), seed=1, std=0.3).eval()
    student = init_weights(Gemma2ForCausalLM(_config()), seed=2)
    return data, teacher, student


def _write(tmp_path, setup, **kw) -> TeacherCache:
    data, teacher, _ = setup
    values = dict(k=K, batch_size=5, chunk_size=24, shard_bytes=20 * 16 * 52, progress=False)
    write_teacher_cache(teacher, {"train": data.train, "heldout": data.heldout}, tmp_path, **(values | kw))
    return TeacherCache(tmp_path)


def test_round_trip_equals_the_teacher_and_its_loss(tmp_path, setup):
    data, teacher, student = setup
    cache = _write(tmp_path, setup, logprob_dtype=torch.float32, temperature=2.0)
    split = cache.split("train")
    assert len(split.shards) > 2  # rows are read across shard boundaries
    indices = torch.tensor([0, 11, 12, 61, 3])
    batch = data.train.batch(indices)
    got = split.topk(indices)
    with torch.no_grad():
        want = teacher_topk(teacher(batch.inputs), K, temperature=2.0)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.tail_logprob, want.tail_logprob, rtol=0, atol=1e-5)
    hidden = student.hidden_states(batch.inputs)
    args = dict(final_softcap=30.0, temperature=2.0, alpha=1.0)
    cached, _ = chunked_distill_loss(hidden, student.output_weight, got, batch.targets, **args)
    fly, _ = chunked_distill_loss(hidden, student.output_weight, want, batch.targets, **args)
    assert cached.item() == pytest.approx(fly.item(), rel=1e-5)
    # The held-out split carries the teacher's cross-entropy.
    h = data.heldout.batch(range(len(data.heldout)))
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(teacher(h.inputs).flatten(0, 1), h.targets.flatten())
    assert cache.split("heldout").teacher_ce == pytest.approx(ce.item(), rel=1e-5)


def test_float16_storage_and_its_size(tmp_path, setup):
    data, teacher, _ = setup
    cache = _write(tmp_path, setup)
    assert cache.bytes_per_token == bytes_per_token(K, V) == K * (2 + 2) + 4  # int16 ids, fp16 log-probs, fp32 tail
    assert bytes_per_token(32, 256000) == 196  # Gemma's vocabulary needs int32 ids
    stored = sum(f.stat().st_size for f in tmp_path.glob("train-*.safetensors"))
    tokens = len(data.train) * data.train.seq_len
    assert tokens * cache.bytes_per_token <= stored < tokens * cache.bytes_per_token * 1.1  # headers only
    batch = data.train.batch(torch.arange(4))
    with torch.no_grad():
        want = teacher_topk(teacher(batch.inputs), K)
    got = cache.split("train").topk(batch.indices)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-3, atol=1e-3)


def test_a_cache_refuses_other_data_temperature_or_an_interrupted_write(tmp_path, setup):
    data, _, _ = setup
    cache = _write(tmp_path / "c", setup)
    other = PackedSequences(data.train.tokens, 15)
    with pytest.raises(ValueError, match="other tokens.*rerun scripts/cache_teacher.py"):
        cache.split("train").check(other, "training")
    with pytest.raises(ValueError, match="temperature 1.0.*--temperature 2.0"):
        cache.check_temperature(2.0)
    (tmp_path / "c" / "cache.json").unlink()
    with pytest.raises(FileNotFoundError, match="no complete teacher cache"):
        TeacherCache(tmp_path / "c")


def _interrupted(tmp_path, setup, monkeypatch, out: Path, after: int) -> Path:
    """A write into `out` that a Ctrl-C stops while it computes shard `after` (0-based); returns the
    partial directory it leaves."""
    import gemma2.teacher_cache as tc

    real = tc._shard_topk

    def stopped(*args, **kwargs):
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    calls: list = []
    monkeypatch.setattr(tc, "_shard_topk", stopped)
    with pytest.raises(KeyboardInterrupt):
        _write(out, setup, overwrite=True)
    monkeypatch.undo()
    return out.with_name(out.name + ".partial")


def test_an_interrupted_write_keeps_the_old_cache_and_the_same_call_finishes_it(tmp_path, setup, monkeypatch,
                                                                                capsys):  # fmt: skip
    """Stopped at its fourth shard, a write leaves the old cache whole and three shards beside it; the
    same call again computes the other shards alone and writes the cache one call writes."""
    _write(tmp_path / "c", setup, k=3)
    (tmp_path / "c" / "notes.txt").write_text("mine")
    before = _files(tmp_path / "c")
    partial = _interrupted(tmp_path, setup, monkeypatch, tmp_path / "c", after=3)
    assert _files(tmp_path / "c") == before
    _write(tmp_path / "one", setup)
    order = _shard_order(tmp_path / "one")
    assert sorted(p.name for p in partial.iterdir()) == sorted(["plan.json", *order[:3]])  # no lock, no temporary
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    computed = _count_shards(monkeypatch)
    _write(tmp_path / "c", setup, overwrite=True)
    assert len(computed) == len(order) - 3 >= 1
    assert f"resuming the teacher cache in {partial}: 3 of its {len(order)} shards" in capsys.readouterr().err
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"  # not the cache's: kept
    (tmp_path / "c" / "notes.txt").unlink()
    _assert_same_cache(tmp_path / "one", tmp_path / "c")
    assert sorted(os.listdir(tmp_path / "c")) == sorted(["cache.json", *order])  # no plan.json, no lock
    assert not partial.exists()


def test_an_old_cache_that_a_killed_publish_left_in_the_partial_directory_serves_as_one(tmp_path, setup,
                                                                                        monkeypatch):  # fmt: skip
    """Killed after its swap, a publish may leave the replaced cache under NAME.partial: its
    index says what its shards are, so a write of that cache goes on from them (none computed)
    and one of another is refused, naming the difference."""
    _write(tmp_path / "old", setup)
    _write(tmp_path / "c", setup, k=3)  # the new cache in place
    os.rename(tmp_path / "old", tmp_path / "c.partial")
    with pytest.raises(ValueError, match=r"a whole teacher cache .* differs from this one in k \(was 8, now 3\): "
                                         "move it aside"):  # fmt: skip
        _write(tmp_path / "c", setup, k=3, overwrite=True)
    computed = _count_shards(monkeypatch)
    _write(tmp_path / "c", setup, overwrite=True)
    assert computed == []
    _write(tmp_path / "one", setup)
    _assert_same_cache(tmp_path / "one", tmp_path / "c")


def test_a_publish_killed_after_linking_the_users_files_is_finished_without_touching_them(tmp_path, setup,
                                                                                          monkeypatch):  # fmt: skip
    """Overwriting a directory of the user's (their plan.json, not a cache's, and notes) with a
    cache, killed just before the swap: NAME.partial then holds links to those files beside a whole
    cache. The same command again publishes it (no shard computed), the user's files as they were;
    a temporary left with this very pid (a container's next run) does not stop it either."""
    import gemma2.files as files

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "plan.json").write_text("my plan")
    (tmp_path / "c" / "notes.txt").write_text("mine")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "_swap", killed)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "c", setup, overwrite=True)
    monkeypatch.undo()
    partial = tmp_path / "c.partial"
    assert os.path.samefile(partial / "plan.json", tmp_path / "c" / "plan.json") and (partial / "cache.json").exists()
    (partial / f".tmp-new-train-00001.safetensors-{os.getpid()}-0").write_bytes(b"half")
    computed = _count_shards(monkeypatch)
    _write(tmp_path / "c", setup, overwrite=True)
    assert computed == [] and not partial.exists()
    assert (tmp_path / "c" / "plan.json").read_text() == "my plan" and (tmp_path / "c" / "notes.txt").read_text() == "mine"
    _write(tmp_path / "one", setup)
    assert sorted(os.listdir(tmp_path / "c")) == sorted([*_files(tmp_path / "one"), "plan.json", "notes.txt"])
    for name in _files(tmp_path / "one"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_a_directory_a_live_process_holds_is_refused(tmp_path, setup):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")  # pytest's parent: alive
    with pytest.raises(ValueError, match=f"is in use by process {os.getppid()} .* write the cache elsewhere"):
        _write(tmp_path / "c", setup, overwrite=True)
    assert os.listdir(tmp_path / "c") == [".lock"] and not (tmp_path / "c.partial").exists()


def test_overwriting_a_directory_without_a_cache_keeps_every_file_in_it(tmp_path, setup):
    (tmp_path / "c").mkdir()
    for name in ("plan.json", "notes.txt"):
        (tmp_path / "c" / name).write_text(f"the user's {name}")
    _write(tmp_path / "c", setup, overwrite=True)
    for name in ("plan.json", "notes.txt"):
        assert (tmp_path / "c" / name).read_text() == f"the user's {name}"


def test_a_partial_cache_goes_on_only_with_its_teacher_data_and_settings(tmp_path, setup, monkeypatch):
    """Another k, shard size, teacher or data is refused, naming it, and the partial kept; a live
    writer's lock too; a smaller batch and chunk (after running out of memory, say) go on."""
    data, teacher, _ = setup
    partial = _interrupted(tmp_path, setup, monkeypatch, tmp_path / "c", after=2)
    kept = _files(partial)
    other_teacher = init_weights(Gemma2ForCausalLM(_config()), seed=5, std=0.3).eval()
    other_data = {"train": PackedSequences(data.train.tokens[1:], 16), "heldout": data.heldout}
    values = dict(k=K, batch_size=5, chunk_size=24, shard_bytes=20 * 16 * 52, progress=False)
    for change, message in [({"k": 3}, "k (was 8, now 3)"), ({"shard_bytes": 999}, "the shard size (--shard-mb)"),
                            ({"teacher": other_teacher}, "the teacher's weights"),
                            ({"splits": other_data}, "the data (its tokens")]:  # fmt: skip
        args = {"teacher": teacher, "splits": {"train": data.train, "heldout": data.heldout}} | values | change
        with pytest.raises(ValueError, match=f"differs from this one in .*{re.escape(message)}.*remove .* to start "
                                             "over"):  # fmt: skip
            write_teacher_cache(directory=tmp_path / "c", **args)
    assert _files(partial) == kept and not (tmp_path / "c").exists()
    (partial / ".lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live writer (pytest's parent)
    with pytest.raises(ValueError, match=f"in use by process {os.getppid()}"):
        _write(tmp_path / "c", setup)
    (partial / ".lock").unlink()
    computed = _count_shards(monkeypatch)
    cache = _write(tmp_path / "c", setup, batch_size=3, chunk_size=16)
    assert len(computed) == 2
    _write(tmp_path / "one", setup)
    assert sorted(_files(tmp_path / "c")) == sorted(_files(tmp_path / "one"))
    indices = torch.arange(len(data.train))
    got, want = cache.split("train").topk(indices), TeacherCache(tmp_path / "one").split("train").topk(indices)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-3)  # float16 storage


def test_a_partial_cache_goes_on_only_in_its_teacher_dtype(tmp_path, setup):
    """A bf16 checkpoint run in fp32 has the weights (and the checksum) of the bf16 model, not its numbers."""
    data, teacher, _ = setup
    bf16 = Gemma2ForCausalLM(_config()).to(torch.bfloat16)
    bf16.load_state_dict(teacher.state_dict())  # rounded to bf16
    fp32 = Gemma2ForCausalLM(_config())
    fp32.load_state_dict(bf16.state_dict())  # exactly the bf16 values
    splits = {"train": data.train, "heldout": data.heldout}
    values = dict(k=K, batch_size=5, chunk_size=24, shard_bytes=20 * 16 * 52, progress=False)
    (tmp_path / "c.partial").mkdir()
    write_teacher_cache(bf16, splits, tmp_path / "c", **values)  # a whole cache, then its shards as a partial one's
    os.rename(tmp_path / "c", tmp_path / "c.partial")
    (tmp_path / "c.partial" / "cache.json").rename(tmp_path / "c.partial" / "plan.json")
    with pytest.raises(ValueError, match=re.escape("teacher_dtype (was bfloat16, now float32)")):
        write_teacher_cache(fp32, splits, tmp_path / "c", **values)


def test_a_cache_larger_than_the_free_space_is_refused_before_any_work(tmp_path, setup, monkeypatch):
    """The room the missing shards take (their tensors: the headers are small) against the free space."""
    import gemma2.teacher_cache as tc

    data, _, _ = setup
    partial = _interrupted(tmp_path, setup, monkeypatch, tmp_path / "c", after=2)
    order = json.loads((partial / "plan.json").read_text())
    missing = [(s, sh) for s in order["splits"].values() for sh in s["shards"] if not (partial / sh["file"]).exists()]
    needed = sum(sh["count"] * s["seq_len"] * bytes_per_token(K, V) for s, sh in missing)  # packed: every column
    free = {"bytes": needed - 1}
    monkeypatch.setattr(tc.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, free["bytes"]))
    computed = _count_shards(monkeypatch)
    with pytest.raises(ValueError, match=f"needs {needed:,} bytes more .* the filesystem of {partial} has"):
        _write(tmp_path / "c", setup)
    with pytest.raises(ValueError, match=f"filesystem of {tmp_path} has .* elsewhere"):  # nothing made
        _write(tmp_path / "new" / "d", setup)
    assert computed == [] and not (tmp_path / "new").exists()
    free["bytes"] = needed
    _write(tmp_path / "c", setup)
    assert len(computed) == len(missing)
    # Prompt rows store only their completions' columns: the room is counted over those.
    prompts = {"train": random_prompt_rows(40, 0, V)}  # prompt_len 8, max_new_tokens 6: 13 columns, 6 stored
    stored = 40 * 6 * bytes_per_token(K, V)
    for room, refused in ((stored - 1, True), (stored, False)):
        free["bytes"] = room
        with pytest.raises(ValueError, match="needs") if refused else contextlib.nullcontext():
            write_teacher_cache(setup[1], prompts, tmp_path / "p", k=K, progress=False)


def test_a_partial_directory_that_is_not_a_caches_is_refused(tmp_path, setup):
    (tmp_path / "c.partial").mkdir()
    (tmp_path / "c.partial" / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="holds files that are not a teacher cache's .* move them"):
        _write(tmp_path / "c", setup)
    assert os.listdir(tmp_path / "c.partial") == ["thesis.tex"] and not (tmp_path / "c").exists()


def test_prompt_rows_store_their_completion_columns_alone(tmp_path, setup):
    """A prompt dataset's cache holds max_new_tokens columns a row, never a prompt's: batches other
    than the writer's read the teacher's top-k wherever a target counts, and zeros in the prompts'
    columns. A format 1 cache (every column of the layout stored) reads the same."""
    _, teacher, _ = setup
    rows = random_prompt_rows(40, 0, V)  # prompt_len 8, max_new_tokens 6: 13 columns, 6 stored
    P, N = rows.prompt_len, rows.max_new_tokens
    write_teacher_cache(teacher, {"train": rows}, tmp_path / "new", k=K, batch_size=7, progress=False,
                        logprob_dtype=torch.float32)  # fmt: skip
    stored = {p.name: load_file(p) for p in (tmp_path / "new").glob("train-*.safetensors")}
    assert sum(len(t["tail"]) for t in stored.values()) == len(rows)
    assert {t["ids"].shape[1:] for t in stored.values()} == {(N, K)}
    assert {t["tail"].shape[1] for t in stored.values()} == {N}
    # The same cache in format 1: each row's whole layout, the completion columns from P - 1 on.
    (tmp_path / "old").mkdir()
    for name, tensors in stored.items():
        full = {key: torch.zeros(len(t), rows.seq_len, *t.shape[2:], dtype=t.dtype) for key, t in tensors.items()}
        for key, t in tensors.items():
            full[key][:, P - 1 :] = t
        save_file(full, tmp_path / "old" / name)
    index = json.loads((tmp_path / "new" / "cache.json").read_text())
    del index["splits"]["train"]["columns"]
    (tmp_path / "old" / "cache.json").write_text(json.dumps(index | {"format": 1}))
    new, old = TeacherCache(tmp_path / "new").split("train"), TeacherCache(tmp_path / "old").split("train")
    for indices in ([0, 1, 2], [5, 17, 33, 39], [12], list(range(40))):
        batch = rows.batch(indices)
        got = new.topk(batch.indices, columns=batch.columns)
        with torch.no_grad():
            want = teacher_topk(teacher(batch.inputs, batch.valid), K)
        counted = batch.targets != IGNORE_INDEX
        assert counted.any() and got.ids.shape == want.ids.shape
        assert torch.equal(got.ids[counted], want.ids[counted])
        torch.testing.assert_close(got.logprobs[counted], want.logprobs[counted], rtol=0, atol=1e-5)
        torch.testing.assert_close(got.tail_logprob[counted], want.tail_logprob[counted], rtol=0, atol=1e-5)
        prompts = slice(0, P - 1 - batch.start)  # the batch's columns before the completions'
        assert not any(t[:, prompts].any() for t in got)
        for a, b in zip(got, old.topk(batch.indices, columns=batch.columns)):
            assert torch.equal(a, b)
    none = new.topk(torch.tensor([3]), columns=slice(0, P - 1))  # columns none of which is stored
    assert none.ids.shape == (1, P - 1, K) and not none.ids.any() and not none.tail_logprob.any()


@pytest.mark.parametrize("rows", ["packed", "prompts"])
def test_training_from_a_full_cache_equals_training_from_the_teacher(tmp_path, setup, rows):
    """With k = V the top-k loss is the full forward KL: the two runs must agree (on prompt rows
    too: the padding masked when caching, the teacher's cross-entropy over the completions only)."""
    data, teacher, _ = setup
    if rows == "prompts":
        data = Datasets(random_prompt_rows(60, 0, V), random_prompt_rows(12, 1, V))
    values = dict(k=V, batch_size=5, chunk_size=24, progress=False, logprob_dtype=torch.float32)
    write_teacher_cache(teacher, {"train": data.train, "heldout": data.heldout}, tmp_path / "cache", **values)
    cache = TeacherCache(tmp_path / "cache")
    cfg = dict(steps=3, batch_size=4, lr=3e-3, warmup=1, alpha=0.7, eval_every=3, chunk_size=24, max_new_tokens=6)
    fresh = lambda: init_weights(Gemma2ForCausalLM(_config()), seed=2)  # noqa: E731
    a = train(TrainConfig(out_dir=str(tmp_path / "a"), **cfg), fresh(), data, teacher=cache, progress=False)
    b = train(TrainConfig(out_dir=str(tmp_path / "b"), **cfg), fresh(), data, teacher=teacher, progress=False)
    assert len(a) == len(b) == 5  # evaluation at steps 0 and 3, three steps
    for x, y in zip(a, b):
        for key in ("loss", "kd", "ce", "eval_ce", "eval_kd", "teacher_eval_ce"):
            assert (key in x) == (key in y), (x["step"], key)
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-4), (x["step"], key)


# --- several ranks (torchrun) ----------------------------------------------------------------------

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


def _rank_setup():
    """The module fixture's teacher and data, rebuilt in a spawned rank."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, size=1200).astype(np.int32)
    splits = {"train": PackedSequences(tokens[:1000], 16), "heldout": PackedSequences(tokens[1000:], 16)}
    return init_weights(Gemma2ForCausalLM(_config()), seed=1, std=0.3).eval(), splits


WRITE = dict(k=K, batch_size=5, chunk_size=24, shard_bytes=20 * 16 * 52, progress=False)


def _rank_writes(rank: int, tmp: str, out: str, failing_rank: int | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    import gemma2.teacher_cache as tc

    if rank == failing_rank:
        def fail(*args, **kwargs):
            raise ValueError(f"rank {rank} cannot write")
        tc._write_shards = fail
    teacher, splits = _rank_setup()
    try:
        result = {"index": tc.write_teacher_cache(teacher, splits, out, overwrite=True, **WRITE)}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _spawn_writers(tmp: Path, out: Path, failing_rank: int | None = None) -> list[dict]:
    mp.spawn(_rank_writes, args=(str(tmp), str(out), failing_rank), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_same_cache(one: Path, two: Path) -> None:
    """The same files, byte for byte: the index too (its cross-entropy is summed from the shards' in order)."""
    a, b = _files(one), _files(two)
    assert a.keys() == b.keys() and len(a) > 4 and "cache.json" in a
    for name in a:
        assert a[name] == b[name], name


def _shard_order(directory: Path) -> list[str]:
    """A cache's shards in the order they are dealt to ranks: every split's, split after split."""
    index = json.loads((directory / "cache.json").read_text())
    return [shard["file"] for split in index["splits"].values() for shard in split["shards"]]


def _count_shards(monkeypatch) -> list:
    """The shards computed from here on (the teacher run over them), one entry each."""
    import gemma2.teacher_cache as tc

    computed, real = [], tc._shard_topk
    monkeypatch.setattr(tc, "_shard_topk", lambda *a, **kw: computed.append(a[2]) or real(*a, **kw))
    return computed


def test_two_ranks_write_the_cache_one_process_writes(tmp_path):
    teacher, splits = _rank_setup()
    write_teacher_cache(teacher, splits, tmp_path / "one", **WRITE)
    results = _spawn_writers(tmp_path, tmp_path / "two")
    _assert_same_cache(tmp_path / "one", tmp_path / "two")
    assert results[0] == results[1] == {"index": json.loads((tmp_path / "two" / "cache.json").read_text())}


def test_a_failing_rank_fails_every_rank_and_keeps_the_old_cache_and_the_finished_shards(tmp_path, monkeypatch,
                                                                                          capsys):  # fmt: skip
    """Rank 1 fails: every rank raises, the old cache is as it was, rank 0's shards are kept, and
    one process then finishes the cache computing rank 1's shards alone: the cache two ranks write."""
    teacher, splits = _rank_setup()
    write_teacher_cache(teacher, splits, tmp_path / "cache", **(WRITE | {"k": 3}))
    before = _files(tmp_path / "cache")
    results = _spawn_writers(tmp_path, tmp_path / "cache", failing_rank=1)
    assert results[1] == {"error": "ValueError: rank 1 cannot write"}
    assert results[0]["error"].startswith("ValueError: 1 of 2 ranks failed") and "is unchanged" in results[0]["error"]
    assert "the same command again writes the rest" in results[0]["error"]
    assert _files(tmp_path / "cache") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    write_teacher_cache(teacher, splits, tmp_path / "one", **WRITE)
    order = _shard_order(tmp_path / "one")
    partial = tmp_path / "cache.partial"
    assert sorted(p.name for p in partial.iterdir()) == sorted(["plan.json", *order[0::2]])  # no lock left
    computed = _count_shards(monkeypatch)
    write_teacher_cache(teacher, splits, tmp_path / "cache", overwrite=True, **WRITE)
    assert len(computed) == len(order[1::2])
    assert f"{len(order[0::2])} of its {len(order)} shards were finished" in capsys.readouterr().err
    _assert_same_cache(tmp_path / "one", tmp_path / "cache")
    assert not partial.exists()


def _rank_zero_fails(rank: int, tmp: str, out: str, where: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    import gemma2.teacher_cache as tc

    if rank == 0 and where == "index":
        def fail(*args, **kwargs):
            raise OSError(28, "No space left on device")
        tc._publish = fail
    teacher, splits = _rank_setup()
    try:
        result = {"index": tc.write_teacher_cache(teacher, splits, out, overwrite=where == "index", **WRITE)}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.parametrize("where", ["check", "index"])
def test_rank_zero_failing_fails_every_rank_and_keeps_the_old_cache(tmp_path, where):
    """check: an existing cache without overwrite, refused by rank 0 before any work, the same
    message on every rank; index: rank 0's cache.json cannot be written after every shard was."""
    teacher, splits = _rank_setup()
    write_teacher_cache(teacher, splits, tmp_path / "cache", **(WRITE | {"k": 3}))
    before = _files(tmp_path / "cache")
    mp.spawn(_rank_zero_fails, args=(str(tmp_path), str(tmp_path / "cache"), where), nprocs=WORLD, join=True)
    errors = [json.loads((tmp_path / f"rank{r}.json").read_text())["error"] for r in range(WORLD)]
    if where == "check":
        assert errors[0] == errors[1] and "already holds a complete teacher cache" in errors[0]
    else:
        assert errors[0] == "OSError: [Errno 28] No space left on device"
        assert errors[1].startswith("ValueError: rank 0 could not put the teacher cache in place")
    assert _files(tmp_path / "cache") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_the_script_under_torchrun_writes_the_one_process_cache(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7}."}) + "\n"
                            for i in range(120)))  # fmt: skip
    args = ["scripts/cache_teacher.py", "--teacher", "checkpoints/tiny-teacher", "--data", str(docs), "--seq-len", "16",
            "--k", "4", "--batch-size", "4", "--shard-mb", "0.01", "--dtype", "fp32"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--device", "cpu", "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr
    _assert_same_cache(tmp_path / "one", tmp_path / "two")
    assert two.stderr.count("wrote ") == 1  # rank 0 alone reports


def test_a_writer_whose_lock_was_taken_over_does_not_publish(tmp_path, setup, monkeypatch):
    """Its lock taken over from another machine while it computed (gemma2.locks): it stops before
    putting the cache in place, the directory as it was."""
    import gemma2.teacher_cache as tc

    real = tc._write_shards

    def taken_over(shard_topk, splits, work, todo, progress):
        real(shard_topk, splits, work, todo, progress)
        (work / ".lock").write_text("4242 node-b\n")

    monkeypatch.setattr(tc, "_write_shards", taken_over)
    with pytest.raises(ValueError, match="no longer this process's to write: .* taken over by process 4242 on node-b"):
        _write(tmp_path / "c", setup)
    assert not (tmp_path / "c").exists() and (tmp_path / "c.partial" / ".lock").read_text() == "4242 node-b\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{tmp}/cached"], r"cached already holds a complete teacher cache; pass overwrite=True \(--overwrite\)"),
        (["--out", "{tmp}/mine"], r"mine already holds files; pass overwrite=True \(--overwrite\)"),
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--k", "0"], r"k must be in \[1, vocab size 4096\], got 0"),
        (["--k", "5000"], r"k must be in \[1, vocab size 4096\], got 5000"),
        (["--temperature", "0"], "temperature must be > 0"),
        (["--teacher", "{tmp}/nope"], "--teacher .*nope: no such file or directory"),
        (["--teacher", "{tmp}"], "found no model.safetensors"),
        (["--tokenizer", "{tmp}/other.model"], r"other.model \(300 pieces\) is not the one the teacher came with \(.*, 4096 pieces\)"),
    ],
)
def test_the_script_refuses_bad_flags_before_the_teacher_loads(tmp_path, monkeypatch, capsys, args, message):
    import runpy

    from gemma2.tokenizer import train_tokenizer

    train_tokenizer(["Hello there! How are you today?"] * 3, tmp_path / "other.model", 300)
    (tmp_path / "cached").mkdir()
    (tmp_path / "cached" / "cache.json").write_text("{}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for name in ("gemma2.checkpoint.load_model", "gemma2.data_args.datasets_from_args"):
        monkeypatch.setattr(name, lambda *a, _name=name, **k: pytest.fail(f"{_name} was called"))
    flags = ["--teacher", str(ROOT / "checkpoints" / "tiny-teacher"), "--out", str(tmp_path / "new"), "--seq-len", "16"]
    script = ROOT / "scripts" / "cache_teacher.py"
    monkeypatch.setattr(sys, "argv", [str(script), *flags, *[a.format(tmp=tmp_path) for a in args]])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()
