"""The Jupyter face: magics, display, widgets and plots."""
