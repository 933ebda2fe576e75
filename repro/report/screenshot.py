"""A screenshot of a page of the site, taken by headless Chromium (Debian's ``chromium``), for the README."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from repro.errors import UserError
from repro.store.atomic import atomic_path

#: names Chromium's executable has on Debian and elsewhere
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
#: the browser window the screenshot shows: wide enough for the index's table
WINDOW = (1400, 900)
TIMEOUT_S = 120
PALETTE_COLORS = 128


def find_chromium() -> str | None:
    """The path of a Chromium executable on PATH, or None."""
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def chromium_flags() -> list[str]:
    """Flags of a headless Chromium that touches nothing outside the page: no GPU, no first-run or extensions;
    as root (CI, containers) without its sandbox, which refuses to start there."""
    flags = ["--headless", "--disable-gpu", "--no-first-run", "--disable-extensions", "--hide-scrollbars"]
    return [*flags, "--no-sandbox"] if os.geteuid() == 0 else flags


def screenshot(page: Path, png: Path) -> None:
    """Save a PNG of ``page`` as the browser window shows it, written atomically."""
    chromium = find_chromium()
    if chromium is None:
        raise UserError(f"--screenshot {png}: no Chromium found ({', '.join(CHROMIUM_NAMES)}); install Debian's "
                        "package: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="repro-screenshot-") as folder:
        shot = Path(folder) / "page.png"  # chromium picks the image format by the name's suffix
        command = [chromium, *chromium_flags(), f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}",
                   page.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        if done.returncode != 0 or not shot.is_file() or shot.stat().st_size == 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"--screenshot {png}: chromium failed (exit {done.returncode}): {last}")
        with Image.open(shot) as image, atomic_path(png) as partial:
            # a page is a few flat colors: a 128-color palette keeps it sharp at about a third of the bytes
            image.convert("RGB").quantize(colors=PALETTE_COLORS).save(partial, format="PNG", optimize=True)
