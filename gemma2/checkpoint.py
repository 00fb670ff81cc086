"""Reading and writing Gemma 2 checkpoints.

Two layouts on disk:
- Hugging Face: `config.json` + `model.safetensors`, or shards listed by
  `model.safetensors.index.json`. Our module names are the Hugging Face names, so no renaming.
- The official PyTorch reference: one `.ckpt` (a dict with `model_state_dict`), or `.bin` shards
  listed by `pytorch_model.bin.index.json`. Same names except `embedder.weight` and one fused
  `qkv_proj` per layer (rows q, k, v); its shape comes from a preset or config the caller names.

Loading builds the model on the `meta` device and assigns each tensor once, converted to the target
dtype as it is read, so the peak memory stays close to the size of the weights. Every key is
checked: missing, unexpected and mis-shaped tensors are errors, never silently left at init, and
so are tensors holding NaN or inf. Every problem with a checkpoint (its config.json included) is a
`CheckpointError`.

Saving never destroys what a directory held: the new files are written beside it and swapped in
at once (gemma2.files.atomic_directory), files the previous save did not write (a tokenizer, a
README, other shards) are kept, and a crash or full disk leaves the old checkpoint whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Container, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from .config import Gemma2Config, model_directory
from .dtypes import to_dtype
from .errors import CheckpointError
from .files import atomic_directory, atomic_file
from .model import Gemma2ForCausalLM
from .quantize import Int8Loading

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
OFFICIAL_INDEX = "pytorch_model.bin.index.json"
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"  # not a Gemma 2 weight: a copy of EMBED that some exporters write
SKIPPED = ("freqs_cis",)  # the official reference stores its RoPE table; we recompute it


# Official <-> Hugging Face names: pure functions over an explicit map.


def official_to_hf(name: str, tensor: Tensor, config: Gemma2Config) -> Iterator[tuple[str, Tensor]]:
    """One official tensor -> the Hugging Face tensors it holds (the fused qkv becomes three)."""
    if name.startswith("embedder."):  # the weight, and an int8 checkpoint's weight_scaler
        yield "model.embed_tokens." + name.removeprefix("embedder."), tensor
    elif ".self_attn.qkv_proj." in name:  # the weight, or an int8 checkpoint's scaler (one per row)
        prefix, suffix = name.split("qkv_proj.")
        q_rows = config.num_attention_heads * config.head_dim
        kv_rows = config.num_key_value_heads * config.head_dim
        if tensor.shape[0] != q_rows + 2 * kv_rows:
            raise CheckpointError(
                f"{name} has {tensor.shape[0]} rows; the config expects (H + 2 KV) * head_dim = "
                f"{q_rows + 2 * kv_rows}: the config does not match this checkpoint"
            )
        q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
        yield prefix + "q_proj." + suffix, q
        yield prefix + "k_proj." + suffix, k
        yield prefix + "v_proj." + suffix, v
    else:
        yield name, tensor


def hf_to_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face state dict -> the official reference's names (fused qkv, embedder)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():  # weights, and an int8 model's weight_scalers alike
        if name.startswith("model.embed_tokens."):
            out["embedder." + name.removeprefix("model.embed_tokens.")] = tensor
        elif ".self_attn.q_proj." in name:
            prefix, suffix = name.split("q_proj.")
            parts = [state[prefix + p + "_proj." + suffix] for p in "qkv"]
            out[prefix + "qkv_proj." + suffix] = torch.cat(parts)
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            out[name] = tensor
    return out


# Reading.


def resolve_config(path: Path, config: Gemma2Config | str | None) -> Gemma2Config:
    """The config of the checkpoint at `path`: `config` when given (or the preset it names), else
    the config.json beside it."""
    if isinstance(config, Gemma2Config):
        return config
    if isinstance(config, str):
        return Gemma2Config.from_name(config)
    directory = model_directory(path)
    if not (directory / "config.json").exists():
        raise CheckpointError(
            f"{directory}: no config.json to say the model's shape; pass config= (a Gemma2Config or a preset "
            "name such as '2b'; the scripts' --config)"
        )
    try:
        return Gemma2Config.from_json(directory / "config.json")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not a Gemma 2 config
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{directory / 'config.json'}: not a valid Gemma 2 config ({detail})") from None


@contextmanager
def _opened(file: Path) -> Iterator:
    """safe_open(file), any failure to read it as one CheckpointError (safetensors raises its own
    error types for truncated or corrupt files)."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read safetensors file ({e}); is it truncated or corrupt?") from e


