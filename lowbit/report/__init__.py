"""Reports: a Comparison as Markdown (for terminals and CI logs) and as self-contained HTML."""

from lowbit.evaluate.comparison import RENDERERS
from lowbit.report import html, markdown, tune

RENDERERS.add(("comparison", "markdown"), markdown.render_markdown)
RENDERERS.add(("comparison", "html"), html.render_html)
RENDERERS.add(("tune", "markdown"), tune.render_markdown)
RENDERERS.add(("tune", "html"), tune.render_html)
