"""What a Dockerfile builds from: its stages, the files its COPY instructions take from the build
context (as .dockerignore admits them), and a content hash over all of it.

    python3 scripts/dockerfile_inputs.py hash [--root DIR] DOCKERFILE [EXTRA ...]   # 12 hex digits
    python3 scripts/dockerfile_inputs.py files [--root DIR] DOCKERFILE              # one path a line

scripts/build-images.sh tags every image by `hash`: a sha256 over the Dockerfile's bytes, every
context file its COPY instructions name (path, executable bit, bytes; a symlink by its target) and the
EXTRA strings (the base images' ids, build arguments that change the content), so an unchanged image is
never rebuilt and a changed one never reuses a stale tag. tests/test_images.py checks the Dockerfiles
and .dockerignore with the same parser. Stdlib only: the build runs it with the host's python3.

Only the subset of Dockerfile syntax the images use is understood: ADD, and COPY sources with
variables, are refused (the hash could not follow them); COPY --from=<stage> takes nothing from the
context. .dockerignore follows Docker's matcher (moby/patternmatcher): `**` crosses directories, `*` and
`?` do not, `!` re-admits, the last matching rule wins and a rule matching a directory covers its files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HASH_LENGTH = 12
_GLOB_CHARS = frozenset("*?[")


class DockerfileError(ValueError):
    """A Dockerfile the content hash cannot follow, or a COPY source that does not exist."""


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    destination: str
    from_stage: str | None


@dataclass
class Stage:
    base: str
    name: str | None
    copies: list[Copy] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    # ARG names, ONBUILD ARG included: an image built FROM this stage declares those.
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    workdir: str | None = None
    entrypoint: list[str] = field(default_factory=list)


def logical_lines(text: str) -> Iterator[str]:
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not pending and not line):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def _env_pairs(rest: str) -> dict[str, str]:
    words = shlex.split(rest)
    if len(words) >= 2 and "=" not in words[0]:  # the legacy `ENV NAME value` form
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def _apply(stage: Stage, instruction: str, rest: str, *, onbuild: bool, origin: str) -> None:
    if instruction == "ARG":
        stage.args.append(rest.split("=", 1)[0].strip())
    elif onbuild:
        return  # runs in the images built FROM this stage, not in it
    elif instruction == "COPY":
        words = shlex.split(rest)
        from_stage = next((w.removeprefix("--from=") for w in words if w.startswith("--from=")), None)
        paths = [w for w in words if not w.startswith("--")]
        if len(paths) < 2:
            raise DockerfileError(f"{origin}: COPY {rest} names no source")
        stage.copies.append(Copy(tuple(paths[:-1]), paths[-1], from_stage))
    elif instruction == "RUN":
        stage.runs.append(rest)
    elif instruction == "ENV":
        stage.env.update(_env_pairs(rest))
    elif instruction == "USER":
        stage.user = rest
    elif instruction == "WORKDIR":
        stage.workdir = rest
    elif instruction == "ENTRYPOINT":
        loaded = json.loads(rest) if rest.startswith("[") else None
        if not isinstance(loaded, list):
            raise DockerfileError(f"{origin}: ENTRYPOINT must use the exec (JSON) form")
        stage.entrypoint = [str(word) for word in loaded]


def parse(text: str, origin: str = "Dockerfile") -> list[Stage]:
    """The stages of a Dockerfile, in order; instructions before the first FROM (global ARGs) are
    not kept."""
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        onbuild = keyword.upper() == "ONBUILD"
        if onbuild:
            keyword, _, rest = rest.strip().partition(" ")
        instruction, rest = keyword.upper(), rest.strip()
        if instruction == "ADD":
            raise DockerfileError(f"{origin}: ADD is not supported by the content hash; use COPY")
        if instruction == "FROM":
            words = [word for word in rest.split() if not word.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            _apply(stages[-1], instruction, rest, onbuild=onbuild, origin=origin)
    return stages


def parse_file(path: Path) -> list[Stage]:
    return parse(path.read_text(), str(path))


def context_sources(stages: Sequence[Stage]) -> list[str]:
    """The COPY sources taken from the build context, in order (COPY --from takes none)."""
    return [
        source
        for stage in stages
        for copy in stage.copies
        if copy.from_stage is None
        for source in copy.sources
    ]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(f"^{out}$")


@dataclass(frozen=True)
class DockerIgnore:
    """A .dockerignore's rules: (re-admits, pattern) in file order."""

    rules: tuple[tuple[bool, re.Pattern[str]], ...]

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
            rules.append((negate, _pattern_regex(pattern)))
        return cls(tuple(rules))

    @classmethod
    def for_context(cls, root: Path) -> DockerIgnore:
        """The context's .dockerignore; none admits everything."""
        ignore_file = root / ".dockerignore"
        return cls.parse(ignore_file.read_text() if ignore_file.exists() else "")

    def admits(self, relative: str) -> bool:
        """Whether the file is sent to the builder: the last rule matching it or a parent decides."""
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for negate, regex in self.rules:
            if any(regex.match(prefix) for prefix in prefixes):
                excluded = not negate
        return not excluded


