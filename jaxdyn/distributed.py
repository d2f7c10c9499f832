"""Multi-process initialisation (docs/scale-out.md), called before any JAX computation.

Sources, first hit wins:
1. explicit arguments (from flags);
2. `JAXDYN_COORDINATOR`, `JAXDYN_NUM_PROCESSES`, `JAXDYN_PROCESS_ID` (and optional
   `JAXDYN_LOCAL_DEVICE_IDS`, `JAXDYN_CPU_DEVICES`) environment variables, set by `launch/*.sh`;
3. auto-detection by `jax.distributed.initialize()` (Cloud TPU, SLURM, Open MPI), only when
   `JAXDYN_DISTRIBUTED=auto` or a cluster environment is detected.
A single process with none of these skips initialisation.
"""

from __future__ import annotations

import dataclasses
import os

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator: str | None = None  # "host:port"
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cpu_devices: int | None = None  # fake CPU devices per process (testing, local.sh)


def from_env(env: dict[str, str] | None = None) -> DistributedConfig:
    env = dict(os.environ if env is None else env)
    ids = env.get("JAXDYN_LOCAL_DEVICE_IDS")
    num = lambda k: int(env[k]) if env.get(k) else None
    return DistributedConfig(
        coordinator=env.get("JAXDYN_COORDINATOR") or None,
        num_processes=num("JAXDYN_NUM_PROCESSES"),
        process_id=num("JAXDYN_PROCESS_ID"),
        local_device_ids=tuple(int(i) for i in ids.split(",")) if ids else None,
        cpu_devices=num("JAXDYN_CPU_DEVICES"),
    )


def cluster_detected(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return (env.get("JAXDYN_DISTRIBUTED") == "auto" or "SLURM_NTASKS" in env
            and int(env.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in env
            and "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def init(cfg: DistributedConfig | None = None) -> None:
    """Initialise JAX's multi-controller runtime when more than one process takes part."""
    cfg = cfg or from_env()
    if cfg.cpu_devices:
        jax.config.update("jax_num_cpu_devices", cfg.cpu_devices)
    if cfg.coordinator and (cfg.num_processes or 1) > 1:
        if cfg.process_id is None:
            raise ValueError("JAXDYN_PROCESS_ID (or --process_id) is required with a coordinator")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=cfg.coordinator,
                                   num_processes=cfg.num_processes, process_id=cfg.process_id,
                                   local_device_ids=cfg.local_device_ids)
    elif cluster_detected():
        jax.distributed.initialize()


def is_main_process() -> bool:
    """Process 0 writes logs, metrics and config dumps; every process checkpoints."""
    return jax.process_index() == 0


def smoke_check() -> dict:
    """Initialise, then sum each process's index over all devices: proves the collectives work."""
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    init()
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    local = np.full((jax.local_device_count(),), jax.process_index(), np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "sum_of_process_ids": total}


if __name__ == "__main__":
    import json

    print(json.dumps(smoke_check()))
