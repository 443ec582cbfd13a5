#!/usr/bin/env bash
# The oldest transformers pyproject.toml admits, in its own environment beside .venv: a venv whose site-packages
# hold only transformers at the bound (with the tokenizers and huggingface_hub it pins), and whose `.pth` file
# puts .venv's site-packages after its own, so torch, safetensors and the rest are .venv's and nothing is
# downloaded twice. Prints that environment's python, for GENESIS_TRANSFORMERS_LOWER_BOUND_PYTHON, which turns on
# tests/test_export_formats.py's lower-bound test (exported directories read there as they are read here).
set -euo pipefail
cd "$(dirname "$0")/.."
BOUND=$(.venv/bin/python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
found = [m.group(1) for d in deps if (m := re.fullmatch(r"transformers>=([0-9.]+)", d.replace(" ", "")))]
if not found:
    raise SystemExit("pyproject.toml: no 'transformers>=X' dependency to take the lower bound from")
print(found[0])
PY
)
ENV=.venv-transformers-lower
if [ ! -x "$ENV/bin/python" ] || ! "$ENV/bin/python" -c "import transformers, sys; sys.exit(not transformers.__version__.startswith('$BOUND'))" 2>/dev/null; then
    rm -rf "$ENV"
    .venv/bin/python -m venv "$ENV"
    own=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    .venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$own/genesis-venv.pth"
    # pip's resolver warns that .venv's trl/datasets want newer versions: those packages are not used there.
    "$ENV/bin/python" -m pip install -q --disable-pip-version-check "transformers==$BOUND" >/dev/null 2>&1 \
        || "$ENV/bin/python" -m pip install -q --disable-pip-version-check "transformers==$BOUND"
fi
"$ENV/bin/python" -c "import transformers; assert transformers.__version__.startswith('$BOUND'), transformers.__version__" >&2
echo "$PWD/$ENV/bin/python"
