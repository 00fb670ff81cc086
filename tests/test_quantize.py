"""Weight-only int8 (gemma2.quantize): the kernel against dequantise-then-matmul written here, the
official int8 layout built here by hand, our own int8 layout round-tripped, the error cases, the
scripts' flags, and the quality of the int8 tiny teacher against its fp32 self."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import randomize_, tiny_config
from gemma2 import CheckpointError, Gemma2Config, Gemma2ForCausalLM, load_model, save_model
from gemma2.checkpoint import save_official
from gemma2.generation import generate
from gemma2.quantize import Int8Embedding, Int8Linear, dequantize_matmul, int8_matmul, quantize_model, weight_bytes

ROOT = Path(__file__).resolve().parents[1]


def textbook_int8(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8, written independently of the library: s = max|row| / 127 as stored
    (in fp32, then in `dtype`), q = round(w / s) against that stored scale."""
    s = (w.double().abs().max(dim=1).values / 127).float().to(dtype).double()
    q = (w.double() / s[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, s.to(dtype)


def random_model(cfg: Gemma2Config | None = None, seed: int = 0) -> Gemma2ForCausalLM:
    model = Gemma2ForCausalLM(cfg or tiny_config()).eval()
    randomize_(model, seed)
    return model


# The kernel.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_channel_is_the_textbook_formula(dtype):
    w = (torch.randn(37, 50, generator=torch.Generator().manual_seed(3)) * torch.rand(37, 1) * 3).to(dtype)
    w[5] = 0.0  # an all-zero row must not divide by zero
    linear = torch.nn.Linear(50, 37, bias=False, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = Int8Linear.from_linear(linear)
    q, s = textbook_int8(w, dtype)
    rows = torch.arange(37) != 5
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight[rows], q[rows])
    assert torch.equal(layer.weight[5], torch.zeros(50, dtype=torch.int8))
    assert layer.weight_scaler.dtype == dtype and torch.equal(layer.weight_scaler[rows], s[rows])
    # Every weight is within half a step of its row's scale, as stored (in bf16 too: the codes are
    # rounded against the bf16 scale, not the fp32 one, which gave up to 0.83 of a step).
    back = layer.weight.double() * layer.weight_scaler.double()[:, None]
    assert ((back - w.double()).abs() <= layer.weight_scaler.double()[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# Decode steps (the CPU kernel in bf16), a prefill; widths that are not multiples of 16 (which the
# kernel reads past the end of: garbage or a segfault).
@pytest.mark.parametrize("shape", [(1, 256), (3, 5, 256), (2, 40, 256), (1, 72), (3, 1, 100)])
def test_int8_linear_equals_dequantise_then_matmul(dtype, shape):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (96, shape[-1]), generator=g, dtype=torch.int8)
    s = (torch.rand(96, generator=g) / 100).to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    want = (x.double() @ (q.double() * s.double()[:, None]).T).float()  # in float64, written here
    # The bound, 1e-3, in fp32; a bf16 output alone is rounded by up to 2^-9 relative
    # (8 significant bits), so there the bound is bf16's own precision, 2^-8.
    bound = 1e-3 if dtype == torch.float32 else 2**-8
    for got in (int8_matmul(x, q, s), dequantize_matmul(x, q, s)):
        assert got.dtype == dtype and got.shape == (*shape[:-1], 96)
        assert (got.float() - want).norm() / want.norm() < bound


def test_bf16_decode_on_cpu_reads_int8_through_the_kernel(monkeypatch):
    """The speed path: a decode step in bf16 never builds a dequantised copy of the weight."""
    import gemma2.quantize

    def refuse(*args):
        raise AssertionError("dequantised")

    monkeypatch.setattr(gemma2.quantize, "dequantize_matmul", refuse)
    q = torch.randint(-127, 128, (64, 32), dtype=torch.int8)
    int8_matmul(torch.randn(2, 1, 32, dtype=torch.bfloat16), q, torch.rand(64, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match="dequantised"):  # a prefill dequantises once
        int8_matmul(torch.randn(2, 40, 32, dtype=torch.bfloat16), q, torch.rand(64, dtype=torch.bfloat16))


def test_int8_embedding_gathers_and_attends():
    emb = torch.nn.Embedding(40, 16)
    q8 = Int8Embedding.from_embedding(emb)
    q, s = textbook_int8(emb.weight.detach())
    deq = q.float() * s[:, None]
    ids = torch.tensor([[0, 7, 39, 7]])
    assert torch.allclose(q8(ids), deq[ids], rtol=1e-6, atol=0)
    h = torch.randn(2, 16)
    assert torch.allclose(q8.attend(h), h @ deq.T, rtol=1e-4, atol=1e-5)


def test_quantized_model_runs_without_float_weights_and_close_to_float():
    model = random_model()
    ids = torch.randint(3, 300, (2, 24))
    with torch.no_grad():
        want = model(ids)
        quantize_model(model)
        got = model(ids)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.Linear not in kinds and torch.nn.Embedding not in kinds
    assert (got - want).norm() / want.norm() < 0.02
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_generation_with_an_int8_model_is_its_own_uncached_argmax():
    """Cached int8 decoding (KV cache in the activation dtype) gives the tokens of recomputation."""
    model = quantize_model(random_model(seed=3))
    with torch.no_grad():
        model.model.norm.weight.mul_(0.1)  # varied tokens, not one repeated
    prompt = torch.randint(3, 300, (1, 5))
    out = generate(model, prompt, max_new_tokens=20)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_bytes_of_the_benchmark_config(dtype):
    """The issue's benchmark config, built on meta: int8 holds <= 0.55x the bf16 weight bytes."""
    cfg = Gemma2Config(vocab_size=32768, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128,
                       sliding_window=512, max_position_embeddings=2048)  # fmt: skip
    with torch.device("meta"):
        bf16 = Gemma2ForCausalLM(cfg).to(torch.bfloat16)
        int8 = quantize_model(Gemma2ForCausalLM(cfg).to(dtype))
    params = sum(p.numel() for p in bf16.parameters())
    assert weight_bytes(bf16) == 2 * params
    assert weight_bytes(int8) <= 0.55 * weight_bytes(bf16)


CHILD_LOAD = """
import json, sys, threading, time, torch
import gemma2.quantize
from gemma2 import load_model
from gemma2.quantize import quantize_model, weight_bytes

gemma2.quantize._ROWS_PER_CHUNK_BYTES = 2**20  # the transients of one chunk: small next to this model

def anon():  # the process's anonymous resident memory (not the mapped checkpoint file's pages)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))

def load():
    if sys.argv[2] == "on load":
        return load_model(sys.argv[1], dtype=torch.bfloat16, quantize="int8")
    # The control: the whole model in memory first (fp32: a bf16 load would only map the file), then int8.
    return quantize_model(load_model(sys.argv[1], dtype=torch.float32))

load()  # once unmeasured: torch's first-use allocations are not the loader's
peak, done = [anon()], threading.Event()
def sample():
    while not done.is_set():
        peak.append(max(peak[-1], anon()))
        time.sleep(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
model = load()
done.set()
sampler.join()
print(json.dumps({"growth": peak[-1] - peak[0], "bytes": weight_bytes(model)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from Linux /proc")
def test_quantise_on_load_never_holds_the_float_model(tmp_path):
    """Peak anonymous memory while a bf16 checkpoint loads as int8, sampled in a fresh process
    (glibc told to unmap every freed tensor at once, so what is freed leaves the count): about the
    int8 weights, where loading the float model and then quantising it (the control) holds both."""
    cfg = Gemma2Config(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=128, query_pre_attn_scalar=128,
                       sliding_window=64, max_position_embeddings=256)  # fmt: skip
    with torch.device("meta"):
        model = Gemma2ForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    bf16_bytes = weight_bytes(model)
    save_model(model, tmp_path)
    del model
    growth = {}
    for how in ("on load", "control"):
        env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run([sys.executable, "-c", CHILD_LOAD, str(tmp_path), how], capture_output=True, text=True,
                              env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        r = json.loads(done.stdout)
        assert r["bytes"] <= 0.55 * bf16_bytes
        growth[how] = r["growth"] / bf16_bytes
    print(f"\npeak anonymous memory growth / bf16 weight bytes: {growth}")
    assert growth["control"] >= 2.0  # the measurement sees the fp32 model held with its int8 copy
    assert growth["on load"] < 0.75  # the int8 weights (0.5x) and one chunk's transients


# Checkpoints: the official int8 layout, built here by hand.


def official_int8_state(model: Gemma2ForCausalLM) -> dict[str, torch.Tensor]:
    """The official release's int8 layout from a float model, written independently of the library:
    int8 `weight` + `weight_scaler` per projection (q, k, v fused into qkv_proj) and embedder."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"freqs_cis": torch.randn(64, 12)}
    out["embedder.weight"], out["embedder.weight_scaler"] = textbook_int8(state.pop("model.embed_tokens.weight"))
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        fused = torch.cat([state.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        out[p + "self_attn.qkv_proj.weight"], out[p + "self_attn.qkv_proj.weight_scaler"] = textbook_int8(fused)
        for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            out[p + name + ".weight"], out[p + name + ".weight_scaler"] = textbook_int8(state.pop(p + name + ".weight"))
    return out | state  # the norms, in float


def write_ckpt(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"model_state_dict": state}, path)
    return path


def test_official_int8_checkpoint_loads_exactly_the_tensors_it_holds(tmp_path):
    cfg = tiny_config()
    raw = official_int8_state(random_model(cfg, seed=5))
    model = load_model(write_ckpt(raw, tmp_path / "model.ckpt"), config=cfg)  # detected: no quantize=
    got = model.state_dict()
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    assert torch.equal(got["model.embed_tokens.weight"], raw["embedder.weight"])
    assert torch.equal(got["model.embed_tokens.weight_scaler"], raw["embedder.weight_scaler"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        rows = {"q": slice(0, H * hd), "k": slice(H * hd, (H + KV) * hd), "v": slice((H + KV) * hd, None)}
        for x, r in rows.items():
            assert torch.equal(got[p + f"self_attn.{x}_proj.weight"], raw[p + "self_attn.qkv_proj.weight"][r])
            assert torch.equal(got[p + f"self_attn.{x}_proj.weight_scaler"], raw[p + "self_attn.qkv_proj.weight_scaler"][r])
        for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert got[p + name + ".weight"].dtype == torch.int8
            assert torch.equal(got[p + name + ".weight"], raw[p + name + ".weight"])
            assert torch.equal(got[p + name + ".weight_scaler"], raw[p + name + ".weight_scaler"])
        assert torch.equal(got[p + "input_layernorm.weight"], raw[p + "input_layernorm.weight"])
    # Its logits are those of the dequantised weights in a float model.
    deq = Gemma2ForCausalLM(cfg).eval()
    state = {}
    for name, t in got.items():
        if name.endswith("weight_scaler"):
            continue
        scaler = got.get(name.removesuffix("weight") + "weight_scaler")
        state[name] = t if scaler is None else t.float() * scaler[:, None]
    deq.load_state_dict(state, strict=True)
    ids = torch.randint(3, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(model(ids), deq(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["missing scaler", "missing fused scaler", "scaler of wrong shape",
                                  "fused scaler of wrong length", "float weight", "float weight, scalers first",
                                  "int8 norm"])  # fmt: skip
def test_official_int8_checkpoint_errors(tmp_path, case):
    cfg = tiny_config()
    raw = official_int8_state(random_model(cfg, seed=6))
    p = "model.layers.1."
    if case == "missing scaler":
        del raw[p + "mlp.down_proj.weight_scaler"]
        match = r"missing tensors .*mlp\.down_proj\.weight_scaler"
    elif case == "missing fused scaler":
        del raw[p + "self_attn.qkv_proj.weight_scaler"]
        match = r"missing tensors .*self_attn\.[kqv]_proj\.weight_scaler"
    elif case == "scaler of wrong shape":
        raw[p + "self_attn.o_proj.weight_scaler"] = torch.ones(7)
        match = r"o_proj\.weight_scaler' has shape \(7,\)"
    elif case == "fused scaler of wrong length":
        raw[p + "self_attn.qkv_proj.weight_scaler"] = torch.ones(5)
        match = "has 5 rows"
    elif case in ("float weight", "float weight, scalers first"):
        raw[p + "mlp.up_proj.weight"] = torch.randn(cfg.intermediate_size, cfg.hidden_size)
        if case == "float weight, scalers first":  # the scaler arrives after the float weight
            raw = dict(sorted(raw.items(), key=lambda kv: kv[0].endswith("weight_scaler")))
        match = r"mlp\.up_proj\.weight is torch\.float32, not int8"
    else:
        raw[p + "input_layernorm.weight"] = torch.zeros(cfg.hidden_size, dtype=torch.int8)
        match = "input_layernorm.weight is int8"
    with pytest.raises(CheckpointError, match=match):
        load_model(write_ckpt(raw, tmp_path / "model.ckpt"), config=cfg)


def test_quantize_argument_is_checked(tmp_path):
    save_model(random_model(), tmp_path)
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        load_model(tmp_path, quantize="int4")


# Our own int8 layout.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantise_on_load_equals_quantising_the_loaded_model(tmp_path, dtype):
    """Where the checkpoint is stored in the model's dtype (an fp32 checkpoint loaded in bf16 is
    quantised from its fp32 values, the loaded model from their bf16 rounding)."""
    model = random_model(seed=7).to(dtype)
    save_model(model, tmp_path / "f")
    loaded = load_model(tmp_path / "f", dtype=dtype, quantize="int8")
    after = quantize_model(load_model(tmp_path / "f", dtype=dtype))
    assert loaded.state_dict().keys() == after.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), after.state_dict().values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_model_writes_int8_and_our_loader_reads_it_back(tmp_path, dtype):
    model = random_model(seed=8)
    save_model(model, tmp_path / "f")
    q = load_model(tmp_path / "f", dtype=dtype, quantize="int8")
    save_model(q, tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", framework="pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    assert stored["model.layers.0.mlp.gate_proj.weight"].dtype == torch.int8
    assert stored["model.embed_tokens.weight"].dtype == torch.int8
    assert stored["model.embed_tokens.weight_scaler"].dtype == dtype
    assert stored["model.norm.weight"].dtype == dtype
    back = load_model(tmp_path / "q", dtype=dtype)  # int8 detected from the tensors
    assert back.state_dict().keys() == q.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), q.state_dict().values()))
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(ids), q(ids))


def test_save_official_of_an_int8_model_round_trips(tmp_path):
    cfg = tiny_config()
    q = quantize_model(random_model(cfg, seed=9))
    save_official(q, tmp_path / "model.ckpt")
    raw = torch.load(tmp_path / "model.ckpt", weights_only=True)["model_state_dict"]
    assert raw["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.int8
    assert "embedder.weight_scaler" in raw and "model.layers.0.self_attn.qkv_proj.weight_scaler" in raw
    back = load_model(tmp_path / "model.ckpt", config=cfg)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), q.state_dict().values()))


# Distillation: an int8 teacher is refused live with the fix, and can be cached.


def test_int8_teacher_is_refused_live_and_can_be_cached(tmp_path):
    from gemma2.data import PackedSequences
    from gemma2.teacher import check_teacher
    from gemma2.teacher_cache import TeacherCache, write_teacher_cache

    teacher = quantize_model(random_model(seed=11))
    with pytest.raises(ValueError, match="int8 weights.*cache_teacher.py"):
        check_teacher(teacher, 300, 1.0, "forward_kl")
    data = PackedSequences(torch.randint(3, 300, (4 * 16 + 1,)).numpy(), 16)
    write_teacher_cache(teacher, {"train": data}, tmp_path, k=4, progress=False)
    cached = TeacherCache(tmp_path).split("train").topk(torch.arange(4), "cpu")
    with torch.no_grad():
        top1 = teacher(data.batch(range(4)).inputs).argmax(-1)
    assert torch.equal(cached.ids[..., 0].long(), top1)


# The scripts.


def test_convert_checkpoint_quantize_int8(tmp_path):
    model = random_model(seed=10)
    save_model(model, tmp_path / "f")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), "--input", str(tmp_path / "f"),
                           "--output", str(tmp_path / "q"), "--quantize", "int8", "--dtype", "fp32"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    direct = quantize_model(load_model(tmp_path / "f"))
    converted = load_model(tmp_path / "q")
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), direct.state_dict().values()))
    # In place, an int8 input stays int8; --dtype is its scales' and norms': a change is refused,
    # naming them, and the same dtype (with or without --quantize int8) rewrites the same tensors.
    convert = [sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), "--input", str(tmp_path / "q"),
               "--output", str(tmp_path / "q")]  # fmt: skip
    done = subprocess.run(convert, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.endswith(
        "would turn its int8 checkpoint's torch.float32 scales and norms into torch.bfloat16 in place; "
        "pass --dtype float32, another --output, or --overwrite\n"
    )
    for extra in (["--dtype", "fp32"], ["--dtype", "fp32", "--quantize", "int8"]):
        done = subprocess.run(convert + extra, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        again = load_model(tmp_path / "q")
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), direct.state_dict().values()))
    # A shard per tensor, the int8 embedding's first: the scales' dtype is read on in later shards.
    save_model(direct, tmp_path / "s", max_shard_bytes=1)
    with safe_open(str(min((tmp_path / "s").glob("*.safetensors"))), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"I8"}
    done = subprocess.run(convert[:3] + [str(tmp_path / "s"), "--output", str(tmp_path / "s"), "--dtype", "fp32"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # A float input quantised in place loses its float weights: refused.
    done = subprocess.run(convert[:3] + [str(tmp_path / "f"), "--output", str(tmp_path / "f"), "--quantize", "int8",
                                         "--dtype", "fp32"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "--quantize int8 would replace its torch.float32 weights in place" in done.stderr


def test_generate_script_quantize_int8():
    """The script's text is, token for token, what the library generates with the int8 model."""
    from gemma2.tokenizer import Tokenizer

    teacher = ROOT / "checkpoints" / "tiny-teacher"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint", str(teacher),
                           "--quantize", "int8", "--dtype", "bf16", "--prompt", "The with statement",
                           "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    tok = Tokenizer(teacher / "tokenizer.model")
    model = load_model(teacher, dtype=torch.bfloat16, quantize="int8")
    assert isinstance(model.model.layers[0].mlp.up_proj, Int8Linear)
    ids = torch.tensor([tok.encode("The with statement")])
    out = generate(model, ids, max_new_tokens=8, stop_token_ids=(tok.eos_id,), pad_id=tok.pad_id)
    assert done.stdout == tok.decode(out[0, ids.shape[1] :]) + "\n"
    assert "decode:" in done.stderr


# Quality on the shipped tiny teacher and the built-in held-out split.


@pytest.mark.slow
def test_int8_tiny_teacher_quality():
    from gemma2.data import load_datasets
    from gemma2.demo import TEACHER_DIR, load_teacher

    fp32, tokenizer = load_teacher()
    int8 = load_model(TEACHER_DIR, quantize="int8")
    heldout = load_datasets(None, tokenizer, fp32.config.max_position_embeddings).heldout
    batch = heldout.batch(range(len(heldout)))

    def run(model):
        hidden = []
        hooks = [layer.register_forward_hook(lambda m, i, o: hidden.append(o)) for layer in model.model.layers]
        with torch.no_grad():
            logits = model(batch.inputs)
        for h in hooks:
            h.remove()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        return nll.exp().item(), logits.argmax(-1), hidden

    ppl32, top32, hidden32 = run(fp32)
    ppl8, top8, hidden8 = run(int8)
    agree = (top8 == top32).float().mean().item()
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(hidden8, hidden32)]
    print(f"\nheld-out tokens {batch.targets.numel()}: fp32 ppl {ppl32:.3f}, int8 ppl {ppl8:.3f} "
          f"({ppl8 / ppl32 - 1:+.3%}); greedy agreement {agree:.2%}; hidden relative error per layer "
          + ", ".join(f"{e:.4f}" for e in errors))  # fmt: skip
    assert abs(ppl8 / ppl32 - 1) <= 0.01
    assert agree >= 0.98


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_on_cuda_equals_the_reference():
    q = torch.randint(-127, 128, (512, 256), dtype=torch.int8, device="cuda")
    s = (torch.rand(512, device="cuda") / 100).to(torch.bfloat16)
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    want = (x.double() @ (q.double() * s.double()[:, None]).T).float()
    got = int8_matmul(x, q, s)
    assert (got.float() - want).norm() / want.norm() < 1e-2  # bf16 accumulation on the GPU
    model = quantize_model(random_model()).to("cuda")
    prompt = torch.randint(3, 300, (1, 5), device="cuda")
    assert generate(model, prompt, max_new_tokens=4).shape == (1, 9)
