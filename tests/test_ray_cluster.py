"""`crmt-reproduce --executor ray --address ADDR` on a two-node Ray cluster simulated on this machine
(`ray.cluster_utils.Cluster`, Ray's own multi-node test harness: a head and a second raylet, one CPU each, sharing
this filesystem as a cluster shares its batch folder): the trainings are spread over both nodes, the CSVs equal the
local executor's, and the report names the cluster's address."""
import re
import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster
from crmt_nb.reproduce import reproduce

SUBSET = ['modality_preference', 'soe_table2_submodels']

@pytest.fixture(scope='module')
def two_nodes(tmp_path_factory):
    d = tmp_path_factory.mktemp('ray_cluster')
    if ray.is_initialized(): ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False))
    cluster.add_node(num_cpus=1); cluster.wait_for_nodes()
    logs, address = [], cluster.address
    try: reproduce('smoke', only=','.join(SUBSET), out=d / 'ray', executor='ray', address=address, progress=False, log=logs.append)
    finally: ray.shutdown(); cluster.shutdown()
    reproduce('smoke', only=','.join(SUBSET), out=d / 'local', workers=2, progress=False, log=lambda s: None)
    return dict(dir=d, logs=logs, address=address)

def test_trainings_ran_on_both_nodes(two_nodes):
    nodes = [m.group(1) for l in two_nodes['logs'] if (m := re.match(r'\[train\] .* on node (\w+)$', l))]
    assert len(nodes) >= 2 and len(set(nodes)) == 2, two_nodes['logs']

def test_same_csvs_as_the_local_executor(two_nodes):
    d = two_nodes['dir']
    for name in SUBSET:
        pd.testing.assert_frame_equal(pd.read_csv(d / 'ray' / name / f'{name}.csv'), pd.read_csv(d / 'local' / name / f'{name}.csv'),
                                      check_exact=True, obj=name)

def test_the_report_names_the_cluster(two_nodes):
    assert f"Executor of this batch: Ray ({two_nodes['address']}: 2 CPU(s), 0 GPU(s))" in (two_nodes['dir'] / 'ray' / 'report.md').read_text()
