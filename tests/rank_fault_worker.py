"""`python -m ptrain` with one rank's view of the world changed, as on a node that differs from the others:
- PTRAIN_FAULT_FILE: decoding a file whose name contains it fails with an OSError (EIO) on rank PTRAIN_FAULT_RANK only
  (a transient error on network storage, a node whose copy of the data lacks the file); ptrain's decoder is
  untouched for every other file;
- PTRAIN_RANK_CWD: rank PTRAIN_FAULT_RANK starts in this folder, so a relative --output_dir names another folder
  there (a node-local path on a second node);
- PTRAIN_FAULT_STEP: the training step's loss raises a RuntimeError at that step on rank PTRAIN_FAULT_RANK (a bug or
  an unexpected input deep in a model)."""

import errno
import os
import sys

if os.environ.get("RANK", "0") == os.environ["PTRAIN_FAULT_RANK"]:
    if os.environ.get("PTRAIN_FAULT_FILE"):
        import ptrain.data as data

        real = data.load_clip

        def load_clip(path, *args, **kwargs):
            if os.environ["PTRAIN_FAULT_FILE"] in str(path):
                raise OSError(errno.EIO, "Input/output error (injected)", str(path))
            return real(path, *args, **kwargs)

        data.load_clip = load_clip
    if os.environ.get("PTRAIN_FAULT_STEP"):
        import ptrain.step as step

        real_loss, calls = step.TrainStep.loss, []

        def loss(self, prepared):
            calls.append(1)
            if len(calls) == int(os.environ["PTRAIN_FAULT_STEP"]):
                raise RuntimeError("injected failure in the training step")
            return real_loss(self, prepared)

        step.TrainStep.loss = loss
    if os.environ.get("PTRAIN_RANK_CWD"):
        os.makedirs(os.environ["PTRAIN_RANK_CWD"], exist_ok=True)
        os.chdir(os.environ["PTRAIN_RANK_CWD"])

from ptrain.__main__ import main  # noqa: E402

sys.exit(main())
