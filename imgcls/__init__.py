"""imgcls: distributed batch image classification on Ray."""
