"""Built-in synthetic datasets, written in the on-disk formats real users hold."""
