"""``python -m forkserver bench`` (parent side): core, scenarios, workers, report, CLI.

Kept empty: templates ``require("forkserver._bench._workers")``, which
imports this package first.
"""