def _read_safetensors(file: Path) -> Iterator[tuple[str, Tensor]]:
    with _opened(file) as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


# How torch.save's format from before PyTorch 1.6 (not a zip archive) begins, in its default pickle
# protocol 2 (the only one torch.load's weights_only reader takes): its magic number pickled.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _is_legacy_torch_save(file: Path) -> bool:
    try:
        with open(file, "rb") as f:
            return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
    except OSError:
        return False


def _load_pickle(file: Path) -> dict[str, Tensor]:
    try:
        # weights_only: never unpickle arbitrary objects; mmap: never hold two copies.
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        if _is_legacy_torch_save(file):
            new = file.with_name(file.stem + ".resaved.ckpt")
            raise CheckpointError(
                f"{file}: saved in PyTorch's format from before 1.6, which cannot be memory-mapped (checkpoints "
                "are read in place, never copied whole into memory); save it again in the current format and "
                f"load that: python -c \"import torch; torch.save(torch.load('{file}', weights_only=True), '{new}')\""
            ) from e
        raise CheckpointError(f"{file}: cannot read PyTorch checkpoint ({e}); is it truncated or corrupt?") from e
    state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors (optionally under 'model_state_dict')")
    for name, value in state.items():
        if not isinstance(value, Tensor):  # e.g. a training checkpoint's {"state_dict": ..., "epoch": 3}
            raise CheckpointError(
                f"{file}: entry {name!r} is not a tensor ({type(value).__name__}); a Gemma 2 checkpoint is a "
                "dict of tensors, at its top level or under 'model_state_dict': save the model's weights alone"
            )
    return state


def _read_pickle(file: Path) -> Iterator[tuple[str, Tensor]]:
    yield from _load_pickle(file).items()


def checkpoint_files(path: Path) -> list[Path]:
    """The files that hold the tensors, in a stable order."""
    if path.is_file() and path.suffix in (".json", ".model"):  # a model directory's config or tokenizer
        raise CheckpointError(f"{path} is not a weights file (.safetensors, .ckpt, .bin); pass its directory, "
                              f"{path.parent}")  # fmt: skip
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    layouts = [name for name in (HF_INDEX, HF_SINGLE, OFFICIAL_INDEX) if (path / name).exists()]
    if len(layouts) > 1:  # e.g. a Hugging Face save beside official shards: which is the model?
        raise CheckpointError(
            f"{path} holds more than one set of weights ({', '.join(layouts)}); move the ones you do not "
            "want to load out of the directory"
        )
    for index_name in (HF_INDEX, OFFICIAL_INDEX):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid index file ({e})") from None
            files = [path / f for f in sorted(set(weight_map.values()))]
            absent = [str(f) for f in files if not f.exists()]
            if absent:
                raise CheckpointError(f"{index} lists shards that are missing: {absent}")
            return files
    if (path / HF_SINGLE).exists():
        return [path / HF_SINGLE]
    ckpts = sorted(path.glob("*.ckpt"))
    if len(ckpts) == 1:
        return ckpts
    inner = sorted(p.parent for p in path.glob("*/config.json"))  # a training run's step-XXXXXX, say
    hint = f"; its subdirectories hold models: pass one of them, such as {inner[-1]}" if inner else ""
    raise CheckpointError(
        f"{path}: found no {HF_SINGLE}, {HF_INDEX}, {OFFICIAL_INDEX} or single .ckpt file to load{hint}"
    )


