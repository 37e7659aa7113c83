"""The items and their texts: the `cart corpus` stage and its sources (emoji, Karpathy, COCO, manifests,
folders), which texts train and which validate (`pairs.py`), and the image and shard helpers every stage uses."""
