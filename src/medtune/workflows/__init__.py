"""medtune.workflows: the jobs a user runs (train, evaluate, predict, export, advise, demo).

Layer 7 of the package (``docs/architecture.md``): each workflow composes the layers below and
is exposed as ``medtune.<name>`` and as a ``medtune`` command.
"""
