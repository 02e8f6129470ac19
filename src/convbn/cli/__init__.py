"""The ``convbn`` command line, for *your* model: one module per subcommand (``convbn --help`` lists them).

``main.py`` dispatches; ``run_default.py`` (``convbn`` with no arguments: the main job),
``bench.py`` (``convbn bench SPEC``) and ``inspect_cmd.py`` (``convbn inspect SPEC``) each define
``add_parser(subparsers)`` and ``run(args) -> int``; ``spec.py`` builds the model a SPEC names and
inputs it accepts. The measurements are :mod:`convbn.bench`'s. The paper reproductions (transfer
learning, adversarial examples, the Table 6 sweep, Appendix M) are not part of the package: they live
in the repository's ``experiments/`` folder (``python -m experiments --help``).
"""
