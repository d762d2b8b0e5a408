"""ComfyUI nodes on the runtime: ``FlowUpscalerLoader`` -> ``FlowUpscalerUpscale`` / ``FlowUpscalerDecode``.

- ``nodes``: the three nodes (ComfyUI's classic node API, ``INPUT_TYPES``); imported by ComfyUI only,
  through the small folder the installer writes under ``custom_nodes/``.
- ``models``: the models folders (``models/flow_upscaler/<name>/`` for artifact folders,
  ``models/latent_upscale_models/`` for the published checkpoint) and the loader's choice list.
- ``loaded``: the upscalers the loader keeps open across prompts, and the handle the nodes pass on.
- ``install`` (``python -m runtime.comfyui install COMFYUI_DIR``): writes or removes that folder.

The nodes call the public ``Upscaler`` only; only ``nodes`` and ``models`` import
ComfyUI's modules, so the installer runs in any Python.
"""