def _finite(t: Tensor) -> bool:
    """Whether every element is finite. A finite sum proves it (NaN and inf propagate into any
    sum) at memory speed; only a sum that overflows needs the exact, several times slower test.
    Integer tensors (int8 weights) are finite by construction; summing them would upcast a copy."""
    if not t.is_floating_point():
        return True
    return bool(t.sum().isfinite()) or bool(t.isfinite().all())


def stored_dtype(path: str | os.PathLike, floating: bool = False) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: that of its first weight (not the official
    RoPE table, complex; int8 for an int8 checkpoint), read from safetensors files' headers, not
    their bytes (the 2B embedding is 1.2 GB). floating: that of its first floating-point tensor
    instead (the same, except in an int8 checkpoint: its scales' and norms', which may first appear
    in a later shard than the int8 embedding's)."""

    def weight(name: str, dtype: torch.dtype) -> bool:
        return name not in SKIPPED and (dtype.is_floating_point or dtype == torch.int8 and not floating)

    files = checkpoint_files(Path(path))
    for file in files:
        if file.suffix == ".safetensors":
            with _opened(file) as f:
                pieces = ((name, f.get_slice(name)) for name in f.keys())
                # An empty slice reads no tensor bytes (a scalar is read whole: it is tiny).
                tensors = ((name, piece[:0] if piece.get_shape() else f.get_tensor(name)) for name, piece in pieces)
                dtype = next((t.dtype for name, t in tensors if weight(name, t.dtype)), None)
        else:
            dtype = next((t.dtype for name, t in _read_pickle(file) if weight(name, t.dtype)), None)
        if dtype is not None:
            return dtype
    raise CheckpointError(f"{files[0] if len(files) == 1 else path}: holds no {'float ' if floating else ''}weights")


def skipped(raw_name: str, expected: dict[str, torch.Size]) -> bool:
    """Whether a checkpoint tensor is not loaded: the RoPE table, or a copy of the tied head
    (some exporters write lm_head.weight anyway; `check_tied_head` holds it to being a copy)."""
    return raw_name in SKIPPED or raw_name == HEAD and EMBED in expected


def check_tied_head(head: LazyRows, embed: LazyRows, start: int = 0, stop: int | None = None) -> None:
    """A CheckpointError unless rows start:stop of lm_head.weight equal the embedding's (in the
    embedding's dtype), read a block of rows at a time: Gemma 2 ties its output head to the
    embedding, so a head of its own would silently be replaced by it."""
    if head.shape != embed.shape:
        raise CheckpointError(f"{head.file}: {HEAD} has shape {tuple(head.shape)} but {EMBED} {tuple(embed.shape)}; "
                              "Gemma 2 ties its output head to the embedding: is this a Gemma 2 checkpoint?")  # fmt: skip
    stop = head.shape[0] if stop is None else stop
    for a in range(start, stop, 4096):
        b = min(a + 4096, stop)
        rows = embed.read(a, b)
        if not torch.equal(head.read(a, b).to(rows.dtype), rows):
            raise CheckpointError(
                f"{head.file}: {HEAD} differs from {EMBED}: the checkpoint has an output head of its own, and Gemma 2 "
                "ties it to the embedding, so it would be ignored and the logits would not be this checkpoint's"
            )


def tied_head_rows(files: list[Path]) -> tuple[LazyRows, LazyRows] | None:
    """lm_head.weight and the embedding, read lazily, when the checkpoint's files hold both."""
    found = {name: rows for file in files for name, rows in lazy_tensors(file) if name in (HEAD, EMBED)}
    return (found[HEAD], found[EMBED]) if len(found) == 2 else None


def check_tensor(file: Path, raw_name: str, name: str, shape: torch.Size, expected: dict[str, torch.Size],
                 seen: Container[str]) -> None:  # fmt: skip
    """A CheckpointError unless `name` is a tensor of the model, not yet seen, of the expected shape."""
    if name not in expected:
        raise CheckpointError(f"{file}: unexpected tensor {raw_name!r}; is this a Gemma 2 checkpoint?")
    if name in seen:
        raise CheckpointError(f"{file}: tensor {raw_name!r} appears twice in the checkpoint")
    if shape != expected[name]:
        raise CheckpointError(
            f"{file}: tensor {raw_name!r} has shape {tuple(shape)} but the config expects "
            f"{tuple(expected[name])}: the config does not match this checkpoint"
        )


def check_finite_values(file: Path, raw_name: str, tensor: Tensor) -> None:
    """A CheckpointError naming the tensor when it (or the part of it read) holds NaN or inf."""
    if not _finite(tensor):
        raise CheckpointError(
            f"{file}: tensor {raw_name!r} holds NaN or inf values; this checkpoint is "
            "corrupt (or was saved from a diverged run): load an earlier one"
        )


def check_complete(path: Path, expected: Container[str], seen: Container[str]) -> None:
    """A CheckpointError listing the model's tensors that the checkpoint did not hold."""
    missing = sorted(set(expected) - set(seen))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing tensors {shown}")


class LazyRows:
    """A checkpoint tensor whose rows are read only when asked for: `read(start, stop)` maps the
    file, copies nothing but those rows' pages in, and lets the mapping go with the result.
    `split` cuts it into row ranges (the official fused qkv) without reading anything."""

    def __init__(self, file: Path, name: str, shape: torch.Size, int8: bool, offset: int = 0) -> None:
        self.file, self.name, self.shape, self.offset = file, name, shape, offset
        self.int8 = int8  # an int8 checkpoint's weight (gemma2.quantize)

    def split(self, sizes: list[int]) -> list[LazyRows]:
        parts, start = [], self.offset
        for rows in sizes:
            parts.append(LazyRows(self.file, self.name, torch.Size([rows, *self.shape[1:]]), self.int8, start))
            start += rows
        return parts

    def read(self, start: int, stop: int) -> Tensor:
        """Rows start:stop, memory-mapped (valid after the file is closed; pages load on first touch)."""
        a, b = self.offset + start, self.offset + stop
        try:
            if self.file.suffix == ".safetensors":
                with safe_open(self.file, framework="pt") as f:
                    return f.get_slice(self.name)[a:b]
            return _load_pickle(self.file)[self.name][a:b]  # mmap: only these rows are read
        except Exception as e:
            raise CheckpointError(
                f"{self.file}: cannot read tensor {self.name!r} ({e}); is it truncated or corrupt?"
            ) from e


def lazy_tensors(file: Path) -> Iterator[tuple[str, LazyRows]]:
    """The tensors of one checkpoint file, from its header alone: each read later, by rows, on demand.
    A `.ckpt`/`.bin` is memory-mapped, so only the rows read leave the disk, as with safetensors."""
    if file.suffix == ".safetensors":
        with _opened(file) as f:
            headers = [(name, f.get_slice(name)) for name in f.keys()]
            listed = [(name, torch.Size(h.get_shape()), h.get_dtype() == "I8") for name, h in headers]
    else:
        listed = [(name, t.shape, t.dtype == torch.int8) for name, t in _load_pickle(file).items()]
    for name, shape, int8 in listed:
        yield name, LazyRows(file, name, shape, int8)


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    config: Gemma2Config | str | None = None,
    progress: bool = False,
    quantize: str | None = None,
    check_finite: bool = True,
    attention: str = "auto",
    compile_attention: bool | None = None,
) -> Gemma2ForCausalLM:
    """Load a Gemma 2 checkpoint (Hugging Face directory, official `.ckpt`, or `.bin` shards).

    config: the model's shape when the checkpoint has no config.json (a Gemma2Config or a preset
    name); it overrides config.json when given. progress: show a bar over the tensors.
    quantize: "int8" quantises every projection and the embedding while loading (gemma2.quantize);
    an int8 checkpoint (int8 weights with `weight_scaler`s) loads as int8 without it.
    check_finite: refuse a tensor holding NaN or inf (a CheckpointError naming it). It reads every
    weight once more (a sum per tensor on the target device: 0.03 s per GiB of fp32 on one CPU
    thread from the page cache; a memory-mapped file is then read from disk at load, not later);
    False skips that pass and trusts the file.
    attention, compile_attention: as in Gemma2ForCausalLM (default: the fastest measured path for
    the device and call; "eager" is the reference; compile_attention=False never compiles).
    """
    dtype = to_dtype(dtype)  # bfloat16 or float32, by dtype or by name (gemma2.dtypes)
    path = Path(path)
    files = checkpoint_files(path)
    config = resolve_config(path, config)
    with torch.device("meta"):
        model = Gemma2ForCausalLM(config, attention, compile_attention)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    placing = Int8Loading(model, quantize, expected, dtype, device)  # casts, or quantises, each tensor
    state: dict[str, Tensor] = {}
    copied_head = False  # lm_head.weight was there (a copy of the embedding, checked once loaded)
    # Closed however the loop ends: an error's line then starts a line of its own.
    with tqdm(total=len(expected), desc="loading", unit="tensor", disable=not progress) as bar:
        for file in files:
            reader = _read_safetensors if file.suffix == ".safetensors" else _read_pickle
            for raw_name, raw in reader(file):
                if skipped(raw_name, expected):
                    copied_head |= raw_name == HEAD
                    continue
                for name, tensor in placing.place_all(official_to_hf(raw_name, raw, config)):
                    check_tensor(file, raw_name, name, tensor.shape, expected, state)
                    state[name] = tensor  # cast (or quantised) by `placing`
                    if check_finite:
                        check_finite_values(file, raw_name, state[name])
                    bar.update()
    placing.check()
    check_complete(path, expected, state)
    if copied_head and (tied := tied_head_rows(files)) is not None:
        check_tied_head(*tied)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# Writing.


