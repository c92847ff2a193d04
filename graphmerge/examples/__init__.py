"""Small example models bundled with graphmerge, usable as ``examples:NAME`` on the command line.

Each file is a plain, self-contained module a user could copy as a template: a model class, a
``build_model()`` factory and an ``example_inputs()`` function giving one batch of input.
"""
