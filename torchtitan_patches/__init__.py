"""Train hydra_titan's models inside upstream torchtitan 0.3.0 (DESIGN §11).

Nothing in torchtitan is edited. torchtitan finds this package through its
own config registry (``--module torchtitan_patches --config hydra_debug``);
the configs it returns name a ``HydraTrainer`` (torchtitan's Trainer plus the
model's auxiliary losses), a ModelSpec whose model is one of hydra_titan's
(``HydraTitanModel``) and whose parallelize function is hydra_titan's, and
hydra_titan's tokenizer and dataloader behind torchtitan's interfaces. See
README.md in this folder for the commands and what is and is not bridged.
"""

from __future__ import annotations

from importlib import metadata

TORCHTITAN_VERSION = "0.3.0"  # the release this bridge is written and tested against


def _check_torchtitan() -> None:
    try:
        found = metadata.version("torchtitan")
    except metadata.PackageNotFoundError:
        raise ImportError(f"torchtitan_patches needs torchtitan {TORCHTITAN_VERSION}: pip install -e '.[torchtitan]' "
                          "(pin torch in the same command so pip keeps your torch build)") from None
    if found != TORCHTITAN_VERSION:
        raise ImportError(f"torchtitan_patches is written for torchtitan {TORCHTITAN_VERSION}, found {found}: "
                          f"pip install 'torchtitan=={TORCHTITAN_VERSION}'")


_check_torchtitan()
