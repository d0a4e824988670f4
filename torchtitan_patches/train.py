"""``python -m torchtitan_patches.train --config hydra_debug [torchtitan flags]``: torchtitan's own main.

The same run as ``torchrun ... -m torchtitan.train --module torchtitan_patches
--config hydra_debug``, with three conveniences:

* ``--module torchtitan_patches`` is implied;
* started without torchrun, it is a one-process run: torchtitan needs
  torchrun's environment (``LOCAL_RANK``, a rendezvous address), so a free
  local port and rank 0 of 1 are filled in;
* it leaves through ``os._exit`` after torchtitan's own teardown: gloo worker
  threads can abort an interpreter at exit after all work is done (see
  ``hydra_titan.distributed.shutdown_and_exit``), which would turn a finished
  CPU run into exit status 134.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from hydra_titan.distributed import shutdown_and_exit

logger = logging.getLogger(__name__)


def _single_process_env() -> None:
    """torchrun's variables for a lone process (only those torchrun would have set)."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--module" or a.startswith("--module=") for a in args):
        args = ["--module", "torchtitan_patches", *args]
    _single_process_env()
    from torchtitan import train as titan_train  # after the env: torchtitan reads it at start-up

    sys.argv = [sys.argv[0], *args]
    try:
        titan_train.main()
    except SystemExit as e:  # tyro's --help (0) and bad flags (2) exit through here
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    except Exception:
        logger.exception("training failed")
        return 1
    return 0


if __name__ == "__main__":
    shutdown_and_exit(main())
