"""What a person sees: formatting, SVG charts, the live dashboard, the text line, GPU status."""
