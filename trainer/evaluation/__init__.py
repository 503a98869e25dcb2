"""How good and how sure a model is: calibration, the abstention threshold, the chance
level, and the per-class report."""
