"""File names of the preprocessed array cache, shared by the step that writes it and the readers."""

META_FILE = "meta.json"
# Per split directory: uint8 N x S x S x 3 RGB images and int64 labels, plain .npy (mmap-able).
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
