"""Entry point for `torchrun --nproc_per_node=N train.py --config train_configs/<flavor>.toml`."""

from hydra_titan.train import main

if __name__ == "__main__":
    main()
