"""Reusable code for the brain-MRI deep-learning notebook series.

The notebooks in ``notebooks/`` tell the story; this package keeps the code they
share, so that notebook N+1 imports what notebook N built. Each module is named
for what it holds and small enough to read in one sitting. Data flows one way,
top to bottom; a lower layer never imports a higher one.

Frame (every notebook):
    runtime       device, seeds, run profiles (smoke / workshop / full), CPU speed settings
    paths         where data, outputs and trained runs live
    io            safe reading and writing: atomic writes, clear errors for bad files
    environment   what is installed and what this machine can do (notebook 00)
    series        the notebook list, its house rules, running it headlessly

Looking at scans:
    orientation   canonical orientation, planes, letters, voxel <-> millimetres
    viewer        the interactive slice browser (with a static figure when headless)
    gallery       static lettered planes for figures

Data (notebooks 01-02):
    simulate      the default simulated cohort (anatomy, lesions, scanner: its parts)
    datasets      one table of cases from BIDS, CSV, Decathlon, BraTS, image folders (adapters)
    preprocess    from a stored scan to model input and back (geometry, intensity, skullstrip)
    augment       batched augmentation on any device
    cache         preprocessed tensors keyed by the preprocessing settings
    prepfigures   before/after figures for preprocessing

Models and training (notebooks 03-05):
    features      handcrafted features for the classical baselines
    models        MLP, 2D/3D CNN, CNN+GRU, U-Net, configurable in depth and width
    training_data dataset -> tensors for each task
    train         the training engine (mixed precision, checkpoints, resume); distributed

Evaluation and deployment (notebooks 06-08):
    metrics       classification and segmentation scores with bootstrap intervals; plots
    evaluate      a run's held-out test scores, failures and the comparison table
    explain       Grad-CAM, occlusion and their sanity checks
    export        TorchScript, ONNX and the model card
    predict       a trained model on new scans, outputs on the scan's own grid; report

Command-line entry points: ``python -m helpers.simulate``, ``helpers.datasets``,
``helpers.preprocess``, ``helpers.cache``, ``helpers.train``, ``helpers.evaluate``,
``helpers.explain``, ``helpers.export``, ``helpers.predict``, ``helpers.viewer``,
``helpers.series``.
"""

__version__ = "0.1.0"
