"""Phase 2 and the machinery of both phases: phases as data, the training loop, the runner
that drives them, the choice of depth and learning rate, the frozen prefix, and the terms
added to the loss (feature alignment to unlabelled images, forgetting guards)."""
