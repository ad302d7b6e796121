"""Show numpydoc value sets such as ``{"exact", "gauss-newton"}`` as written.

griffe reads the type of a parameter as a Python annotation. In an annotation a quoted
string is a forward reference, so each choice is parsed as code and
``"gauss-newton"`` comes out as the expression ``gauss - newton``. This extension puts
the text of the docstring back in place of any parsed value set.
"""

from __future__ import annotations

import re

from griffe import DocstringSectionKind, Extension

_CHOICES = re.compile(r"^\s*(\w+(?:,\s*\w+)*) : (\{[^}]*\})", re.M)
_KINDS = (DocstringSectionKind.parameters, DocstringSectionKind.other_parameters)


class ChoicesAsText(Extension):
    """Keep ``name : {"a", "b"}`` parameter types as their literal text."""

    def on_object(self, *, obj, loader, **kwargs) -> None:
        doc = obj.docstring
        if doc is None or "{" not in doc.value:
            return
        raw = {}
        for names, choices in _CHOICES.findall(doc.value):
            for name in re.split(r",\s*", names):
                raw[name] = choices
        if not raw:
            return
        for section in doc.parsed:
            if section.kind in _KINDS:
                for param in section.value:
                    if param.name in raw:
                        param.annotation = raw[param.name]
