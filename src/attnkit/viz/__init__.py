"""Pictures of attention: the HTML explorer report, the attention lab, PNG heatmaps.

- :func:`report_html` / :func:`write_report`: one self-contained page (no network) with
  a head view, a model view, a matrix heatmap and a head-role table for an
  :class:`~attnkit.inspect.AttentionMaps` input; ``AttentionMaps`` shows the same page
  inline in Jupyter.
- :func:`lab_html` / :func:`write_lab`: the attention lab (sliders for q, k, v, scale,
  temperature, causal and window masks; scores, softmax and output live).
- :func:`explain`: run a model (default the bundled MiniLM) on a text and capture its maps.
- :func:`save_pngs`: static heatmaps (the ``plot`` extra).
- :mod:`attnkit.viz.server`: ``attnkit serve``, the explorer and lab as a local web app.
"""

from attnkit.viz.explainer import explain, find_tokens, summarize
from attnkit.viz.lab import lab_html, write_lab
from attnkit.viz.png import save_pngs
from attnkit.viz.report import report_data, report_html, write_report

__all__ = ["explain", "find_tokens", "lab_html", "report_data", "report_html", "save_pngs", "summarize",
           "write_lab", "write_report"]
