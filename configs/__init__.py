"""The YAML configs: the demo run configs (``*.yaml``) and the literature presets (``presets/*.yaml``).

Installed as the package ``gradclip_algo.configs``, so that the commands and ``build_algorithms`` find them
by name from any directory.
"""
