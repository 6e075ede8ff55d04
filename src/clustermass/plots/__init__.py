"""Figures, one module per area; they draw only what they are given.

Every plotting function takes computed arrays or tables (nothing of the pipeline is recomputed
here) and builds a :class:`matplotlib.figure.Figure` directly, without pyplot: no GUI backend is
ever selected, nothing global changes (no ``matplotlib.use``), and figures are freed when their
last reference goes. Save them with :func:`clustermass._io.save_figure` (PNG through Agg).
matplotlib itself is imported only when a ``clustermass.plots.<area>`` module is.
"""

from __future__ import annotations


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, **kwargs):
    """``(fig, axes)`` like ``pyplot.subplots`` but on a pyplot-free ``Figure``.

    ``kwargs`` go to :meth:`matplotlib.figure.Figure.subplots` (``sharex``, ``sharey``,
    ``squeeze``, ``gridspec_kw``, ...). ``figsize`` in inches.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)
