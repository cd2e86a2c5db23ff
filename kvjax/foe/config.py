"""Configurations of the Federation-of-Experts block and of its standard-MoE baseline, as data."""

from __future__ import annotations

import dataclasses
import math


def _check_positive_int(owner: str, name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


def _check_common(owner: str, cfg) -> None:
  for name in ("d_model", "num_q_heads", "num_kv_heads", "head_dim", "d_ff"):
    _check_positive_int(owner, name, getattr(cfg, name))
  if cfg.num_q_heads % cfg.num_kv_heads:
    raise ValueError(f"{owner}.num_q_heads={cfg.num_q_heads} must be a multiple of "
                     f"num_kv_heads={cfg.num_kv_heads} (grouped-query attention)")
  if cfg.head_dim % 2:
    raise ValueError(f"{owner}.head_dim must be even for rotary embeddings, got {cfg.head_dim}")
  if not (isinstance(cfg.capacity_factor, (int, float)) and cfg.capacity_factor > 0):
    raise ValueError(f"{owner}.capacity_factor must be a positive number, got "
                     f"{cfg.capacity_factor!r}")
  if cfg.rope_theta <= 0:
    raise ValueError(f"{owner}.rope_theta must be positive, got {cfg.rope_theta!r}")


@dataclasses.dataclass(frozen=True)
class FoEConfig:
  """One Federation-of-Experts transformer block (attention + clustered MoE).

  The block has `num_clusters` clusters. Cluster c owns KV head c with its
  `num_q_heads // num_kv_heads` query heads, its own residual stream, its own router and
  its own `experts_per_cluster` experts; each token picks `top_k` experts inside every
  cluster. So a token activates `num_clusters * top_k` experts in all, and the block holds
  `num_clusters * experts_per_cluster` experts.

  Attributes:
    d_model: residual width.
    num_q_heads: query heads in all clusters together.
    num_kv_heads: KV heads; FoE needs exactly one per cluster.
    head_dim: channels per head.
    num_clusters: clusters; must equal `num_kv_heads`.
    experts_per_cluster: experts owned by each cluster.
    top_k: experts each token is routed to inside each cluster.
    d_ff: hidden width of one SwiGLU expert.
    capacity_factor: slots per expert per dispatch group =
      ceil(capacity_factor * tokens_in_group * top_k / experts_per_cluster); tokens past that
      are dropped from that expert (they keep the residual, see `kvjax.foe.routing`).
    rope_theta: rotary-embedding base.
    norm_eps: RMSNorm epsilon.
  """

  d_model: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  num_clusters: int
  experts_per_cluster: int
  top_k: int
  d_ff: int
  capacity_factor: float = 1.25
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6

  def __post_init__(self):
    _check_common("FoEConfig", self)
    _check_positive_int("FoEConfig", "num_clusters", self.num_clusters)
    _check_positive_int("FoEConfig", "experts_per_cluster", self.experts_per_cluster)
    _check_positive_int("FoEConfig", "top_k", self.top_k)
    if self.num_kv_heads != self.num_clusters:
      raise ValueError(
          f"FoEConfig.num_kv_heads={self.num_kv_heads} must equal num_clusters="
          f"{self.num_clusters}: each Federation-of-Experts cluster owns exactly one KV head")
    if self.top_k > self.experts_per_cluster:
      raise ValueError(f"FoEConfig.top_k={self.top_k} must be <= experts_per_cluster="
                       f"{self.experts_per_cluster} (top-k is taken inside each cluster)")

  @property
  def q_per_kv(self) -> int:
    return self.num_q_heads // self.num_kv_heads

  @property
  def num_experts(self) -> int:
    return self.num_clusters * self.experts_per_cluster

  def matched_baseline(self) -> "MoEConfig":
    """The standard MoE block with the same attention, experts and active experts per token."""
    return MoEConfig(d_model=self.d_model, num_q_heads=self.num_q_heads,
                     num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                     num_experts=self.num_experts, top_k=self.num_clusters * self.top_k,
                     d_ff=self.d_ff, capacity_factor=self.capacity_factor,
                     rope_theta=self.rope_theta, norm_eps=self.norm_eps)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """One standard transformer block (attention + MoE with a global top-k router).

  Attributes are as in `FoEConfig`, with `num_experts` experts in one pool and `top_k`
  experts per token chosen among all of them.
  """

  d_model: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  num_experts: int
  top_k: int
  d_ff: int
  capacity_factor: float = 1.25
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6

  def __post_init__(self):
    _check_common("MoEConfig", self)
    _check_positive_int("MoEConfig", "num_experts", self.num_experts)
    _check_positive_int("MoEConfig", "top_k", self.top_k)
    if self.top_k > self.num_experts:
      raise ValueError(f"MoEConfig.top_k={self.top_k} must be <= num_experts="
                       f"{self.num_experts}")

  @property
  def q_per_kv(self) -> int:
    return self.num_q_heads // self.num_kv_heads


def expert_capacity(tokens_per_group: int, top_k: int, num_experts: int,
                    capacity_factor: float) -> int:
  """Slots per expert for one dispatch group: ceil(cf * tokens * top_k / experts), >= 1."""
  return max(1, math.ceil(capacity_factor * tokens_per_group * top_k / num_experts))
