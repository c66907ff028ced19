"""Real services on 127.0.0.1 for the pipeline's integration tests.

SeaweedFS (S3), an MLflow server and a Prefect server, both backed by the
machine's PostgreSQL (fresh databases per session), and a local Ray with 2 CPU
workers. Started once per session, stopped by PID at the end.
"""

import os
import socket
import uuid

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_databases(*names: str) -> tuple[str, ...]:
    """Fresh databases; leftovers of killed sessions (erasure_test_*) are dropped first."""
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE 'erasure_test_%'")
        for (stale,) in cursor.fetchall():
            cursor.execute(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)')
        for name in names:
            cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()
    return names


def drop_database(name: str) -> None:
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    connection.close()


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    from cli import services as svc

    svc.STATE = tmp_path_factory.mktemp("services")
    ports = svc.Ports(s3=8333, mlflow=free_port(), prefect=free_port())
    suffix = uuid.uuid4().hex[:8]
    mlflow_db, prefect_db = postgres_databases(f"erasure_test_mlflow_{suffix}", f"erasure_test_prefect_{suffix}")
    try:
        timings = {
            "s3": svc.start_s3(ports),
            "mlflow": svc.start_mlflow(ports, backend_uri=f"postgresql+psycopg2://postgres@127.0.0.1:5432/{mlflow_db}"),
            "prefect": svc.start_prefect(ports, database_url=f"postgresql+asyncpg://postgres@127.0.0.1:5432/{prefect_db}"),
        }
    except Exception:
        for name in ("prefect", "mlflow", "s3"):
            svc.stop(name)
        raise
    print(f"\nservices ready (s): {timings}")
    saved = dict(os.environ)
    os.environ.update(svc.environment(ports, prefect=True))
    os.environ["ERASURE_RAY_CPUS"] = "2"
    try:
        yield {"ports": ports, "timings": timings, "state": svc.STATE}
    finally:
        try:
            for name in ("prefect", "mlflow", "s3"):
                svc.stop(name)
            os.environ.clear()
            os.environ.update(saved)
            drop_database(mlflow_db)
            drop_database(prefect_db)
        finally:
            import ray

            from tasks.compute import drop_pools

            drop_pools()
            ray.shutdown()
