"""The HTML page `dvc plots show` fills, with vega, vega-lite and vega-embed inlined, so the plots
draw with no network (clusters without internet; DVC's own page loads the three from a CDN).

DVC fills `{plot_divs}` (each plot: a div and a `vegaEmbed(...)` call) and `{scripts}` (the CDN
`<script src>` tags of its renderers). This page has no `{scripts}`: the libraries come from the
bundle in its head, built by the pinned `vl-convert-python` (constraints.txt), which ships vega,
vega-lite and vega-embed. `.dvc/config` points `plots.html_template` at the committed copy,
`.dvc/plots/offline.html`; `loom plots-template --check` says whether it is what the pinned
package builds, `loom plots-template` rewrites it.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_PATH = Path(".dvc") / "plots" / "offline.html"  # relative to the repository root

_PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega {vega}, vega-lite {vegalite}, vega-embed {embed}: inlined from vl-convert-python {vlc}
         (`loom plots-template`), so that the page draws offline -->
    <script type="text/javascript">
(function () {{ // one function scope: the bundle's top-level names cannot clash with DVC's `var spec`
{bundle}
}})();
    </script>
    <script type="text/javascript">
// every plot's numbers in their shortest form to 6 digits (d3's ".6~g"): vega picks a tick's digits from the tick
// step, and drew a constant learning rate of 3e-5 as "0", a deviation of 2.5e-9 as 0.0000000025
(function () {{
    var embed = window.vegaEmbed;
    window.vegaEmbed = function (el, spec, opt) {{
        spec.config = Object.assign({{numberFormat: ".6~g"}}, spec.config);
        return embed(el, spec, opt);
    }};
}})();
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def render_template() -> str:
    """The page's text, from the installed vl-convert-python."""
    from importlib.metadata import version

    import vl_convert as vlc

    vegalite = vlc.get_vegalite_versions()[-1]
    bundle = vlc.javascript_bundle(vl_version=vegalite)
    for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):
        if placeholder in bundle:  # DVC would substitute inside the library's code
            raise RuntimeError(f"the vega bundle contains DVC's placeholder {placeholder}; the page cannot inline it")
    return _PAGE.format(vega=vlc.get_vega_version(), vegalite=vegalite, embed=vlc.get_vega_embed_version(),
                        vlc=version("vl-convert-python"), bundle=bundle)
