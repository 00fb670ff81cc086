"""The main job out of the box: distil a small Gemma 2 student from the shipped tiny teacher, train
the identical student from scratch on the same tokens and steps, and compare them.

    python scripts/demo.py              # ~5 min on 2 CPU cores
    python scripts/demo.py --quick      # seconds: checks that everything runs, compares nothing

Prints held-out perplexity, parameters and wall time for the teacher and both students, and each
student's acceptance rate as the teacher's speculative draft (k = 4, greedy, held-out prompts); says
whether distillation won, and shows a greedy sample from each for the same prompt. Writes
OUT/results.json, OUT/curves.png (held-out loss against steps) and each student's checkpoint
(OUT/distilled/step-*, OUT/scratch/step-*). A rerun replaces a previous demo's outputs and refuses,
before training, anything else in their way (a file of yours in OUT/distilled). Library: gemma2.demo.
"""

import argparse
import dataclasses

from gemma2.cli import add_threads_option, run_cli, set_threads
from gemma2.demo import QUICK, TEACHER_DIR, DemoConfig, report, run


def main() -> int:
    default = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where results.json, curves.png and checkpoints go")
    p.add_argument("--teacher", default=str(TEACHER_DIR), help="teacher model directory (default: the shipped one)")
    p.add_argument("--quick", action="store_true", help=f"a {QUICK.steps}-step smoke run (for CI)")
    p.add_argument("--steps", type=int, help=f"optimizer steps per student (default {default.steps})")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default {default.batch_size})")
    p.add_argument("--lr-distilled", type=float, help=f"peak learning rate (default {default.lr_distilled})")
    p.add_argument("--lr-scratch", type=float, help=f"peak learning rate (default {default.lr_scratch})")
    p.add_argument("--temperature", type=float, help=f"KD temperature (default {default.temperature})")
    p.add_argument("--alpha", type=float, help=f"KD weight of the distilled student (default {default.alpha})")
    p.add_argument("--seed", type=int, help=f"initial weights and data order of both students (default {default.seed})")
    p.add_argument("--prompt", help=f"prompt of the greedy samples (default {default.prompt!r})")
    add_threads_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args()
    set_threads(args.threads)
    cfg = QUICK if args.quick else default
    names = ("steps", "batch_size", "lr_distilled", "lr_scratch", "temperature", "alpha", "seed", "prompt")
    given = {k: getattr(args, k) for k in names}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})

    results = run(cfg, args.out, teacher_dir=args.teacher, progress=not args.no_progress)
    print()
    print(report(results))
    if args.quick:
        print(f"(--quick: a {cfg.steps}-step smoke run, too short for the verdict to mean anything; "
              "run without --quick for the comparison)")
    print(f"\nwrote {args.out}/results.json", end="")
    if results["curves_png"]:
        print(f" and {results['curves_png']}")
    else:
        print("; no curves.png: matplotlib is not installed (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    run_cli(main)
