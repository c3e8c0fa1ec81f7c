"""The `ptrain` console script: `ptrain FLAGS` trains (= `python -m ptrain FLAGS`), `ptrain plan ...` runs the memory
planner (= `python -m ptrain.planner ...`), `ptrain dry-run FLAGS` checks a run without training
(= `python -m ptrain --dry_run FLAGS`). Several processes: `torchrun --nproc_per_node N --no-python ptrain FLAGS`
or, as before, `torchrun --nproc_per_node N -m ptrain FLAGS`."""

from __future__ import annotations

import sys

USAGE = """usage: ptrain [train] FLAGS | ptrain dry-run FLAGS | ptrain plan --model_dir DIR [...] [-- FLAGS]

Fine-tune video diffusion transformers (LoRA / full fine-tune, FSDP2, context parallel) with torchrun.

commands:
  train      train (the default: `ptrain FLAGS` = `python -m ptrain FLAGS`); `ptrain train --help` lists every flag
  dry-run    validate the config, parallel degrees and data, print a summary, exit (`python -m ptrain --dry_run`)
  plan       simulate the per-GPU peak memory of a run on fake tensors, no GPU (`python -m ptrain.planner`)

several processes: torchrun --nproc_per_node N --no-python ptrain FLAGS   (or torchrun ... -m ptrain FLAGS)
tiny checkpoints and synthetic videos for a demo: python -m ptrain.testing.tiny --help
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "--help"
    if command in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if command == "plan":
        from ptrain.planner import main as plan

        plan(argv[1:])
        return 0
    from ptrain.__main__ import main as train

    if command == "dry-run":
        return train(["--dry_run", *argv[1:]])
    if command == "train":
        argv = argv[1:]
    return train(argv)


if __name__ == "__main__":
    sys.exit(main())