def source_files(root: Path, source: str, ignore: DockerIgnore, origin: str = "Dockerfile") -> list[str]:
    """The context files (relative POSIX paths, sorted) one COPY source sends to the builder."""
    if "$" in source:
        raise DockerfileError(
            f"{origin}: COPY source {source} uses a variable the content hash cannot expand"
        )
    if _GLOB_CHARS.intersection(source):
        matches = sorted(root.glob(source))
    else:
        matches = [root / source] if (root / source).exists() or (root / source).is_symlink() else []
    if not matches:
        raise DockerfileError(f"{origin}: COPY source {source} does not exist")
    files: set[str] = set()
    for match in matches:
        candidates = sorted(match.rglob("*")) if match.is_dir() and not match.is_symlink() else [match]
        for path in candidates:
            if path.is_file() or path.is_symlink():
                relative = path.relative_to(root).as_posix()
                if ignore.admits(relative):
                    files.add(relative)
    return sorted(files)


def input_files(root: Path, dockerfile: Path) -> list[str]:
    """Every context file the Dockerfile's COPY instructions take, as .dockerignore admits them."""
    ignore = DockerIgnore.for_context(root)
    files: set[str] = set()
    for source in context_sources(parse_file(dockerfile)):
        files.update(source_files(root, source, ignore, str(dockerfile)))
    return sorted(files)


def content_hash(root: Path, dockerfile: Path, extras: Sequence[str] = ()) -> str:
    """sha256 (12 hex) over the Dockerfile, the files it COPYs from the context, and the extras."""
    digest = hashlib.sha256()
    digest.update(b"dockerfile\0" + dockerfile.read_bytes() + b"\0")
    for relative in input_files(root, dockerfile):
        path = root / relative
        body = b"symlink:" + os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        executable = b"x" if os.access(path, os.X_OK) else b"-"
        digest.update(relative.encode() + b"\0" + executable + hashlib.sha256(body).digest())
    digest.update(json.dumps(list(extras)).encode())
    return digest.hexdigest()[:HASH_LENGTH]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    hash_command = commands.add_parser("hash", help="print the Dockerfile's content hash")
    files_command = commands.add_parser("files", help="list the context files its COPY instructions take")
    for command in (hash_command, files_command):
        command.add_argument("--root", type=Path, default=Path.cwd(), help="the build context (default .)")
        command.add_argument("dockerfile", type=Path)
    hash_command.add_argument("extras", nargs="*", help="strings hashed too, e.g. base=<image id>")
    args = parser.parse_args(argv)
    try:
        if args.command == "hash":
            print(content_hash(args.root, args.dockerfile, args.extras))
        else:
            print("\n".join(input_files(args.root, args.dockerfile)))
    except (DockerfileError, OSError) as error:
        print(f"dockerfile_inputs: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
