"""The faces of Tyche's command line: one module or package per ``tyche`` command.

``tyche.__main__`` routes ``tyche <command>`` to the module the registry
(:mod:`tyche.methods`) names for it (``tyche.cli.basin``, ``tyche.cli.causal``,
``tyche.cli.codebook``, ``tyche.cli.interaction``, ``tyche.cli.zoo``). The shared pieces live
here too: :mod:`tyche.cli.commandline` (dataclass configs as flags, checks) and
:mod:`tyche.cli.run_folder` (the lock and record of an output folder). A face may import the
methods, the shared modules and the zoo; no method imports a face.
"""
