"""The discrete-event simulator: traces through clusters far larger than one machine.

It drives the system's own code: the engine's ``Scheduler`` (step fidelity), the cost model's
``request_work`` / ``work_s`` / ``batch_work_s``, the serving layer's ``assign_deadline``,
``decide`` and routing policies, and writes the replay's ``RequestRecord``. Layout:
``config`` (cluster and policies), ``acceptance`` (tokens decided per step), ``workload``
(trace as arrays, work per request), ``runner`` (the simulated model runner),
``step_replica`` (step fidelity), ``fast_cluster`` (fast fidelity, its approximation
documented there), ``ingress`` (deadline, admission, routing), ``simulator`` (the loop) and
``validation`` (simulated against real records).
Imports neither torch nor Ray.
"""

from dilaserve.sim.acceptance import AcceptanceModel
from dilaserve.sim.config import ClusterConfig, ReplicaGroup, SimPolicies
from dilaserve.sim.simulator import simulate
from dilaserve.sim.workload import Workload

__all__ = ["AcceptanceModel", "ClusterConfig", "ReplicaGroup", "SimPolicies", "Workload", "simulate"]
