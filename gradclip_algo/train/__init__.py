"""Training runs from one YAML file: the ``gradclip-train`` command, its adding-problem task and the demo.

``adding_problem`` needs only torch; the other modules need Composer and matplotlib.
"""
