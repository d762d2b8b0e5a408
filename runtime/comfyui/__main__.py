"""``python -m runtime.comfyui install COMFYUI_DIR [--uninstall]`` (see ``runtime.comfyui.install``)."""

import sys

from engines.cli import run_cli

from .install import main

sys.exit(run_cli(main))
