#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
# Set up .venv/ (vLLM CPU base release + the patch set, linked in develop
# mode) and run the demo or the tests:
#
#     bash tools/bootstrap.sh demo     # the README's first command
#     bash tools/bootstrap.sh test     # the README's second command
#
# .venv/ is created if missing and reused while requirements/ is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-test}; shift || true

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements-$(cat requirements/*.txt tools/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements/cpu.txt -r requirements/test.txt
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
  # `import vllm` next to torch+cpu; vLLM's text models need none of them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  rm -f .venv/.requirements-*
  touch "$stamp"
fi
if [ "$what" = test ]; then
  # DeepSpeed's CPU ranks build its shared-memory op on first use (about
  # 40 s on a fresh machine): build it now, beside the downloads below
  (.venv/bin/python -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null 2>&1 &)
fi
.venv/bin/python tools/patchset.py apply --develop
# Sources of the supported releases, for the patch-set tests.
for release in 0.26.0 0.32.0 0.33.0; do
  .venv/bin/python tools/patchset.py fetch --release "$release" --out .cache/releases >/dev/null
done

case $what in
  demo) exec .venv/bin/python examples/offline_inference/generic_model.py "$@" ;;
  # two workers, each test file whole in one (its engines start once)
  test) exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout 900 --durations=15 -n 2 --dist loadfile tests "$@" ;;
  setup) ;;
  *) echo "usage: bash tools/bootstrap.sh demo|test|setup" >&2; exit 2 ;;
esac
