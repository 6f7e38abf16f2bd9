"""A griffe extension for the API pages: the Sphinx roles of the docstrings (``:class:`~gradclip_algo.X```,
``:func:`name```, ...) become cross-references, links where the target has a page and code elsewhere.

A name without a dot is looked up beside the documented object: in its class for a method or attribute,
else in its module.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([\w.]+)`")


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(lambda role: _reference(role, obj), obj.docstring.value)


def _reference(role: re.Match[str], obj: griffe.Object) -> str:
    short, name = role.group(1) == "~", role.group(2)
    if name.startswith("gradclip_algo"):
        identifier = name
    else:
        scope = obj if obj.is_class or obj.is_module else obj.parent
        identifier = f"{scope.path}.{name}" if scope is not None else name
    title = name.rsplit(".", 1)[-1] if short else name
    return f'<autoref identifier="{identifier}" optional>`{title}`</autoref>'
