"""The run's steps around the phases, each called once by ``trainer.run``: resuming, the
decisions before the phases, the phase-2 loss terms, and after the phases the adaptation
candidate, the Fisher information and calibration."""
