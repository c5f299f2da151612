#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
# vLLM's own tests of what the patch set edits (the model registry, envs,
# the version, the multiprocessing executor, the block pool's prefix
# cache, the engine core client), from the CPU base release's sources, run against .venv twice:
# with the patch set reverted and applied. Prints both summaries and the
# tests whose result differs (none expected).
#
#     bash tools/upstream_tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
release=0.32.0
work=.cache/upstream-tests
mkdir -p "$work"
if [ ! -d "$work/vllm-$release/tests" ]; then
  # the release's sdist from PyPI (pip would try to build it)
  .venv/bin/python - "$release" "$work" <<'PY'
import re, sys, urllib.request
release, work = sys.argv[1:]
index = urllib.request.urlopen("https://pypi.org/simple/vllm/").read().decode()
url = re.search(rf'href="([^"]*/vllm-{re.escape(release)}\.tar\.gz)[#"]', index)[1]
urllib.request.urlretrieve(url, f"{work}/vllm-{release}.tar.gz")
PY
  tar xzf "$work/vllm-$release.tar.gz" -C "$work" "vllm-$release/tests"
fi
selection=(tests/test_envs.py tests/test_version.py
  tests/v1/executor/test_multiproc_executor.py tests/models/test_registry.py
  tests/v1/core/test_prefix_caching.py tests/v1/core/test_reset_prefix_cache_e2e.py
  tests/v1/engine/test_engine_core_client.py)
run() {  # their conftest needs packages vLLM's CPU install lacks: without it
  (cd "$work/vllm-$release" && HF_HUB_OFFLINE=1 VLLM_LOGGING_LEVEL=ERROR \
    "$OLDPWD/.venv/bin/python" -m pytest -q -p no:cacheprovider --noconftest \
    --timeout 120 -n 2 --tb=no -rf "${selection[@]}" 2>&1 |
    grep "^FAILED\|passed\|failed" || true)
}
.venv/bin/python tools/patchset.py revert >/dev/null
run > "$work/before.txt"
.venv/bin/python tools/patchset.py apply --develop >/dev/null
run > "$work/after.txt"
echo "without the patch set: $(tail -1 "$work/before.txt")"
echo "with the patch set:    $(tail -1 "$work/after.txt")"
if diff <(grep "^FAILED" "$work/before.txt" | cut -d' ' -f2 | sort) \
        <(grep "^FAILED" "$work/after.txt" | cut -d' ' -f2 | sort); then
  echo "the same tests fail with and without the patch set:"
  grep "^FAILED" "$work/after.txt" | cut -d' ' -f2 | sed 's/\[.*//' | sort | uniq -c
fi
