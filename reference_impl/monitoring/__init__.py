"""Monitoring in production: is the service healthy, and is the model still right?

Chapter: "Monitoring in production". Modules, in the order the monitoring job uses them:

- ``features``: what we measure on each image (brightness, contrast, sharpness, noise, entropy, size) and on each
  prediction (softmax probabilities, confidence, a PCA-reduced embedding);
- ``profile``: the reference profile saved in the bundle at packaging time (reference samples, frozen decile bins,
  the PCA, a null pool for calibration, the temperature for calibrated confidence);
- ``drift``: the statistical tests (PSI on frozen bins, KS with a multiple-testing correction, MMD on embeddings,
  black-box shift detection on the softmax outputs) and their calibration to a false-alarm rate;
- ``integrity``: data-integrity checks (format, size, bit depth, unreadable inputs, volume), kept apart from drift;
- ``quality``: accuracy per window from late labels, and an estimate from calibrated confidence when none exist;
- ``job``: ``python -m reference_impl monitor``: windows of the prediction log -> every check -> results, gauges,
  Evidently reports;
- ``alerts`` and ``review``: alert rules and sinks; the human-in-the-loop review queue.
"""
