"""The private Ray APIs denseqa relies on are all still where denseqa.ray_private reaches them."""
from __future__ import annotations

import importlib.metadata

from denseqa import ray_private


def test_every_private_ray_symbol_denseqa_uses_is_still_there():
    # Given this Ray, When every symbol ray_private names is looked up, Then none has moved
    missing = ray_private.missing_symbols()
    assert not missing, (f"Ray {importlib.metadata.version('ray')} moved private APIs that denseqa/ray_private.py "
                         f"uses: {', '.join(missing)}; update that module (and only it) to the new locations")


def test_a_moved_symbol_is_named_in_the_report(monkeypatch):
    # Given a symbol list that includes one that does not exist
    monkeypatch.setattr(ray_private, "SYMBOLS", (*ray_private.SYMBOLS, ("ray.serve._private.api", "no_such_call")))
    # Then exactly that one is reported
    assert ray_private.missing_symbols() == ["ray.serve._private.api:no_such_call"]


def test_no_other_module_reaches_into_a_private_ray_api():
    # Given every library module, Then only ray_private names a private Ray module
    import pathlib
    import re

    package = pathlib.Path(ray_private.__file__).parent
    private = re.compile(r"\bray(\.\w+)*\._private\b|\bfrom ray\.serve\.context import _")
    offenders = [str(p.relative_to(package.parent)) for p in package.rglob("*.py")
                 if p.name != "ray_private.py" and private.search(p.read_text())]
    assert not offenders, f"private Ray APIs used outside denseqa/ray_private.py: {offenders}"
