"""`python -m ptrain` with a read error injected on one rank: decoding the file whose name contains
PTRAIN_FAULT_FILE fails with an OSError (EIO) on rank PTRAIN_FAULT_RANK only, as a transient error on network storage
or a node whose copy of the data lacks the file would. The decoder itself is ptrain's, untouched for every other file."""

import errno
import os
import sys

if os.environ.get("RANK", "0") == os.environ["PTRAIN_FAULT_RANK"]:
    import ptrain.data as data

    real = data.load_clip

    def load_clip(path, *args, **kwargs):
        if os.environ["PTRAIN_FAULT_FILE"] in str(path):
            raise OSError(errno.EIO, "Input/output error (injected)", str(path))
        return real(path, *args, **kwargs)

    data.load_clip = load_clip

from ptrain.__main__ import main  # noqa: E402

sys.exit(main())
