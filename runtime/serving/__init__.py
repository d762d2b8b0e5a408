"""Serving on NVIDIA Triton Inference Server: the model ``flow_upscaler`` (``triton_model``), the
model repository that holds it (``repository``), the bundled server that runs it (``server``) and
the per-request logic apart from Triton's types (``requests``). ``python -m runtime.serve`` is the
command."""
