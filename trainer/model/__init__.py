"""The network: the torchvision classifier with its new head, its layer groups from input
to head, and the weights it starts from."""
