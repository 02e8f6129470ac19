"""The ``convbn`` command line: one module per subcommand (``convbn --help`` lists them).

``main.py`` dispatches; ``run_default.py`` (``convbn`` with no arguments), ``bench.py``,
``inspect_cmd.py``, ``transfer.py`` and ``adversarial.py`` each define ``add_parser(subparsers)``
and ``run(args) -> int``. The measurement logic lives in :mod:`convbn.experiments`.
"""
