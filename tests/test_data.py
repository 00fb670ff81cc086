"""Data: reading, packing (boundaries, lengths, no token lost), held-out split, shuffling, sharding,
resumable position, and clear errors for empty or unreadable inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import random_prompt_rows
from gemma2.data import BatchLoader, PackedSequences, eval_batches, load_datasets, read_texts, tokenize

BOS, EOS = 2, 1


class ByteTokenizer:
    """One id per UTF-8 byte (3 + byte), Gemma's bos / eos ids: packing tests need nothing more."""

    bos_id, eos_id, vocab_size = BOS, EOS, 259

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        return [BOS] * bos + [3 + b for b in text.encode()] + [EOS] * eos


def test_read_texts_txt_jsonl_and_sorted_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("second\n\nstill the second document")
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "1b"}) + "\n")
    (tmp_path / "d" / "sub" / "c.txt").write_text("third")
    (tmp_path / "d" / "ignored.md").write_text("not data")
    (tmp_path / "d" / "blank.txt").write_text("  \n")  # empty documents are dropped
    assert read_texts([tmp_path / "d"]) == ["first", "1b", "second\n\nstill the second document", "third"]
    assert read_texts(tmp_path / "d" / "sub" / "c.txt") == ["third"]


@pytest.mark.parametrize("make", ["empty_file", "empty_jsonl", "empty_dir", "blank_docs"])
def test_empty_dataset_is_an_error_naming_the_path(tmp_path, make):
    path = tmp_path / "data"
    if make == "empty_file":
        path = tmp_path / "data.txt"
        path.write_text("")
    elif make == "empty_jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("\n")
    elif make == "empty_dir":
        path.mkdir()
    else:
        path = tmp_path / "data.jsonl"
        path.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(ValueError, match=str(path)):
        read_texts([path])


def test_unreadable_inputs_are_errors_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_texts([tmp_path / "missing.txt"])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*UTF-8"):
        read_texts([bad])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"txt": "wrong field"}\n')
    with pytest.raises(ValueError, match='broken.jsonl:1.*"text"'):
        read_texts([broken])


def test_packing_boundaries_lengths_and_no_token_lost():
    docs = ["ab", "cde", "", "fghij", "k"]
    stream = tokenize([d for d in docs if d], ByteTokenizer())
    assert stream.dtype == np.int32
    # Each document is bos ... eos, back to back.
    expected = []
    for d in docs:
        if d:
            expected += [BOS, *(3 + b for b in d.encode()), EOS]
    assert stream.tolist() == expected
    T = 4
    data = PackedSequences(stream, T)
    n = (len(stream) - 1) // T
    assert len(data) == n
    batch = data.batch(range(n))
    assert batch.inputs.shape == batch.targets.shape == (n, T)
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64
    # Targets are the inputs shifted by one, windows overlap by one token, and read in order the
    # sequences give back the whole stream: only a tail shorter than seq_len is dropped.
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert torch.equal(batch.inputs[1:, 0], batch.targets[:-1, -1])
    covered = torch.cat([batch.inputs.flatten(), batch.targets[-1, -1:]])
    assert covered.tolist() == stream[: n * T + 1].tolist()
    assert len(stream) - (n * T + 1) < T
    # Every input token is followed by its successor, bos after eos at document boundaries.
    assert (batch.targets[batch.inputs == EOS] == BOS).all()


def test_out_of_range_indices_are_an_error():
    data = PackedSequences(np.arange(20, dtype=np.int32), 4)
    with pytest.raises(IndexError):
        data.batch([len(data)])


