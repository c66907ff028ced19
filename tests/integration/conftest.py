"""Real services on 127.0.0.1 for the pipeline's integration tests.

SeaweedFS (S3), an MLflow server and a Prefect server, and a local Ray with 2
CPU workers, all with their state in a temporary folder. MLflow and Prefect use
SQLite there by default, so the suite needs no database server; with
``ERASURE_TEST_POSTGRES_URL`` set (e.g. ``postgresql://postgres@127.0.0.1:5432/postgres``)
they use fresh PostgreSQL databases instead (``erasure_test_*``, dropped at the
end). Started once per session, stopped by PID at the end.
"""

import os
import socket
import time
import uuid

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres(database: str | None = None, driver: str = "postgresql") -> str:
    """``ERASURE_TEST_POSTGRES_URL`` with another database (default: its own, else postgres) and driver."""
    from sqlalchemy.engine import make_url

    url = make_url(os.environ["ERASURE_TEST_POSTGRES_URL"])
    url = url.set(drivername=driver, database=database or url.database or "postgres")
    return url.render_as_string(hide_password=False)


def _admin(statements) -> None:
    import psycopg2

    connection = psycopg2.connect(_postgres())
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            statements(cursor)
    finally:
        connection.close()


def _stale(name: str) -> bool:
    """A leftover of a killed session: named erasure_test_<kind>_<unix time>_<id> more than 6 hours ago."""
    try:
        return time.time() - int(name.split("_")[3]) > 6 * 3600
    except (IndexError, ValueError):
        return True


def postgres_databases(*names: str) -> tuple[str, ...]:
    """Fresh databases; leftovers of killed sessions are dropped first (not those of sessions running now)."""

    def create(cursor):
        cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE 'erasure_test_%'")
        for (stale,) in cursor.fetchall():
            if _stale(stale):
                cursor.execute(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)')
        for name in names:
            cursor.execute(f'CREATE DATABASE "{name}"')

    _admin(create)
    return names


def drop_database(name: str) -> None:
    _admin(lambda cursor: cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    from cli import services as svc

    saved = dict(os.environ)
    os.environ["ERASURE_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    state = svc.services_dir()
    ports = svc.Ports(s3=free_port(), mlflow=free_port(), prefect=free_port())
    databases = ()
    if os.environ.get("ERASURE_TEST_POSTGRES_URL"):
        suffix = f"{int(time.time())}_{uuid.uuid4().hex[:8]}"
        databases = postgres_databases(f"erasure_test_mlflow_{suffix}", f"erasure_test_prefect_{suffix}")
        mlflow_backend = _postgres(databases[0], "postgresql+psycopg2")
        prefect_database = _postgres(databases[1], "postgresql+asyncpg")
    else:
        mlflow_backend = None  # SQLite in the state folder
        prefect_database = f"sqlite+aiosqlite:///{state / 'prefect.db'}"
    try:
        timings = {
            "s3": svc.start_s3(ports),
            "mlflow": svc.start_mlflow(ports, backend_uri=mlflow_backend),
            "prefect": svc.start_prefect(ports, database_url=prefect_database),
        }
    except Exception:
        for name in ("prefect", "mlflow", "s3"):
            svc.stop(name)
        os.environ.clear()
        os.environ.update(saved)
        raise
    print(f"\nservices ready (s): {timings} ({'postgres' if databases else 'sqlite'})")
    os.environ.update(svc.environment(ports, prefect=True))
    os.environ["ERASURE_RAY_CPUS"] = "2"
    try:
        yield {"ports": ports, "timings": timings, "state": state, "mlflow_backend": mlflow_backend}
    finally:
        try:
            for name in ("prefect", "mlflow", "s3"):
                svc.stop(name)
            os.environ.clear()
            os.environ.update(saved)
            for name in databases:
                drop_database(name)
        finally:
            import ray

            from tasks.compute import drop_pools

            drop_pools()
            ray.shutdown()
