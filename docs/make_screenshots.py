"""Regenerate the TensorBoard screenshots in docs/ from a real run watched by lightning-sentinel.

It trains the example of ``examples/cli_train.py`` twice (``healthy``: ``examples/sentinel.yaml``;
``broken``: plus ``examples/broken.yaml``), starts TensorBoard on the logs, opens four views in
headless Chromium and saves them as small palette PNGs next to this file::

    python docs/make_screenshots.py            # needs chromium (Debian: apt-get install chromium)
    python docs/make_screenshots.py --keep-logs /tmp/sentinel_logs

The test suite does not run this (it needs a browser); it takes about a minute.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# file name -> (TensorBoard URL fragment, window size)
VIEWS: dict[str, tuple[str, str]] = {
    "tensorboard_scalars.png": ("scalars&tagFilter=sentinel%2F(grad_norm%7Closs%2F)", "1280,900"),
    "tensorboard_custom_scalars.png": ("custom_scalars", "1280,900"),
    "tensorboard_histograms.png": (
        "histograms&tagFilter=sentinel%2F(activations%7Cgradients)%2Fnet.0",
        "1280,700",
    ),
    "tensorboard_text.png": ("text&runSelectionState={only_broken}", "1440,640"),
}


def train(log_dir: Path) -> None:
    """Train the healthy and the broken example into ``log_dir/healthy`` and ``log_dir/broken``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name, configs in (("healthy", ["sentinel.yaml"]), ("broken", ["sentinel.yaml", "broken.yaml"])):
        command = [sys.executable, str(ROOT / "examples" / "cli_train.py"), "fit"]
        for config in configs:
            command += ["--config", str(ROOT / "examples" / config)]
        command += [
            f"--trainer.logger.init_args.save_dir={log_dir}",
            f"--trainer.logger.init_args.name={name}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
        ]
        print(f"training the {name} example ...", flush=True)
        subprocess.run(command, check=True, env=env, cwd=log_dir, capture_output=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def shoot(chromium: str, url: str, window: str, target: Path, colors: int) -> None:
    """Screenshot ``url`` in headless Chromium and save it as an optimised palette PNG."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "raw.png"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={scratch}/profile",
                f"--window-size={window}",
                "--virtual-time-budget=15000",
                f"--screenshot={raw}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        image = Image.open(raw).convert("RGB")
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    print(f"  {target.relative_to(ROOT)}: {target.stat().st_size / 1024:.0f} KB", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default=None, help="browser binary (default: chromium on PATH)")
    parser.add_argument("--keep-logs", type=Path, default=None, help="train into this folder and keep it")
    parser.add_argument(
        "--colors", type=int, default=96, help="palette size of the PNGs (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    chromium = args.chromium or next(
        (
            found
            for name in ("chromium", "chromium-browser", "google-chrome")
            if (found := shutil.which(name))
        ),
        None,
    )
    if chromium is None:
        print("make_screenshots: error: no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        log_dir = args.keep_logs or Path(scratch) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        train(log_dir)
        port = _free_port()
        board = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://localhost:{port}/"
            _wait_for(base + "data/plugins_listing")
            only_broken = urllib.parse.quote(
                base64.b64encode(json.dumps({"healthy/version_0": False}).encode()).decode()
            )
            for file_name, (fragment, window) in VIEWS.items():
                url = base + "#" + fragment.format(only_broken=only_broken)
                shoot(chromium, url, window, DOCS / file_name, args.colors)
        finally:
            board.terminate()
            board.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
