"""Segmentation: lesions and tissues from MRI, and the measurements made on them."""
