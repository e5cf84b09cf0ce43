"""File names of the preprocessed array cache, shared by the step that writes it and the readers."""

META_FILE = "meta.json"
# Every sample's split, group, slice and content hash (``dvpt_core.data.splits``), beside meta.json.
SPLITS_FILE = "splits.csv"
# Per split directory, plain .npy (mmap-able): uint8 N x S x S x 3 RGB images, and
# classification: int64 labels; segmentation: uint8 N x S x S label maps, and per slice the
# volume id (unicode; "" for 2D images) and slice index (int32; -1 for 2D) to restack volumes.
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
MASKS_FILE = "masks.npy"
VOLUMES_FILE = "volumes.npy"
SLICES_FILE = "slices.npy"
# Segmentation caches of 3D data, per split (``dvpt_core.data.cases``): each volume's shape, slice
# axis, slice indices, voxel spacing and affine (JSON), and for the evaluated splits its label
# volume at the original resolution (compressed .npz keyed by volume id), which evaluation scores
# the restacked predictions against.
VOLUME_INFO_FILE = "volumes.json"
VOLUME_LABELS_FILE = "volume_labels.npz"
