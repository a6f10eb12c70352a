"""``[core] hostname_callable`` of the two Celery workers of the distributed test.

Both workers run on this one machine, so Airflow's default (the machine's FQDN) would give every task instance
the same ``hostname``. Each worker process gets ``DISTRIBUTED_WORKER_NAME`` (``worker1``, ``worker2``) and
``AIRFLOW__CORE__HOSTNAME_CALLABLE=tests.distributed.hostname.worker_hostname``, so the task instances it runs
record ``worker1.<fqdn>`` -- what two machines would show. Kept tiny: the task supervisor imports it.
"""

from __future__ import annotations

import os
import socket

WORKER_NAME_ENV = "DISTRIBUTED_WORKER_NAME"


def worker_hostname() -> str:
    name = os.environ.get(WORKER_NAME_ENV)
    fqdn = socket.getfqdn()
    return f"{name}.{fqdn}" if name else fqdn
