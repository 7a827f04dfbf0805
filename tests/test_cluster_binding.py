"""A local Ray run listens on loopback only (issue 11, item 3): the GCS, the raylet, the dashboard and
its agents, and every worker's gRPC port — nothing on the machine's LAN address or on every interface."""
import ipaddress

import pytest


def _loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)                 # ::ffff:127.0.0.1 is loopback too
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def test_local_ray_listens_on_loopback_only(ray_session):
    import ray

    from pipeline.cluster import listening_addresses

    @ray.remote(num_cpus=0.1)
    def ping():
        return ray.util.get_node_ip_address()

    assert set(ray.get([ping.remote() for _ in range(2)])) == {"127.0.0.1"}   # workers are up (own gRPC ports)
    socks = listening_addresses()
    assert len(socks) >= 4, socks                      # GCS, raylet, dashboard, agents, workers, ...
    exposed = [s for s in socks if not _loopback(s[0])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"


def test_local_ray_workers_run_at_normal_priority(ray_session):
    """Ray's default worker niceness (+15) lets its own pollers preempt the trainer's threads (cluster.py): workers
    run at the niceness of the process that started Ray (0 normally; `nice make test` starts everything higher)."""
    import os

    import ray

    @ray.remote(num_cpus=0.1)
    def niceness():
        return os.getpriority(os.PRIO_PROCESS, 0)

    assert ray.get(niceness.remote()) == os.getpriority(os.PRIO_PROCESS, 0)


def test_ensure_ray_uses_the_loopback_options(monkeypatch):
    import ray

    from pipeline import cluster

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("LBR_RAY_NODE_IP", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    cluster.ensure_ray(num_cpus=1)
    assert seen["dashboard_host"] == "127.0.0.1" and "_node_ip_address" not in seen
    import ray._private.ray_constants as rc

    assert rc.ENABLE_RAY_CLUSTER is False            # Ray's single-machine mode: node address = loopback
    # opening a local head to the network is explicit
    monkeypatch.setenv("LBR_RAY_NODE_IP", "10.1.2.3")
    assert cluster.local_ray_options()["_node_ip_address"] == "10.1.2.3"


@pytest.mark.parametrize("var", ["LBR_RAY_DASHBOARD_HOST"])
def test_dashboard_host_is_explicit(monkeypatch, var):
    from pipeline import cluster

    monkeypatch.delenv(var, raising=False)
    assert cluster.local_ray_options()["dashboard_host"] == "127.0.0.1"
    monkeypatch.setenv(var, "0.0.0.0")
    assert cluster.local_ray_options()["dashboard_host"] == "0.0.0.0"