def written_by_save(directory: Path) -> set[str]:
    """The files of `directory` that a previous save_model wrote: config, index, the index's shards."""
    owned = {"config.json", HF_SINGLE, HF_INDEX}
    try:
        owned |= set(json.loads((directory / HF_INDEX).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no index, or one we cannot read: then it names no shards of ours
    return owned


def check_save_directory(directory: str | os.PathLike) -> None:
    """Refuse a directory that holds official weights: a Hugging Face save beside them would leave
    two models there, which load_model refuses to choose between."""
    if (Path(directory) / OFFICIAL_INDEX).exists():
        raise ValueError(f"{directory} holds official weights ({OFFICIAL_INDEX}); the Hugging Face layout beside "
                         "them would leave two models in one directory: save into another directory")  # fmt: skip


def save_model(
    model: Gemma2ForCausalLM, directory: str | os.PathLike, *, max_shard_bytes: int = 4 * 2**30
) -> None:
    """Write the Hugging Face layout: config.json and safetensors, sharded above `max_shard_bytes`.

    Atomic: the files are written into a temporary sibling, then the directory is swapped in one
    step; a crash leaves the previous content whole. Files of an existing `directory` that a
    previous save did not write are kept (see the module docstring)."""
    directory = Path(directory)
    check_save_directory(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    dtype = str(model.dtype).removeprefix("torch.")  # the activations' (an int8 model's scales')
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    keep = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    keep = [name for name in keep if name not in written_by_save(directory)]
    with atomic_directory(directory, keep=keep) as tmp:
        if len(shards) == 1:
            save_file(shards[0], tmp / HF_SINGLE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        model.config.to_json(tmp / "config.json", dtype=dtype)


def save_official(model: Gemma2ForCausalLM, path: str | os.PathLike) -> None:
    """Write the official reference's `.ckpt`: `{"model_state_dict": ...}` with fused qkv; atomic
    (a temporary sibling renamed over `path`)."""
    state = hf_to_official({k: v.detach() for k, v in model.state_dict().items()})
    with atomic_file(path) as tmp:
        torch.save({"model_state_dict": state}, tmp)
