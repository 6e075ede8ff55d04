"""Figures, one module per area (matplotlib Agg, saved with clustermass._io.save_figure)."""
