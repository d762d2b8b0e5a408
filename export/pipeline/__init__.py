"""The build as a pipeline of stages, each one module: export+validate (``graph``), ``quantize``,
``profiles``, ``engine``, ``gate`` and ``manifest``, composed by ``driver.build_artifacts``.

A stage is an object whose constructor captures what it needs and whose call builds one thing.
The stages that reuse earlier artifacts key them on their inputs, settings and the source of every
project module they import (``sources``). This file imports nothing, so that importing one stage
does not pull the others into its key.
"""
