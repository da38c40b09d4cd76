#!/usr/bin/env bash
# Create .venv from the pinned lock file (idempotent: skips when the lock has not changed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEDSIGHT_VENV:-.venv}
stamp="$VENV/.lock-sha256"
want=$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "bootstrap: creating $VENV from requirements.lock (first time takes ~3 min)" >&2
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# kserve separately and without dependencies: its caps (pandas<3, psutil<6) are below the lock's
# pins; everything it needs is pinned in the lock (see the note at the top of requirements.lock).
grep -v '^kserve==' requirements.lock > "$VENV/.lock-without-kserve.txt"
"$VENV/bin/pip" install --quiet -r "$VENV/.lock-without-kserve.txt"
"$VENV/bin/pip" install --quiet --no-deps "$(grep '^kserve==' requirements.lock)"
"$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e .
# DeepSpeed's CPU shared-memory op, compiled now (~30 s) rather than by the first LLM stage of the
# first pipeline (medsight/train/native_ops.py). Without a compiler the stage builds it or fails
# as it would have anyway, so this step only warns.
"$VENV/bin/python" -m medsight.train.native_ops || echo "bootstrap: DeepSpeed's CPU op was not prebuilt; the first LLM stage will compile it" >&2
echo "$want" > "$stamp"
