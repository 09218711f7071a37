"""The committed generated code in lambda_client/_proto is what `make proto` would write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("client/lambda_client/_proto/pgbroker/v1")
GENERATED_AT = OUT.relative_to("client")  # protoc writes below --python_out
GENERATED = ("broker_pb2.py", "broker_pb2.pyi", "broker_pb2_grpc.py", "broker_pb2_grpc.pyi")


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    # The same invocation as the Makefile's `proto` target, written into a temporary tree.
    bindir = str(Path(sys.executable).parent)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Ilambda_client/_proto=protos",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            "protos/pgbroker/v1/broker.proto",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    stale = [
        name
        for name in GENERATED
        if (tmp_path / GENERATED_AT / name).read_text() != (ROOT / OUT / name).read_text()
    ]
    assert not stale, f"stale generated code {stale}: run `make proto` and commit the result"
