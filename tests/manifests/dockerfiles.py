"""What hadolint does not check in our Dockerfiles: every base image pinned to a version (ARG
defaults resolved), several stages, and a numeric non-root user for the final stage."""

from __future__ import annotations

import re

_ARG = re.compile(r"^ARG\s+(\w+)(?:=(\S+))?\s*$", re.MULTILINE | re.IGNORECASE)
_FROM = re.compile(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", re.IGNORECASE)
_USER = re.compile(r"^USER\s+(\S+)", re.IGNORECASE)
_VAR = re.compile(r"\$\{?(\w+)\}?")


def _lines(text: str) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]


def base_images(text: str) -> list[str]:
    """The image of each FROM, with ARG defaults substituted; a stage named by an earlier
    ``AS`` is left out (it is no base image)."""
    args = {name: value or "" for name, value in _ARG.findall(text)}
    stages: set[str] = set()
    images: list[str] = []
    for line in _lines(text):
        match = _FROM.match(line)
        if not match:
            continue
        image = _VAR.sub(lambda m: args.get(m.group(1), m.group(0)), match.group(1))
        if image not in stages:
            images.append(image)
        if match.group(2):
            stages.add(match.group(2))
    return images


def dockerfile_problems(text: str) -> list[str]:
    problems: list[str] = []
    images = base_images(text)
    for image in images:
        if "@sha256:" in image:
            continue
        last = image.rsplit("/", 1)[-1]
        tag = last.split(":", 1)[1] if ":" in last else ""
        if not tag or tag == "latest" or "$" in tag:
            problems.append(f"base image {image!r} is not pinned to a version")
    if sum(1 for ln in _lines(text) if _FROM.match(ln)) < 2:
        problems.append("a single stage: build in one stage, copy the result into a fresh one")
    padded = "\n" + text
    final = padded[padded.upper().rfind("\nFROM ") :]
    users = [m.group(1) for ln in _lines(final) if (m := _USER.match(ln))]
    if not users:
        problems.append("the final stage sets no USER: it would run as root")
    else:
        uid = users[-1].split(":", 1)[0]
        if not uid.isdigit() or int(uid) == 0:
            problems.append(f"the final USER {users[-1]!r} is not a numeric non-root UID")
    return problems
