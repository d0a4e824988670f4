"""hydra_titan: a PyTorch-native pretraining stack for HYDRA language models."""

__version__ = "0.1.0"


def create_ccgqa_mod_mor_model(*args, **kwargs):
    """The original HYDRA entry point; see hydra_titan.models.hydra.factory."""
    from .models.hydra.factory import create_ccgqa_mod_mor_model as create

    return create(*args, **kwargs)
