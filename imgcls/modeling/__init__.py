"""Models and their artifact: architectures, losses, backbones, initial weights, the saved artifact and its checks."""
