"""Reusable code for the brain-MRI deep-learning notebook series.

The notebooks in ``notebooks/`` tell the story; this package keeps the code they
share, so that notebook N+1 imports what notebook N built. Modules are small and
named for what they hold:

- ``helpers.runtime``: the device, seeds, run profiles (smoke / workshop / full)
  and CPU speed settings.
- ``helpers.paths``: where data, outputs and trained runs live.
- ``helpers.io``: reading and writing NIfTI volumes safely (clear errors,
  atomic writes).
- ``helpers.series``: the list of notebooks, their hygiene rules, and running
  them headlessly (``python -m helpers.series``).

Data flows one way: io -> datasets/preprocess -> models/train -> metrics/report.
A lower layer never imports a higher one.
"""

__version__ = "0.1.0"
