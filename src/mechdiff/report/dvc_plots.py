"""An offline page template for `dvc plots show` / `dvc plots diff`.

DVC's plots pages load Vega, Vega-Lite and Vega-Embed from a CDN, so offline they show nothing. The template
written here inlines those libraries (vl-convert's JavaScript bundle, a Vega-Lite 5 build: DVC's plot templates
are Vega-Lite 5 specs) around DVC's `{plot_divs}` anchor.
"""

from __future__ import annotations

from pathlib import Path

from mechdiff.errors import MechdiffError


def offline_template(path: str | Path) -> Path:
    """Write an HTML template for `dvc plots ... --html-template` (or the `plots.html_template` config) that needs
    no network to `path`; returns it."""
    try:
        import vl_convert
    except ImportError:
        raise MechdiffError("vl-convert-python is not installed (it carries the Vega bundle): "
                            "pip install vl-convert-python, or `make setup`") from None
    v5 = [v for v in vl_convert.get_vegalite_versions() if v.startswith("5.")]
    bundle = vl_convert.javascript_bundle(vl_version=v5[-1] if v5 else None)
    if "</script" in bundle.lower():  # it goes inside one <script> element
        raise MechdiffError("vl-convert's Vega bundle contains '</script' and cannot be inlined")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>DVC plots</title>\n"
        "<script>(function () {\n" + bundle + "\n})();</script>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n",
        encoding="utf8",
    )
    return path