def test_heldout_split_is_by_document_disjoint_and_deterministic(tmp_path):
    docs = [f"document number {i} " + "x" * (i % 7) for i in range(200)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def documents(tokens: np.ndarray) -> set[bytes]:
        cuts = np.flatnonzero(tokens == BOS)
        return {bytes((tokens[a + 1 : b - 1] - 3).astype(np.uint8)) for a, b in zip(cuts, [*cuts[1:], len(tokens)])}

    a = load_datasets([path], ByteTokenizer(), 8, holdout_fraction=0.1)
    b = load_datasets([path], ByteTokenizer(), 16, holdout_fraction=0.1)
    train_docs, held_docs = documents(a.train.tokens), documents(a.heldout.tokens)
    assert len(held_docs) == 20 and len(train_docs) == 180
    assert not train_docs & held_docs
    assert train_docs | held_docs == {d.encode() for d in docs}
    # The split depends on the documents only (not on seq_len or anything else).
    assert np.array_equal(a.heldout.tokens, b.heldout.tokens)
    assert load_datasets([path], ByteTokenizer(), 8, holdout_fraction=0).heldout is None


def test_too_little_data_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("hi")
    with pytest.raises(ValueError, match="lower seq_len"):
        load_datasets([path], ByteTokenizer(), 64, holdout_fraction=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchLoader(PackedSequences(np.zeros(9, dtype=np.int32), 4), batch_size=3)


def _loader_data(n: int = 12, T: int = 3) -> PackedSequences:
    return PackedSequences(np.arange(n * T + 1, dtype=np.int32), T)


def test_shuffle_is_a_seeded_permutation_per_epoch():
    data = _loader_data()

    def epochs(seed: int, n_epochs: int = 3) -> list[list[int]]:
        loader = BatchLoader(data, batch_size=4, seed=seed)
        return [[i for _ in range(3) for i in next(loader).indices.tolist()] for _ in range(n_epochs)]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert a == b  # deterministic
    assert a != c  # the seed matters
    for epoch in a:
        assert sorted(epoch) == list(range(12))  # each epoch visits every sequence once
    assert a[0] != a[1]  # and in a new order
    # The batch holds exactly the sequences it names.
    batch = next(BatchLoader(data, batch_size=4, seed=0))
    assert torch.equal(batch.inputs, data.batch(batch.indices).inputs)


def test_ranks_read_disjoint_slices_of_the_same_global_batch():
    data = _loader_data(n=20)
    single = BatchLoader(data, batch_size=4, seed=3)
    ranks = [BatchLoader(data, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):  # across epoch ends too (20 sequences, global batch 4)
        together = torch.cat([next(r).indices for r in ranks])
        assert torch.equal(together, next(single).indices)


def test_a_step_reads_the_same_rows_however_its_batch_is_split():
    """An epoch ends at a step's boundary, so a step's rows depend on the step batch alone: 2 x 2
    micro-batches x 2 ranks, 4 x 1 x 2 and 8 x 1 x 1 read, step by step, the rows of the documented
    order (epoch e's seeded permutation, 8 rows a step, the 103 % 8 = 7 left over skipped), across
    epoch ends; and a checkpoint of one split resumes with another. (An epoch that ended at a
    micro-batch gave 2 x 2 x 2 other rows from the first epoch end, and made such a resume fail.)"""
    data = _loader_data(n=103)

    def loaders(batch_size: int, accum: int, world: int) -> list[BatchLoader]:
        return [BatchLoader(data, batch_size, seed=0, rank=r, world_size=world, grad_accum=accum)
                for r in range(world)]  # fmt: skip

    def steps(split: list[BatchLoader], accum: int, n: int) -> list[list[int]]:
        return [sorted(i for _ in range(accum) for loader in split for i in next(loader).indices.tolist())
                for _ in range(n)]  # fmt: skip

    perms = [np.random.default_rng([0, e]).permutation(103) for e in range(3)]
    want = [sorted(perms[e][8 * i : 8 * i + 8].tolist()) for e in range(3) for i in range(12)]
    for batch_size, accum, world in ((2, 2, 2), (4, 1, 2), (8, 1, 1), (1, 4, 2)):
        assert steps(loaders(batch_size, accum, world), accum, 36) == want, (batch_size, accum, world)
    first = loaders(2, 2, 2)
    steps(first, 2, 13)  # into epoch 1
    state = first[0].state_dict()
    assert state == {"epoch": 1, "offset": 8, "seed": 0}
    resumed = loaders(4, 1, 2)
    for loader in resumed:
        loader.load_state_dict(state)
    assert steps(resumed, 1, 20) == want[13:33]


def test_position_resumes_exactly_even_across_epochs():
    data = _loader_data(n=10)
    loader = BatchLoader(data, batch_size=3, seed=5)
    for _ in range(4):  # 3 batches per epoch: we are in epoch 1
        next(loader)
    state = loader.state_dict()
    assert state["epoch"] == 1
    expected = [next(loader).indices for _ in range(5)]
    resumed = BatchLoader(data, batch_size=3, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as stored in trainer_state.json
    assert all(torch.equal(a, next(resumed).indices) for a in expected)
    with pytest.raises(ValueError, match="seed"):
        BatchLoader(data, batch_size=3, seed=6).load_state_dict(state)


def test_grouping_by_length_reorders_each_run_longest_first_and_nothing_else():
    """group = 32: within each run of 32 rows of an epoch's order the rows go longest first (each
    row's length measured on its batch alone), the runs hold the rows the ungrouped order has
    there, an epoch still visits every row once, the order does not depend on how the global batch
    is split into ranks or micro-batches, and a resume continues it; packed rows are refused."""
    rows = random_prompt_rows(96, 0, 64)
    # Alone, a row is its prompt and completion unpadded: inputs are one token shorter.
    length = {i: rows.batch([i]).inputs.shape[1] + 1 for i in range(len(rows))}

    def order(loader, batches: int) -> list[int]:
        return [i for _ in range(batches) for i in next(loader).indices.tolist()]

    grouped, plain = order(BatchLoader(rows, 4, seed=1, group=32), 48), order(BatchLoader(rows, 4, seed=1), 48)
    for e in (0, 96):  # each epoch: its three runs, rotated by some offset
        epoch = grouped[e : e + 96]
        assert sorted(epoch) == list(range(96))

        def runs_at(offset: int) -> bool:
            cyclic = epoch[offset:] + epoch[:offset]
            return all([length[i] for i in cyclic[lo : lo + 32]] == sorted((length[i] for i in cyclic[lo : lo + 32]),
                                                                             reverse=True)
                       and sorted(cyclic[lo : lo + 32]) == sorted(plain[e + lo : e + lo + 32])
                       for lo in range(0, 96, 32))  # fmt: skip

        assert any(runs_at(offset) for offset in range(96))
    widths = [[rows.batch(o[lo : lo + 4]).inputs.shape[1] for lo in range(0, 192, 4)] for o in (grouped, plain)]
    assert np.mean(widths[0]) < np.mean(widths[1])
    ranks = [BatchLoader(rows, 1, seed=1, rank=r, world_size=4, group=32) for r in range(4)]
    assert [i for _ in range(48) for r in ranks for i in next(r).indices.tolist()] == grouped
    assert order(BatchLoader(rows, 2, seed=1, group=32), 96) == grouped
    loader = BatchLoader(rows, 4, seed=1, group=32)
    order(loader, 30)  # into the second epoch
    resumed = BatchLoader(rows, 4, seed=1, group=32)
    resumed.load_state_dict(loader.state_dict())
    assert order(resumed, 18) == grouped[120:]
    with pytest.raises(ValueError, match="packed rows are all seq_len long"):
        BatchLoader(_loader_data(n=20), 4, group=8)


def test_grouping_by_length_leaves_over_random_rows_not_the_shortest():
    """10 rows, a global batch of 4: each epoch leaves 2 over. Grouped in one run of all 10 rows,
    the two shortest must not be the ones left over every epoch (they would never be trained)."""
    rows = random_prompt_rows(10, 2, 64)
    loader = BatchLoader(rows, 4, seed=0, group=10)
    seen = np.bincount([i for _ in range(2 * 200) for i in next(loader).indices.tolist()], minlength=10)
    assert seen.sum() == 200 * 8 and seen.min() > 0.6 * seen.max()


def test_eval_batches_split_ranks_evenly():
    data = _loader_data(n=11)
    seen = [torch.cat([b.indices for b in eval_batches(data, 2, rank=r, world_size=2)]) for r in range(2)]
    assert seen[0].tolist() == [0, 1, 2, 3, 4] and seen[1].tolist() == [5, 6, 7, 8, 9]
    assert [len(b.indices) for b in eval_batches(data, 4, max_sequences=6)] == [4, 2]


def test_memmapped_tokens_round_trip(tmp_path):
    data = PackedSequences(np.arange(50, dtype=np.int32), 7)
    data.save(tmp_path / "tokens.npy")
    loaded = PackedSequences.load(tmp_path / "tokens.npy", 7)
    assert isinstance(loaded.tokens, np.memmap)
    assert torch.equal(loaded.batch([0, 5]).inputs, data.batch([0, 5]).inputs)
    assert loaded.fingerprint() == data.fingerprint()
    assert PackedSequences(np.arange(50, dtype=np.int32), 6).fingerprint() != data.fingerprint()


def test_with_a_sentencepiece_tokenizer(tmp_path):
    from gemma2.tokenizer import Tokenizer, train_tokenizer

    docs = [f"The quick brown fox {i} jumps over the lazy dog." for i in range(50)]
    tok = Tokenizer(train_tokenizer(docs, tmp_path / "tok.model", vocab_size=320))
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = load_datasets([path], tok, 16, holdout_fraction=0.1)
    stream = data.train.tokens
    assert stream[0] == tok.bos_id and stream[-1] == tok.eos_id
    assert (stream == tok.bos_id).sum() == (stream == tok.eos_id).sum() == 45
    assert tok.decode(stream[1 : np.flatnonzero(stream == tok.eos_id)[0]].tolist()) in docs
