"""HLO collective parsing and the alpha-beta latency model."""

import math

import pytest

from kvjax.foe import hlo, latency

COMPILED_LINES = """
  %psum.5 = f32[2,8,32]{2,1,0} all-reduce(%x), channel_id=1, replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add
  %all-to-all = (bf16[2,4,32]{2,1,0}, bf16[2,4,32]{2,1,0}) all-to-all(%a, %b), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %ag = f32[8,16]{1,0} all-gather(%y), channel_id=3, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}
  %rs-start = f32[4]{0} reduce-scatter(%z), channel_id=4, replica_groups={}, dimensions={0}
  %cp = s8[128]{0} collective-permute(%w), channel_id=5, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %ars = f32[16]{0} all-reduce-start(%v), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %ard = f32[16]{0} all-reduce-done(%ars)
  %add.1 = f32[16]{0} add(%p, %q)
"""
LOWERED_LINE = ("  all_to_all.10 = bf16[8,10,256]{2,1,0} all-to-all(reshape.16), channel_id=1, "
                "replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}")


def test_parses_every_collective_with_groups_and_bytes():
  ops = hlo.collectives(COMPILED_LINES, num_devices=8)
  assert [op.kind for op in ops] == ["all-reduce", "all-to-all", "all-gather", "reduce-scatter",
                                     "collective-permute", "all-reduce"]
  ar, a2a, ag, rs, cp, ars = ops
  assert ar.groups == ((0, 4), (1, 5), (2, 6), (3, 7)) and ar.bytes_per_device == 2 * 8 * 32 * 4
  assert a2a.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
  assert a2a.bytes_per_device == 2 * (2 * 4 * 32 * 2)  # tuple of two bf16 parts
  # [4,2]<=[2,4]T(1,0): iota(8) as 2x4, transposed to 4x2, rows are the groups.
  assert ag.groups == ((0, 4), (1, 5), (2, 6), (3, 7))
  assert rs.groups == (tuple(range(8)),)  # empty replica_groups = all devices
  assert cp.groups == ((0, 1), (1, 2), (2, 3), (3, 0)) and cp.bytes_per_device == 128
  assert ars.is_async and ars.bytes_per_device == 64


def test_lowered_module_syntax_and_cluster_crossing():
  (op,) = hlo.collectives(LOWERED_LINE, 8)
  assert op.kind == "all-to-all" and op.bytes_per_device == 8 * 10 * 256 * 2
  rows = hlo.table_rows([op], expert_axis_size=4)
  assert rows[0]["crosses_clusters"] is False
  rows = hlo.table_rows([op], expert_axis_size=2)  # 4 clusters of 2: {0..3} spans two
  assert rows[0]["crosses_clusters"] is True
  assert "all-to-all" in hlo.markdown_table(rows)


LINK = latency.LinkModel(gpus_per_node=8, intra_bandwidth=900e9, inter_bandwidth=50e9,
                         intra_latency=2e-6, inter_latency=8e-6)


def test_all_to_all_cost_inside_and_across_nodes():
  n = 64e6
  inside = latency.group_time("all-to-all", range(4), n, LINK)
  assert inside == pytest.approx(3 * 2e-6 + n * 3 / 4 / 900e9)
  # 16 devices on two nodes: 7/16 of the bytes stay on NVLink, 8/16 cross InfiniBand.
  across = latency.group_time("all-to-all", range(16), n, LINK)
  assert across == pytest.approx(15 * 8e-6 + max(n * 7 / 16 / 900e9, n * 8 / 16 / 50e9))
  assert across > 10 * inside


def test_all_reduce_cost_flat_and_hierarchical():
  n = 8e6
  # One GPU per node: a ring over InfiniBand.
  one_per_node = latency.group_time("all-reduce", [0, 8, 16, 24], n, LINK)
  assert one_per_node == pytest.approx(2 * (3 * 8e-6 + 3 / 4 * n / 50e9))
  # Two GPUs on each of 4 nodes: intra reduce-scatter + inter all-reduce of n/2 + all-gather.
  hier = latency.group_time("all-reduce", [0, 1, 8, 9, 16, 17, 24, 25], n, LINK)
  intra = 1 * 2e-6 + 1 / 2 * n / 900e9
  inter = 2 * (3 * 8e-6 + 3 / 4 * (n / 2) / 50e9)
  assert hier == pytest.approx(2 * intra + inter)
  assert latency.group_time("all-reduce", [3], n, LINK) == 0.0


def test_layer_time_sums_ops_and_takes_slowest_group():
  ops = hlo.collectives(COMPILED_LINES, 8)
  t = latency.layer_time(ops, LINK)
  assert t["total"] == pytest.approx(sum(v for k, v in t.items() if k != "total"))
  slow = latency.collective_time(ops[0], latency.LinkModel(gpus_per_node=4))
  fast = latency.collective_time(ops[0], latency.LinkModel(gpus_per_node=8))
  assert slow > fast  # {0,4} crosses nodes of 4 GPUs, not nodes of 8
  assert latency.cross_node_bytes(ops[:1], 4) == ops[0].bytes_per_device
  assert latency.cross_node_bytes(ops[:1], 8) == 0


@pytest.mark.parametrize("kwargs,match", [(dict(gpus_per_node=0), "gpus_per_node"),
                                          (dict(inter_bandwidth=0), "inter_bandwidth"),
                                          (dict(intra_latency=-1), "intra_latency")])
def test_link_model_rejects_bad_figures(kwargs, match):
  with pytest.raises(ValueError, match=match):
    latency.LinkModel(**kwargs)


def test_unknown_kind_is_an_error():
  with pytest.raises(ValueError, match="unknown collective kind"):
    latency.group_time("broadcast", [0, 1], 1.0, LINK)
  assert math.isfinite(latency.group_time("collective-permute", (0, 9), 1e6, LINK))
