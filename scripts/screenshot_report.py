#!/usr/bin/env python3
"""Render a simulation ``report.html`` in headless Chromium and check the picture is not blank.

    python scripts/screenshot_report.py REPORT.html [--out shot.png] [--width 1200]

Exit status 0 when the page rendered with its plots (the screenshot has real contrast and the
plots' coloured lines), 1 when it looks blank, 2 when Chromium is missing or failed. Needs
Debian's ``chromium`` package (``apt-get install -y chromium``) and Pillow (a dependency of
matplotlib, in the ``sim`` extra). As root, Chromium runs with ``--no-sandbox``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@dataclass(frozen=True)
class ShotCheck:
    width: int
    height: int
    stddev: float
    """Standard deviation of grey levels (0 for a blank page)."""
    ink_share: float
    """Share of pixels that are not near-white (text, lines, fills)."""
    coloured_pixels: int
    """Pixels of saturated colour (plot lines, bars); text alone is grey."""

    @property
    def blank(self) -> bool:
        return self.stddev < 5 or self.ink_share < 0.01 or self.coloured_pixels < 500


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html: Path, out: Path, width: int = 1200, height: int = 4000) -> Path:
    """Take a full-width screenshot of ``html`` with headless Chromium (no network needed)."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium not found: install it with `apt-get install -y chromium`")
    with tempfile.TemporaryDirectory(prefix="edgefed-chromium-") as profile:
        argv = [
            binary,
            "--headless",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            html.resolve().as_uri(),
        ]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


def check_png(png: Path) -> ShotCheck:
    from PIL import Image, ImageStat

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        grey = rgb.convert("L")
        stddev = float(ImageStat.Stat(grey).stddev[0])
        histogram = grey.histogram()
        ink = sum(histogram[:235]) / (rgb.width * rgb.height)
        saturation = rgb.convert("HSV").getchannel("S")
        coloured = sum(saturation.histogram()[100:])
        return ShotCheck(rgb.width, rgb.height, stddev, ink, coloured)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: beside HTML)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args(argv)
    out = args.out or args.html.with_suffix(".png")
    try:
        screenshot(args.html, out, args.width, args.height)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"screenshot failed: {exc}", file=sys.stderr)
        return 2
    result = check_png(out)
    verdict = "BLANK" if result.blank else "ok"
    print(
        f"{out}: {result.width}x{result.height}, grey stddev {result.stddev:.1f}, "
        f"ink {result.ink_share:.1%}, coloured pixels {result.coloured_pixels:,}: {verdict}"
    )
    return 1 if result.blank else 0


if __name__ == "__main__":
    sys.exit(main())
