"""The training configs, installed with the package: `--config shapes` reads shapes.yaml from here."""
