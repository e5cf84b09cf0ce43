"""Checks that an end-to-end run tracked into ``production_stack`` really used it, and leaked none
of its credentials.

Each check reads the stores themselves, independently of the MLflow client the pipeline used:
the objects in the SeaweedFS bucket (s3fs) and the rows in PostgreSQL (psycopg).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
from psycopg import sql

from infra.local_stack import ARTIFACT_PREFIX, LocalStack

PROXY_SCHEME = "mlflow-artifacts:/"


def bucket_keys(stack: LocalStack, artifact_uri: str) -> list[str]:
    """The objects (``bucket/key``) under a proxied artifact location (``mlflow-artifacts:/...``)."""
    assert artifact_uri.startswith(PROXY_SCHEME), artifact_uri  # the server proxies, clients hold no S3 keys
    prefix = f"{stack.s3.bucket}/{ARTIFACT_PREFIX}/{artifact_uri.removeprefix(PROXY_SCHEME).strip('/')}"
    return stack.s3.filesystem().find(prefix)


def assert_registered_into_the_stack(stack: LocalStack, name: str, alias: str, adapter_dir: Path,
                                     onnx_path: Path) -> None:
    """``name@alias`` is a version whose pyfunc and ONNX models are objects in the bucket (the
    adapter's files byte for byte those the run wrote, the ONNX graph computing what the exported
    one does), and whose run and version are rows of the PostgreSQL database behind the server."""
    client = mlflow.MlflowClient(stack.tracking_uri)
    version = client.get_model_version_by_alias(name, alias)
    fs = stack.s3.filesystem()

    pyfunc_id = version.source.removeprefix("models:/")
    pyfunc_keys = bucket_keys(stack, client.get_logged_model(pyfunc_id).artifact_location)
    for file in ("adapter.safetensors", "adapter.json"):
        (key,) = [k for k in pyfunc_keys if k.endswith(f"/adapter/{file}")]
        assert _sha256(fs.cat(key)) == _sha256((adapter_dir / file).read_bytes()), key
    onnx_id = version.tags["onnx_model_uri"].removeprefix("models:/")
    onnx_keys = bucket_keys(stack, client.get_logged_model(onnx_id).artifact_location)
    (key,) = [k for k in onnx_keys if k.endswith("/model.onnx")]
    with tempfile.TemporaryDirectory() as tmp:
        # MLflow stores the graph with its weights as external data beside it: compare what it computes.
        fs.get(f"{key.rsplit('/', 1)[0]}/", tmp, recursive=True)
        np.testing.assert_allclose(_onnx_outputs(Path(tmp) / "model.onnx"), _onnx_outputs(onnx_path), rtol=0, atol=1e-6)

    with stack.db.connect() as conn:
        assert conn.execute("SELECT version()").fetchone()[0].startswith("PostgreSQL ")
        (status, artifact_uri), = conn.execute("SELECT status, artifact_uri FROM runs WHERE run_uuid = %s",
                                               (version.run_id,)).fetchall()
        assert status == "FINISHED" and artifact_uri.startswith(PROXY_SCHEME)
        assert conn.execute("SELECT status FROM model_versions WHERE name = %s AND version = %s",
                            (name, int(version.version))).fetchall() == [("READY",)]
    assert bucket_keys(stack, artifact_uri), f"the train run logged no artifact into the bucket ({artifact_uri})"


def assert_no_credential_leaks(stack: LocalStack, texts: list[str], trees: list[Path]) -> None:
    """No S3 key nor the database password in any row of MLflow's database (params, tags,
    descriptions, everything), any artifact in the bucket, ``texts`` (what the run printed) or any
    file under ``trees`` (its outputs)."""
    secrets = {"S3 access key": stack.s3.access_key, "S3 secret key": stack.s3.secret_key,
               "database password": stack.db.password}
    found = []
    with stack.db.connect() as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        assert {"runs", "params", "tags", "model_versions", "logged_models"} <= set(tables)
        for table in tables:
            for (row,) in conn.execute(sql.SQL("SELECT t::text FROM {} AS t").format(sql.Identifier(table))):
                found += [f"{what} in table {table}" for what, value in secrets.items() if value in row]
    fs = stack.s3.filesystem()
    keys = fs.find(f"{stack.s3.bucket}/{ARTIFACT_PREFIX}")
    assert keys, "no artifact in the bucket to check"
    for key, content in fs.cat(keys).items():
        found += [f"{what} in s3://{key}" for what, value in secrets.items() if value.encode() in content]
    for number, text in enumerate(texts):
        found += [f"{what} in logged text #{number}" for what, value in secrets.items() if value in text]
    files = [p for tree in trees for p in Path(tree).rglob("*") if p.is_file()]
    assert files, f"nothing under {trees} to check"
    for path in files:
        content = path.read_bytes()
        found += [f"{what} in {path}" for what, value in secrets.items() if value.encode() in content]
    assert not found, found


def _onnx_outputs(path: Path) -> np.ndarray:
    """What the graph at ``path`` computes for a fixed random batch of one."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    shape = [dim if isinstance(dim, int) else 1 for dim in graph_input.shape]
    batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return session.run(None, {graph_input.name: batch})[0]


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()
