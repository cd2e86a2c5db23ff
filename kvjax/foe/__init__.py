"""Federation of Experts (arXiv 2605.06206): a clustered MoE transformer block whose expert
all-to-all stays inside a cluster, with a standard global-expert-parallel MoE baseline,
both written with `shard_map` over a (cluster, expert) mesh, plus HLO collective analysis
and an alpha-beta latency model."""

from kvjax.foe.blocks import (foe_block_reference, foe_param_specs, init_foe_params,
                              init_moe_params, make_foe_block, make_moe_block,
                              moe_block_reference, moe_param_specs, shard_foe_inputs,
                              shard_moe_inputs)
from kvjax.foe.config import FoEConfig, MoEConfig, expert_capacity
from kvjax.foe.mesh import CLUSTER_AXIS, EXPERT_AXIS, make_foe_mesh

__all__ = [
    "CLUSTER_AXIS", "EXPERT_AXIS", "FoEConfig", "MoEConfig", "expert_capacity",
    "foe_block_reference", "foe_param_specs", "init_foe_params", "init_moe_params",
    "make_foe_block", "make_foe_mesh", "make_moe_block", "moe_block_reference",
    "moe_param_specs", "shard_foe_inputs", "shard_moe_inputs",
]
