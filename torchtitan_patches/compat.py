"""What torchtitan 0.3.0 needs from torch that torch 2.13 names differently.

torchtitan 0.3.0 was validated on torch 2.14. On 2.13 one call is missing:
after the first step its trainer shortens the process-group timeouts with
``torch.distributed.set_timeout``, public only since 2.14. torch 2.13 has the
same operation as ``distributed_c10d._set_pg_timeout(timeout, group)``;
:func:`provide_set_timeout` makes it reachable under the 2.14 name, so a run
does not stop with an AttributeError after step 1. Nothing changes on a torch
that has the call.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed import distributed_c10d


def provide_set_timeout() -> bool:
    """Alias ``torch.distributed.set_timeout`` to 2.13's ``_set_pg_timeout`` if it is missing; True if it was."""
    if hasattr(dist, "set_timeout"):
        return False
    dist.set_timeout = distributed_c10d._set_pg_timeout
    return True
