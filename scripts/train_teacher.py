"""Make the shipped tiny teacher (checkpoints/tiny-teacher/) from nothing but this Python.

    python scripts/train_teacher.py --overwrite           # ~25 min on 2 CPU cores; replaces the shipped one
    python scripts/train_teacher.py --steps 20 --out runs/teacher-smoke --work runs/teacher-smoke-work   # a quick check

Steps: build the built-in corpus (gemma2.corpus), train a 4096-piece SentencePiece tokenizer on
its train split, train gemma2.config.TINY_TEACHER with plain next-token loss (alpha = 0) using
gemma2.trainer, then write the Hugging Face layout (config.json, model.safetensors,
tokenizer.model) and a README.md recording how it was made. The tokenizer, trainer checkpoints
and metrics.jsonl go to --work, which must be new or empty (--resume continues the run in it);
nothing is ever deleted, and an existing --out is replaced only with --overwrite.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from gemma2.checkpoint import save_model
from gemma2.cli import add_threads_option, run_cli, set_threads
from gemma2.config import TINY_TEACHER
from gemma2.corpus import build_corpus, corpus_fingerprint, split_corpus
from gemma2.data import split_datasets
from gemma2.files import atomic_file, write_text_atomic
from gemma2.model import Gemma2ForCausalLM
from gemma2.tokenizer import Tokenizer, train_tokenizer
from gemma2.student import init_weights
from gemma2.trainer import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/tiny-teacher", help="the model directory to write")
    p.add_argument("--work", default="runs/tiny-teacher", help="trainer checkpoints and metrics.jsonl")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    add_threads_option(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --work (its tokenizer and checkpoints)")
    p.add_argument("--overwrite", action="store_true", help="replace the model files of an existing --out")
    args = p.parse_args()
    work, out = Path(args.work), Path(args.out)
    tok_path = work / "tokenizer.model"
    # Built first: it checks the settings before any work.
    cfg = TrainConfig(
        out_dir=str(work), steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        alpha=0.0, eval_every=100, save_every=100, seed=args.seed, tokenizer_file=str(tok_path),
    )  # fmt: skip
    if args.resume and not tok_path.is_file():
        raise ValueError(f"--resume: {work} holds no tokenizer.model of an earlier run; drop --resume to start one")
    if not args.resume and work.exists() and any(work.iterdir()):
        raise ValueError(f"--work {work} is not empty; pass a new or empty directory, or --resume to continue its run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace its model files, or another --out")
    set_threads(args.threads)
    t0 = time.perf_counter()

    docs = build_corpus()
    if not args.resume:
        train_docs, _ = split_corpus(docs)  # the same split split_datasets makes below
        train_tokenizer(train_docs, tok_path, args.vocab_size)
    tokenizer = Tokenizer(tok_path)
    data = split_datasets(docs, tokenizer, args.seq_len, where="the built-in corpus")
    config = TINY_TEACHER.replace(vocab_size=tokenizer.vocab_size)
    model = init_weights(Gemma2ForCausalLM(config), seed=args.seed)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"teacher: {n_params:,} parameters; {len(data.train)} training sequences of {args.seq_len} tokens; "
          f"{args.steps} steps of {args.batch_size} sequences", file=sys.stderr)  # fmt: skip

    # overwrite: the trainer writes beside the tokenizer this script put in --work (nothing is deleted).
    metrics = train(cfg, model, data, resume=args.resume, overwrite=True)
    seconds = time.perf_counter() - t0
    final = [m for m in metrics if "eval_ce" in m][-1]

    save_model(model, out)
    with atomic_file(out / "tokenizer.model") as tmp:
        shutil.copyfile(tok_path, tmp)
    write_text_atomic(work / "final.json", json.dumps(final) + "\n")
    record = {
        "command": "python " + " ".join(sys.argv),
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "lr": args.lr, "warmup": args.warmup, "tokens": args.steps * args.batch_size * args.seq_len,
        "parameters": n_params, "corpus_fingerprint": corpus_fingerprint(docs),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "seconds": round(seconds),
        "heldout_ce": round(final["eval_ce"], 4), "heldout_ppl": round(final["eval_ppl"], 2),
    }  # fmt: skip
    write_text_atomic(out / "README.md", readme(record))
    print(f"wrote {out} in {seconds / 60:.1f} min: held-out perplexity {final['eval_ppl']:.2f}", file=sys.stderr)


def readme(r: dict) -> str:
    c = TINY_TEACHER
    return f"""# tiny-teacher

The demo teacher (`python scripts/demo.py`): a {r['parameters'] / 1e6:.2f} M-parameter model with the
Gemma 2 architecture, trained from scratch on CPython's own documentation (`gemma2.corpus`).
Not a useful language model: a teacher that is far better than what a small student learns in a
few minutes, so that distillation has something to give.

- Shape: D {c.hidden_size}, {c.num_hidden_layers} layers alternating local (window {c.sliding_window})
  and global, {c.num_attention_heads} query / {c.num_key_value_heads} KV heads of {c.head_dim}, MLP {c.intermediate_size},
  context {c.max_position_embeddings}, softcaps {c.attn_logit_softcapping} / {c.final_logit_softcapping}, vocab {c.vocab_size} (fp32).
- Tokenizer: SentencePiece BPE with Gemma's special-token layout, trained on the corpus's train
  split (`gemma2.tokenizer.train_tokenizer`).

## How it was made

```
{r['command']}
```

| | |
|---|---|
| seed | {r['seed']} |
| steps x batch x seq_len | {r['steps']} x {r['batch_size']} x {r['seq_len']} = {r['tokens']:,} tokens |
| peak lr, warmup | {r['lr']}, {r['warmup']} steps, cosine to lr / 10 |
| objective | next-token cross-entropy (alpha = 0) |
| corpus fingerprint | {r['corpus_fingerprint']} |
| torch, Python | {r['torch']}, {r['python']} |
| machine | {r['cpu_count']} CPU cores, torch on {r['threads']} thread(s) |
| wall time | {r['seconds'] / 60:.1f} min |
| held-out cross-entropy | {r['heldout_ce']} nats/token |
| held-out perplexity | {r['heldout_ppl']} |

The corpus depends on the Python version: with another one the fingerprint differs and the
held-out perplexity will too (the teacher still works).

```json
{json.dumps(r, indent=2)}
```
"""


if __name__ == "__main__":
    run_cli(main)
