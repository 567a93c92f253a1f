"""The scaling command end to end (its numbers belong to BENCHMARKS.md, never to a test), and
the collective counting it rests on, against hand-computed bytes."""

import csv
import json
import sys

import pytest

from alexnet_jax.bench import collectives

import conftest

_HLO = """
  %ag = f32[8,3,3,64]{2,1,0,3} all-gather(f32[8,3,3,32]{2,1,0,3} %x), channel_id=1, replica_groups={{0,1},{2,3}}, dimensions={3}, metadata={op_name="jit(step)/shard_map/jvp(AlexNet)/conv3/all_gather"}
  %rs = f32[8,128]{0,1} reduce-scatter(f32[8,256]{0,1} %y), channel_id=2, replica_groups=[2,2]<=[4], dimensions={1}, to_apply=%add, metadata={op_name="jit(step)/shard_map/transpose(jvp(AlexNet))/fc7/reduce_scatter"}
  %ar = (f32[100]{0}, bf16[10,10]{1,0}) all-reduce(f32[100]{0} %a, bf16[10,10]{1,0} %b), replica_groups={}, to_apply=%add
  %ags = (f32[4]{0}, f32[16]{0}) all-gather-start(f32[4]{0} %z), replica_groups={{0,1,2,3}}, dimensions={0}
  %agd = f32[16]{0} all-gather-done((f32[4]{0}, f32[16]{0}) %ags)
  %cp = f32[5]{0} collective-permute(f32[5]{0} %w), source_target_pairs={{0,1},{1,0}}
"""  # noqa: E501  (HLO lines as XLA prints them)


def test_collectives_are_counted_with_ring_bytes():
  found = collectives.collectives(_HLO, num_devices=4)
  assert [c.kind for c in found] == ['all-gather', 'reduce-scatter', 'all-reduce', 'all-gather',
                                     'collective-permute']
  ag, rs, ar, ags, cp = found
  assert (ag.group_size, ag.result_bytes, ag.layer, ag.backward) == (2, 8 * 9 * 64 * 4, 'conv3',
                                                                    False)
  assert ag.bytes_sent == 8 * 9 * 64 * 4 / 2  # half of the gathered array comes from the peer
  assert (rs.group_size, rs.full_bytes, rs.layer, rs.backward) == (2, 8 * 256 * 4, 'fc7', True)
  assert rs.bytes_sent == 8 * 128 * 4
  assert (ar.group_size, ar.result_bytes) == (4, 400 + 200)  # every device; both operands
  assert ar.bytes_sent == 2 * 600 * 3 / 4 and ar.layer == ''
  assert (ags.result_bytes, ags.bytes_sent) == (64, 48)  # the async start's result only
  assert (cp.group_size, cp.bytes_sent) == (2, 20)
  assert collectives.bytes_sent(found) == sum(c.bytes_sent for c in found)
  comm = collectives.bytes_sent(found) / 1e9 + 5 * 1e-5
  assert collectives.project(0.1, found, 1.0, latency_us=10.0) == pytest.approx(0.1 + comm)
  assert collectives.project(0.1, found, 1.0, latency_us=10.0, overlap=True) == 0.1


