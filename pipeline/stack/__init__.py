"""The production stack on one machine: real servers on 127.0.0.1, started and stopped by us.

Owns the servers of the scaled setup run locally: PostgreSQL (``postgres``: MLflow's backend
store, run as an unprivileged user), the MLflow tracking server on it with artifacts in S3
(``mlflow_server``), a two-node Ray cluster with token authentication (``ray_cluster``), the
process-group bookkeeping they share (``process``) and the whole stack with its state file
(``stack``: ``up`` / ``down``; S3 is SeaweedFS from ``pipeline.store.seaweed``). Every process
is started in its own process group and stopped by that group, never by name (no ``ray
stop``). The top layer: it may import every other room of ``pipeline``.
"""
