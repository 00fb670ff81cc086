"""Tokenize a corpus, or a prompt dataset, once into a token file that every training rank memory-maps.

    python scripts/tokenize_data.py --tokenizer checkpoints/gemma-2-9b/tokenizer.model \
        --data corpus/ --out data/corpus.npy --workers 8
    torchrun --nproc-per-node 8 scripts/distill.py --data data/corpus.npy ...

    python scripts/tokenize_data.py --tokenizer ... --prompts chats.jsonl --out data/chats.npy --workers 8
    torchrun --nproc-per-node 8 scripts/distill.py --prompts data/chats.npy --max-new-tokens 256 ...

--data takes .txt files (one document each), .jsonl ('text' per line), Parquet files (the column
--text-column; needs pip install -e '.[data]') or directories of them. --prompts takes .jsonl prompt
datasets (gemma2/prompts.py: {"messages": [...]} or {"prompt": ..., "completion": ...} per line);
their rows' layout (--prompt-len, --max-new-tokens) is chosen when training, not here. Writes OUT
(int32 tokens: training items then held-out ones) and its sidecar OUT with .json (tokenizer
fingerprint, counts, split). It writes in OUT with .partial (a directory beside OUT) until done: a
killed run leaves nothing that scripts/distill.py accepts, and the same command again continues it:
it reads the data again but tokenizes only what the killed run had not recorded (it records at most
once a second), and writes the file an uninterrupted run writes.
Library: gemma2.token_writer.write_token_file.
"""

import argparse
import sys

from gemma2.cli import run_cli
from gemma2.data_args import check_heldout
from gemma2.token_files import sidecar_path
from gemma2.token_writer import interrupted, write_token_file
from gemma2.tokenizer import Tokenizer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model (the one training will use)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", metavar="PATH", help=".txt, .jsonl, .parquet files or directories")
    source.add_argument("--prompts", nargs="+", metavar="PATH", help=".jsonl prompt datasets (gemma2/prompts.py)")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--eval-data", nargs="+", metavar="PATH", help="held-out documents (default: split from --data)")
    held.add_argument("--eval-prompts", nargs="+", metavar="PATH",
                      help="held-out prompt datasets (default: split from --prompts)")
    p.add_argument("--holdout-fraction", type=float, default=None,
                   help="documents or examples held out by hash (default 0.02; not with --eval-data/--eval-prompts)")
    p.add_argument("--text-column", default="text", help="Parquet column holding the text (default: text)")
    p.add_argument("--out", required=True, help="token file to write, NAME.npy (sidecar: NAME.json)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing token file")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args()


def main(args: argparse.Namespace) -> int:
    prompts = args.prompts is not None
    if (args.eval_prompts if not prompts else args.eval_data) is not None:
        raise ValueError("held-out prompts (--eval-prompts) go with --prompts, held-out documents (--eval-data) "
                         "with --data")  # fmt: skip
    eval_paths = args.eval_prompts if prompts else args.eval_data
    check_heldout(eval_paths, args.holdout_fraction)
    info = write_token_file(
        args.prompts if prompts else args.data, Tokenizer(args.tokenizer), args.out,
        holdout_fraction=0.02 if args.holdout_fraction is None else args.holdout_fraction, eval_paths=eval_paths,
        text_column=args.text_column, prompts=prompts, workers=args.workers, overwrite=args.overwrite,
        progress=not args.no_progress,
    )  # fmt: skip
    unit = "examples" if prompts else "documents"
    items, tokens = info[unit], info["tokens"]

    def count(split: str) -> str:
        return f"{items[split]:,} {unit if items[split] != 1 else unit[:-1]}"

    print(f"wrote {args.out} and {sidecar_path(args.out)}: {tokens['train']:,} training tokens ({count('train')}), "
          f"{tokens['heldout']:,} held-out tokens ({count('heldout')})", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    arguments = parse_args()
    run_cli(lambda: main(arguments), on_interrupt=lambda: interrupted(arguments.out))
