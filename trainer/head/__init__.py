"""Phase 1, the new head: frozen-backbone features cached once, a linear probe fitted on
them to convergence, and the stage that turns the probe into the model's head."""