@pytest.mark.slow
def test_scaling_command_measures_counts_projects_and_plots(tmp_path):
  out = tmp_path / 'scaling'
  cmd = [sys.executable, '-m', 'alexnet_jax.bench.scaling', '--config=configs/tiny.py',
         '--strategies=columns', '--devices=1,2', '--project_devices=4',
         '--per_device_batch=4', '--steps=1', '--warmup=0', '--cpu_devices=4',
         '--intra_host_gb_s=2', '--latency_us=5', f'--output={out}']
  proc = conftest.run(cmd, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(x) for x in (out / 'scaling.jsonl').read_text().splitlines()]
  skipped = [r for r in lines if 'skipped' in r]
  assert [(r['parallelism'], r['devices']) for r in skipped] == [('columns', 1)]
  records = {(r['parallelism'], r['devices']): r for r in lines if 'skipped' not in r}
  # data on 1 device, the reference, is always measured.
  assert set(records) == {('data', 1), ('columns', 2), ('columns', 4)}
  base = records['data', 1]
  assert base['scaling_efficiency'] == 1.0 and base['bytes_sent'] == 0
  for key, r in records.items():
    assert r['measured'] == (key[1] < 4) and r['peak_memory_bytes'] > 0
    assert r['batch_size'] == 4 * key[1]
    # The projection: the one-device step plus the counted bytes and messages on the link.
    comm = r['bytes_sent'] / 2e9 + r['num_collectives'] * 5e-6 if key[1] > 1 else 0.0
    assert r['projected_step_ms'] == pytest.approx(base['step_ms'] + comm * 1e3)
  assert records['columns', 2]['mesh'] == [1, 2] and records['columns', 4]['mesh'] == [2, 2]
  pair, two_pairs = records['columns', 2], records['columns', 4]
  # One pair: besides activations, only metrics and fc8's whole bias are summed (bytes, not MB).
  assert 0 < pair['bytes_sent'] - pair['bytes_sent_activations'] < 200 < pair['bytes_sent']
  assert two_pairs['bytes_sent'] > two_pairs['bytes_sent_activations'] > 0
  with open(out / 'scaling.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 and rows[0]['parallelism'] == 'data' and rows[0]['devices'] == '1'
  assert (out / 'scaling.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'proj img/s' in proc.stdout and 'skipped columns on 1 devices' in proc.stdout


def test_projection_can_plan_with_a_given_one_device_step():
  from alexnet_jax.bench import scaling  # pylint: disable=g-import-not-at-top
  records = [
      {'parallelism': 'data', 'devices': 1, 'batch_size': 128, 'step_ms': 700.0,
       'train_images_per_sec': 128 / 0.7, 'bytes_sent': 0.0, 'num_collectives': 0,
       'measured': True},
      {'parallelism': 'data', 'devices': 8, 'batch_size': 1024, 'bytes_sent': 4.0e8,
       'num_collectives': 3, 'measured': False}]
  scaling.project(records, intra_host_gb_s=10.0, inter_host_gb_s=1.0, latency_us=100.0,
                  step_ms=81.0)
  # 81 ms of compute, 400 MB at 10 GB/s = 40 ms, 3 messages of 0.1 ms.
  assert records[1]['projected_step_ms'] == pytest.approx(81 + 40 + 0.3)
  assert records[1]['projected_speedup'] == pytest.approx(8 * 81 / 121.3)
  assert records[0]['scaling_efficiency'] == 1.0 and records[0]['projected_step_ms'] == 81.0


def test_bytes_between_hosts_follow_the_hierarchical_algorithms():
  ag, rs, ar, ags, cp = collectives.collectives(_HLO, num_devices=4)
  two_hosts, alternate = [0, 0, 1, 1], [0, 1, 0, 1]
  # Pairs {0,1} and {2,3} within each host: nothing crosses; alternating hosts: all of it.
  assert ag.bytes_between_hosts(two_hosts) == rs.bytes_between_hosts(two_hosts) == 0
  assert ag.bytes_between_hosts(alternate) == ag.bytes_sent
  assert rs.bytes_between_hosts(alternate) == rs.bytes_sent
  # All four devices, 2 hosts of 2: 2 S (h-1)/(h l) = S / 2 of the all-reduce crosses, and
  # S (h-1)/(h l) = S / 4 of the all-gather; the rest (2 S (l-1)/l, S (l-1)/l) stays within.
  assert ar.bytes_between_hosts(two_hosts) == 600 / 2
  assert ags.bytes_between_hosts(two_hosts) == 64 / 4
  # The permute's pairs (0->1, 1->0) stay on host 0, or all cross.
  assert cp.bytes_between_hosts(two_hosts) == 0 and cp.bytes_between_hosts(alternate) == 20
  # XLA's transposed iota groups: ids laid out 2x2 and transposed, (0,2) and (1,3).
  line = ('%x = f32[8]{0} all-reduce(f32[8]{0} %a), replica_groups=[2,2]<=[2,2]T(1,0), '
          'to_apply=%add')
  (transposed,) = collectives.collectives(line, num_devices=4)
  assert transposed.groups == ((0, 2), (1, 3))
  assert transposed.bytes_between_hosts(two_hosts) == transposed.bytes_sent == 32
  # The projection puts each part on its own link.
  found = [ar, ag]
  t = collectives.project(0.1, found, 10.0, 1.0, host_of=two_hosts, latency_us=5.0)
  across = 300.0
  within = ar.bytes_sent + ag.bytes_sent - across
  assert t == pytest.approx(0.1 + within / 10e9 + across / 1e9 + 2 * 5e-6)


@pytest.mark.slow
def test_scaling_command_across_two_processes(tmp_path):
  """2 processes x 2 CPU devices: the sweep runs one host's points on process 0 and the 4-device
  point on both hosts; process 0 alone writes the files."""
  port = conftest.free_port()
  with conftest.Processes() as group:
    for i in range(2):
      cmd = [sys.executable, '-m', 'alexnet_jax.bench.scaling', '--config=configs/tiny.py',
             '--strategies=columns', '--project_devices=2x1', '--per_device_batch=4',
             '--steps=1', '--warmup=0', '--cpu_devices=2', f'--output={tmp_path / str(i)}',
             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
             f'--process_id={i}']
      group.start(cmd)
    codes = [group.wait_one(i, timeout=300) for i in range(2)]
    outputs = [group.output(i) for i in range(2)]
  for code, out in zip(codes, outputs):
    assert code == 0, out[-3000:]
  assert not (tmp_path / '1').exists()
  lines = [json.loads(x) for x in (tmp_path / '0' / 'scaling.jsonl').read_text().splitlines()]
  # One device holds no pair of columns; the model axis stays within a host, so 2 hosts of 1
  # device cannot either.
  skipped = {(r['devices'], r['hosts']): r['skipped'] for r in lines if 'skipped' in r}
  assert set(skipped) == {(1, 1), (2, 2)}
  assert 'needs a multiple of 2 devices, and 1 are here' in skipped[1, 1]
  assert 'within one host' in skipped[2, 2]
  records = {(r['parallelism'], r['devices'], r['hosts']): r for r in lines if 'skipped' not in r}
  assert set(records) == {('data', 1, 1), ('columns', 2, 1), ('columns', 4, 2)}
  assert all(r['measured'] for r in records.values())
  one, two = records['columns', 2, 1], records['columns', 4, 2]
  assert one['bytes_sent_between_hosts'] == 0 and two['mesh'] == [2, 2]
  # Across hosts only the gradient sums of the data axis travel, never the columns' activations.
  assert 0 < two['bytes_sent_between_hosts'] <= two['bytes_sent'] - two['bytes_sent_activations']
  assert 'columns on 4 devices (2 hosts)' in outputs[0]
