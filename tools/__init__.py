"""Environment tools outside the pipeline's layers: run from the repository root, imported by no
layer (tests/test_layout.py). ``python -m tools.tvfix``: the torchvision import fix that
``make setup`` installs (docs/development.md#installation)."""
