"""A STAND-IN for the few ComfyUI functions the nodes call (ComfyUI is not on the package registry).

Not ComfyUI: a minimal copy of the behaviour of ComfyUI 0.8.0's ``folder_paths`` (models paths,
``add_model_folder_path``, ``get_filename_list``, ``get_full_path``), ``comfy.model_management``
(device, ``free_memory``, ``intermediate_device``, interrupt) and ``comfy.utils.ProgressBar``,
written from their source, with what the tests read recorded (``freed``, ``progress``). The real
behaviour is checked on a real ComfyUI (runtime/comfyui/README.md).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

MODULES = ("folder_paths", "comfy", "comfy.model_management", "comfy.utils")
NODE_MODULES = ("nodes", "models", "loaded")  # the runtime.comfyui modules that import ComfyUI's


class StandIn:
    def __init__(self, base: Path, device: str = "cpu"):
        self.base = base
        self.device = torch.device(device)
        self.freed: list[tuple[int, torch.device]] = []
        self.progress: list[tuple[int, int]] = []
        self.interrupt_at: tuple[int, int] | None = None  # (done, total) at which the user cancels
        self.modules = self._modules()

    def _modules(self) -> dict[str, types.ModuleType]:
        standin = self
        folder_paths = types.ModuleType("folder_paths")
        folder_paths.models_dir = str(self.base / "models")
        pt = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
        folder_paths.folder_names_and_paths = {
            "checkpoints": ([str(self.base / "models" / "checkpoints")], pt),
            "latent_upscale_models": ([str(self.base / "models" / "latent_upscale_models")], pt),
        }

        def add_model_folder_path(name, path, is_default=False):
            paths = folder_paths.folder_names_and_paths.setdefault(name, ([], set()))[0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)

        def get_folder_paths(name):
            return folder_paths.folder_names_and_paths[name][0][:]

        def get_filename_list(name):
            paths, extensions = folder_paths.folder_names_and_paths[name]
            found = set()
            for root in paths:
                for current, _, files in os.walk(root, followlinks=True):
                    for f in files:
                        rel = os.path.relpath(os.path.join(current, f), root)
                        if not extensions or os.path.splitext(f)[-1].lower() in extensions:
                            found.add(rel)
            return sorted(found)

        def get_full_path(name, filename):
            if name not in folder_paths.folder_names_and_paths:
                return None
            filename = os.path.relpath(os.path.join("/", filename), "/")
            for root in folder_paths.folder_names_and_paths[name][0]:
                path = os.path.join(root, filename)
                if os.path.isfile(path):
                    return path
            return None

        folder_paths.add_model_folder_path = add_model_folder_path
        folder_paths.get_folder_paths = get_folder_paths
        folder_paths.get_filename_list = get_filename_list
        folder_paths.get_full_path = get_full_path

        comfy = types.ModuleType("comfy")
        mm = types.ModuleType("comfy.model_management")

        class InterruptProcessingException(Exception):
            pass

        mm.InterruptProcessingException = InterruptProcessingException
        mm.interrupt_processing = False
        mm.get_torch_device = lambda: standin.device
        mm.intermediate_device = lambda: torch.device("cpu")
        mm.free_memory = lambda memory_required, device, keep_loaded=(): standin.freed.append((memory_required, device))

        def interrupt_current_processing(value=True):
            mm.interrupt_processing = value

        def throw_exception_if_processing_interrupted():
            if mm.interrupt_processing:
                mm.interrupt_processing = False
                raise InterruptProcessingException()

        mm.interrupt_current_processing = interrupt_current_processing
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.current = total, 0

            def update_absolute(self, value, total=None, preview=None):
                if total is not None:
                    self.total = total
                self.current = min(value, self.total)
                standin.progress.append((self.current, self.total))
                if standin.interrupt_at == (self.current, self.total):  # the user presses Cancel now
                    interrupt_current_processing()

            def update(self, value):
                self.update_absolute(self.current + value)

        utils.ProgressBar = ProgressBar
        comfy.model_management, comfy.utils = mm, utils
        return {"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils}

    def install(self) -> None:
        sys.modules.update(self.modules)

    def remove(self) -> None:
        """Forget the stand-in and the node modules bound to it, so the next test imports them afresh."""
        for name in MODULES:
            sys.modules.pop(name, None)
        package = sys.modules.get("runtime.comfyui")
        for name in NODE_MODULES:
            sys.modules.pop(f"runtime.comfyui.{name}", None)
            if package is not None and hasattr(package, name):
                delattr(package, name)  # else ``from . import models`` would reuse the old module
