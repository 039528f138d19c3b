"""The controller: observes the serving cluster, re-plans with the planner, and applies a plan
without losing requests (new replicas up before old ones drain; drained before removed;
threshold changes pushed to live replicas).

Pure (no Ray, no torch): ``config`` (settings), ``observation`` (what a tick sees, the load
window), ``actions`` (the steps of a reconfiguration), ``decision`` (observe -> decide -> an
ordered list of actions, with hysteresis), ``apply`` (runs actions against a ``Cluster``,
stopping at the first failure), ``controller`` (the tick loop).
Ray side (thin): ``deploy`` (each replica in a Serve application of its own),
``serve_cluster`` (the ``Cluster`` on Ray Serve), ``actor`` (the detached actor,
``start_controller`` / ``stop_controller``). docs/controller.md has the design.
"""
