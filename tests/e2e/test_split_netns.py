"""The split deployment across hosts: `tinkerd api`, a trainer and a sampler each in a network namespace of its own
(joined to this one by a veth pair), PostgreSQL and the SDK here. Every byte between them crosses an interface; the
checkpoint directory is shared as a network filesystem would share it (the namespaces share the file system).

Skipped, with the reason, where namespaces cannot be made (not root, no `ip`, a kernel or container that refuses).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY
from tests.e2e.test_sdk_training import PROMPT, datum
from tests.netns import NETWORK, Namespace, cannot_make_namespaces, namespaces
from tests.pg_server import running_postgres
from tests.split_deployment import SplitDeployment
from tinkerd.store import Store
from tinkerd.store.workers import WorkerRegistry

# slow: three more processes to start (minutes on a loaded 2-core machine); the default run has test_split.py.
pytestmark = [pytest.mark.postgres, pytest.mark.e2e, pytest.mark.slow]

ROLES = ("api", "trainer", "sampler")


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, Namespace]]:
    reason = cannot_make_namespaces()
    if reason is not None:
        pytest.skip(reason)
    with namespaces(ROLES) as made:
        yield made


def test_the_sdk_trains_and_samples_with_each_role_on_its_own_host(
    hosts: dict[str, Namespace], tiny_model_dir: Path, tmp_path: Path
) -> None:
    listen = ("127.0.0.1", *(space.host_address for space in hosts.values()))
    with running_postgres(listen_addresses=listen, trusted_networks=(str(NETWORK),)) as pg:
        local_url = pg.create_database("netns")
        schema = local_url.split("search_path%3D")[1]
        Store.open(local_url).close()

        def url_from(space: Namespace) -> str:  # the database as that host reaches it: over its veth
            return f"{pg.url(host=space.host_address)}?options=-csearch_path%3D{schema}"

        deployment = SplitDeployment(tmp_path, local_url, str(tiny_model_dir), lease_s=5.0)
        api = hosts["api"]
        deployment.add_api(netns=api.name, database_url=url_from(api), host=api.address)
        for role in ("trainer", "sampler"):
            space = hosts[role]
            database = url_from(space)
            deployment.add_worker(role, f"{role}-ns", netns=space.name, database_url=database, host=space.address)
        received = {role: space.rx_bytes() for role, space in hosts.items()}
        deployment.start()
        try:
            deployment.wait_ready()
            assert deployment.url.startswith(f"http://{api.address}:")
            service = tinker.ServiceClient(base_url=deployment.url, api_key=API_KEY)
            client = service.create_lora_training_client(base_model=deployment.model, rank=4, seed=7).result()
            first = client.forward_backward([datum()], "cross_entropy").result().metrics["loss:sum"]
            client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            assert client.forward_backward([datum()], "cross_entropy").result().metrics["loss:sum"] < first
            # An ephemeral snapshot written by the trainer's host, sampled on the sampler's host.
            sampler = client.save_weights_and_get_sampling_client().result()
            params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=3, stop=[])
            sample = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params).result().sequences[0]
            assert 0 < len(sample.tokens) <= 5
            service.close("success").result()

            store = Store.open(local_url)
            try:
                workers = {w.id: w for w in WorkerRegistry(store.db).live()}
                claimed = store.db.read(
                    lambda conn: conn.exec_driver_sql("SELECT DISTINCT kind, claimed_by FROM futures").all()
                )
            finally:
                store.close()
            assert ("sample", "sampler-ns") in claimed and ("forward_backward", "trainer-ns") in claimed
            # Each worker's health endpoint answers at its own host's address, reached over its veth.
            for role in ("trainer", "sampler"):
                health = workers[f"{role}-ns"].health_url or ""
                assert health.startswith(f"http://{hosts[role].address}:"), health
                assert httpx.get(health, timeout=5.0).json()["role"] == role
        finally:
            deployment.close()
        # Every role talked over its own interface (to PostgreSQL here, and the api to the SDK).
        grown = {role: space.rx_bytes() - received[role] for role, space in hosts.items()}
        assert all(n > 10_000 for n in grown.values()), grown
