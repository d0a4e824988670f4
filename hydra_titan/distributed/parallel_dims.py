"""Data-parallel layout: dp_replicate x dp_shard ranks, and its device mesh.

dp_shard ranks share one FSDP2 shard group; dp_replicate > 1 makes it HSDP
(replicas of a sharded model, gradients all-reduced across replicas). Every
rank is a data-parallel rank, so the data shard of a rank is its global rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, world_size: int) -> "ParallelDims":
        """Fill dp_shard = -1 with what is left of the world and check the product."""
        if dp_replicate < 1:
            raise ValueError(f"parallelism.dp_replicate must be >= 1, got {dp_replicate}")
        if dp_shard == -1:
            if world_size % dp_replicate:
                raise ValueError(f"world size {world_size} is not divisible by parallelism.dp_replicate "
                                 f"({dp_replicate})")
            dp_shard = world_size // dp_replicate
        if dp_shard < 1 or dp_replicate * dp_shard != world_size:
            raise ValueError(f"parallelism.dp_replicate ({dp_replicate}) x parallelism.dp_shard ({dp_shard}) "
                             f"must equal the world size ({world_size})")
        return cls(dp_replicate, dp_shard)

    @property
    def dp_world_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """2-D mesh (dp_replicate, dp_shard); FSDP gets both dims for HSDP, else dp_shard."""
        return init_device_mesh(device_type, (self.dp_replicate, self.dp_shard),
                                mesh_dim_names=("dp_replicate", "dp_shard"))

    def fsdp_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        return mesh if self.hsdp else mesh["dp_shard"]
