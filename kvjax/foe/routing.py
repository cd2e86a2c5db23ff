"""Top-k routing with expert capacity, token dispatch/combine and the router's auxiliary losses.

Conventions (shared by the sharded blocks and their single-device references):

* Routing happens per *dispatch group*: the tokens that live on one device. Capacity is
  counted per (group, expert): `C = expert_capacity(tokens_in_group, top_k, experts, cf)`.
* Gates are the softmax probabilities of the chosen experts, not renormalized over the top-k
  (Switch/GShard style), so the router gets a gradient even with top_k = 1.
* Priority for capacity slots: all first choices of a group, in token order, then all second
  choices, and so on. An assignment whose slot index is >= C is *dropped*: that expert's
  contribution for that token is zero, and the token keeps only its residual (and its other,
  kept, choices).
* Load-balancing loss (Switch Transformer): `E * sum_e f_e * P_e` with f_e the fraction of
  top-k assignments (before dropping) that chose expert e and P_e the mean router
  probability of e, both over all tokens of the batch. Router z-loss (ST-MoE):
  mean over tokens of logsumexp(logits)^2.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Routing:
  """Top-k routing of one dispatch group of N tokens among E experts (k choices each).

  Attributes:
    expert_index: int32 [N, k], chosen experts, best first.
    gate: float32 [N, k], router probability of each chosen expert.
    slot: int32 [N, k], position in the expert's capacity buffer; equals E * C (out of
      range) for dropped assignments.
    kept: bool [N, k], False for assignments dropped by the capacity limit.
    probs: float32 [N, E], full router softmax.
    logits: float32 [N, E].
  """

  expert_index: jax.Array
  gate: jax.Array
  slot: jax.Array
  kept: jax.Array
  probs: jax.Array
  logits: jax.Array


jax.tree_util.register_dataclass(
    Routing, data_fields=["expert_index", "gate", "slot", "kept", "probs", "logits"],
    meta_fields=[])


def route(logits: jax.Array, top_k: int, capacity: int) -> Routing:
  """Top-k routing with capacity for one dispatch group.

  Args:
    logits: [N, E] router logits of the group's tokens (any float dtype; computed in f32).
    top_k: experts per token, 1 <= top_k <= E.
    capacity: slots per expert, >= 1.

  Returns:
    A `Routing`; `slot` indexes a flattened [E * capacity] buffer (expert-major).
  """
  if logits.ndim != 2:
    raise ValueError(f"logits must be [tokens, experts], got shape {logits.shape}")
  num_tokens, num_experts = logits.shape
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
  if capacity < 1:
    raise ValueError(f"capacity must be >= 1, got {capacity}")
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  gate, expert_index = lax.top_k(probs, top_k)  # [N, k]
  # Choice-major order: every token's first choice claims a slot before any second choice.
  choice_major = jax.nn.one_hot(expert_index.T.reshape(-1), num_experts, dtype=jnp.int32)
  position = jnp.cumsum(choice_major, axis=0) - 1  # [k*N, E], rank within each expert
  position = jnp.sum(position * choice_major, axis=-1).reshape(top_k, num_tokens).T  # [N, k]
  kept = position < capacity
  slot = jnp.where(kept, expert_index * capacity + position, num_experts * capacity)
  return Routing(expert_index=expert_index, gate=gate, slot=slot.astype(jnp.int32), kept=kept,
                 probs=probs, logits=logits)


def dispatch(x: jax.Array, routing: Routing, num_experts: int, capacity: int) -> jax.Array:
  """Copies each token into its experts' capacity buffers.

  Args:
    x: [N, D] tokens of one dispatch group.
    routing: from `route`.

  Returns:
    [E, capacity, D]; unused slots are zero.
  """
  num_tokens, top_k = routing.slot.shape
  sources = jnp.broadcast_to(x[:, None, :], (num_tokens, top_k, x.shape[-1]))
  buffer = jnp.zeros((num_experts * capacity, x.shape[-1]), x.dtype)
  # Slots are unique per kept assignment; dropped ones point past the end and are discarded.
  buffer = buffer.at[routing.slot.reshape(-1)].set(sources.reshape(-1, x.shape[-1]),
                                                   mode="drop", unique_indices=True)
  return buffer.reshape(num_experts, capacity, x.shape[-1])


def combine(expert_out: jax.Array, routing: Routing) -> jax.Array:
  """Gathers expert outputs back to tokens, weighted by their gates.

  Args:
    expert_out: [E, capacity, D] outputs in the slots `dispatch` filled.
    routing: from `route`.

  Returns:
    [N, D]: sum over kept choices of gate * expert output; zero for fully dropped tokens.
  """
  num_experts, capacity, width = expert_out.shape
  flat = expert_out.reshape(num_experts * capacity, width)
  picked = jnp.take(flat, routing.slot, axis=0, mode="fill", fill_value=0)  # [N, k, D]
  weight = jnp.where(routing.kept, routing.gate, 0.0).astype(picked.dtype)
  return jnp.einsum("nkd,nk->nd", picked, weight)


@dataclasses.dataclass(frozen=True)
class RouterStats:
  """Per-group router statistics, means over the group's tokens (combine across groups by
  averaging, then form the losses with `router_losses`).

  Attributes:
    assignment_fraction: [E], fraction of the group's top-k assignments (before dropping)
      that went to each expert; sums to 1.
    mean_prob: [E], mean router probability of each expert.
    mean_sq_logsumexp: [], mean over tokens of logsumexp(logits)^2.
    dropped_fraction: [], fraction of assignments dropped by the capacity limit.
  """

  assignment_fraction: jax.Array
  mean_prob: jax.Array
  mean_sq_logsumexp: jax.Array
  dropped_fraction: jax.Array


jax.tree_util.register_dataclass(
    RouterStats, data_fields=["assignment_fraction", "mean_prob", "mean_sq_logsumexp",
                              "dropped_fraction"], meta_fields=[])


def router_stats(routing: Routing) -> RouterStats:
  num_experts = routing.probs.shape[-1]
  counts = jnp.sum(jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.float32),
                   axis=(0, 1))
  return RouterStats(
      assignment_fraction=counts / routing.expert_index.size,
      mean_prob=jnp.mean(routing.probs, axis=0),
      mean_sq_logsumexp=jnp.mean(jax.nn.logsumexp(routing.logits, axis=-1) ** 2),
      dropped_fraction=jnp.mean(jnp.logical_not(routing.kept).astype(jnp.float32)))


def router_losses(stats: RouterStats) -> tuple[jax.Array, jax.Array]:
  """(load_balancing_loss, z_loss) from statistics already averaged over all tokens.

  `stats` fields may carry leading axes (e.g. one row per cluster); the losses are averaged
  over them. The balanced optimum of the load-balancing loss is 1.
  """
  num_experts = stats.mean_prob.shape[-1]
  balance = num_experts * jnp.sum(stats.assignment_fraction * stats.mean_prob, axis=-1)
  return jnp.mean(balance), jnp.mean(stats.mean_sq_logsumexp)


def swiglu_experts(x: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array) -> jax.Array:
  """Applies E SwiGLU experts to their buffers.

  Args:
    x: [E, S, D] slots per expert.
    w_gate, w_up: [E, D, F].
    w_down: [E, F, D].

  Returns:
    [E, S, D].
  """
  hidden = jax.nn.silu(jnp.einsum("esd,edf->esf", x, w_gate)) * jnp.einsum(
      "esd,edf->esf", x, w_up)
  return jnp.einsum("esf,efd->esd", hidden, w_down)


def moe_layer(x: jax.Array, router: jax.Array, w_gate: jax.Array, w_up: jax.Array,
              w_down: jax.Array, *, top_k: int, capacity: int,
              expert_axis: str | Sequence[str] | None = None) -> tuple[jax.Array, RouterStats]:
  """Routes one dispatch group of tokens to experts and back.

  Args:
    x: [N, D] tokens of this group (this device's tokens when sharded).
    router: [D, E] router weights over all E experts of the pool.
    w_gate, w_up: [E_local, D, F]; w_down: [E_local, F, D]. Without `expert_axis`,
      E_local = E. With it, the pool is split into equal contiguous blocks across the devices
      of `expert_axis` (device i holds experts [i * E_local, (i + 1) * E_local)).
    top_k, capacity: routing parameters (capacity per expert for this group).
    expert_axis: mesh axis name(s), inside `shard_map`, over which the experts are split;
      two all-to-alls over exactly these axes move tokens to their experts and back.

  Returns:
    ([N, D] gate-weighted expert outputs, this group's `RouterStats`).
  """
  num_experts = router.shape[-1]
  routing = route(jnp.einsum("nd,de->ne", x, router), top_k, capacity)
  buffers = dispatch(x, routing, num_experts, capacity)  # [E, C, D]
  if expert_axis is not None:
    # [E, C, D] -> [E_local, shards * C, D]: each device receives its experts' slots from
    # every device of the axis.
    buffers = lax.all_to_all(buffers, expert_axis, split_axis=0, concat_axis=1, tiled=True)
  out = swiglu_experts(buffers, w_gate, w_up, w_down)
  if expert_axis is not None:
    out = lax.all_to_all(out, expert_axis, split_axis=1, concat_axis=0, tiled=True)
  return combine(out, routing), router_stats(routing)
