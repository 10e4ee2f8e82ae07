"""Images in: listings (folders, prefixes, manifests; no Ray), bounded decoding, Ray Data datasets, augmentation."""
